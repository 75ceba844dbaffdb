"""Devices, precision, and atomic checkpoints.

Layout: runs/<name>/checkpoints/<stage>/step_XXXXXX/{model.safetensors, state.pt, meta.json} and a `latest`
file naming the newest complete one. A checkpoint directory is written under a temporary name and renamed
into place, so a crash mid-write never leaves a checkpoint that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from exocortex.config import ExocortexError, ModelConfig, atomic_write_text


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())  # torchrun: set per rank
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware computes it natively (GPUs, CPUs with AVX512-BF16/AMX), else fp32."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        fast = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
            getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if fast else torch.float32
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- checkpoints

def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "checkpoints" / stage


def save_checkpoint(run_dir: Path, stage: str, step: int, model: torch.nn.Module, model_cfg: ModelConfig,
                    state: dict | None = None, meta: dict | None = None, keep: int = 0,
                    weights: dict | None = None) -> Path:
    """Write model weights (safetensors), training state (optimizer, RNG, loader position) and metadata.
    `weights` replaces model.state_dict() when given (an FSDP model's weights gathered whole)."""
    from safetensors.torch import save_file

    root = stage_dir(run_dir, stage)
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


def latest_checkpoint(run_dir: Path, stage: str) -> Path | None:
    """Newest complete checkpoint of a stage, skipping any that is missing files (with a warning)."""
    root = stage_dir(run_dir, stage)
    if not root.exists():
        return None
    pointer = root / "latest"
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if (named / "model.safetensors").exists() and (named / "meta.json").exists():
            return named
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    for c in candidates:
        if (c / "model.safetensors").exists() and (c / "meta.json").exists():
            return c
        print(f"warning: skipping incomplete checkpoint {c}")
    return None


def clear_checkpoints(run_dir: Path, stage: str) -> None:
    root = stage_dir(run_dir, stage)
    if root.exists():
        shutil.rmtree(root)


def require_checkpoint(run_dir: Path, stage: str, hint: str) -> Path:
    ckpt = latest_checkpoint(run_dir, stage)
    if ckpt is None:
        raise ExocortexError(f"{run_dir} has no '{stage}' checkpoint; run `{hint}` first")
    return ckpt


def load_model(ckpt_dir: Path, device: torch.device | str = "cpu"):
    """Rebuild the model from a checkpoint directory (config travels in meta.json)."""
    from safetensors.torch import load_file

    from exocortex.model import GPT

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
