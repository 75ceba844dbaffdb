"""`exocortex synth`: a data engine that writes conversation datasets (JSONL) from three sources, every row with
its provenance, ready to train on as a `jsonl:<path>` task (midtrain / sft mixtures; exocortex/tasks/benchmarks.py).

Sources (one module each):
  generators   the built-in task generators (exocortex/tasks): reference answers known by construction;
  teacher      any OpenAI-compatible endpoint: (a) answers our generators' questions, kept only when the task's
               grader passes them; (b) writes new questions from seeded personas x topics x styles and answers
               them, verified where the answer can be checked (calculator, the python sandbox, agreement);
  self         a trained run's own samples: k per prompt at temperature T, kept when graded correct
               (rejection sampling, i.e. self-distillation).

A row is {"messages": [...], "answer": str, "provenance": {...}}: the messages and answer are what the jsonl:
loader reads (it ignores the rest); provenance says where the row came from and how it was checked:
  {"source": "generator" | "teacher" | "self", "task": name, "family": phrasing family (when the generator
   gives one), "seed": the job's seed, "item": the item's number (seed and item together redraw it),
   "teacher": {"url", "model"} and "mode" (teacher rows), "verification": {"method": ..., "passed": bool | None}}.

Items are numbered; item i of a job draws from its own rng (`item_rng(seed, i)`), so a job can stop anywhere and
resume: the output is appended to, and items already in it (or in its `.rejected.jsonl` beside it, which records
every item that was tried and not kept, with the reason) are skipped. Near-duplicates (MinHash/LSH,
exocortex/data/dedup.py) of a row already written are rejected, across resumes too.
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from exocortex.errors import ExocortexError

SOURCES = ("generators", "teacher", "self")


def item_rng(seed: int, item: int) -> random.Random:
    """The rng of item `item` of a job seeded `seed`: independent of every other item, so resuming redraws it."""
    return random.Random(f"synth-{seed}-{item}")


def pick_task(rng: random.Random, mixture: dict[str, float]) -> str:
    names = [k for k, w in mixture.items() if w > 0]
    if not names:
        raise ExocortexError("--tasks needs at least one task with a positive weight")
    return rng.choices(names, [mixture[k] for k in names])[0]


@dataclass
class Dataset:
    """The output file of a synth job, opened for appending: rows kept go to `path`, items tried and not kept
    to `path.rejected.jsonl` (with why). Knows which items are done and dedups against every row written."""

    path: Path
    source: str
    seed: int
    dedup_threshold: float = 0.8
    mode: str = ""  # the teacher's mode: answering and writing number their items separately
    done: set[int] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=lambda: {"kept": 0, "rejected": 0, "duplicates": 0})
    reasons: dict[str, int] = field(default_factory=dict)
    collapse: dict = field(default_factory=dict)  # collapse metrics of the whole file, after the job

    def __post_init__(self):
        self.path = Path(self.path)
        self.rejected_path = self.path.with_name(self.path.name.removesuffix(".jsonl") + ".rejected.jsonl")
        from exocortex.data.dedup import NearDuplicates  # datasketch: imported by the jobs that dedup, not the CLI

        self.near = NearDuplicates(threshold=self.dedup_threshold)
        self._seen: set[str] = set()  # normalised texts kept: tells an exact duplicate from a near one
        self.resumed = 0
        for f, kept in ((self.path, True), (self.rejected_path, False)):
            for row in _read_rows(f):
                p = row.get("provenance", {})
                if kept:  # every row already written counts for dedup, whatever job wrote it
                    text = _text(row)
                    self.near.check_and_add(text)
                    self._seen.add(_normal(text))
                job = (p.get("source"), p.get("seed"), p.get("mode", ""))
                if job == (_source_label(self.source), self.seed, self.mode) and "item" in p:
                    self.done.add(int(p["item"]))
        self.resumed = len(self.done)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.path, "a", encoding="utf-8")
        self._rej = open(self.rejected_path, "a", encoding="utf-8")

    def todo(self, n: int) -> list[int]:
        return [i for i in range(n) if i not in self.done]

    def keep(self, row: dict) -> bool:
        """Write `row` unless it near-duplicates one already written (then record it as rejected); True if kept."""
        text = _text(row)
        if self.near.check_and_add(text):
            dup = "exact" if _normal(text) in self._seen else "near"
            self.counts["duplicates"] += 1
            self.reject(row["provenance"], f"{dup} duplicate", row["messages"])
            return False
        self._out.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._out.flush()
        self._seen.add(_normal(text))
        self.counts["kept"] += 1
        return True

    def reject(self, provenance: dict, reason: str, messages: list | None = None) -> None:
        """Record an item that was tried and not kept: resuming skips it, and the summary counts why."""
        row = {"provenance": provenance, "reason": reason, **({"messages": messages} if messages else {})}
        self._rej.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._rej.flush()
        key = reason.split(":")[0]
        self.reasons[key] = self.reasons.get(key, 0) + 1
        if not reason.endswith(" duplicate"):
            self.counts["rejected"] += 1

    def close(self) -> None:
        self._out.close()
        self._rej.close()


def _text(row: dict) -> str:
    """What duplicates are judged on: the user's and the assistant's words, tool calls included (not tool
    outputs or system prompts: they are not the data's own wording)."""
    from exocortex.data.collapse import conversation_text

    return conversation_text(row) if row.get("messages") else ""


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def _source_label(source: str) -> str:
    return "generator" if source == "generators" else source


def _read_rows(f: Path) -> list[dict]:
    """The rows of a file being appended to. A last line cut short (a job killed while writing) is removed."""
    if not f.exists():
        return []
    data = f.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        print(f"synth: {f}: removing a last line cut short ({len(data) - cut} bytes); that item is done again",
              file=sys.stderr)
        with open(f, "r+b") as fh:
            fh.truncate(cut)
        data = data[:cut]
    rows = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ExocortexError(f"{f}:{lineno}: not JSON; synth appends to this file: move it away or fix "
                                     "it") from None
    return rows


def provenance(source: str, task: str, seed: int, item: int, example: dict | None = None, **extra) -> dict:
    p = {"source": _source_label(source), "task": task}
    if example is not None and example.get("family"):
        p["family"] = example["family"]
    return {**p, "seed": seed, "item": item, **extra}


def row(messages: list[dict], answer: str, prov: dict) -> dict:
    return {"messages": messages, "answer": answer, "provenance": prov}


class Progress:
    """A one-line progress bar on stderr (a plain line every ~20 s when stderr is not a terminal)."""

    def __init__(self, total: int, what: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=what, unit="item", file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 20.0)
        self.t0 = time.time()

    def update(self, ds: Dataset) -> None:
        self.bar.set_postfix(kept=ds.counts["kept"], rejected=ds.counts["rejected"], dups=ds.counts["duplicates"],
                             refresh=False)
        self.bar.update(1)

    def close(self) -> float:
        self.bar.close()
        return time.time() - self.t0


def collapse_lines(path: Path) -> tuple[dict, list[str]]:
    """Collapse metrics (exocortex/data/collapse.py) of every row in the file (user and assistant text), and the
    lines that say them: one summary, then one per alarm."""
    from exocortex.data.collapse import collapse_alarms, collapse_metrics, conversation_text

    m = collapse_metrics([conversation_text(r) for r in _read_rows(path) if r.get("messages")])
    alarms = collapse_alarms(m)
    if not m["n"]:
        return m, []
    head = (f"synth: collapse of {path.name} ({m['n']} rows): distinct-2 {m['distinct_2']:.3f}, self-BLEU "
            f"{m['self_bleu']:.3f}, numbers masked {m['template_distinct_2']:.3f} / {m['template_self_bleu']:.3f}, "
            f"zlib {m['compression_ratio']:.3f}, duplicates {m['exact_duplicate_rate']:.1%} exact, "
            f"{m['near_duplicate_rate']:.1%} near" + ("" if alarms else "; no alarm"))
    return m, [head] + [f"synth: collapse alarm: {a}" for a in alarms]


def summary_line(ds: Dataset, seconds: float, tried: int) -> str:
    c = ds.counts
    why = ", ".join(f"{k} {v}" for k, v in sorted(ds.reasons.items()))
    return (f"synth: {tried} items in {seconds:.1f}s ({tried / max(seconds, 1e-9):.1f}/s): kept {c['kept']} rows, "
            f"rejected {c['rejected']}, near-duplicates {c['duplicates']}" + (f" ({why})" if why else "")
            + (f"; {ds.resumed} items were already done" if ds.resumed else "")
            + f" -> {ds.path}" + (f" (not kept: {ds.rejected_path.name})" if c['rejected'] + c['duplicates'] else ""))
