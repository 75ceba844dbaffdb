"""The model's notes about its user, kept across sessions: the `remember`, `recall` and `forget` tools.

One SQLite database (`$EXOCORTEX_HOME/notes.sqlite`, default ~/.exocortex) holds every user's notes; a note
belongs to one user key (the chat CLI's `--user`, or for the server the request's `user` field, apps/serve.py)
and no tool ever reads or changes another key's notes. Each note keeps where it came from
(`source`: chat, api, cli) and when it was written or last edited. Limits: NOTE_CHARS per note and
MAX_NOTES per user; past them the tool answers with an error the model reads (and the owner can `exocortex
memory forget`). The owner sees and changes everything with `exocortex memory list|edit|forget`, or on the
server's /v1/memory and its chat page's Memory panel.

Like lookup, `recall` and `forget` with no query use the user's last message (a small model decides *when*
to recall; copying the right words into a query is what it does badly). A note's text is data to the model,
like a document's.
"""
from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from exocortex.errors import ExocortexError
from exocortex.infer.docstore import STOPWORDS
from exocortex.infer.tools import Tool, ToolError, string_arg

LOCAL_USER = "local"  # whose notes `exocortex chat` keeps, and the server's for requests without a `user`
NOTE_CHARS = 300
MAX_NOTES = 1000
RECALL_K = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id INTEGER PRIMARY KEY, user TEXT NOT NULL, text TEXT NOT NULL, source TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS notes_user ON notes(user);
CREATE VIRTUAL TABLE IF NOT EXISTS notes_fts USING fts5(text, content='notes', content_rowid='id',
                                                        tokenize='porter unicode61');
"""
_WORD = re.compile(r"\w+")
# words too common to find a note by (a question's "what is my ..."): without them "What is my dog called?"
# finds the note about the dog, not every note with "is" in it
_STOP = STOPWORDS | frozenset("please tell remember forget recall know".split())


def default_notes_path() -> Path:
    return Path(os.environ.get("EXOCORTEX_HOME", "~/.exocortex")).expanduser() / "notes.sqlite"


@dataclass
class Note:
    id: int
    user: str
    text: str
    source: str
    created: float
    updated: float


class NoteStore:
    def __init__(self, path: str | Path, max_notes: int = MAX_NOTES, note_chars: int = NOTE_CHARS):
        self.path, self.max_notes, self.note_chars = Path(path), max_notes, note_chars
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # the server's tool threads share the connection: one use at a time
        try:
            self.db = sqlite3.connect(str(self.path), check_same_thread=False)
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ExocortexError(f"{self.path} is not a notes database ({e}); move it away to start a new one") from None

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ what the owner and the tools do
    def add(self, user: str, text: str, source: str) -> int:
        text = " ".join(text.split())
        if not text:
            raise ToolError("the note is empty")
        if len(text) > self.note_chars:
            raise ToolError(f"a note holds at most {self.note_chars} characters (this one has {len(text)})")
        with self.lock, self.db:
            if self.db.execute("SELECT count(*) FROM notes WHERE user = ?", (user,)).fetchone()[0] >= self.max_notes:
                raise ToolError(f"memory is full ({self.max_notes} notes); forget some first")
            same = self.db.execute("SELECT id FROM notes WHERE user = ? AND text = ?", (user, text)).fetchone()
            if same:
                return same[0]
            now = time.time()
            nid = self.db.execute("INSERT INTO notes(user, text, source, created, updated) VALUES (?, ?, ?, ?, ?)",
                                  (user, text, source, now, now)).lastrowid
            self.db.execute("INSERT INTO notes_fts(rowid, text) VALUES (?, ?)", (nid, text))
        return nid

    def search(self, user: str, query: str, k: int = RECALL_K, latest: bool = True) -> list[Note]:
        """The user's notes best matching `query` (BM25 over their words); with no words to go by, or (latest)
        none matching, the latest: a question need not share a word with the note that answers it ("What is
        my job?" and "I work as a pilot"), and the model reads the notes and judges."""
        terms = [w for w in dict.fromkeys(w.lower() for w in _WORD.findall(query)) if w not in _STOP]
        with self.lock:
            if not terms:
                rows = self.db.execute("SELECT * FROM notes WHERE user = ? ORDER BY updated DESC, id DESC LIMIT ?",
                                       (user, k)).fetchall()
            else:
                rows = self.db.execute(
                    "SELECT n.* FROM notes_fts JOIN notes n ON n.id = notes_fts.rowid WHERE notes_fts MATCH ? "
                    "AND n.user = ? ORDER BY bm25(notes_fts), n.id DESC LIMIT ?",
                    (" OR ".join(f'"{t}"' for t in terms), user, k)).fetchall()
        if not rows and terms and latest:
            return self.search(user, "", k)
        return [Note(*r) for r in rows]

    def list(self, user: str | None = None) -> list[Note]:
        with self.lock:
            rows = self.db.execute("SELECT * FROM notes" + (" WHERE user = ?" if user is not None else "")
                                   + " ORDER BY user, id", (() if user is None else (user,))).fetchall()
        return [Note(*r) for r in rows]

    def get(self, user: str, note_id: int) -> Note | None:
        with self.lock:
            row = self.db.execute("SELECT * FROM notes WHERE id = ? AND user = ?", (note_id, user)).fetchone()
        return Note(*row) if row else None

    def edit(self, user: str, note_id: int, text: str) -> None:
        text = " ".join(text.split())
        if not text or len(text) > self.note_chars:
            raise ToolError(f"a note holds 1 to {self.note_chars} characters")
        old = self.get(user, note_id)
        if old is None:
            raise ToolError(f"no note {note_id}")
        with self.lock, self.db:
            self.db.execute("INSERT INTO notes_fts(notes_fts, rowid, text) VALUES ('delete', ?, ?)", (note_id, old.text))
            self.db.execute("UPDATE notes SET text = ?, updated = ? WHERE id = ?", (text, time.time(), note_id))
            self.db.execute("INSERT INTO notes_fts(rowid, text) VALUES (?, ?)", (note_id, text))

    def forget(self, user: str, note_id: int) -> Note:
        old = self.get(user, note_id)
        if old is None:
            raise ToolError(f"no note {note_id}")
        with self.lock, self.db:
            self.db.execute("INSERT INTO notes_fts(notes_fts, rowid, text) VALUES ('delete', ?, ?)", (note_id, old.text))
            self.db.execute("DELETE FROM notes WHERE id = ?", (note_id,))
        return old

    # ------------------------------------------------------------------ the model's tools
    def tools(self, user: str, source: str) -> dict[str, Tool]:
        """remember / recall / forget bound to one user's notes (what a session or a request gets)."""

        def remember(arguments: dict) -> str:
            nid = self.add(user, string_arg(arguments, "note", "remember"), source)
            return f"saved as note {nid}"

        def recall(arguments: dict) -> str:
            notes = self.search(user, string_arg(arguments, "query", "recall", default=""))
            return "\n".join(f"note {n.id}: {n.text}" for n in notes) if notes else "no notes"

        def forget(arguments: dict) -> str:
            notes = self.search(user, string_arg(arguments, "query", "forget", default=""), k=1, latest=False)
            if not notes:
                return "no notes"
            gone = self.forget(user, notes[0].id)
            return f"forgot note {gone.id}: {gone.text}"

        return {"remember": remember, "recall": recall, "forget": forget}
