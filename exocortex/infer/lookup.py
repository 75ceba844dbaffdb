"""`lookup`: keyword search (BM25) over a document index — the user's own documents or the generated world's
encyclopedia. The model calls `lookup` ({"query": ...}, or no query: the user's question) and reads the
best-matching passage as the tool's response, so it can answer about things it never memorised ("a cognitive
core that looks things up").
"""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from exocortex.data.sources import iter_documents
from exocortex.data.world import World
from exocortex.errors import ExocortexError
from exocortex.infer.docstore import DocumentStore, default_index_path, tool_answer
from exocortex.infer.tools import TOOLS, search_tool

_WORD = re.compile(r"\w+")


def _terms(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


class DocumentIndex:
    """Okapi BM25 over passages. Small and dependency-free: the indexes here hold thousands of passages."""

    def __init__(self, passages: list[str], titles: list[str] | None = None, k1: float = 1.2, b: float = 0.75,
                 max_chars: int = 600, title_weight: int = 3):
        titles = titles or [""] * len(passages)
        kept = [(p.strip(), t) for p, t in zip(passages, titles) if p.strip()]
        self.passages, self.titles = [p for p, _ in kept], [t for _, t in kept]
        self.k1, self.b, self.max_chars = k1, b, max_chars
        # a title (an entity's name, a file's name) counts as title_weight extra mentions: the passage *about*
        # something outranks passages that merely mention it
        self.tfs = [Counter(_terms(p)) + Counter({w: title_weight for w in _terms(t)}) for p, t in kept]
        self.lens = [sum(tf.values()) for tf in self.tfs]
        self.avg_len = sum(self.lens) / max(1, len(self.lens))
        df = Counter(t for tf in self.tfs for t in tf)
        n = len(self.passages)
        self.idf = {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}

    def search(self, query: str, k: int = 1) -> list[tuple[float, str]]:
        q = set(_terms(query))
        scored = []
        for i, tf in enumerate(self.tfs):
            s = 0.0
            for t in q:
                f = tf.get(t)
                if f:
                    s += self.idf[t] * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * self.lens[i] / self.avg_len))
            if s > 0:
                scored.append((s, i))
        scored.sort(key=lambda x: (-x[0], x[1]))
        return [(s, self.passages[i]) for s, i in scored[:k]]

    def __call__(self, query: str) -> str:
        """The tool: the best passage, cut to max_chars (tool output has to fit the model's context)."""
        return tool_answer(query, lambda q: [("", p) for _, p in self.search(q, 1)], self.max_chars)

    @classmethod
    def from_paths(cls, paths: list[str | Path], passage_chars: int = 500) -> "DocumentIndex":
        """Index the user's text files: paragraphs, merged or split to about passage_chars each."""
        passages: list[str] = []
        for doc in (d for p in paths for d in iter_documents(p)):
            buf = ""
            for para in re.split(r"\n\s*\n", doc):
                para = " ".join(para.split())
                while len(para) > passage_chars:  # long paragraph: cut at a sentence or word boundary
                    cut = max(para.rfind(". ", 0, passage_chars) + 1, para.rfind(" ", 0, passage_chars))
                    cut = cut if cut > 0 else passage_chars
                    passages.append(para[:cut].strip())
                    para = para[cut:].strip()
                if buf and len(buf) + len(para) > passage_chars:
                    passages.append(buf)
                    buf = ""
                buf = f"{buf} {para}".strip()
            if buf:
                passages.append(buf)
        return cls(passages)


def world_index(world) -> DocumentIndex:
    """One passage per entity of the generated world: every fact about it in canonical sentences, the name
    spelled out once and pronouns after that (tool output must fit a 256-token context on the tiny preset)."""
    by_subject: dict[str, list[str]] = {}
    for f in world.facts():
        by_subject.setdefault(f.subject, []).append(f.answer)
    passages, titles = [], []
    for subject, sents in by_subject.items():
        e = world.entity(subject)
        gender = getattr(e, "gender", None)
        he, his = {"f": ("she", "her"), "m": ("he", "his")}.get(gender, ("it", "its"))
        name = re.compile(rf"(?:\bthe )?{re.escape(subject)}('s)?", re.I)
        rest = [name.sub(lambda m: his if m.group(1) else he, s) for s in sents[1:]]
        rest = [s[0].upper() + s[1:] for s in rest]
        passages.append(" ".join([sents[0], *rest]))
        titles.append(subject)
    return DocumentIndex(passages, titles)


def tools_for_run(cfg, docs: list[str] | None = None, index: str | None = None) -> dict:
    """The tools a run's chat model gets: calculator, python, and lookup over the user's documents: `docs`
    (files read into memory now) or `index` (the on-disk index `exocortex index` keeps; "" = its default
    place), else, for a run on the generated world, over the world's encyclopedia."""
    tools = dict(TOOLS)
    if docs and index is not None:
        raise ExocortexError("give --docs (files read now) or --index (the index `exocortex index` keeps), not both")
    if index is not None:
        path = Path(index) if index else default_index_path()
        if not path.exists():
            raise ExocortexError(f"no document index at {path}: build it with `exocortex index PATH...`")
        tools["lookup"] = search_tool(DocumentStore(path))
    elif docs:
        tools["lookup"] = search_tool(DocumentIndex.from_paths(docs))
    elif not cfg.data.path:
        tools["lookup"] = search_tool(world_index(World(seed=cfg.data.world_seed)))
    return tools
