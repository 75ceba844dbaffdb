"""Stage `sft`: teach the base model the chat format, its identity, and tool calls.

Same training loop as pretraining; the data are rendered conversations packed into rows, and the loss
mask keeps only what the assistant writes (its text, its tool calls, <|assistant_end|>).
"""
from __future__ import annotations

import math

import numpy as np

import torch

from exocortex import distributed
from exocortex.checkpoint import load_model, require_checkpoint, resolve_device, resolve_dtype
from exocortex.config import RunConfig, save_config
from exocortex.data.loader import PackedRows, pack_conversations
from exocortex.tokenizer import Tokenizer


def build_sft_rows(tok: Tokenizer, conversations: list[dict], seq_len: int):
    rendered = [tok.render_conversation(c) for c in conversations]
    return pack_conversations(rendered, seq_len, tok.bos_id)


def mix_in_text(cfg: RunConfig, x: np.ndarray, y: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Add plain pretraining rows (loss on every token) so finetuning does not erase the base model's
    knowledge; rows are a deterministic sample of the tokenized corpus."""
    from exocortex.pretrain import load_token_data

    train_tokens, _ = load_token_data(cfg)
    T = x.shape[1]
    n_text = int(len(x) * fraction / (1 - fraction))
    n_avail = (len(train_tokens) - 1) // T
    rows = np.random.default_rng(cfg.sft_data.seed).choice(n_avail, size=min(n_text, n_avail), replace=False)
    chunk = np.stack([np.asarray(train_tokens[r * T:r * T + T + 1], dtype=np.int64) for r in rows])
    return np.concatenate([x, chunk[:, :-1]]), np.concatenate([y, chunk[:, 1:]])


def run_sft(cfg: RunConfig, resume: bool = False) -> dict:
    from exocortex.data.world import World
    from exocortex.pretrain import write_summary
    from exocortex.tasks import sft_conversations
    from exocortex.train import train

    tok = Tokenizer.load(cfg.run_dir / "tokenizer")
    device = resolve_device(cfg.device)
    t = cfg.sft
    dtype = resolve_dtype(t.dtype, device)
    base_ckpt = require_checkpoint(cfg.run_dir, "pretrain", f"exocortex pretrain --run {cfg.name}")
    model, _ = load_model(base_ckpt, device)
    world = World(seed=cfg.data.world_seed)
    s = cfg.sft_data
    train_convs = sft_conversations(s.n_conversations, s.seed, world, "train")
    val_convs = sft_conversations(max(64, s.n_conversations // 50), s.seed + 1, world, "test")
    seq_len = model.cfg.seq_len
    x, y = build_sft_rows(tok, train_convs, seq_len)
    vx, vy = build_sft_rows(tok, val_convs, seq_len)
    if s.text_fraction > 0:
        x, y = mix_in_text(cfg, x, y, s.text_fraction)
    source = PackedRows(x, y, t.device_batch, seed=cfg.seed)
    val = PackedRows(vx, vy, t.device_batch).batches()
    rows_per_step = max(1, t.batch_tokens // (t.device_batch * seq_len)) * t.device_batch
    steps = t.max_steps or max(1, math.ceil(t.epochs * len(x) / rows_per_step))
    print(f"sft: {len(train_convs):,} conversations packed into {len(x):,} rows of {seq_len} "
          f"({s.text_fraction:.0%} plain text); {steps} steps ({t.epochs:g} epochs)")
    if distributed.is_main():
        save_config(cfg)
    torch.manual_seed(cfg.seed + 1)
    res = train(model, t, "sft", cfg.run_dir, source, val, device, dtype, total_steps=steps, resume=resume,
                meta={"base": str(base_ckpt)})
    if not distributed.is_main():
        return {}
    summary = {"conversations": len(train_convs), "rows": int(len(x)), "steps": res.steps, "tokens": res.tokens,
               "seconds": res.seconds, "tokens_per_second": res.tokens_per_second,
               "final_train_loss": res.final_train_loss, "final_val_loss": res.final_val_loss,
               "checkpoint": res.checkpoint}
    write_summary(cfg.run_dir, "sft", summary)
    print(f"sft: {res.steps} steps in {res.seconds:.0f}s; val loss {res.final_val_loss:.3f}")
    return summary
