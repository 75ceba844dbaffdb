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

from exocortex.config import ModelConfig, section_from_dict
from exocortex.errors import ExocortexError, first_line
from exocortex.fileio import atomic_write_text, fsync_path, fsync_tree, read_json_object, remove_tree
from exocortex.model import GPT
from exocortex.run import RunDir
from exocortex.tokenizer import Tokenizer


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir: Path, stage: str, step: int, model: torch.nn.Module, model_cfg: ModelConfig,
                    state: dict | None = None, meta: dict | None = None, keep: int = 0,
                    weights: dict | None = None) -> Path:
    """Write model weights (safetensors), training state (optimizer, RNG, loader position) and metadata.
    `weights` replaces model.state_dict() when given (an FSDP model's weights gathered whole).

    Order, so that a crash at any point leaves a complete checkpoint to load and resume from: the new one is
    written and fsynced under a temp name, renamed into place, named in `latest`; only then are the old
    ones this one supersedes removed (the set-aside ones of a previous run, any newer ones from a branch that was
    rolled back or resumed before, the oldest beyond `keep`)."""
    run = RunDir(run_dir)
    root = run.checkpoints(stage)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp_step_*"):  # left by a run killed mid-write (remove_tree sweeps its trash)
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
                                 f"{first_line(e, 160)}); the previous one is intact, continue with --resume once "
                                 f"there is room") from None
        raise
    # the same step written again (resuming a finished run): for a moment `latest` names nothing, and the
    # checkpoint before it counts
    remove_tree(final)
    os.replace(tmp, final)
    fsync_path(root)
    atomic_write_text(root / "latest", final.name)
    run.drop_superseded(stage)
    run.prune_checkpoints(stage, final, keep)
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
    """Rebuild the model from a checkpoint directory (config travels in meta.json). Every file is checked:
    a damaged one is a one-line error naming it."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    meta, cfg = read_meta(ckpt_dir)
    _check_vocab(ckpt_dir, cfg)
    model = GPT(cfg)
    path = ckpt_dir / "model.safetensors"
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as e:  # truncated, garbage or another shape: which file, and the first line of why
        raise ExocortexError(f"cannot load weights from {path}: {first_line(e)}") from None
    return model.to(device), meta


def read_meta(ckpt_dir: Path) -> tuple[dict, ModelConfig]:
    """meta.json, and its model_config checked like config.json's (types, ranges, shape)."""
    path = Path(ckpt_dir) / "meta.json"
    meta = read_json_object(path, "the checkpoint is damaged: remove it to use the one before, or train the "
                                  "stage again")
    if not isinstance(meta.get("step"), int) or "model_config" not in meta:
        raise ExocortexError(f"{path} is damaged: it needs an object with 'step' and 'model_config'")
    try:
        cfg = section_from_dict(ModelConfig, meta["model_config"], "model_config")
    except ExocortexError as e:
        raise ExocortexError(f"{path}: {e}") from None
    return meta, cfg


def _check_vocab(ckpt_dir: Path, cfg: ModelConfig) -> None:
    """A checkpoint inside a run (runs/<name>/checkpoints/<stage>/step_X) must match that run's tokenizer:
    a tokenizer trained again with another vocabulary would make the model answer garbage."""
    run = RunDir(ckpt_dir.parents[2]) if len(ckpt_dir.parents) > 2 else None
    if run is None or ckpt_dir.parents[1].name != "checkpoints" or not run.tokenizer_dir.exists():
        return
    tok = Tokenizer.load(run.tokenizer_dir)
    if tok.vocab_size != cfg.vocab_size:
        raise ExocortexError(f"{ckpt_dir} was trained with a vocabulary of {cfg.vocab_size} tokens but "
                             f"{run.tokenizer_dir} has {tok.vocab_size}: the tokenizer was replaced after training")


def load_state(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "state.pt"
    try:
        state = torch.load(path, weights_only=False)
    except Exception as e:  # truncated or garbage: torch raises many kinds
        raise ExocortexError(f"cannot load the training state {path}: {first_line(e)}") from None
    if not isinstance(state, dict):
        raise ExocortexError(f"{path} is damaged: not a training state")
    return state
