"""A run directory: what every stage reads from and writes to, so any stage can be re-run alone.

    runs/<name>/config.json, tokenizer/, data/, checkpoints/<stage>/step_XXXXXX/ (+ latest), logs/, report.md, plots/

`RunDir` knows the paths, the stages' summaries (typed: the fields below are the contract between the stage
that writes a summary and the report that reads it), and which checkpoint of a stage counts: the newest
complete one, the one a stage starts from (its parents in the registry), and rolling a stage back.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

from exocortex import registry
from exocortex.errors import ExocortexError, first_line
from exocortex.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json_object, remove_tree
from exocortex.memory import peak_rss_mb

_STEP = re.compile(r"step_\d+")


# ----------------------------------------------------------------------------- stage summaries

@dataclass
class TokenizerSummary:
    source: str
    documents: int
    train_tokens: int
    val_tokens: int
    vocab_size: int
    bytes_per_token: float
    seconds_load: float
    seconds_train: float
    seconds_encode: float
    corpus_stats: dict
    corpus_stats_sample_documents: int | None = None  # user corpora: the statistics read this many documents
    # user corpora: documents removed before the split as exact / near duplicates of earlier ones (data/dedup.py),
    # out of "read"; None for the generated world, which is not deduplicated (stages/tokenizer.py says why)
    duplicates: dict | None = None
    peak_rss_mb: float | None = None   # the stage's peak resident memory (memory.py); set by write_summary


@dataclass
class PretrainSummary:
    params: int
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    final_train_loss: float
    final_val_loss: float | None
    val_bpb: float
    tokens_per_param: float
    device: str
    dtype: str
    checkpoint: str
    # None in summaries written by older versions, which did not measure them
    flops_per_token: int | None = None
    flops: float | None = None
    mfu: float | None = None
    packing: str | None = None
    world_size: int | None = None
    parallel: str | None = None
    time_budget_minutes: float | None = None
    peak_rss_mb: float | None = None   # the stage's peak resident memory (memory.py); set by write_summary

    def spent_line(self) -> str:
        """'spent X min, Y PFLOPs, Z tokens' (+ MFU where the peak is known) for logs and the report."""
        flops = f", {self.flops / 1e15:.3g} PFLOPs" if self.flops is not None else ""
        line = f"spent {self.seconds / 60:.1f} min{flops}, {self.tokens:,} tokens"
        if self.mfu is not None:
            line += f" at {self.mfu:.1%} MFU"
        if self.time_budget_minutes:
            line += f" (time budget {self.time_budget_minutes:g} min)"
        return line


@dataclass
class FinetuneSummary:
    parent: str
    conversations: int
    rows: int
    steps: int
    epochs: float
    tokens: int
    seconds: float
    tokens_per_second: float
    final_train_loss: float
    final_val_loss: float | None
    checkpoint: str
    peak_rss_mb: float | None = None   # the stage's peak resident memory (memory.py); set by write_summary


@dataclass
class RLSummary:
    parent: str
    task: str
    steps: int
    seconds: float
    checkpoint: str
    guard: dict | None                 # {"step", "reason", "kept"} when the degeneration guard stopped the run
    reward_first: float | None
    reward_last: float | None
    heldout: list = field(default_factory=list)  # [step, held-out accuracy] pairs
    peak_rss_mb: float | None = None   # the stage's peak resident memory (memory.py); set by write_summary


@dataclass
class EvalSummary:
    stages: dict = field(default_factory=dict)   # stage -> {metric: value}
    samples: list = field(default_factory=list)  # a few graded replies per task and stage
    # collapse metrics (data/collapse.py), "data: <stage>" per dataset trained on and "samples: <stage>" per stage's
    # samples (with "ask_ten_times"): {metric: value, "stage": stage, "alarms": [one line per alarm]}
    collapse: dict = field(default_factory=dict)
    # per chat stage: {"calibration": the fitted P(right) (infer/confidence.Calibration's fields), "replies":
    # [[task, split, index, right, predicted P(right)], ...] on the half it was measured on} (evals.calibration_scores)
    calibration: dict = field(default_factory=dict)
    # per chat stage: {task: {"seen"|"heldout": {phrasing family: [right, asked]}}}, for the tasks that hold
    # families out (evals.chat_scores)
    families: dict = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mb: float | None = None   # the stage's peak resident memory (memory.py); set by write_summary


@dataclass
class SpeedrunSummary:
    stage_seconds: dict = field(default_factory=dict)
    total_seconds: float = 0.0
    stage_peak_rss_mb: dict = field(default_factory=dict)  # each stage's own peak (memory.py)
    peak_rss_mb: float = 0.0  # the whole process's: the largest stage's


SUMMARIES: dict[str, type] = {"tokenizer": TokenizerSummary, "pretrain": PretrainSummary,
                              "midtrain": FinetuneSummary, "sft": FinetuneSummary, "rl": RLSummary,
                              "eval": EvalSummary, "speedrun": SpeedrunSummary}


# ----------------------------------------------------------------------------- the run directory

class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    def log_path(self, stage: str) -> Path:
        return self.logs_dir / f"{stage}.jsonl"

    # ------------------------------------------------------------------ summaries
    def write_summary(self, stage: str, summary: Any) -> None:
        expected = SUMMARIES[stage]
        if not isinstance(summary, expected):
            raise TypeError(f"the {stage} summary must be a {expected.__name__}")
        if getattr(summary, "peak_rss_mb", 0) is None:  # a stage's summary: its peak so far is the stage's peak
            summary.peak_rss_mb = round(peak_rss_mb(), 1)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.logs_dir / f"{stage}_summary.json", dataclasses.asdict(summary))

    def summary(self, stage: str):
        """The stage's typed summary, or None if it has not run. Keys this version does not know (a newer
        version wrote them) are left out; a missing required one is an error that says what to re-run."""
        p = self.logs_dir / f"{stage}_summary.json"
        if not p.exists():
            return None
        cls, redo = SUMMARIES[stage], f"re-run `exocortex {stage} --run {self.name}`"
        raw = read_json_object(p, redo)
        try:
            hints = get_type_hints(cls)
            known = {k: v for k, v in raw.items() if k in hints}
            for k, v in known.items():
                if not _is_a(v, hints[k]):
                    raise TypeError(f"{k}={v!r} is not {hints[k]}")
            return cls(**known)
        except TypeError as e:  # a wrong type, or a required field missing
            raise ExocortexError(f"{p} is unreadable or from another version ({first_line(e)}); {redo}") from None

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self, stage: str) -> Path:
        return self.path / "checkpoints" / stage

    def previous_checkpoints(self, stage: str) -> Path:
        """Where a fresh run of a stage sets the old checkpoints aside until its own first one is complete."""
        return self.path / "checkpoints" / f"{stage}.previous"

    def checkpoint_dirs(self, stage: str) -> list[Path]:
        """A stage's complete checkpoints, the one `latest` names first, then newest first. They come from
        checkpoints/<stage>, or from the set-aside old ones while a fresh run has not written one yet."""
        for root in (self.checkpoints(stage), self.previous_checkpoints(stage)):
            steps = [c for c in reversed(_step_dirs(root)) if _complete(c)]
            if steps:
                named = _pointed_to(root)  # missing or damaged: the newest comes first
                return sorted(steps, key=lambda c: c != named)  # stable: the named one first
        return []

    def latest_checkpoint(self, stage: str) -> Path | None:
        """Newest complete checkpoint of a stage, skipping any that is missing files (with a warning)."""
        dirs = self.checkpoint_dirs(stage)
        if not dirs:
            return None
        for c in _step_dirs(dirs[0].parent):
            if c.name > dirs[0].name and not _complete(c):
                print(f"warning: skipping incomplete checkpoint {c}")
        return dirs[0]

    def require_checkpoint(self, stage: str) -> Path:
        ckpt = self.latest_checkpoint(stage)
        if ckpt is None:
            raise ExocortexError(f"{self.path} has no '{stage}' checkpoint; run `exocortex {stage} --run {self.name}` first")
        return ckpt

    def parent_checkpoint(self, stage: str) -> tuple[str, Path]:
        """The checkpoint a stage starts from: its first parent (registry order) that the run has."""
        parents = registry.BY_NAME[stage].parents
        for parent in parents:
            ckpt = self.latest_checkpoint(parent)
            if ckpt is not None:
                return parent, ckpt
        return parents[-1], self.require_checkpoint(parents[-1])  # raises with a hint

    def chat_checkpoint(self, stage: str | None = None) -> Path:
        """The model to talk to: `stage`'s, or the newest chat stage's the run has."""
        if stage:
            return self.require_checkpoint(stage)
        for s in registry.CHAT_STAGES:
            ckpt = self.latest_checkpoint(s)
            if ckpt is not None:
                return ckpt
        return self.require_checkpoint(registry.CHAT_STAGES[-1])  # raises with a hint

    def trained_stages(self) -> dict[str, Path]:
        """Every model stage that has a checkpoint -> its latest one."""
        found = {s: self.latest_checkpoint(s) for s in registry.MODEL_STAGES}
        return {s: c for s, c in found.items() if c is not None}

    def refuse_to_replace(self, *stages: str, why: str = "",
                          instead: str = "--resume to continue or --force to start over") -> None:
        """A command that would replace trained checkpoints (of `stages`; default: every model stage) runs only
        with --force: the one-line refusal names them, says why they matter, and what to do instead."""
        found = {s: c for s in stages or registry.MODEL_STAGES if (c := self.latest_checkpoint(s)) is not None}
        if found:
            raise ExocortexError(f"{self.path} has trained checkpoints ({listed(found)}){why}; {instead}")

    def set_aside_checkpoints(self, stage: str) -> None:
        """A fresh run begins: its stage's checkpoints move (one rename) to <stage>.previous, where they still
        count until the new run's first checkpoint is complete (save_checkpoint then removes them). So a run
        that fails before then leaves the old result, and --resume continues the old run."""
        root, previous = self.checkpoints(stage), self.previous_checkpoints(stage)
        if any(_complete(c) for c in _step_dirs(root)):
            remove_tree(previous)  # older still: the current ones supersede them
            root.rename(previous)
        else:
            remove_tree(root)  # at most a crashed fresh run's temp files; `previous` stays what counts

    def drop_superseded(self, stage: str) -> None:
        """A new checkpoint of `stage` is complete: what it supersedes goes (its stage's set-aside checkpoints,
        and the set a new tokenizer set aside, which no stage can use once the new models exist)."""
        remove_tree(self.previous_checkpoints(stage))
        remove_tree(self.previous_set)

    def prune_checkpoints(self, stage: str, kept: Path, keep: int = 0) -> None:
        """Remove a stage's checkpoints newer than `kept` (rolled back, or a branch a resume left behind: were
        `latest` lost, the newest would count) and, with keep > 0, all but the `keep` newest up to `kept`."""
        dirs = _step_dirs(self.checkpoints(stage))
        newer = [p for p in dirs if _step(p) > _step(kept)]
        older = [p for p in dirs if _step(p) < _step(kept)]
        for p in reversed(newer):
            remove_tree(p)
        for p in older[:max(0, len(older) - keep + 1)] if keep > 0 else []:
            remove_tree(p)

    def roll_back(self, stage: str, step: int) -> Path | None:
        """Point a stage's `latest` at its newest checkpoint from at most `step` and remove the later ones; with
        none, remove this run's checkpoints of the stage: the ones it set aside count again (returned), else
        later stages start from its parent (None)."""
        root = self.checkpoints(stage)
        good = [p for p in _step_dirs(root) if _step(p) <= step]
        if not good:
            remove_tree(root)
            return self.latest_checkpoint(stage)
        atomic_write_text(root / "latest", good[-1].name)
        self.prune_checkpoints(stage, good[-1])
        return good[-1]

    # ------------------------------------------------------------------ a replaced tokenizer's set
    @property
    def previous_set(self) -> Path:
        """Where a new tokenizer sets aside the old one with its tokens, checkpoints and config.json: they do not
        count there (no model runs with another tokenizer), and go once the new pretraining has a checkpoint."""
        return self.path / "previous"

    def set_aside_set(self) -> None:
        """Move the checkpoints, tokens and tokenizer (in that order: no checkpoint ever counts beside another
        tokenizer, no token files beside another tokenizer) and a copy of config.json into `previous_set`."""
        remove_tree(self.previous_set)  # older still: the models these checkpoints came from replaced it
        self.previous_set.mkdir()
        atomic_write_bytes(self.previous_set / "config.json", (self.path / "config.json").read_bytes())
        for part in _SET:
            if (self.path / part).exists():
                os.replace(self.path / part, self.previous_set / part)

    def restore_set(self) -> None:
        """Undo `set_aside_set`: what stands in the old set's place now goes first, then the old parts come back
        in reverse order (the checkpoints last), so no step in between pairs parts of two sets."""
        for part in _SET:
            remove_tree(self.path / part)
        for part in reversed(_SET):
            if (self.previous_set / part).exists():
                os.replace(self.previous_set / part, self.path / part)
        if (self.previous_set / "config.json").exists():
            os.replace(self.previous_set / "config.json", self.path / "config.json")
        remove_tree(self.previous_set)


def listed(checkpoints: dict[str, Path]) -> str:
    """'pretrain step_000006, sft step_000040': a stage -> checkpoint map for a message."""
    return ", ".join(f"{stage} {ckpt.name}" for stage, ckpt in checkpoints.items())


_SET = ("checkpoints", "data", "tokenizer")  # what a new tokenizer sets aside, in the order it does


def _step(ckpt: Path) -> int:
    return int(ckpt.name.split("_")[1])


def _is_a(value: Any, hint: Any) -> bool:
    """Does a JSON value have a summary field's type? (an int stands for a float; a bool is no number)"""
    kinds = get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if float in kinds:
        kinds = (*kinds, int)
    return any(value is None if k is type(None) else isinstance(value, k) and not (isinstance(value, bool) and k is not bool)
               for k in kinds)


def _pointed_to(root: Path) -> Path | None:
    """The checkpoint a stage's `latest` file names; None (and a warning) when it names none, so the newest
    complete checkpoint is used as if the file were missing."""
    pointer = root / "latest"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if not _STEP.fullmatch(name):
        print(f"warning: {pointer} is damaged; using the newest complete checkpoint")
        return None
    return root / name


def _step_dirs(root: Path) -> list[Path]:
    """step_XXXXXX directories, oldest first (temp and trash directories are hidden: they start with '.')."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _STEP.fullmatch(p.name) and p.is_dir())


def _complete(ckpt: Path) -> bool:
    return (ckpt / "model.safetensors").exists() and (ckpt / "meta.json").exists()


def most_recent_run(runs_dir: str | Path) -> Path:
    """The run whose chat model (or any checkpoint) was written last."""
    root = Path(runs_dir)
    runs = [p for p in root.glob("*") if (p / "config.json").exists()] if root.exists() else []
    if not runs:
        raise ExocortexError(f"no runs in {root}/; train one with `exocortex speedrun` (or name one with --run)")

    def stamp(p: Path) -> float:
        files = list((p / "checkpoints").glob("*/latest"))
        return max((f.stat().st_mtime for f in files), default=(p / "config.json").stat().st_mtime)

    return max(runs, key=stamp)
