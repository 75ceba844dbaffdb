"""Where pretraining text comes from: the generated world (default, offline) or the user's own files.

User data: a file or a directory (searched recursively) of .txt / .md (one document per file), .jsonl (one
JSON object per line with a "text" field) or .parquet (a "text" column), e.g. a `exocortex data download`
cache. Bad input is an error naming the file (and line): cheap checks (empty files, parquet schemas) run
before anything is written, the rest while reading.

A corpus is read as a list of *tasks* (a parquet row group, a byte range of a .jsonl file, a batch of text
files, a slice of generated documents): small picklable units that worker processes read independently,
in an order that reproduces the corpus's document order exactly (data/tokens.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

from exocortex.config import DataConfig
from exocortex.data.dedup import dedup_texts
from exocortex.errors import ExocortexError

SUPPORTED = (".txt", ".md", ".jsonl", ".parquet")
JSONL_CHUNK_BYTES = 64 << 20   # a .jsonl file is read in byte ranges of this size, in parallel
TEXT_BATCH_BYTES = 16 << 20    # consecutive small .txt/.md files are grouped into tasks of about this size

Task = tuple  # ("docs", [str]) | ("text", [path]) | ("jsonl", path, start, end) | ("parquet", path, row_group)


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


def _json_object(line: str, where: Callable[[], str]) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ExocortexError(f"{where()}: invalid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ExocortexError(f"{where()}: expected a JSON object, got {type(row).__name__}")
    return row


def iter_json_lines(lines: Iterable[str], source: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank JSONL line; a bad row is an error naming file and line."""
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            yield lineno, _json_object(line, lambda: f"{source}:{lineno}")


def _line_number(f: Path, pos: int) -> int:
    """Line number of byte offset `pos`: counted only when an error needs it (chunks don't know theirs)."""
    with open(f, "rb") as fh:
        return fh.read(pos).count(b"\n") + 1


def _iter_jsonl_range(f: Path, start: int, end: int) -> Iterator[str]:
    """The "text" of each line that *starts* in [start, end): ranges of one file partition its lines."""
    with open(f, "rb") as fh:
        if start > 0:
            fh.seek(start - 1)
            if fh.read(1) != b"\n":
                fh.readline()  # the line in progress belongs to the previous range
        while (pos := fh.tell()) < end:
            line = fh.readline()
            if not line:
                break
            if not line.strip():
                continue
            where = lambda: f"{f}:{_line_number(f, pos)}"  # noqa: E731
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ExocortexError(f"{where()}: not UTF-8 (bad byte at column {e.start + 1}); convert the file "
                                     f"to UTF-8") from None
            row = _json_object(text, where)
            if not isinstance(row.get("text"), str):
                raise ExocortexError(f'{where()}: expected an object with a string "text" field')
            yield row["text"]


def _parquet(f: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(f)
    except Exception as e:
        raise ExocortexError(f"{f}: not a readable parquet file ({e}); delete it (or re-download it)") from None


def _check_parquet(f: Path) -> int:
    """Schema and row count from the footer alone; returns the number of row groups."""
    import pyarrow as pa

    pf = _parquet(f)
    names = pf.schema_arrow.names
    if "text" not in names:
        raise ExocortexError(f'{f}: parquet file has no "text" column (columns: {", ".join(names)})')
    kind = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        raise ExocortexError(f'{f}: the "text" column holds {kind}, not strings')
    if pf.metadata.num_rows == 0:
        raise ExocortexError(f"{f}: empty parquet file (0 rows); delete it (or re-download it)")
    return pf.metadata.num_row_groups


def _iter_parquet_group(f: Path, group: int) -> Iterator[str]:
    pf = _parquet(f)
    try:
        col = pf.read_row_group(group, columns=["text"]).column(0)
        values = col.to_pylist()
    except UnicodeDecodeError:
        raise ExocortexError(f"{f}: row group {group} has text that is not UTF-8") from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds for a damaged file
        raise ExocortexError(f"{f}: cannot read row group {group} ({e}); delete it (or re-download it)") from None
    for i, t in enumerate(values):
        if isinstance(t, bytes):
            try:
                t = t.decode("utf-8")
            except UnicodeDecodeError:
                row = sum(pf.metadata.row_group(g).num_rows for g in range(group)) + i
                raise ExocortexError(f"{f}: row {row} of the text column is not UTF-8") from None
        if t:
            yield t


def plan_tasks(files: list[Path], jsonl_chunk_bytes: int = JSONL_CHUNK_BYTES,
               text_batch_bytes: int = TEXT_BATCH_BYTES) -> list[Task]:
    """Split files into independent reading tasks, in document order. Also the cheap up-front checks:
    empty files and parquet schemas fail here, before any text is read or anything written."""
    tasks: list[Task] = []
    batch: list[str] = []
    batch_bytes = 0
    for f in files:
        size = f.stat().st_size
        if size == 0:
            raise ExocortexError(f"{f}: empty file (0 bytes); remove it or add text")
        suffix = f.suffix.lower()
        if suffix in (".txt", ".md"):
            batch.append(str(f))
            batch_bytes += size
            if batch_bytes >= text_batch_bytes:
                tasks.append(("text", batch))
                batch, batch_bytes = [], 0
            continue
        if batch:
            tasks.append(("text", batch))
            batch, batch_bytes = [], 0
        if suffix == ".parquet":
            tasks += [("parquet", str(f), g) for g in range(_check_parquet(f))]
        else:
            tasks += [("jsonl", str(f), s, min(size, s + jsonl_chunk_bytes)) for s in range(0, size, jsonl_chunk_bytes)]
    if batch:
        tasks.append(("text", batch))
    return tasks


def task_file(task: Task) -> str | None:
    """The one file a task reads (None for batches and in-memory documents)."""
    return task[1] if task[0] in ("jsonl", "parquet") else None


def read_task(task: Task) -> Iterator[str]:
    """The non-blank documents of one task, in order."""
    kind = task[0]
    if kind == "docs":
        docs: Iterable[str] = task[1]
    elif kind == "text":
        docs = _iter_text_files(task[1])
    elif kind == "jsonl":
        docs = _iter_jsonl_range(Path(task[1]), task[2], task[3])
    elif kind == "parquet":
        docs = _iter_parquet_group(Path(task[1]), task[2])
    else:
        raise ValueError(f"unknown task {kind!r}")
    return (d for d in docs if d.strip())


def _iter_text_files(paths: list[str]) -> Iterator[str]:
    for p in paths:
        text = _read_text_file(Path(p))
        if not text.strip():
            raise ExocortexError(f"{p}: no text (the file is blank); remove it or add text")
        yield text


def iter_documents(path: str | Path) -> Iterator[str]:
    for task in plan_tasks(find_files(path)):
        yield from read_task(task)


def corpus_tasks(data: DataConfig, docs_per_task: int = 4096) -> tuple[list[Task], str, list[str] | None]:
    """The configured corpus as reading tasks, a short description of it for the report, and (for the
    generated world, which lives in memory anyway) the documents themselves."""
    if data.path:
        return plan_tasks(find_files(data.path)), f"user data: {data.path}", None
    from exocortex.data.world import generate_documents

    docs = generate_documents(seed=data.world_seed, target_bytes=data.world_bytes, hold_out=True)
    tasks = [("docs", docs[i:i + docs_per_task]) for i in range(0, len(docs), docs_per_task)]
    return tasks, f"generated world (seed {data.world_seed}, {data.world_bytes / 1e6:.0f} MB)", docs


def load_documents(data: DataConfig) -> tuple[list[str], str]:
    """All documents of the configured source in memory (small corpora and tests; the tokenizer stage
    streams instead), and a short description of it for the report."""
    tasks, source, docs = corpus_tasks(data)
    docs = docs if docs is not None else [d for t in tasks for d in read_task(t)]
    if not docs:
        raise ExocortexError(f"data path {data.path} contains no text")
    return docs, source


def split_train_val(docs: list[str], val_fraction: float, dedup: bool = True) -> tuple[list[str], list[str]]:
    """Deterministic split: exact and near-duplicate documents removed first (data/dedup.py: the first
    occurrence stays), so that no document has a copy on the other side; then every k-th document goes to
    val (at least one each side). The tokenizer stage splits streamed corpora the same way (data/tokens.py)."""
    if dedup:
        docs = [docs[i] for i in dedup_texts(docs)[0]]
    if len(docs) < 2:
        # a single long document: split its text instead
        text = docs[0]
        cut = max(1, int(len(text) * (1 - val_fraction)))
        return [text[:cut]], [text[cut:] or text[-1000:]]
    k = val_every(val_fraction)
    val = docs[::k]
    train = [d for i, d in enumerate(docs) if i % k]
    return train, val


def val_every(val_fraction: float) -> int:
    """Document i is held out for validation when i % val_every == 0."""
    return max(2, round(1 / max(val_fraction, 1e-6)))
