"""Stages `tokenizer` and `pretrain`.

tokenizer: load the corpus (generated world or --data), hold out a val split, train the BPE, tokenize both
splits into runs/<name>/data/{train,val}.npy, and measure the corpus's variety for the report.
pretrain: train the base model on those tokens with the shared loop.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from exocortex import distributed
from exocortex.checkpoint import resolve_device, resolve_dtype
from exocortex.config import ExocortexError, RunConfig, atomic_write_text, budget_steps, save_config
from exocortex.data.loader import TokenRows, eval_batches, tokenize_documents
from exocortex.data.sources import load_documents, split_train_val
from exocortex.tokenizer import Tokenizer, iter_texts_for_training


def write_summary(run_dir: Path, stage: str, summary: dict) -> None:
    p = Path(run_dir) / "logs" / f"{stage}_summary.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(summary, indent=2, default=str))


def read_summary(run_dir: Path, stage: str) -> dict | None:
    p = Path(run_dir) / "logs" / f"{stage}_summary.json"
    return json.loads(p.read_text()) if p.exists() else None


def run_tokenizer(cfg: RunConfig) -> dict:
    t0 = time.time()
    docs, source = load_documents(cfg.data)  # raises a clear error on bad input before anything is written
    t_load = time.time() - t0
    save_config(cfg)
    train_docs, val_docs = split_train_val(docs, cfg.data.val_fraction)
    print(f"tokenizer: {len(docs):,} documents ({sum(map(len, docs)) / 1e6:.1f} M chars) from {source}")

    t1 = time.time()
    tok = Tokenizer.train(iter_texts_for_training(train_docs, cfg.tokenizer.train_bytes), cfg.tokenizer.vocab_size)
    t_train = time.time() - t1
    tok.save(cfg.run_dir / "tokenizer")

    t2 = time.time()
    data_dir = cfg.run_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train_tokens = tokenize_documents(tok, train_docs)
    val_tokens = tokenize_documents(tok, val_docs)
    for name, arr in (("train", train_tokens), ("val", val_tokens)):
        tmp = data_dir / f".{name}.tmp.npy"
        np.save(tmp, arr)
        tmp.replace(data_dir / f"{name}.npy")
    t_encode = time.time() - t2
    n_bytes = sum(len(d.encode("utf-8")) for d in train_docs)

    from exocortex.data.world import corpus_stats
    stats = corpus_stats(docs)
    summary = {
        "source": source, "documents": len(docs), "train_tokens": int(len(train_tokens)),
        "val_tokens": int(len(val_tokens)), "vocab_size": tok.vocab_size,
        "bytes_per_token": n_bytes / max(1, len(train_tokens)), "seconds_load": t_load,
        "seconds_train": t_train, "seconds_encode": t_encode, "corpus_stats": stats,
    }
    write_summary(cfg.run_dir, "tokenizer", summary)
    print(f"tokenizer: vocab {tok.vocab_size}, trained in {t_train:.1f}s; {len(train_tokens):,} train / "
          f"{len(val_tokens):,} val tokens ({summary['bytes_per_token']:.2f} bytes/token), encoded in {t_encode:.1f}s")
    return summary


def load_token_data(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    d = cfg.run_dir / "data"
    if not (d / "train.npy").exists() or not (d / "val.npy").exists():
        raise ExocortexError(f"{cfg.run_dir} has no tokenized data; run `exocortex tokenizer --run {cfg.name}` first")
    return np.load(d / "train.npy", mmap_mode="r"), np.load(d / "val.npy")


def run_pretrain(cfg: RunConfig, resume: bool = False) -> dict:
    from exocortex.model import GPT
    from exocortex.train import train

    tok = Tokenizer.load(cfg.run_dir / "tokenizer")
    cfg.model.vocab_size = tok.vocab_size
    train_tokens, val_tokens = load_token_data(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.pretrain.dtype, device)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    n_params = model.num_params()
    t = cfg.pretrain
    rows = t.device_batch
    source = TokenRows(np.asarray(train_tokens), cfg.model.seq_len, rows, seed=cfg.seed)
    val = eval_batches(val_tokens, cfg.model.seq_len, rows, t.eval_tokens)
    steps = budget_steps(t, n_params)
    print(f"pretrain: {n_params / 1e6:.2f}M params, {cfg.model.depth} layers x {cfg.model.n_embd} wide, "
          f"vocab {cfg.model.vocab_size}, seq {cfg.model.seq_len}; {device} {str(dtype).replace('torch.', '')}; "
          f"budget: " + (f"{steps} steps" if steps else f"{t.time_minutes} minutes"))
    if distributed.is_main():
        save_config(cfg)
    from exocortex.logger import MetricsLogger
    logger = MetricsLogger.from_config(cfg.logging, cfg.run_dir, cfg.name, "pretrain", cfg.to_dict())
    try:
        res = train(model, t, "pretrain", cfg.run_dir, source, val, device, dtype, total_steps=steps,
                    resume=resume, logger=logger)
    finally:
        logger.close()
    from exocortex.evaluate import bits_per_byte
    bpb = bits_per_byte(model, tok, val, device, dtype)  # on every rank: an FSDP model's forward needs them all
    if not distributed.is_main():
        return {}
    summary = {"params": n_params, "flops_per_token": model.flops_per_token(), "steps": res.steps,
               "tokens": res.tokens, "seconds": res.seconds, "tokens_per_second": res.tokens_per_second,
               "flops": res.flops, "mfu": res.mfu, "final_train_loss": res.final_train_loss,
               "final_val_loss": res.final_val_loss, "val_bpb": bpb, "tokens_per_param": res.tokens / n_params,
               "device": str(device), "dtype": str(dtype), "world_size": distributed.world_size(),
               "parallel": t.parallel, "time_budget_minutes": t.time_minutes if not steps else None,
               "checkpoint": res.checkpoint}
    write_summary(cfg.run_dir, "pretrain", summary)
    print(f"pretrain: {res.steps} steps, {res.tokens:,} tokens in {res.seconds:.0f}s "
          f"({res.tokens_per_second:,.0f} tok/s); val loss {res.final_val_loss:.3f}, val bpb {bpb:.3f}")
    print(f"pretrain: {spent_line(summary)}")
    return summary


def spent_line(s: dict) -> str:
    """'spent X min, Y PFLOPs, Z tokens' (+ MFU where the peak is known) for logs and the report."""
    line = f"spent {s['seconds'] / 60:.1f} min, {s.get('flops', 0) / 1e15:.3g} PFLOPs, {s['tokens']:,} tokens"
    if s.get("mfu") is not None:
        line += f" at {s['mfu']:.1%} MFU"
    if s.get("time_budget_minutes"):
        line += f" (time budget {s['time_budget_minutes']:g} min)"
    return line
