"""One synth job: its settings (SynthJob) and `run_synth`, which opens the output, runs the source, prints the
summary. The CLI (`exocortex synth`) only parses flags into a SynthJob."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from exocortex.config import MIDTRAIN_MIXTURE, RunConfig
from exocortex.errors import ExocortexError
from exocortex.synth import SOURCES, Dataset, collapse_lines, summary_line
from exocortex.synth.teacher import KINDS, MODES, TeacherConfig
from exocortex.tasks import task_set
from exocortex.tasks.base import SPLITS

# tasks a source draws from when --tasks is not given: a teacher knows nothing of the run's generated world
DEFAULT_TASKS = {"generators": dict(MIDTRAIN_MIXTURE),
                 "teacher": {"arithmetic": 1.0, "word_problems": 1.0, "spelling": 1.0},
                 "self": {"arithmetic": 1.0, "word_problems": 1.0}}


@dataclass
class SynthJob:
    source: str
    out: Path
    n: int = 1000                                  # items to try (0..n-1): rows written can be fewer (or, self: more)
    seed: int = 0
    split: str = "train"                           # which split of the generators' questions
    tasks: dict[str, float] = field(default_factory=dict)  # empty: DEFAULT_TASKS[source]
    dedup_threshold: float = 0.8
    teacher: TeacherConfig | None = None
    mode: str = "answer"                           # teacher: answer generator questions | write new ones
    kinds: dict[str, float] = field(default_factory=lambda: {k: 1.0 for k in KINDS})
    drop_unverified: bool = False
    stage: str | None = None                       # self: the run's checkpoint (rl, sft, ...)
    k: int = 8                                     # self: samples per prompt
    temperature: float = 1.0                       # self: sampling temperature
    max_tokens: int = 256                          # self: new tokens per sample

    def check(self) -> None:
        if self.source not in SOURCES:
            raise ExocortexError(f"--source must be one of {', '.join(SOURCES)}, not '{self.source}'")
        if self.split not in SPLITS:
            raise ExocortexError(f"--split must be one of {', '.join(SPLITS)}, not '{self.split}'")
        if self.n < 0 or self.k < 1 or not 0 < self.dedup_threshold <= 1:
            raise ExocortexError("--n must be >= 0, --k >= 1 and --dedup-threshold in (0, 1]")
        if self.source == "teacher" and (self.teacher is None or not self.teacher.url or not self.teacher.model):
            raise ExocortexError("--source teacher needs --teacher-url and --teacher-model")
        if self.mode not in MODES:
            raise ExocortexError(f"--mode must be one of {', '.join(MODES)}")
        bad = sorted(set(self.kinds) - set(KINDS))
        if bad:
            raise ExocortexError(f"--kinds: unknown {', '.join(bad)} (kinds: {', '.join(KINDS)})")


def run_synth(cfg: RunConfig, job: SynthJob) -> Dataset:
    """Run the job against `cfg`'s tasks (its generated world and identity name) and, for `self`, its model."""
    job.check()
    mixture = job.tasks or DEFAULT_TASKS[job.source]
    tasks = task_set(cfg)
    if not (job.source == "teacher" and job.mode == "write"):
        for name in mixture:
            tasks[name]  # an unknown task fails here, in one line, before any work
    ds = Dataset(job.out, job.source, job.seed, job.dedup_threshold, mode=job.mode if job.source == "teacher" else "")
    try:
        tried, seconds = _run_source(cfg, job, ds, tasks, mixture)
    finally:
        ds.close()
    print(summary_line(ds, seconds, tried))
    ds.collapse, lines = collapse_lines(ds.path)  # the whole file: what a run would train on
    for line in lines:
        print(line)
    return ds


def _run_source(cfg: RunConfig, job: SynthJob, ds: Dataset, tasks, mixture) -> tuple[int, float]:
    t0 = time.time()
    if job.source == "generators":
        from exocortex.synth.generators import run_generators

        tried = run_generators(ds, tasks, mixture, job.n, job.split)
    elif job.source == "teacher":
        from exocortex.synth.teacher import Teacher, answer_item, run_teacher, write_item

        teacher = Teacher(job.teacher)
        work = (partial(answer_item, teacher, tasks, mixture, job.seed, split=job.split) if job.mode == "answer"
                else partial(write_item, teacher, job.kinds, job.seed, drop_unverified=job.drop_unverified))
        tried = run_teacher(ds, teacher, work, job.n)
    else:
        tried = _run_self(cfg, job, ds, tasks, mixture)
    return tried, time.time() - t0


def _run_self(cfg: RunConfig, job: SynthJob, ds: Dataset, tasks, mixture) -> int:
    from exocortex.infer.engine import load_engine
    from exocortex.synth.selfdistill import run_self

    stage = job.stage or cfg.run.chat_checkpoint(None).parent.name
    engine = load_engine(cfg, stage)
    origin = {"run": cfg.name, "stage": stage}
    return run_self(ds, engine, tasks, mixture, job.n, job.split, job.k, job.temperature, job.max_tokens, origin)
