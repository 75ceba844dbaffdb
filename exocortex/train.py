"""The one training loop, shared by every training stage (pretrain, midtrain, sft, rl): they differ only in
data, loss mask and per-token weights (RL's advantages).

Muon (torch.optim.Muon) for the 2-D matrices inside the blocks, AdamW for embeddings, lm_head and norm
gains; linear warmup / constant / linear warmdown; gradient accumulation to a target batch in tokens;
bf16 autocast where the hardware supports it; optional torch.compile; periodic val loss; atomic
checkpoints; `resume=True` continues an interrupted run exactly (data order is a pure function of step).
Several processes (torchrun) train data-parallel: DDP, or FSDP2 with `parallel="fsdp"` (exocortex/distributed.py).
"""
from __future__ import annotations

import ctypes
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm import tqdm

from exocortex import distributed as dist
from exocortex.checkpoint import (autocast, clear_checkpoints, latest_checkpoint, load_state, resolve_dtype,
                                  save_checkpoint)
from exocortex.config import ExocortexError, ModelConfig, TrainConfig, atomic_write_text, lr_dim_scale
from exocortex.flops import peak_flops


class BatchSource(Protocol):
    """Deterministic batches: micro-batch number i always gives the same rows, so resume is exact.

    get() returns (inputs, targets) — mean cross-entropy over targets != -1 — or (inputs, targets, weights):
    the loss is then sum(weights * token cross-entropy), which is how RL passes advantages (already
    normalised by the source) through the same loop."""

    rows: int  # rows per micro-batch

    def get(self, index: int) -> tuple[torch.Tensor, ...]: ...


def build_optimizers(model: torch.nn.Module, t: TrainConfig) -> list[torch.optim.Optimizer]:
    width = model.cfg.n_embd
    scale = lr_dim_scale(width)
    matrices, embed, head, scalars = [], [], [], []
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            embed.append(p)
        elif "lm_head" in name:
            head.append(p)
        elif p.ndim == 2:
            matrices.append(p)
        else:
            scalars.append(p)
    adam_groups = [
        {"params": embed, "lr": t.embedding_lr * scale},
        {"params": head, "lr": t.unembedding_lr * scale},
        {"params": scalars, "lr": t.scalar_lr},
    ]
    # the fused kernel is one pass over each tensor: 13x faster than the default on CPU (d8: 13 vs 178 ms)
    kw = {"fused": True} if next(model.parameters()).device.type in ("cpu", "cuda") else {}
    adamw = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, **kw)
    # torch.optim.Muon runs Newton-Schulz in bf16: on a CPU without native bf16 (AVX2) that is ~40x slower than
    # float32 (tiny preset: 10.7 of a 13.4 s step), so there it runs in float32
    native_bf16 = resolve_dtype("auto", next(model.parameters()).device) == torch.bfloat16
    muon_cls = dist.ShardedMuon if dist.is_sharded(model) else torch.optim.Muon if native_bf16 else Float32Muon
    muon = muon_cls(matrices, lr=t.matrix_lr, momentum=0.95, weight_decay=t.weight_decay, adjust_lr_fn="original")
    if not native_bf16:
        muon.ns_dtype = torch.float32
    for opt in (adamw, muon):
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    return [adamw, muon]


class Float32Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in float32 (torch's is fixed to bf16), for devices
    without native bf16 matmuls. Same update otherwise: Nesterov momentum, "original" lr adjustment, decoupled
    weight decay (tests/test_train.py checks it against torch.optim.Muon)."""

    ns_dtype = torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["adjust_lr_fn"] not in (None, "original"):
                raise ValueError("Float32Muon implements the 'original' lr adjustment only")
            lr, mom = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)
                update = p.grad.lerp(buf, mom) if group["nesterov"] else buf
                ortho = dist._newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                            self.ns_dtype)
                A, B = p.shape[:2]
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(ortho, alpha=-lr * math.sqrt(max(1, A / B)))
        return loss


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of handing it back to the OS.

    A training step frees and re-allocates the same large buffers every step (the logits alone are 268 MB at
    vocab 32768 x 4096 tokens). glibc serves blocks over 32 MB with fresh mmaps and unmaps them on free, so
    every step page-faults them in again, which is slow (very slow in VMs). With mmap off and trimming off,
    freed blocks are reused: d8 on CPU, forward + backward 4.4 -> 4.1 s per micro-batch (bench/train.py).
    Small allocations can split a freed hole, so the heap may take one more block before it settles: d8's
    peak RSS 2,307 -> 2,350 MB, then flat (tests/test_train.py). CPU only; a no-op (False) off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def lr_multiplier(step: int, total: int, t: TrainConfig) -> float:
    warmup = max(1, round(t.warmup_frac * total)) if t.warmup_frac > 0 else 0
    warmdown = round(t.warmdown_frac * total)
    if step < warmup:
        return (step + 1) / warmup
    if warmdown > 0 and step >= total - warmdown:
        frac = (total - step) / warmdown
        return frac + (1 - frac) * t.final_lr_frac
    return 1.0


@dataclass
class TrainResult:
    stage: str
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    final_train_loss: float
    final_val_loss: float | None
    checkpoint: str
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False  # a step_hook stopped the run; `checkpoint` is the last one before that
    flops: float = 0.0  # training FLOPs done (model.flops_per_token() x tokens)
    mfu: float | None = None  # flops / (seconds x peak FLOP/s of all ranks); None where the peak is unknown


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


@torch.no_grad()
def evaluate_loss(model, batches: list[tuple[torch.Tensor, torch.Tensor]], device, dtype) -> float:
    """Mean loss per target token; ranks split the batches and add up their sums."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    world, n = dist.world_size(), len(batches)
    for i in range(dist.rank(), -(-n // world) * world, world):  # same count on every rank: FSDP's collectives
        x, y = batches[min(i, n - 1)]
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            loss = model(x, y, reduction="sum")
        if i < n:
            sums[0] += loss.double()
            sums[1] += (y != -1).sum()
    dist.all_reduce_sum(sums)
    model.train()
    return (sums[0] / sums[1].clamp(min=1)).item()


def _load_resumable(run_dir: Path, stage: str, model, optimizers) -> tuple[Path, dict]:
    """Load the newest checkpoint that reads back whole; a corrupt one (truncated by a crash or a full disk)
    is skipped with a warning and the one before it is used."""
    from safetensors.torch import load_file

    candidates = [c for c in [latest_checkpoint(run_dir, stage)] if c is not None]
    root = Path(run_dir) / "checkpoints" / stage
    candidates += [c for c in sorted(root.glob("step_*"), reverse=True) if c.is_dir() and c not in candidates]
    for ckpt in candidates:
        try:
            weights = load_file(str(ckpt / "model.safetensors"))
            state = load_state(ckpt)
            if dist.is_sharded(model):  # checkpoints are whole either way: FSDP re-shards them on load
                dist.load_full_model_state(model, weights)
                for opt, s in zip(optimizers, state["optimizers"]):
                    dist.load_optimizer_state(opt, s)
            else:
                model.load_state_dict(weights)
                for opt, s in zip(optimizers, state["optimizers"]):
                    opt.load_state_dict(s)
            return ckpt, state
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped the same way
            print(f"warning: skipping unreadable checkpoint {ckpt} ({type(e).__name__}: {str(e)[:80]})")
    raise ExocortexError(f"--resume: no readable '{stage}' checkpoint in {run_dir} to resume from")


def train(model: torch.nn.Module, t: TrainConfig, stage: str, run_dir: Path, source: BatchSource,
          val_batches: list, device: torch.device, dtype: torch.dtype, total_steps: int | None = None,
          resume: bool = False, meta: dict | None = None,
          on_checkpoint: Callable[[Path], None] | None = None,
          step_hook: Callable[[int, dict], bool] | None = None, logger=None) -> TrainResult:
    """Train `model` in place; returns a summary. Budget: total_steps, else t.time_minutes (measured).

    step_hook(step, record) runs after every optimizer step; it may add metrics to the record and returns
    True to stop the run early *without* a final checkpoint (RL's degeneration guard), so the newest
    checkpoint on disk is one from before the problem. `logger` (exocortex.logger.MetricsLogger) also gets
    every record. With t.parallel == "fsdp" the model is left sharded: run any later forward on every rank."""
    run_dir = Path(run_dir)
    if device.type == "cpu":
        keep_freed_memory()
    model.to(device).train()
    cfg: ModelConfig = model.cfg
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main()
    tokens_per_micro = source.rows * cfg.seq_len
    accum = max(1, t.batch_tokens // (tokens_per_micro * world))  # micro-batches per rank per step
    tokens_per_step = accum * tokens_per_micro * world
    if t.parallel not in ("ddp", "fsdp"):
        raise ExocortexError(f"{stage}.parallel={t.parallel}: expected ddp or fsdp")
    wrapped = model
    if t.parallel == "fsdp":  # shard first: the optimizers must see the sharded parameters
        wrapped = dist.apply_fsdp(model, param_dtype=None if dtype == torch.float32 else dtype)
    optimizers = build_optimizers(model, t)
    sharded = dist.is_sharded(model)
    if world > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(wrapped, dynamic=False) if t.compile else wrapped
    flops_per_token = model.flops_per_token()
    peak = peak_flops(device, dtype)  # one rank's; None where unknown

    log_path = run_dir / "logs" / f"{stage}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    step, elapsed = 0, 0.0
    if not resume and main:
        clear_checkpoints(run_dir, stage)  # a fresh run supersedes old checkpoints: --resume must never find them
    dist.barrier()
    if resume:
        ckpt, state = _load_resumable(run_dir, stage, model, optimizers)
        _set_rng_state(state["rng"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        total_steps = state["total_steps"]
        if state.get("done"):
            print(f"{stage}: already finished at step {step}; nothing to resume")
        else:
            print(f"{stage}: resuming from {ckpt.name} (step {step}/{total_steps})")
    if main:
        atomic_write_text(log_path, "".join(json.dumps(h) + "\n" for h in history))

    time_budget = t.time_minutes * 60 if total_steps is None else None
    if total_steps is None and not t.time_minutes:
        raise ExocortexError(f"{stage}: no budget; set max_steps, tokens_per_param, epochs or time_minutes")
    provisional = total_steps or 10_000  # until the time budget has measured a step
    timed_steps, timed_seconds, retimed, first_two = 0, 0.0, False, 0.0

    def checkpoint(done: bool = False) -> Path | None:
        weights = None
        if sharded:  # every rank sends its shards; rank 0 gets whole tensors, and the same layout DDP saves
            weights = dist.full_model_state(model)
            opt_states = [dist.full_optimizer_state(o) for o in optimizers]
        if not main:  # rank 0 writes; weights and optimizer states are identical on every rank
            return None
        state = {"optimizers": opt_states if sharded else [o.state_dict() for o in optimizers], "rng": _rng_state(),
                 "step": step, "elapsed": elapsed, "history": history, "total_steps": total_steps or provisional,
                 "done": done}
        path = save_checkpoint(run_dir, stage, step, model, cfg, state,
                               {"tokens": step * tokens_per_step, **(meta or {})}, keep=t.keep_checkpoints,
                               weights=weights)
        if on_checkpoint:
            on_checkpoint(path)
        return path

    last_val = None
    last_loss = float("nan")
    interactive = sys.stderr.isatty()
    bar = tqdm(total=total_steps or None, initial=step, desc=stage, unit="step", dynamic_ncols=True,
               disable=not (interactive and main))
    last_print = time.time()
    ckpt_path = None
    stopped = False
    try:
        while total_steps is None or step < total_steps:
            t0 = time.perf_counter()
            total = total_steps or provisional
            mult = lr_multiplier(step, total, t)
            for opt in optimizers:
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * mult
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                batch = source.get((step * accum + micro) * world + rank)
                x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
                # DDP all-reduces (FSDP reduce-scatters) gradients on the last micro-batch only
                sync = micro == accum - 1 or world == 1
                with dist.gradient_sync(wrapped, sync), autocast(device, dtype):
                    if len(batch) == 3:  # weighted tokens (RL): weights already carry the normalisation
                        loss = (fwd(x, y, reduction="none").view_as(y) * batch[2].to(device)).sum()
                    else:
                        loss = fwd(x, y)
                    (loss / accum).backward()
                loss_sum += loss.detach()
            if world > 1:
                loss_sum = dist.all_reduce_sum(loss_sum) / world
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            step += 1
            last_loss = (loss_sum / accum).item()  # one sync per step, for the progress bar
            if not math.isfinite(last_loss):
                raise ExocortexError(f"{stage}: loss became {last_loss} at step {step}; lower the learning rates "
                                     f"(--set {stage}.matrix_lr=...) or check the data")
            dt = time.perf_counter() - t0
            elapsed += dt
            # the time budget measures real steps (after the first two, which include compilation), then
            # re-measures once at 30% of the budget, still in the constant-LR phase, so evals, checkpoints
            # and a slower machine are all counted
            if time_budget is not None and step > 2:
                timed_steps += 1
                timed_seconds += dt
                if timed_steps == 5 or (timed_steps > 5 and not retimed and elapsed > 0.3 * time_budget):
                    retimed = timed_steps > 5
                    per_step = (elapsed - first_two) / (step - 2) if retimed else timed_seconds / timed_steps
                    total_steps = dist.broadcast_int(step + max(1, int((time_budget - elapsed) / per_step)))
                    bar.total = total_steps
                    bar.refresh()
            if step == 2:
                first_two = elapsed
            record = {"step": step, "loss": last_loss, "lr_mult": mult, "tokens": step * tokens_per_step,
                      "elapsed": round(elapsed, 3), "tok_per_s": tokens_per_step / dt}
            if peak:  # model FLOPs utilisation of this step
                record["mfu"] = round(tokens_per_step / dt * flops_per_token / (peak * world), 4)
            is_last = total_steps is not None and step >= total_steps
            if val_batches and (step % t.eval_every == 0 or is_last):
                te = time.perf_counter()
                last_val = evaluate_loss(model, val_batches, device, dtype)
                record["val_loss"] = last_val
                elapsed += time.perf_counter() - te  # evals count against a time budget too
            if step_hook is not None:
                th = time.perf_counter()
                stopped = bool(step_hook(step, record))
                elapsed += time.perf_counter() - th  # hook work (RL's held-out evals) counts against the budget
            history.append(record)
            if main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if logger is not None:
                logger.log(stage, record)
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}",
                            **({"val": f"{last_val:.3f}"} if last_val is not None else {}))
            bar.update(1)
            if main and not interactive and (time.time() - last_print > 20 or is_last):
                # logs and CI get a plain line every ~20 s instead of a progress bar
                last_print = time.time()
                eta = f"{(total_steps - step) * elapsed / max(1, step) / 60:.1f} min" if total_steps else "?"
                print(f"{stage}: step {step}/{total_steps or '?'} loss {last_loss:.3f}"
                      + (f" val {last_val:.3f}" if last_val is not None else "")
                      + f" | {tokens_per_step / dt:,.0f} tok/s | {elapsed / 60:.1f} min, ETA {eta}", flush=True)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and not is_last and not stopped:
                tc = time.perf_counter()
                checkpoint()
                elapsed += time.perf_counter() - tc
            if stopped:
                break
        if stopped:  # keep the newest checkpoint from before the problem as the stage's result
            ckpt_path = latest_checkpoint(run_dir, stage) if main else None
        elif last_val is None and val_batches:  # e.g. resuming a run that had already finished
            last_val = evaluate_loss(model, val_batches, device, dtype)
        if not stopped:
            ckpt_path = checkpoint(done=True)
        dist.barrier()
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        bar.close()
        raise ExocortexError(f"{stage}: out of memory at step {step + 1} with {source.rows} rows x {cfg.seq_len} "
                             f"tokens per micro-batch; try --set {stage}.device_batch={max(1, source.rows // 2)} "
                             f"(gradient accumulation keeps the same batch_tokens)") from None
    except KeyboardInterrupt:
        bar.close()
        if step > 0:
            p = checkpoint()
            raise ExocortexError(f"{stage}: interrupted at step {step}; saved {p}. Continue with --resume") from None
        raise ExocortexError(f"{stage}: interrupted before the first step") from None
    bar.close()
    tokens = step * tokens_per_step
    flops = float(tokens * flops_per_token)
    return TrainResult(stage=stage, steps=step, tokens=tokens, seconds=elapsed,
                       tokens_per_second=tokens / max(elapsed, 1e-9), final_train_loss=last_loss,
                       final_val_loss=last_val, checkpoint=str(ckpt_path), history=history, stopped_early=stopped,
                       flops=flops, mfu=flops / (elapsed * peak * world) if peak and elapsed > 0 else None)
