"""Atomic checkpoints: weights, training state and metadata of one step.

Layout: runs/<name>/checkpoints/<stage>/step_XXXXXX/{model.safetensors, state.pt, meta.json} and a `latest`
file naming the newest complete one. A checkpoint directory is written under a temporary name, fsynced and
renamed into place, so a crash mid-write never leaves a checkpoint that looks complete; old checkpoints go only
after a new one is complete (run.py: a fresh run sets them aside first).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from exocortex.config import ModelConfig
from exocortex.errors import ExocortexError
from exocortex.fileio import atomic_write_text, fsync_path, fsync_tree, remove_tree
from exocortex.model import GPT
from exocortex.run import RunDir


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir: Path, stage: str, step: int, model: torch.nn.Module, model_cfg: ModelConfig,
                    state: dict | None = None, meta: dict | None = None, keep: int = 0,
                    weights: dict | None = None) -> Path:
    """Write model weights (safetensors), training state (optimizer, RNG, loader position) and metadata.
    `weights` replaces model.state_dict() when given (an FSDP model's weights gathered whole).

    Order, so that a crash at any point leaves a complete checkpoint to load and resume from: the new one is
    written and fsynced under a temp name, renamed into place, named in `latest`; only then are the old
    ones this one supersedes removed (the pruned beyond `keep`, the set-aside ones of a previous run)."""
    run = RunDir(run_dir)
    root = run.checkpoints(stage)
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".tmp_step_*"), *root.glob(".trash_*")]:  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}_{os.getpid()}"
    try:
        _write_checkpoint_files(tmp, model, weights, state,
                                {"stage": stage, "step": step, "model_config": model_cfg.__dict__, **(meta or {})})
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception):  # a full disk, a file size limit: the last good checkpoint is untouched
            raise ExocortexError(f"{stage}: could not write checkpoint {final} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:160] if str(e) else ''}); the previous one is intact, "
                                 f"continue with --resume once there is room") from None
        raise
    # the same step written again (resuming a finished run): for a moment `latest` names nothing, and the
    # checkpoint before it counts
    remove_tree(final)
    os.replace(tmp, final)
    fsync_path(root)
    atomic_write_text(root / "latest", final.name)
    run.drop_previous_checkpoints(stage)
    if keep > 0:
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            remove_tree(old)
    return final


def _write_checkpoint_files(tmp: Path, model, weights: dict | None, state: dict | None, meta: dict) -> None:
    from safetensors.torch import save_file

    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in (model.state_dict() if weights is None else weights).items()}
    save_file(weights, str(tmp / "model.safetensors"))
    if state is not None:
        torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    fsync_tree(tmp)


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
