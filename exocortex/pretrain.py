"""Stages `tokenizer` and `pretrain`.

tokenizer: stream the corpus (generated world or --data), train the BPE on its start, encode all of it in
parallel worker processes into runs/<name>/data/{train,val}.bin (data/tokens.py), holding out every k-th
document for val, and measure the corpus's variety for the report.
pretrain: train the base model on those tokens with the shared loop, rows packed best-fit (data/loader.py).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from exocortex import distributed
from exocortex.checkpoint import resolve_device, resolve_dtype
from exocortex.config import ExocortexError, RunConfig, atomic_write_text, budget_steps, save_config
from exocortex.data.loader import BestFitRows, TokenRows, eval_batches, packed_eval_batches
from exocortex.data.sources import corpus_tasks, read_task, val_every
from exocortex.data.tokens import TokenSplit, commit_token_data, has_token_data, read_split, write_token_data
from exocortex.tokenizer import Tokenizer, iter_texts_for_training


def write_summary(run_dir: Path, stage: str, summary: dict) -> None:
    p = Path(run_dir) / "logs" / f"{stage}_summary.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(summary, indent=2, default=str))


def read_summary(run_dir: Path, stage: str) -> dict | None:
    p = Path(run_dir) / "logs" / f"{stage}_summary.json"
    return json.loads(p.read_text()) if p.exists() else None


def _train_texts(tasks, k: int, val_fraction: float, sample: list[str], sample_bytes: int) -> Iterator[str]:
    """The train split's documents in corpus order (document i is val when i % k == 0), read in this
    process; the first sample_bytes of them are also kept in `sample` for the corpus statistics."""
    first, n, kept = None, 0, 0
    for task in tasks:
        for doc in read_task(task):
            if kept < sample_bytes:
                sample.append(doc)
                kept += len(doc)
            if n == 0:
                first = doc
            elif n % k:
                yield doc
            n += 1
    if n == 1:  # a single document: train on all but its held-out tail (as write_token_data splits it)
        yield first[:max(1, int(len(first) * (1 - val_fraction)))]


def run_tokenizer(cfg: RunConfig) -> dict:
    """Train the BPE on the start of the corpus, then encode all of it in parallel into token files.
    Nothing is written to the run directory until both have succeeded."""
    from exocortex.data.world import corpus_stats

    t0 = time.time()
    tasks, source, world_docs = corpus_tasks(cfg.data)  # cheap checks of every file first
    t_load = time.time() - t0
    print(f"tokenizer: {source}" + (f" ({len(world_docs):,} documents)" if world_docs else f" ({len(tasks):,} chunks)"))

    t1 = time.time()
    sample: list[str] = []
    k = val_every(cfg.data.val_fraction)
    texts = _train_texts(tasks, k, cfg.data.val_fraction, sample, 0 if world_docs else 50_000_000)
    tok = Tokenizer.train(iter_texts_for_training(texts, cfg.tokenizer.train_bytes), cfg.tokenizer.vocab_size)
    t_train = time.time() - t1

    t2 = time.time()
    run_dir = cfg.run_dir.absolute()
    created = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    tmp = run_dir / f".data.tmp{os.getpid()}"
    try:
        stats = write_token_data(tok, tasks, tmp, cfg.data.val_fraction, workers=cfg.data.workers)
    except BaseException:  # bad input found while encoding: leave no trace of this run
        shutil.rmtree(created or tmp, ignore_errors=True)
        raise
    t_encode = time.time() - t2
    save_config(cfg)
    tok.save(cfg.run_dir / "tokenizer")
    commit_token_data(tmp, cfg.run_dir / "data")

    summary = {
        "source": source, "documents": stats.documents, "train_tokens": stats.train_tokens,
        "val_tokens": stats.val_tokens, "vocab_size": tok.vocab_size,
        "bytes_per_token": stats.train_bytes / max(1, stats.train_tokens), "seconds_load": t_load,
        "seconds_train": t_train, "seconds_encode": t_encode,
        "corpus_stats": corpus_stats(world_docs or sample),
    }
    if not world_docs:
        summary["corpus_stats_sample_documents"] = len(sample)
    write_summary(cfg.run_dir, "tokenizer", summary)
    print(f"tokenizer: vocab {tok.vocab_size}, trained in {t_train:.1f}s; {stats.documents:,} documents, "
          f"{stats.train_tokens:,} train / {stats.val_tokens:,} val tokens ({summary['bytes_per_token']:.2f} "
          f"bytes/token), encoded in {t_encode:.1f}s")
    return summary


def load_splits(cfg: RunConfig) -> tuple[TokenSplit, TokenSplit]:
    d = cfg.run_dir / "data"
    if not has_token_data(d):
        raise ExocortexError(f"{cfg.run_dir} has no tokenized data; run `exocortex tokenizer --run {cfg.name}` first")
    bos = Tokenizer.load(cfg.run_dir / "tokenizer").bos_id if not (d / "meta.json").exists() else None
    return read_split(d, "train", bos), read_split(d, "val", bos)


def load_token_data(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token arrays, memory-mapped."""
    train, val = load_splits(cfg)
    return train.tokens, val.tokens


def train_source(cfg: RunConfig, seq_len: int, rows: int):
    """The pretraining batch source, packed as cfg.data.packing says."""
    cfg.data.validate()
    train, _ = load_splits(cfg)
    if cfg.data.packing == "bestfit":
        return BestFitRows(train.tokens, train.starts, seq_len, rows, seed=cfg.seed)
    return TokenRows(train.tokens, seq_len, rows, seed=cfg.seed)


def val_batches(cfg: RunConfig, seq_len: int, rows: int, max_tokens: int) -> list:
    """Fixed val batches, packed the way training rows are (so val loss measures the training objective)."""
    cfg.data.validate()
    _, val = load_splits(cfg)
    if cfg.data.packing == "bestfit":
        return packed_eval_batches(val.tokens, val.starts, seq_len, rows, max_tokens)
    return eval_batches(val.tokens, seq_len, rows, max_tokens)


def run_pretrain(cfg: RunConfig, resume: bool = False) -> dict:
    from exocortex.model import GPT
    from exocortex.train import train

    tok = Tokenizer.load(cfg.run_dir / "tokenizer")
    cfg.model.vocab_size = tok.vocab_size
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.pretrain.dtype, device)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    n_params = model.num_params()
    t = cfg.pretrain
    rows = t.device_batch
    source = train_source(cfg, cfg.model.seq_len, rows)
    val = val_batches(cfg, cfg.model.seq_len, rows, t.eval_tokens)
    steps = budget_steps(t, n_params)
    print(f"pretrain: {n_params / 1e6:.2f}M params, {cfg.model.depth} layers x {cfg.model.n_embd} wide, "
          f"vocab {cfg.model.vocab_size}, seq {cfg.model.seq_len}, {cfg.data.packing} packing; {device} {str(dtype).replace('torch.', '')}; "
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
               "packing": cfg.data.packing, "device": str(device), "dtype": str(dtype), "world_size": distributed.world_size(),
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
