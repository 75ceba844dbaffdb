"""Stages `midtrain` and `sft`: finetune on rendered conversations from a task mixture.

midtrain teaches the chat format, tool calls (calculator, lookup), multiple choice and spelling on a broad
mixture, starting from the base model; sft is a shorter, targeted pass on top of it. Both use the one
training loop; the data are conversations packed into rows, and the loss mask keeps only what the assistant
writes (its text, its tool calls, <|assistant_end|>).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from exocortex.checkpoint import load_model
from exocortex.config import RunConfig, check_budget, save_config
from exocortex.data.loader import PackedRows, load_splits, pack_conversations
from exocortex.device import resolve_device, resolve_dtype
from exocortex.run import FinetuneSummary
from exocortex.tasks import mixture_conversations, task_set
from exocortex.tokenizer import Tokenizer
from exocortex.train import parallel
from exocortex.train.loop import train
from exocortex.train.metrics import MetricsSink


def build_sft_rows(tok: Tokenizer, conversations: list[dict], seq_len: int):
    rendered = [tok.render_conversation(c) for c in conversations]
    return pack_conversations(rendered, seq_len, tok.bos_id)


def mix_in_text(cfg: RunConfig, x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Add plain pretraining rows (loss on every token) so finetuning does not erase the base model's
    knowledge; rows are a deterministic sample of the tokenized corpus."""
    train_tokens = load_splits(cfg)[0].tokens
    T = x.shape[1]
    n_text = int(len(x) * fraction / (1 - fraction))
    n_avail = (len(train_tokens) - 1) // T
    rows = np.random.default_rng(seed).choice(n_avail, size=min(n_text, n_avail), replace=False)
    chunk = np.stack([np.asarray(train_tokens[r * T:r * T + T + 1], dtype=np.int64) for r in rows])
    return np.concatenate([x, chunk[:, :-1]]), np.concatenate([y, chunk[:, 1:]])


def run_finetune(cfg: RunConfig, stage: str, resume: bool = False, force: bool = False) -> FinetuneSummary | None:
    check_budget(cfg, stage)
    if not resume and not force:
        cfg.run.refuse_to_replace(stage)
    t, s = getattr(cfg, stage), getattr(cfg, f"{stage}_data")
    # the task files are read (and bad rows reported) before anything heavy is loaded
    tasks = task_set(cfg)
    train_convs = mixture_conversations(tasks, s.mixture, s.n_conversations, s.seed, "train")
    val_convs = mixture_conversations(tasks, s.mixture, max(64, s.n_conversations // 50), s.seed + 1, "test")
    tok = Tokenizer.load(cfg.run.tokenizer_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(t.dtype, device)
    parent, parent_ckpt = cfg.run.parent_checkpoint(stage)
    model, _ = load_model(parent_ckpt, device)
    seq_len = model.cfg.seq_len
    x, y = build_sft_rows(tok, train_convs, seq_len)
    vx, vy = build_sft_rows(tok, val_convs, seq_len)
    if s.text_fraction > 0:
        x, y = mix_in_text(cfg, x, y, s.text_fraction, s.seed)
    source = PackedRows(x, y, t.device_batch, seed=cfg.seed)
    val = PackedRows(vx, vy, t.device_batch).batches()
    rows_per_step = max(1, t.batch_tokens // (t.device_batch * seq_len)) * t.device_batch
    steps = t.max_steps or (None if t.time_minutes else max(1, math.ceil(t.epochs * len(x) / rows_per_step)))
    budget = f"{steps} steps ({t.epochs:g} epochs)" if steps else f"{t.time_minutes:g} minutes"
    print(f"{stage}: from {parent} ({parent_ckpt.name}); {len(train_convs):,} conversations "
          f"({', '.join(s.mixture)}) packed into {len(x):,} rows of {seq_len} ({s.text_fraction:.0%} plain text); {budget}")
    if parallel.is_main():
        save_config(cfg)
    torch.manual_seed(cfg.seed + 1)
    metrics = MetricsSink.from_config(cfg.logging, cfg.run_dir, cfg.name, stage, cfg.to_dict())
    res = train(model, t, stage, cfg.run_dir, source, val, device, dtype, total_steps=steps, resume=resume,
                meta={"base": str(parent_ckpt)}, metrics=metrics)
    if not parallel.is_main():
        return None
    summary = FinetuneSummary(
        parent=parent, conversations=len(train_convs), rows=int(len(x)), steps=res.steps,
        epochs=res.steps * rows_per_step / max(1, len(x)), tokens=res.tokens, seconds=res.seconds,
        tokens_per_second=res.tokens_per_second, final_train_loss=res.final_train_loss,
        final_val_loss=res.final_val_loss, checkpoint=res.checkpoint)
    cfg.run.write_summary(stage, summary)
    print(f"{stage}: {res.steps} steps ({summary.epochs:.2f} epochs) in {res.seconds:.0f}s; "
          f"val loss {res.final_val_loss:.3f}")
    return summary


def run_midtrain(cfg: RunConfig, resume: bool = False, force: bool = False) -> FinetuneSummary | None:
    return run_finetune(cfg, "midtrain", resume, force)


def run_sft(cfg: RunConfig, resume: bool = False, force: bool = False) -> FinetuneSummary | None:
    return run_finetune(cfg, "sft", resume, force)
