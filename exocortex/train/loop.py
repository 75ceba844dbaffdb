"""The one training loop, shared by every training stage (pretrain, midtrain, sft, rl): they differ only in
data, loss mask and per-token weights (RL's advantages).

A step: set the learning rates (budget.py), accumulate gradients over micro-batches to `batch_tokens`, clip,
step the optimizers (optim.py); then val loss every `eval_every`, the hooks, metrics (metrics.py) and a periodic
atomic checkpoint. Several processes (torchrun) train data-parallel: DDP, or FSDP2 with `parallel="fsdp"`
(parallel.py). `resume=True` continues an interrupted run exactly: data order is a pure function of the step,
and optimizer, RNG and schedule state travel in the checkpoint.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from exocortex.checkpoint import load_state, save_checkpoint
from exocortex.config import TrainConfig
from exocortex.device import autocast, keep_freed_memory
from exocortex.errors import ExocortexError
from exocortex.run import RunDir
from exocortex.train import parallel as dist
from exocortex.train.budget import StepBudget, lr_multiplier
from exocortex.train.flops import peak_flops
from exocortex.train.metrics import MetricsSink, Progress
from exocortex.train.optim import build_optimizers

# after every optimizer step: hook(step, record) may add metrics to the record; a string it returns stops the
# run there (the reason), without a final checkpoint, so the newest one on disk is from before the problem
Hook = Callable[[int, dict], "str | None"]


class BatchSource(Protocol):
    """Deterministic batches: micro-batch number i always gives the same rows, so resume is exact.

    get() returns (inputs, targets) — mean cross-entropy over targets != -1 — or (inputs, targets, weights):
    the loss is then sum(weights * token cross-entropy), which is how RL passes advantages (already
    normalised by the source) through the same loop."""

    rows: int  # rows per micro-batch

    def get(self, index: int) -> tuple[torch.Tensor, ...]: ...


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
    stop_reason: str | None = None  # a hook stopped the run; `checkpoint` is then the newest one before that
    flops: float = 0.0  # training FLOPs done (model.flops_per_token() x tokens)
    mfu: float | None = None  # flops / (seconds x peak FLOP/s of all ranks); None where the peak is unknown


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def train(model: torch.nn.Module, t: TrainConfig, stage: str, run_dir: Path, source: BatchSource,
          val_batches: list, device: torch.device, dtype: torch.dtype, total_steps: int | None = None,
          resume: bool = False, meta: dict | None = None, hooks: tuple[Hook, ...] = (),
          metrics: MetricsSink | None = None, lr_scale: float = 1.0) -> TrainResult:
    """Train `model` in place; returns a summary. Budget: total_steps, else t.time_minutes (measured).
    `metrics` defaults to the stage's jsonl alone. With t.parallel == "fsdp" the model is left sharded: run any
    later forward on every rank."""
    metrics = metrics or MetricsSink(stage, RunDir(run_dir).log_path(stage))
    trainer = None
    try:
        trainer = _Trainer(model, t, stage, RunDir(run_dir), source, val_batches, device, dtype, meta, lr_scale)
        trainer.begin(total_steps, resume, metrics)
        while not trainer.budget.done(trainer.step):
            record = trainer.train_step()
            if trainer.after_step(record, hooks):
                break
        trainer.finish()
    except (torch.cuda.OutOfMemoryError, MemoryError):
        at = trainer.step + 1 if trainer is not None else 1
        raise ExocortexError(f"{stage}: out of memory at step {at} with {source.rows} rows x "
                             f"{model.cfg.seq_len} tokens per micro-batch; try --set {stage}.device_batch="
                             f"{max(1, source.rows // 2)} (gradient accumulation keeps the same batch_tokens)") from None
    except KeyboardInterrupt:
        if trainer is not None and trainer.step > 0 and trainer.budget is not None:
            p = trainer.checkpoint()
            raise ExocortexError(f"{stage}: interrupted at step {trainer.step}; saved {p}. Continue with --resume") from None
        raise ExocortexError(f"{stage}: interrupted before the first step") from None
    finally:
        if trainer is not None:
            trainer.close()
        metrics.close()  # idempotent: also when the trainer never got it
    return trainer.result()


class _Trainer:
    """The state of one training run (step, elapsed time, history) and the parts of a step; train() drives it."""

    def __init__(self, model, t: TrainConfig, stage: str, run: RunDir, source: BatchSource, val_batches: list,
                 device: torch.device, dtype: torch.dtype, meta: dict | None, lr_scale: float):
        if device.type == "cpu":
            keep_freed_memory()
        self.model, self.t, self.stage, self.run, self.source, self.val_batches = model, t, stage, run, source, val_batches
        self.device, self.dtype, self.meta = device, dtype, meta or {}
        model.to(device).train()
        self.world = dist.world_size()
        tokens_per_micro = source.rows * model.cfg.seq_len
        self.accum = max(1, t.batch_tokens // (tokens_per_micro * self.world))  # micro-batches per rank per step
        self.tokens_per_step = self.accum * tokens_per_micro * self.world
        self.wrapped = model
        if t.parallel == "fsdp":  # shard first: the optimizers must see the sharded parameters
            self.wrapped = dist.apply_fsdp(model, param_dtype=None if dtype == torch.float32 else dtype)
        self.optimizers = build_optimizers(model, t, lr_scale)
        if self.world > 1 and not dist.is_sharded(model):
            from torch.nn.parallel import DistributedDataParallel
            self.wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward = torch.compile(self.wrapped, dynamic=False) if t.compile else self.wrapped
        self.peak = peak_flops(device, dtype)  # one rank's; None where unknown
        self.step, self.elapsed, self.history = 0, 0.0, []
        self.last_loss, self.last_val, self.stop_reason, self.ckpt_path = float("nan"), None, None, None
        self.metrics, self.progress, self.budget, self.resumed = None, None, None, False  # set by begin()

    def begin(self, total_steps: int | None, resume: bool, metrics: MetricsSink) -> None:
        self.metrics, self.resumed = metrics, resume
        if not resume and dist.is_main():
            # a fresh run supersedes the old checkpoints, but they stay until its first one is complete
            self.run.set_aside_checkpoints(self.stage)
        dist.barrier()
        if resume:
            ckpt, state = _load_resumable(self.run.path, self.stage, self.model, self.optimizers)
            _set_rng_state(state["rng"])
            self.step, self.elapsed, self.history = state["step"], state["elapsed"], state["history"]
            total_steps = state["total_steps"]
            print(f"{self.stage}: already finished at step {self.step}; nothing to resume" if state.get("done")
                  else f"{self.stage}: resuming from {ckpt.name} (step {self.step}/{total_steps})")
        self.budget = StepBudget(self.stage, total_steps, self.t.time_minutes, self.t.warmdown_frac)
        metrics.start(self.history)
        self.progress = Progress(self.stage, self.budget.total, self.step)

    def train_step(self) -> dict:
        """One optimizer step over `accum` micro-batches per rank; the step's record."""
        t0 = time.perf_counter()
        mult = lr_multiplier(self.step, self.budget.schedule_total, self.t)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * mult
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            loss_sum += self._micro_step(micro)
        if self.world > 1:
            loss_sum = dist.all_reduce_sum(loss_sum) / self.world
        if self.t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        self.step += 1
        self.last_loss = (loss_sum / self.accum).item()  # one sync per step, for the progress bar
        if not math.isfinite(self.last_loss):
            raise ExocortexError(f"{self.stage}: loss became {self.last_loss} at step {self.step}; lower the learning "
                                 f"rates (--set {self.stage}.matrix_lr=...) or check the data")
        dt = time.perf_counter() - t0
        self.elapsed += dt
        if self.budget.measure(self.step, dt, self.elapsed):
            self.progress.set_total(self.budget.total)
        record = {"step": self.step, "loss": self.last_loss, "lr_mult": mult, "tokens": self.step * self.tokens_per_step,
                  "elapsed": round(self.elapsed, 3), "tok_per_s": self.tokens_per_step / dt}
        if self.peak:  # model FLOPs utilisation of this step
            flops = self.tokens_per_step / dt * self.model.flops_per_token()
            record["mfu"] = round(flops / (self.peak * self.world), 4)
        return record

    def _micro_step(self, micro: int) -> torch.Tensor:
        batch = self.source.get((self.step * self.accum + micro) * self.world + dist.rank())
        x, y = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
        # DDP all-reduces (FSDP reduce-scatters) gradients on the last micro-batch only
        sync = micro == self.accum - 1 or self.world == 1
        with dist.gradient_sync(self.wrapped, sync), autocast(self.device, self.dtype):
            if len(batch) == 3:  # weighted tokens (RL): the weights already carry the normalisation
                loss = (self.forward(x, y, reduction="none").view_as(y) * batch[2].to(self.device)).sum()
            else:
                loss = self.forward(x, y)
            (loss / self.accum).backward()
        return loss.detach()

    def after_step(self, record: dict, hooks: tuple[Hook, ...]) -> bool:
        """Val loss, hooks, metrics and a periodic checkpoint; True when a hook stopped the run. Their time counts
        against a time budget."""
        last = self.budget.done(self.step)
        if self.val_batches and (self.step % self.t.eval_every == 0 or last):
            record["val_loss"] = self.last_val = self._timed(self._val_loss)
        for hook in hooks:
            self.stop_reason = self._timed(lambda: hook(self.step, record)) or self.stop_reason
        self.history.append(record)
        self.metrics.log(record)
        self.progress.update(record, last)
        if self.t.checkpoint_every and self.step % self.t.checkpoint_every == 0 and not last and not self.stop_reason:
            self._timed(self.checkpoint)
        return self.stop_reason is not None

    def _timed(self, fn):
        t0 = time.perf_counter()
        out = fn()
        self.elapsed += time.perf_counter() - t0
        return out

    def _val_loss(self) -> float:
        return evaluate_loss(self.model, self.val_batches, self.device, self.dtype)

    def finish(self) -> None:
        if self.stop_reason:  # the newest checkpoint from before the problem is the stage's result
            latest = self.run.latest_checkpoint(self.stage) if dist.is_main() else None
            # ... this run's: not one of the old run's set aside when it began (those are not its result)
            ours = latest is not None and (self.resumed or latest.parent == self.run.checkpoints(self.stage))
            self.ckpt_path = latest if ours else None
        else:
            if self.last_val is None and self.val_batches:  # e.g. resuming a run that had already finished
                self.last_val = self._val_loss()
            self.ckpt_path = self.checkpoint(done=True)
        dist.barrier()

    def checkpoint(self, done: bool = False) -> Path | None:
        """Every rank takes part (FSDP gathers whole tensors to rank 0); rank 0 writes."""
        sharded = dist.is_sharded(self.model)
        weights = dist.full_model_state(self.model) if sharded else None
        opt_states = [dist.full_optimizer_state(o) if sharded else o.state_dict() for o in self.optimizers]
        if not dist.is_main():
            return None
        state = {"optimizers": opt_states, "rng": _rng_state(), "step": self.step, "elapsed": self.elapsed,
                 "history": self.history, "total_steps": self.budget.schedule_total, "done": done}
        return save_checkpoint(self.run.path, self.stage, self.step, self.model, self.model.cfg, state,
                               {"tokens": self.step * self.tokens_per_step, **self.meta}, keep=self.t.keep_checkpoints,
                               weights=weights)

    def close(self) -> None:
        for part in (self.progress, self.metrics):
            if part is not None:
                part.close()

    def result(self) -> TrainResult:
        tokens = self.step * self.tokens_per_step
        flops = float(tokens * self.model.flops_per_token())
        mfu = flops / (self.elapsed * self.peak * self.world) if self.peak and self.elapsed > 0 else None
        return TrainResult(stage=self.stage, steps=self.step, tokens=tokens, seconds=self.elapsed,
                           tokens_per_second=tokens / max(self.elapsed, 1e-9), final_train_loss=self.last_loss,
                           final_val_loss=self.last_val, checkpoint=str(self.ckpt_path), history=self.history,
                           stop_reason=self.stop_reason, flops=flops, mfu=mfu)


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

    candidates = RunDir(run_dir).checkpoint_dirs(stage)  # the set-aside old ones while there are no new ones
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
