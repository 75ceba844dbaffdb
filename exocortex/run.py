"""A run directory: what every stage reads from and writes to, so any stage can be re-run alone.

    runs/<name>/config.json, tokenizer/, data/, checkpoints/<stage>/step_XXXXXX/ (+ latest), logs/, report.md, plots/

`RunDir` knows the paths, the stages' summaries (typed: the fields below are the contract between the stage
that writes a summary and the report that reads it), and which checkpoint of a stage counts: the newest
complete one, the one a stage starts from (its parents in the registry), and rolling a stage back.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exocortex import registry
from exocortex.errors import ExocortexError
from exocortex.fileio import atomic_write_json, atomic_write_text
from exocortex.memory import peak_rss_mb


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
        cls = SUMMARIES[stage]
        try:
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in json.loads(p.read_text()).items() if k in known})
        except (json.JSONDecodeError, TypeError) as e:
            raise ExocortexError(f"{p} is unreadable or from another version ({e}); re-run "
                                 f"`exocortex {stage} --run {self.name}`") from None

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self, stage: str) -> Path:
        return self.path / "checkpoints" / stage

    def latest_checkpoint(self, stage: str) -> Path | None:
        """Newest complete checkpoint of a stage, skipping any that is missing files (with a warning)."""
        root = self.checkpoints(stage)
        if not root.exists():
            return None
        pointer = root / "latest"
        if pointer.exists():
            named = root / pointer.read_text().strip()
            if _complete(named):
                return named
        for c in sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True):
            if _complete(c):
                return c
            print(f"warning: skipping incomplete checkpoint {c}")
        return None

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

    def clear_checkpoints(self, stage: str) -> None:
        root = self.checkpoints(stage)
        if root.exists():
            shutil.rmtree(root)

    def roll_back(self, stage: str, step: int) -> Path | None:
        """Point a stage's `latest` at its newest checkpoint from at most `step`; with none, remove the stage's
        checkpoints so later stages start from its parent."""
        root = self.checkpoints(stage)
        good = [p for p in sorted(root.glob("step_*")) if p.is_dir() and int(p.name.split("_")[1]) <= step]
        if not good:
            self.clear_checkpoints(stage)
            return None
        atomic_write_text(root / "latest", good[-1].name)
        return good[-1]


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
