"""Atomic checkpoints: weights, training state and metadata of one step.

Layout: runs/<name>/checkpoints/<stage>/step_XXXXXX/{model.safetensors, state.pt, meta.json} and a `latest`
file naming the newest complete one. A checkpoint directory is written under a temporary name and renamed
into place, so a crash mid-write never leaves a checkpoint that looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from exocortex.config import ModelConfig
from exocortex.errors import ExocortexError
from exocortex.fileio import atomic_write_text
from exocortex.model import GPT
from exocortex.run import RunDir


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir: Path, stage: str, step: int, model: torch.nn.Module, model_cfg: ModelConfig,
                    state: dict | None = None, meta: dict | None = None, keep: int = 0,
                    weights: dict | None = None) -> Path:
    """Write model weights (safetensors), training state (optimizer, RNG, loader position) and metadata.
    `weights` replaces model.state_dict() when given (an FSDP model's weights gathered whole)."""
    from safetensors.torch import save_file

    root = RunDir(run_dir).checkpoints(stage)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    for stale in root.glob(".tmp_step_*"):  # left by a run killed mid-write (kill -9, power loss)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp_step_{step:06d}_{os.getpid()}"
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in (model.state_dict() if weights is None else weights).items()}
    save_file(weights, str(tmp / "model.safetensors"))
    if state is not None:
        torch.save(state, tmp / "state.pt")
    m = {"stage": stage, "step": step, "model_config": model_cfg.__dict__, **(meta or {})}
    (tmp / "meta.json").write_text(json.dumps(m, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name)
    if keep > 0:
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_model(ckpt_dir: Path, device: torch.device | str = "cpu"):
    """Rebuild the model from a checkpoint directory (config travels in meta.json)."""
    from safetensors.torch import load_file

    meta = json.loads((Path(ckpt_dir) / "meta.json").read_text())
    cfg = ModelConfig(**meta["model_config"])
    model = GPT(cfg)
    try:
        model.load_state_dict(load_file(str(Path(ckpt_dir) / "model.safetensors")))
    except Exception as e:  # corrupt or mismatched file: say which
        raise ExocortexError(f"cannot load weights from {ckpt_dir}: {e}") from None
    return model.to(device), meta


def load_state(ckpt_dir: Path) -> dict:
    return torch.load(Path(ckpt_dir) / "state.pt", weights_only=False)
