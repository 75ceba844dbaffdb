"""Tokenize a corpus of any size into token files on disk, in parallel, deterministically.

Worker processes each read and encode one task (data/sources.py: a parquet row group, a byte range of a
.jsonl file, ...); results come back in task order, so the output is byte-identical for any number of
workers. The main process streams them to disk as they arrive — nothing holds the whole corpus in memory.

Layout of runs/<name>/data/:
    train.bin, val.bin              every document as <|bos|> + its tokens, concatenated (uint16, or
                                    uint32 for vocabularies over 65,536), read back with np.memmap
    train.docs.npy, val.docs.npy    int64 offset of each document's <|bos|> (what best-fit packing needs)
    meta.json                       dtype, counts and the largest token id; written last, so its presence
                                    means complete

Document i (counting non-blank documents in corpus order) is held out for validation when
i % val_every == 0 (sources.split_train_val's rule, so small corpora split exactly as before). Duplicates found
beforehand (data/dedup.py: `drop`, indices among the non-blank documents) are removed first and not counted:
a document and its near copy can never land on both sides of the split.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from exocortex.errors import ExocortexError
from exocortex.fileio import atomic_write_text, read_json_object
from exocortex.data.dedup import INDEX_LIMIT, NearDuplicates, exact_key, signature
from exocortex.data.sources import Task, read_task, task_file, val_every
from exocortex.tokenizer import Tokenizer

SPLITS = ("train", "val")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def encode_docs(tok: Tokenizer, docs: list[str], dtype, num_threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Documents -> (tokens: <|bos|> + ids per document, concatenated; tokens per document; UTF-8 bytes
    per document)."""
    ids = tok.encode_batch(docs, num_threads=num_threads)
    lens = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    out = np.empty(int(lens.sum()), dtype=dtype)
    pos = 0
    for x in ids:
        out[pos] = tok.bos_id
        out[pos + 1:pos + 1 + len(x)] = x
        pos += len(x) + 1
    nbytes = np.fromiter((len(d.encode("utf-8")) for d in docs), dtype=np.int64, count=len(docs))
    return out, lens, nbytes


# ----------------------------------------------------------------------------- worker processes
_worker_tok: Tokenizer | None = None


def _init_worker(ranks: dict[bytes, int]) -> None:
    global _worker_tok
    # the parent handles Ctrl-C and ends the pool; a forked child must not run the CLI's SIGTERM handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_tok = Tokenizer(ranks)


def _encode_task(task: Task):
    tok = _worker_tok
    return encode_docs(tok, list(read_task(task)), token_dtype(tok.vocab_size))


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def pool_context():
    """Worker processes from a fork server where the OS has one, else spawned. Not a plain fork: this process may
    already run threads (pyarrow's readers, tiktoken's encoders), and a child forked while one of them holds a lock
    waits on it forever (a hub-data tokenizer run hung that way, once in a CI run)."""
    return mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")


def encoded_tasks(tok: Tokenizer, tasks: list[Task], workers: int = 0) -> Iterator[tuple]:
    """encode_docs of each task's documents, in task order. workers > 1: that many processes (pool_context);
    1: this process, threads inside tiktoken."""
    n = min(workers or default_workers(), len(tasks))
    if n <= 1:
        dtype = token_dtype(tok.vocab_size)
        for task in tasks:
            yield encode_docs(tok, list(read_task(task)), dtype, num_threads=0)
        return
    with pool_context().Pool(n, initializer=_init_worker, initargs=(tok.mergeable_ranks,)) as pool:
        # ordered results; chunksize 1 keeps the head of the line moving when tasks differ in size
        yield from pool.imap(_encode_task, tasks, chunksize=1)


# ----------------------------------------------------------------------------- writing
@dataclass
class TokenStats:
    documents: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    train_bytes: int = 0


class _SplitWriter:
    def __init__(self, directory: Path, name: str):
        self.bin = directory / f"{name}.bin"
        self.f = open(self.bin, "wb")
        self.n_tokens = 0
        self.max_id = 0
        self.starts: list[np.ndarray] = []

    def write(self, tokens: np.ndarray, lens: np.ndarray) -> None:
        if len(lens):
            self.starts.append(self.n_tokens + np.concatenate([[0], np.cumsum(lens[:-1])]))
        if len(tokens):
            self.max_id = max(self.max_id, int(tokens.max()))
        tokens.tofile(self.f)
        self.n_tokens += len(tokens)

    def close(self) -> np.ndarray:
        self.f.close()
        starts = np.concatenate(self.starts).astype(np.int64) if self.starts else np.zeros(0, np.int64)
        np.save(self.bin.with_name(self.bin.stem + ".docs.npy"), starts)
        return starts


def write_token_data(tok: Tokenizer, tasks: list[Task], out_dir: Path, val_fraction: float,
                     workers: int = 0, progress: bool | None = None, drop: np.ndarray | None = None) -> TokenStats:
    """Encode every task's documents and write the train/val token files into out_dir (see the module
    docstring), leaving out the documents whose index is in `drop` (sorted). A file that yields no documents
    at all is an error naming it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    k = val_every(val_fraction)
    writers = {s: _SplitWriter(out_dir, s) for s in SPLITS}
    stats = TokenStats()
    file_docs: dict[str, int] = {}
    interactive = sys.stderr.isatty() if progress is None else progress
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="tokenize", unit="chunk", disable=not interactive, dynamic_ncols=True)
    t0 = last_print = time.time()
    prev_file = None
    read = 0  # documents read, dropped ones included
    drop = np.zeros(0, np.int64) if drop is None else drop

    def check_file(f: str | None) -> None:
        if f is not None and file_docs.get(f, 0) == 0:
            raise ExocortexError(f"{f}: no text (no non-blank documents); remove it")

    results = encoded_tasks(tok, tasks, workers)
    try:
        for task, (tokens, lens, nbytes) in zip(tasks, results):
            f = task_file(task)
            if f != prev_file:
                check_file(prev_file)  # results arrive in file order: the previous file is complete
                prev_file = f
            if f is not None:
                file_docs[f] = file_docs.get(f, 0) + len(lens)
            lo, hi = np.searchsorted(drop, [read, read + len(lens)])
            read += len(lens)
            if hi > lo:
                keep = np.ones(len(lens), bool)
                keep[drop[lo:hi] - (read - len(lens))] = False
                tokens, lens, nbytes = tokens[np.repeat(keep, lens)], lens[keep], nbytes[keep]
            is_val = (stats.documents + np.arange(len(lens))) % k == 0
            stats.documents += len(lens)
            if is_val.any():
                tok_val = np.repeat(is_val, lens)
                writers["val"].write(tokens[tok_val], lens[is_val])
                writers["train"].write(tokens[~tok_val], lens[~is_val])
            else:
                writers["train"].write(tokens, lens)
            stats.train_bytes += int(nbytes[~is_val].sum())
            bar.update(1)
            if not interactive and time.time() - last_print > 30:
                last_print = time.time()
                n = writers["train"].n_tokens + writers["val"].n_tokens
                print(f"tokenize: {bar.n}/{len(tasks)} chunks, {stats.documents:,} documents, {n:,} tokens "
                      f"({n / (time.time() - t0):,.0f} tok/s)", flush=True)
        check_file(prev_file)
    finally:
        results.close()  # on an error: stop the worker processes now
        bar.close()
        starts = {s: w.close() for s, w in writers.items()}
    if stats.documents == 0:
        raise ExocortexError("the corpus contains no text")
    if stats.documents == 1:
        stats.train_bytes = _split_single_document(out_dir, val_fraction, tok)
    stats.train_tokens = _n_tokens(out_dir / "train.bin", tok.vocab_size)
    stats.val_tokens = _n_tokens(out_dir / "val.bin", tok.vocab_size)
    atomic_write_text(out_dir / "meta.json", json.dumps({
        "dtype": np.dtype(token_dtype(tok.vocab_size)).name, "bos_id": tok.bos_id, "vocab_size": tok.vocab_size,
        "documents": stats.documents, "train_tokens": stats.train_tokens, "val_tokens": stats.val_tokens,
        "train_documents": len(starts["train"]) if stats.documents > 1 else 1,
        "val_documents": len(starts["val"]), "val_every": k, "duplicates_removed": len(drop),
        # loading compares this with the vocabulary instead of reading every token of a split (tens of GB)
        "max_token_id": max(w.max_id for w in writers.values())}, indent=2))
    return stats


def _n_tokens(path: Path, vocab_size: int) -> int:
    return path.stat().st_size // np.dtype(token_dtype(vocab_size)).itemsize


def _split_single_document(out_dir: Path, val_fraction: float, tok: Tokenizer) -> int:
    """One document (say, a whole book): rule i % k puts it in val; cut its tokens instead, the last
    val_fraction becoming val (with its own <|bos|>). Returns the train part's UTF-8 bytes."""
    dtype = token_dtype(tok.vocab_size)
    doc = np.fromfile(out_dir / "val.bin", dtype=dtype)
    cut = max(2, int(len(doc) * (1 - val_fraction)))
    train, val = doc[:cut], np.concatenate([[tok.bos_id], doc[cut:] if cut < len(doc) else doc[-100:]]).astype(dtype)
    for name, arr in (("train", train), ("val", val)):
        arr.tofile(out_dir / f"{name}.bin")
        np.save(out_dir / f"{name}.docs.npy", np.zeros(1, np.int64))
    return len(tok.decode_bytes(train[1:].tolist()))


# ----------------------------------------------------------------------------- reading
@dataclass
class TokenSplit:
    tokens: np.ndarray   # memory-mapped: the corpus never has to fit in RAM
    starts: np.ndarray   # offset of each document's <|bos|>


def has_token_data(data_dir: Path) -> bool:
    d = Path(data_dir)
    return (d / "meta.json").exists() or ((d / "train.npy").exists() and (d / "val.npy").exists())


def read_split(data_dir: Path, name: str, bos_id: int | None = None) -> TokenSplit:
    d = Path(data_dir)
    if (d / "meta.json").exists():
        meta = read_json_object(d / "meta.json", "re-run `exocortex tokenizer`")
        path = d / f"{name}.bin"
        if path.stat().st_size == 0:
            tokens = np.zeros(0, dtype=meta["dtype"])
        else:
            tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
        return TokenSplit(tokens, np.load(d / f"{name}.docs.npy"))
    # runs tokenized before token files: one .npy per split, documents found by their <|bos|>
    tokens = np.load(d / f"{name}.npy", mmap_mode="r")
    starts = np.flatnonzero(np.asarray(tokens) == bos_id) if bos_id is not None else np.zeros(1, np.int64)
    return TokenSplit(tokens, starts.astype(np.int64))

# ----------------------------------------------------------------------------- whole corpora
@dataclass
class CorpusDuplicates:
    documents: int        # non-blank documents read, duplicates included
    exact: int            # removed as exact duplicates of an earlier document
    near: int             # removed as near duplicates
    drop: np.ndarray      # corpus-order indices (among non-blank documents) of the removed ones, sorted
    seconds: float
    index_full: bool = False

    def describe(self) -> str:
        return (f"dedup: {self.documents:,} documents, removed {self.exact:,} exact and {self.near:,} near duplicates "
                f"({(self.exact + self.near) / max(1, self.documents):.1%}) in {self.seconds:.1f}s")


def _task_signatures(task: Task, num_perm: int = 128, shingle: int = 5) -> tuple[np.ndarray, np.ndarray]:
    docs = list(read_task(task))
    keys = np.fromiter((exact_key(d) for d in docs), dtype=np.uint64, count=len(docs))
    sigs = np.stack([signature(d, num_perm, shingle) for d in docs]) if docs else np.zeros((0, num_perm), np.uint32)
    return keys, sigs


def corpus_duplicates(tasks: list[Task], workers: int = 1, threshold: float = 0.8,
                      index_limit: int = INDEX_LIMIT) -> CorpusDuplicates:
    """Which documents of a corpus (reading tasks, data/sources.py) repeat an earlier one, exactly or nearly.
    Worker processes read tasks and compute keys and signatures; this process keeps the index and decides in
    corpus order, so the answer does not depend on the number of workers. Streams: only the index and the
    dropped indices stay in memory."""
    t0 = last_print = time.time()
    nd = NearDuplicates(threshold=threshold, index_limit=index_limit)
    drop: list[int] = []
    n = 0
    n_workers = min(workers, len(tasks))
    if n_workers <= 1:
        results = map(_task_signatures, tasks)
        pool = None
    else:
        pool = pool_context().Pool(n_workers)
        results = pool.imap(_task_signatures, tasks, chunksize=1)
    try:
        for done, (keys, sigs) in enumerate(results, 1):
            for key, sig in zip(keys.tolist(), sigs):
                if nd.check_signature(key, sig):
                    drop.append(n)
                n += 1
            if time.time() - last_print > 30:
                last_print = time.time()
                print(f"dedup: {done}/{len(tasks)} chunks, {n:,} documents, {len(drop):,} duplicates", flush=True)
    finally:
        if pool is not None:
            pool.terminate()
    return CorpusDuplicates(n, nd.stats["exact"], nd.stats["near"], np.array(drop, dtype=np.int64),
                            time.time() - t0, nd.full_warning is not None)
