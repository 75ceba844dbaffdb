"""Stage `tokenizer`: stream the corpus (generated world or --data), remove exact and near-duplicate documents
of a user corpus (data/dedup.py), train the BPE on its start, and encode all of it in parallel worker processes
into runs/<name>/data/{train,val}.bin (data/tokens.py), holding out every k-th remaining document for val;
measure the corpus's variety for the report.

Why only user corpora are deduplicated: near-duplicate documents on both sides of the split make the val loss
flatter than the model's real loss on unseen text (a web corpus measured 1.47 bits/byte on its own val split,
1.76 on a held-out shard). The generated world has few whole-document duplicates (20 MB: 13 exact and 69 near
of 58,172 documents, 0.1%, mostly arithmetic tables), and the pass would cost the tiny speedrun ~14 CPU-seconds;
its repetition is at the sentence level, which the collapse metrics (data/collapse.py) report instead.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from exocortex.config import RunConfig, save_config
from exocortex.data.tokens import corpus_duplicates
from exocortex.data.sources import corpus_tasks, read_task, val_every
from exocortex.data.tokens import default_workers, write_token_data
from exocortex.data.world import corpus_stats
from exocortex.errors import ExocortexError
from exocortex.fileio import commit_files, remove_tree, temp_path
from exocortex.run import TokenizerSummary, listed
from exocortex.tokenizer import Tokenizer, iter_texts_for_training


def _train_texts(tasks, k: int, val_fraction: float, sample: list[str], sample_bytes: int,
                 drop: np.ndarray) -> Iterator[str]:
    """The train split's documents in corpus order (document i, not counting the duplicates in `drop`, is val
    when i % k == 0), read in this process; the first sample_bytes of them are also kept in `sample` for the
    corpus statistics."""
    first, n, kept, read = None, 0, 0, 0
    next_drop = iter(drop.tolist())
    skip = next(next_drop, -1)
    for task in tasks:
        for doc in read_task(task):
            read += 1
            if read - 1 == skip:
                skip = next(next_drop, -1)
                continue
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


def run_tokenizer(cfg: RunConfig, force: bool = False) -> TokenizerSummary:
    """Train the BPE on the start of the corpus, then encode all of it in parallel into token files.
    Nothing is written to the run directory until both have succeeded. A run with trained models keeps its
    tokenizer unless `force`: they only make sense with the tokenizer they were trained with (_replace)."""
    if not force:
        cfg.run.refuse_to_replace(why=" made with its tokenizer, which a new one makes useless",
                                  instead="--force to replace the tokenizer and the tokens (those checkpoints are "
                                  "set aside until the new pretraining has one), or --run <new name> for a new run")
    trained = cfg.run.trained_stages()
    t0 = time.time()
    tasks, source, world_docs = corpus_tasks(cfg.data)  # cheap checks of every file first
    t_load = time.time() - t0
    print(f"tokenizer: {source}" + (f" ({len(world_docs):,} documents)" if world_docs else f" ({len(tasks):,} chunks)"))

    dups = None
    if world_docs is None:
        dups = corpus_duplicates(tasks, workers=cfg.data.workers or default_workers())
        print(f"tokenizer: {dups.describe()}")
    drop = dups.drop if dups else np.zeros(0, np.int64)
    t1 = time.time()
    sample: list[str] = []
    k = val_every(cfg.data.val_fraction)
    texts = _train_texts(tasks, k, cfg.data.val_fraction, sample, 0 if world_docs else 50_000_000, drop)
    tok = Tokenizer.train(iter_texts_for_training(texts, cfg.tokenizer.train_bytes), cfg.tokenizer.vocab_size)
    t_train = time.time() - t1

    t2 = time.time()
    run_dir = cfg.run_dir.absolute()
    created = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    staged = temp_path(run_dir / "tokenizer")
    try:
        stats = write_token_data(tok, tasks, staged / "data", cfg.data.val_fraction, workers=cfg.data.workers,
                                 drop=drop)
        tok.save(staged / "tokenizer")
    except BaseException as e:  # bad input found while encoding, a full disk: leave no trace of this run
        shutil.rmtree(created or staged, ignore_errors=True)
        if isinstance(e, OSError):  # numpy's short writes carry no errno: any write error is this
            raise ExocortexError(f"tokenizer: could not write the token files ({e.strerror or e}; is the disk "
                                 f"full?); {run_dir} is unchanged") from None
        raise
    t_encode = time.time() - t2
    _replace(cfg, staged, trained)
    save_config(cfg)
    summary = TokenizerSummary(
        source=source, documents=stats.documents, train_tokens=stats.train_tokens, val_tokens=stats.val_tokens,
        vocab_size=tok.vocab_size, bytes_per_token=stats.train_bytes / max(1, stats.train_tokens),
        seconds_load=t_load, seconds_train=t_train, seconds_encode=t_encode,
        corpus_stats=corpus_stats(world_docs or sample),
        corpus_stats_sample_documents=None if world_docs else len(sample),
        duplicates=None if dups is None else {"exact": dups.exact, "near": dups.near, "read": dups.documents,
                                              "seconds": round(dups.seconds, 2), "index_full": dups.index_full})
    cfg.run.write_summary("tokenizer", summary)
    print(f"tokenizer: vocab {tok.vocab_size}, trained in {t_train:.1f}s; {stats.documents:,} documents, "
          f"{stats.train_tokens:,} train / {stats.val_tokens:,} val tokens ({summary.bytes_per_token:.2f} "
          f"bytes/token), encoded in {t_encode:.1f}s")
    return summary


def _replace(cfg: RunConfig, staged: Path, trained: dict) -> None:
    """Swap the staged tokenizer and tokens in with renames only (nothing left to run out of disk). The old
    tokens go first and the new meta.json comes last: a crash in between leaves a run that asks for `exocortex
    tokenizer` again, never tokens beside another tokenizer. Models trained with another tokenizer would answer
    garbage with this one: their set is set aside, not counted, and put back if the swap fails. A tokenizer
    trained again byte for byte (speedrun --force on the same corpus and config) keeps its models: they are
    still right, and the stages after this one set them aside as any fresh run does."""
    run = cfg.run
    same = _same_files(staged / "tokenizer", run.tokenizer_dir)
    set_aside = bool(trained) and not same
    if set_aside:
        run.set_aside_set()
        print(f"tokenizer: the old tokenizer, tokens and checkpoints ({listed(trained)}) are kept in "
              f"{run.previous_set} until the new pretraining writes its first checkpoint; they do not count "
              f"meanwhile. To go back to them: rm -rf {run.path}/{{tokenizer,data,checkpoints}} && "
              f"mv {run.previous_set}/* {run.path}/ && rmdir {run.previous_set}")
    try:
        remove_tree(run.data_dir)
        if not same:
            commit_files(staged / "tokenizer", run.tokenizer_dir, last="tokenizer.json")
        commit_files(staged / "data", run.data_dir, last="meta.json")
    except BaseException:
        if set_aside:
            run.restore_set()
            print(f"tokenizer: the swap failed; the old tokenizer, tokens and checkpoints are back in {run.path}")
        raise
    shutil.rmtree(staged, ignore_errors=True)


def _same_files(new: Path, old: Path) -> bool:
    """Do two directories hold the same files, byte for byte?"""
    names = sorted(p.name for p in new.iterdir())
    return old.is_dir() and names == sorted(p.name for p in old.iterdir()) and \
        all((new / n).read_bytes() == (old / n).read_bytes() for n in names)
