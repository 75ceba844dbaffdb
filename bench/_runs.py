"""A run directory to benchmark when none is given: a preset's shape, a real tokenizer, random weights."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def synthetic_run(root: Path, preset: str = "tiny", text_bytes: int = 2_000_000) -> Path:
    """`root/bench-<preset>`: config, tokenizer (trained on `text_bytes` of the generated world; its vocabulary
    may come out smaller than the preset's), and an sft checkpoint of random weights (no training: replies
    run to max_tokens, which makes a fixed workload)."""
    import torch

    from exocortex.checkpoint import save_checkpoint
    from exocortex.config import make_config, save_config
    from exocortex.data.world import generate_documents
    from exocortex.model import GPT
    from exocortex.tokenizer import Tokenizer

    cfg = make_config(preset, name=f"bench-{preset}")
    cfg.runs_dir = str(root)
    tok = Tokenizer.train(generate_documents(0, target_bytes=text_bytes), cfg.tokenizer.vocab_size)
    cfg.model.vocab_size = cfg.tokenizer.vocab_size = tok.vocab_size
    save_config(cfg)
    tok.save(cfg.run_dir / "tokenizer")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.05)
    save_checkpoint(cfg.run_dir, "sft", 0, model, cfg.model)
    return cfg.run_dir
