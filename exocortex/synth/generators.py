"""Source `generators`: the built-in tasks' examples as they are, with their reference replies (tool calls
included). Item i is one example of a task drawn from the mixture with item i's own rng; its rows are checked
against the task's own grader (a generator whose reference fails its grader is a bug, and says so)."""
from __future__ import annotations

from exocortex.synth import Dataset, Progress, item_rng, pick_task, provenance, row


def generator_row(tasks, mixture: dict[str, float], seed: int, item: int, split: str) -> tuple[dict, bool]:
    """(row, whether the task's grader passes its own reference reply) for item `item`."""
    rng = item_rng(seed, item)
    name = pick_task(rng, mixture)
    task = tasks[name]
    ex = task.example(rng, split)
    messages = [dict(m) for m in ex["messages"]]
    reference = messages[-1]["content"]
    parts = reference if isinstance(reference, list) else [{"type": "text", "text": reference}]
    passed = task.grade_reply(parts, ex)
    prov = provenance("generators", name, seed, item, ex, split=split,
                      verification={"method": "grader", "passed": passed})
    out = row(messages, str(ex.get("answer", "")), prov)
    if ex.get("tools"):
        out["tools"] = ex["tools"]
    return out, passed


def run_generators(ds: Dataset, tasks, mixture: dict[str, float], n: int, split: str) -> int:
    """Write items 0..n-1 not yet done; returns how many were tried."""
    todo = ds.todo(n)
    bar = Progress(len(todo), "generators")
    for item in todo:
        r, passed = generator_row(tasks, mixture, ds.seed, item, split)
        if passed:
            ds.keep(r)
        else:  # never silent: the reference failing its own grader is a generator bug
            ds.reject(r["provenance"], "reference fails its grader", r["messages"])
        bar.update(ds)
    bar.close()
    return len(todo)
