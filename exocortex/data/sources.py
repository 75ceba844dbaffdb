"""Where pretraining text comes from: the generated world (default, offline) or the user's own files.

User data: a file or a directory (searched recursively) of .txt / .md (one document per file), .jsonl (one
JSON object per line with a "text" field) or .parquet (a "text" column). Bad input fails early with the
file (and line) named, before anything is written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from exocortex.config import DataConfig, ExocortexError

SUPPORTED = (".txt", ".md", ".jsonl", ".parquet")


def find_files(path: str | Path) -> list[Path]:
    p = Path(path).expanduser()
    if not p.exists():
        raise ExocortexError(f"data path {p} does not exist")
    if p.is_file():
        if p.suffix.lower() not in SUPPORTED:
            raise ExocortexError(f"{p}: unsupported file type '{p.suffix}' (use {', '.join(SUPPORTED)})")
        files = [p]
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise ExocortexError(f"data directory {p} has no {', '.join(SUPPORTED)} files")
    return files


def _read_text_file(f: Path) -> str:
    raw = f.read_bytes()
    if b"\x00" in raw[:8192]:
        raise ExocortexError(f"{f} looks binary (contains NUL bytes); give text files")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExocortexError(f"{f} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None


def iter_json_lines(lines: Iterable[str], source: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank JSONL line; a bad row is an error naming file and line."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ExocortexError(f"{source}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ExocortexError(f"{source}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def _iter_jsonl(f: Path) -> Iterator[str]:
    for lineno, row in iter_json_lines(_read_text_file(f).splitlines(), f):
        if not isinstance(row.get("text"), str):
            raise ExocortexError(f'{f}:{lineno}: expected an object with a string "text" field')
        yield row["text"]


def _iter_parquet(f: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:
        raise ExocortexError(f"{f}: not a readable parquet file ({e})") from None
    if "text" not in pf.schema_arrow.names:
        raise ExocortexError(f'{f}: parquet file has no "text" column (columns: {", ".join(pf.schema_arrow.names)})')
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):
        for t in batch.column(0).to_pylist():
            if t:
                yield t


def iter_documents(path: str | Path) -> Iterator[str]:
    for f in find_files(path):
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            yield from _iter_jsonl(f)
        elif suffix == ".parquet":
            yield from _iter_parquet(f)
        else:
            text = _read_text_file(f)
            if text.strip():
                yield text


def load_documents(data: DataConfig) -> tuple[list[str], str]:
    """All documents of the configured source, and a short description of it for the report."""
    if data.path:
        docs = [d for d in iter_documents(data.path) if d.strip()]
        if not docs:
            raise ExocortexError(f"data path {data.path} contains no text")
        return docs, f"user data: {data.path}"
    from exocortex.data.world import generate_documents

    docs = generate_documents(seed=data.world_seed, target_bytes=data.world_bytes, hold_out=True)
    return docs, f"generated world (seed {data.world_seed}, {data.world_bytes / 1e6:.0f} MB)"


def split_train_val(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split: every k-th document goes to val (at least one each side)."""
    if len(docs) < 2:
        # a single long document: split its text instead
        text = docs[0]
        cut = max(1, int(len(text) * (1 - val_fraction)))
        return [text[:cut]], [text[cut:] or text[-1000:]]
    k = max(2, round(1 / max(val_fraction, 1e-6)))
    val = docs[::k]
    train = [d for i, d in enumerate(docs) if i % k]
    return train, val
