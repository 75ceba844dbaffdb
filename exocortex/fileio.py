"""Files that are never left half-written: a crash mid-write leaves the old file, not a broken one."""
from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every complete record of a jsonl log; a line cut short by a crash is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")  # a damaged byte costs its line, not the log
    except OSError as e:  # a log feeds plots and reports: without it they lack a curve, nothing fails
        print(f"warning: cannot read {path} ({e.strerror or e}); its records are left out")
        return []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out
