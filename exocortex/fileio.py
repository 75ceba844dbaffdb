"""Files that are never left half-written: a crash mid-write leaves the old file, not a broken one.

The pattern everywhere: write a temp file (or directory) next to the target, fsync it, rename it over the
target, fsync the directory. A rename within one filesystem is atomic, and the fsyncs order the data before
the rename, so after a crash or power loss a reader finds the old file or the new one, never a mix.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

from exocortex.errors import ExocortexError, first_line

_trash_names = itertools.count()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file in a directory tree, then the directories themselves (deepest first)."""
    for root, dirs, files in os.walk(directory, topdown=False):
        for f in files:
            fsync_path(os.path.join(root, f))
        fsync_path(root)


def temp_path(target: str | os.PathLike) -> Path:
    """Where to write `target` before renaming it into place: `.<name>.tmp<pid>` next to it. Such temps left
    by a killed process (kill -9, power loss) are removed here, the next time the target is written."""
    target = Path(target)
    for stale in target.parent.glob(f".{target.name}.tmp*"):
        _remove_if_orphaned(stale, stale.name[len(target.name) + 5:])
    return target.with_name(f".{target.name}.tmp{os.getpid()}")


def _remove_if_orphaned(path: Path, pid: str) -> None:
    """Remove a temp or trash entry whose process is gone (kill -9, power loss); a live one is still in use."""
    if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file + fsync + rename; on any failure (a full disk) the old file stays and the temp
    file is removed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory tree without ever leaving a half-deleted one under its name: it is renamed to a
    hidden sibling `.trash_<pid>_<n>_<name>` first (atomic), then deleted. Trash that a killed process left
    next to it is swept here; a name of its own per call, so trash that would not delete never blocks."""
    path = Path(path)
    if path.parent.is_dir():
        for stale in path.parent.glob(".trash_*"):
            _remove_if_orphaned(stale, stale.name.split("_")[1])
    if not path.exists():
        return
    trash = path.with_name(f".trash_{os.getpid()}_{next(_trash_names)}_{path.name}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def staging_dir(target: str | os.PathLike) -> Path:
    """An empty hidden directory next to `target` (same filesystem, so its files can be renamed into place)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = temp_path(target)
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    return staged


def commit_files(staged: Path, target: Path, last: str | None = None) -> None:
    """Move every file of a fully written staging directory into `target` (fsynced first; renames only,
    `last` last, so it marks a complete set), then remove the staging directory. Files of `target` that the
    staging directory does not have are left alone. The one commit routine: exports, tokenizers, token files."""
    fsync_tree(staged)
    target.mkdir(parents=True, exist_ok=True)
    if last:  # the old set is no longer complete from here until the new one is
        (target / last).unlink(missing_ok=True)
    for f in sorted(staged.iterdir(), key=lambda p: p.name == last):
        os.replace(f, target / f.name)
    fsync_path(target)
    shutil.rmtree(staged, ignore_errors=True)


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
               type(None): "null"}


def read_json_object(path: str | os.PathLike, redo: str) -> dict:
    """A JSON object file of a run (config, metadata, summaries), or one ExocortexError naming the file and
    saying how to make it again (`redo`). Every way such a file goes bad lands here: unreadable (a directory,
    no permission), not UTF-8, not JSON, nested deeper than the parser's stack (RecursionError), or not an
    object at its top."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        why = e.strerror or first_line(e)
    except UnicodeDecodeError:
        why = "not UTF-8"
    except json.JSONDecodeError as e:
        why = f"not valid JSON: {first_line(e, 120)}"
    except RecursionError:
        why = "nested too deeply"
    else:
        if isinstance(value, dict):
            return value
        why = f"{_JSON_KINDS.get(type(value), 'a value')} where a JSON object belongs"
    raise ExocortexError(f"cannot read {path} ({why}); {redo}")


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
        except (json.JSONDecodeError, RecursionError):  # a torn line, or one nested past the parser's stack
            continue
        if isinstance(record, dict):
            out.append(record)
    return out
