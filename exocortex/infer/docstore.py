"""Your documents, indexed on disk: `exocortex index PATH...` and the `lookup` tool over them.

A SQLite database (the standard library's sqlite3 with its FTS5 full-text extension) holds every passage of
the indexed text and markdown files with where it came from (file, first and last line), and an FTS5 index
over them ranked by BM25. Indexing is incremental: a file whose size and modification time are unchanged is
skipped, one whose content changed has its passages replaced, and a file gone from an indexed folder loses
its passages; every update is one transaction, so an interrupted or failed one leaves the index as it was.
Why FTS5 rather than our in-memory BM25 (lookup.DocumentIndex): the index persists (no rebuild per process),
queries read only the posting lists of the query's terms, and memory does not grow with the collection
(bench/index.py; docs/benchmarks.md has the numbers).

A hit's text is data for the model to read, never instructions: the tool's output is the passage under a
source line ("notes/trip.md, lines 12-18:"), and the engine's renderer keeps special-token strings in it
plain like any text (exocortex/tokenizer.py: plain_text).
"""
from __future__ import annotations

import bisect
import os
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

from exocortex.errors import ExocortexError

TEXT_SUFFIXES = (".txt", ".md")


def default_index_path() -> Path:
    """$EXOCORTEX_HOME/documents.sqlite (default ~/.exocortex): the owner's, not a run's."""
    return Path(os.environ.get("EXOCORTEX_HOME", "~/.exocortex")).expanduser() / "documents.sqlite"
PASSAGE_CHARS = 500
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, shown TEXT NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id), start_line INTEGER NOT NULL,
    end_line INTEGER NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS passages_file ON passages(file_id);
CREATE VIRTUAL TABLE IF NOT EXISTS passages_fts USING fts5(
    text, title, content='passages_view', content_rowid='id', tokenize='porter unicode61');
CREATE VIEW IF NOT EXISTS passages_view AS
    SELECT passages.id AS id, passages.text AS text, files.path AS title
    FROM passages JOIN files ON files.id = passages.file_id;
"""
TITLE_WEIGHT = 3.0  # a file's name counts like this many mentions in its passages (BM25 column weight)
_WORD = re.compile(r"\w+")
# words too common to find anything by: left out of queries ("Where does Mira live?" searches "mira live"), which
# also spares FTS5 walking their long posting lists (a query over 140k passages: bench/index.py)
STOPWORDS = frozenset("a an and are as at be by did do does for from has have how i in is it its me my of on or so "
                      "that the their them they this to was we were what when where which who whom whose why will "
                      "with you your".split())


@dataclass
class Passage:
    text: str
    path: str
    start_line: int
    end_line: int
    score: float = 0.0

    @property
    def source(self) -> str:
        """Where it came from, as a person would cite it: `notes/trip.md, lines 12-18`."""
        lines = f"line {self.start_line}" if self.start_line == self.end_line else \
            f"lines {self.start_line}-{self.end_line}"
        return f"{self.path}, {lines}"


@dataclass
class UpdateSummary:
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    passages: int = 0          # passages written by this update
    skipped: list[str] = field(default_factory=list)  # "path: why" for files that could not be indexed

    def line(self) -> str:
        s = (f"{self.added} added, {self.changed} changed, {self.removed} removed, {self.unchanged} unchanged "
             f"({self.passages} passages written)")
        return s + (f"; {len(self.skipped)} skipped" if self.skipped else "")


def split_passages(text: str, passage_chars: int = PASSAGE_CHARS) -> list[tuple[int, int, str]]:
    """A document as passages of about passage_chars: paragraphs (blank-line separated) merged while they fit,
    a longer one cut at a sentence (else a word) boundary. Each passage as (first line, last line, text),
    lines numbered from 1, whitespace inside a passage collapsed to single spaces."""
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def line_of(offset: int) -> int:
        return bisect.bisect_left(newlines, offset) + 1

    pieces: list[tuple[int, int]] = []  # (start, end) character offsets of paragraphs, long ones cut
    for m in re.finditer(r"\S(?:.*?\S)?(?=\s*\n\s*\n|\s*\Z)", text, re.S):
        start, end = m.start(), m.end()
        while end - start > passage_chars:
            window = text[start:start + passage_chars]
            cut = max(window.rfind(". ") + 1, window.rfind(".\n") + 1)
            cut = cut if cut > 0 else window.rfind(" ")
            cut = cut if cut > 0 else passage_chars
            pieces.append((start, start + cut))
            start += cut
            while start < end and text[start].isspace():
                start += 1
        pieces.append((start, end))
    out: list[tuple[int, int, str]] = []
    buf: tuple[int, int] | None = None
    for start, end in pieces:
        if buf is not None and end - buf[0] > passage_chars:
            out.append(buf)
            buf = None
        buf = (buf[0] if buf else start, end)
    if buf is not None:
        out.append(buf)
    return [(line_of(s), line_of(e - 1), " ".join(text[s:e].split())) for s, e in out]


def _match_query(query: str) -> str:
    """An FTS5 query matching passages with any of the query's words, each quoted: user text never reaches
    FTS5's query syntax (AND, NEAR, column filters, ...)."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))
    terms = [w for w in words if w not in STOPWORDS] or words  # a query of only common words still searches
    return " OR ".join(f'"{t}"' for t in terms)


class DocumentStore:
    """The index database at `path` (created if missing). Files are kept by absolute path."""

    def __init__(self, path: str | Path, passage_chars: int = PASSAGE_CHARS, max_chars: int = 600):
        self.path, self.passage_chars, self.max_chars = Path(path), passage_chars, max_chars
        self.lock = threading.Lock()  # one connection, shared by the server's tool threads: one use at a time
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), check_same_thread=False)
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ExocortexError(f"{self.path} is not a document index ({e}); give another --index path or "
                                 "remove it to build a new one") from None
        except sqlite3.OperationalError as e:  # pragma: no cover - a Python built without FTS5
            raise ExocortexError(f"this Python's SQLite has no FTS5 ({e}): the document index needs it") from None

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ indexing
    def update(self, roots: list[str | Path], progress=None) -> UpdateSummary:
        """Bring the index up to date with the text and markdown files under `roots` (files or folders). Files
        indexed earlier under these roots and gone now are removed; files under other roots are left alone."""
        summary = UpdateSummary()
        found: dict[str, tuple[Path, str]] = {}  # absolute path -> (file, how sources show it)
        scopes = []
        for root in roots:
            p = Path(root).expanduser().resolve()
            if not p.exists():
                raise ExocortexError(f"{root} does not exist")
            scopes.append(p)
            files = [p] if p.is_file() else sorted(
                f for f in p.rglob("*") if f.is_file() and not any(x.startswith(".") for x in f.relative_to(p).parts))
            for f in files:
                if f.suffix.lower() in TEXT_SUFFIXES:
                    # shown from the folder given, by its name: short enough for a small model's context
                    found[str(f)] = (f, f.name if p.is_file() else f"{p.name}/{f.relative_to(p).as_posix()}")
                elif p.is_file():
                    raise ExocortexError(f"{root}: only {', '.join(TEXT_SUFFIXES)} files can be indexed")
        with self.lock:
            return self._update(found, scopes, summary, progress)

    def _update(self, found: dict[str, tuple[Path, str]], scopes: list[Path], summary: UpdateSummary,
                progress) -> UpdateSummary:
        known = {path: (fid, size, mtime) for fid, path, size, mtime in
                 self.db.execute("SELECT id, path, size, mtime_ns FROM files")}
        with self.db:  # one transaction: all of it or nothing
            for i, (path, (f, shown)) in enumerate(sorted(found.items())):
                if progress:
                    progress(i, len(found), path)
                st = f.stat()
                old = known.get(path)
                if old and old[1] == st.st_size and old[2] == st.st_mtime_ns:
                    summary.unchanged += 1
                    continue
                try:
                    text = f.read_bytes().decode("utf-8")
                except (OSError, UnicodeDecodeError) as e:
                    summary.skipped.append(f"{path}: {'not UTF-8 text' if isinstance(e, UnicodeDecodeError) else e}")
                    continue
                if "\x00" in text[:8192]:
                    summary.skipped.append(f"{path}: looks binary (NUL bytes)")
                    continue
                if old:
                    self._remove(old[0])
                    summary.changed += 1
                else:
                    summary.added += 1
                fid = self.db.execute("INSERT INTO files(path, shown, size, mtime_ns) VALUES (?, ?, ?, ?)",
                                      (path, shown, st.st_size, st.st_mtime_ns)).lastrowid
                for first, last, passage in split_passages(text, self.passage_chars):
                    pid = self.db.execute("INSERT INTO passages(file_id, start_line, end_line, text) "
                                          "VALUES (?, ?, ?, ?)", (fid, first, last, passage)).lastrowid
                    self.db.execute("INSERT INTO passages_fts(rowid, text, title) VALUES (?, ?, ?)",
                                    (pid, passage, _title(path)))
                    summary.passages += 1
            for path, (fid, _, _) in known.items():
                inside = any(Path(path) == s or s in Path(path).parents for s in scopes)
                if inside and path not in found:
                    self._remove(fid)
                    summary.removed += 1
        return summary

    def _remove(self, file_id: int) -> None:
        path = self.db.execute("SELECT path FROM files WHERE id = ?", (file_id,)).fetchone()[0]
        for pid, text in self.db.execute("SELECT id, text FROM passages WHERE file_id = ?", (file_id,)).fetchall():
            # an external-content FTS5 table forgets a row by being told its old values
            self.db.execute("INSERT INTO passages_fts(passages_fts, rowid, text, title) VALUES ('delete', ?, ?, ?)",
                            (pid, text, _title(path)))
        self.db.execute("DELETE FROM passages WHERE file_id = ?", (file_id,))
        self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    # ------------------------------------------------------------------ searching
    def search(self, query: str, k: int = 3) -> list[Passage]:
        match = _match_query(query)
        if not match:
            return []
        with self.lock:
            rows = self._rows(match, k)
        return [Passage(text, shown, a, b, -rank) for text, shown, a, b, rank in rows]

    def _rows(self, match: str, k: int) -> list[tuple]:
        return self.db.execute(
            "SELECT p.text, f.shown, p.start_line, p.end_line, bm25(passages_fts, 1.0, ?) AS rank "
            "FROM passages_fts JOIN passages p ON p.id = passages_fts.rowid JOIN files f ON f.id = p.file_id "
            "WHERE passages_fts MATCH ? ORDER BY rank, p.id LIMIT ?", (TITLE_WEIGHT, match, k)).fetchall()

    def __call__(self, query: str) -> str:
        """The `lookup` tool: the best passage under its source line, cut to max_chars."""
        return tool_answer(query, lambda q: [(f"{h.source}:\n", h.text) for h in self.search(q, 1)], self.max_chars)

    def stats(self) -> dict:
        files, passages = (self.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("files", "passages"))
        return {"files": files, "passages": passages, "bytes": self.path.stat().st_size}


_SOURCE_LINE = re.compile(r"(?P<path>[^\n]+), lines? (?P<first>\d+)(?:-(?P<last>\d+))?:\n(?P<text>.*)", re.S)


def citation(tool_output: str) -> dict | None:
    """The source of a `lookup` result from the document index (its first line, see DocumentStore.__call__):
    {source, path, start_line, end_line, text}; None for any other tool output."""
    m = _SOURCE_LINE.fullmatch(tool_output.strip("\n"))
    if not m:
        return None
    first = int(m["first"])
    last = int(m["last"] or first)
    return {"source": tool_output.split("\n", 1)[0][:-1], "path": m["path"], "start_line": first,
            "end_line": last, "text": m["text"]}


def tool_answer(query: str, search, max_chars: int) -> str:
    """What a lookup tool says for `query`: the best hit of search(query) -> [(heading, passage)], its passage
    cut at a word to max_chars (tool output has to fit a small model's context), or why there is none."""
    query = query.strip().strip("'\"")
    if not query:
        return "error: empty query"
    hits = search(query)
    if not hits:
        return "no results"
    heading, text = hits[0]
    return heading + (text if len(text) <= max_chars else text[:max_chars].rsplit(" ", 1)[0] + " ...")


def _title(path: str) -> str:
    """A file's name as words for the title column: `notes/trip-to-tarsk.md` -> `trip to tarsk`."""
    return " ".join(_WORD.findall(Path(path).stem.replace("_", " ")))
