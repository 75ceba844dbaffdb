"""App `export`: the run's chat model for other runtimes: a Hugging Face transformers directory (hf.py) or one
GGUF file for llama.cpp / Ollama (gguf.py), with weights, tokenizer and chat template."""
from __future__ import annotations

from pathlib import Path

from exocortex.apps.export.gguf import export_gguf, verify_gguf
from exocortex.apps.export.hf import export_hf, verify_hf
from exocortex.config import RunConfig


def run_export(cfg: RunConfig, format: str = "hf", out: str | None = None, stage: str | None = None,
               dtype: str | None = None, verify: bool = False) -> Path:
    """Export `stage`'s checkpoint (default: the newest chat stage) to `out` (default: under the run)."""
    name = stage or cfg.run.chat_checkpoint().parent.name
    if format == "gguf":
        dtype = dtype or "float16"
        suffix = f"-{stage}" if stage else ""
        path = Path(out) if out else cfg.run_dir / "gguf" / f"{cfg.run_dir.name}{suffix}-{dtype}.gguf"
        export_gguf(cfg.run_dir, path, stage=name, dtype=dtype)
        print(f"exported the {name} model to {path} (run with llama.cpp: llama-cli -m {path} --jinja)")
        if verify:
            print(f"verified against exocortex: {verify_gguf(path, cfg.run_dir, name)}")
        return path
    path = Path(out) if out else cfg.run_dir / ("hf" if not stage else f"hf-{stage}")
    export_hf(cfg.run_dir, path, stage=name, dtype=dtype or "float32")
    print(f"exported the {name} model to {path} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    if verify:
        print(f"verified against exocortex: {verify_hf(path, cfg.run_dir, name)}")
    return path
