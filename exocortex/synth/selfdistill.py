"""Source `self`: rejection sampling from a trained run (self-distillation). For each prompt from the task
mixture, k samples at temperature T from the run's chat model (rl or sft), tools on as in eval; every sample its
task's grader passes is a row (its reply as parts: tool calls and outputs included), near-duplicates of rows
already kept rejected. This is what RL's correct rollouts look like, written down to finetune on."""
from __future__ import annotations

from exocortex.evals import offering
from exocortex.synth import Dataset, Progress, item_rng, pick_task, provenance, row
from exocortex.tasks.base import prompt_ids

PROMPTS_PER_BATCH = 8


def sample_items(engine, tasks, mixture, seed: int, items: list[int], split: str, k: int, temperature: float,
                 max_tokens: int) -> list[tuple[int, str, dict, list[list[dict]] | None]]:
    """(item, task name, example, k replies as parts) for each item, one batched generate per task; replies
    are None for a prompt that leaves the model no room to answer (longer than its context)."""
    limit = engine.model.rope_cos.shape[0]  # the longest sequence the engine decodes
    drawn = []
    for item in items:
        rng = item_rng(seed, item)
        name = pick_task(rng, mixture)
        ex = tasks[name].example(rng, split)
        drawn.append((item, name, ex, prompt_ids(engine.tok, ex)))
    out = [(item, name, ex, None) for item, name, ex, p in drawn if len(p) >= limit]
    for name in dict.fromkeys(n for _, n, _, _ in drawn):  # a task's client functions are offered batch-wide
        group = [(i, ex, p) for i, n, ex, p in drawn if n == name and len(p) < limit]
        if not group:
            continue
        with offering(engine, tasks[name]):
            toks = engine.complete([p for _, _, p in group], num_samples=k, max_tokens=max_tokens,
                                   temperature=temperature, seed=seed * 100_003 + group[0][0])
        for j, (item, ex, _) in enumerate(group):
            out.append((item, name, ex, [engine.to_parts(t) for t in toks[j * k:(j + 1) * k]]))
    return out


def run_self(ds: Dataset, engine, tasks, mixture: dict[str, float], n: int, split: str, k: int, temperature: float,
             max_tokens: int, origin: dict) -> int:
    """Items 0..n-1 not yet done, PROMPTS_PER_BATCH prompts x k samples at a time; `origin` ({run, stage}) goes
    into each row's provenance. Returns how many items were tried."""
    todo = ds.todo(n)
    bar = Progress(len(todo), f"self {origin['stage']}")
    for b in range(0, len(todo), PROMPTS_PER_BATCH):
        for item, name, ex, replies in sample_items(engine, tasks, mixture, ds.seed, todo[b:b + PROMPTS_PER_BATCH],
                                                    split, k, temperature, max_tokens):
            correct = [(j, p) for j, p in enumerate(replies or []) if tasks[name].grade_reply(p, ex)]
            base = provenance("self", name, ds.seed, item, ex, split=split, **origin, k=k, temperature=temperature)
            if replies is None:
                ds.reject(base, "prompt longer than the model's context")
            elif not correct:
                ds.reject({**base, "verification": {"method": "grader", "passed": False}}, f"none of {k} samples correct")
            for j, parts in correct:
                prov = {**base, "sample": j, "verification": {"method": "grader", "passed": True}}
                ds.keep(row([dict(m) for m in ex["messages"][:-1]] + [{"role": "assistant", "content": parts}],
                            str(ex.get("answer", "")), prov))
            bar.update(ds)
    bar.close()
    return len(todo)
