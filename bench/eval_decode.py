"""Batch decoding as the eval and RL run it: eager against the compiled step, same run, same prompts.

    python bench/eval_decode.py --run runs/tiny [--stage sft] [--n 64] [--batch 16,32,64] [--rounds 2]

The prompts are the eval's held-out questions of four chat tasks (arithmetic, word problems, facts_mc,
lookup; tools on), `--n` of each, answered greedily by `Engine.complete_many` in batches as `eval` does.
The compiled steps are built (or loaded from the cache) before the clock starts. Configurations are
interleaved in rounds and each keeps its best, so load on a shared machine hits both alike. Prints new
tokens per second per configuration and the compiled/eager ratio at each batch size; the last line is one
JSON object. (The two sides' greedy tokens may differ slightly: the compiled step sums in another order.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from exocortex.config import load_config  # noqa: E402
from exocortex.device import resolve_device  # noqa: E402
from exocortex.evals import offering  # noqa: E402
from exocortex.infer.decode import compile_status  # noqa: E402
from exocortex.infer.engine import load_engine  # noqa: E402
from exocortex.tasks import task_set  # noqa: E402
from exocortex.tasks.base import prompt_ids  # noqa: E402

TASKS = ("arithmetic", "word_problems", "facts_mc", "lookup")


def timed(engine, jobs, batch: int, max_tokens: int) -> tuple[float, int]:
    seconds, tokens = 0.0, 0
    for task, prompts in jobs:
        with offering(engine, task):
            t0 = time.perf_counter()
            outs = engine.complete_many(prompts, batch_size=batch, max_tokens=max_tokens, temperature=0.0)
            seconds += time.perf_counter() - t0
        tokens += sum(len(o) for o in outs)
    return seconds, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/tiny")
    ap.add_argument("--stage", default="sft")
    ap.add_argument("--n", type=int, default=64, help="questions per task")
    ap.add_argument("--batch", default="16,32,64", help="batch sizes (the eval uses 32)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    cfg = load_config(a.run)
    ok, why = compile_status(resolve_device(cfg.device))
    engines = {"eager": load_engine(cfg, a.stage)}
    if ok:
        engines["compiled"] = load_engine(cfg, a.stage, compile=True)
        engines["compiled"].warm_up()
    else:
        print(f"compiled step unavailable here: {why}")
    tasks = task_set(cfg)
    jobs = [(tasks[name], [prompt_ids(engines["eager"].tok, e) for e in tasks[name].examples(a.n, 12345, "test")])
            for name in TASKS]
    batches = [int(b) for b in a.batch.split(",")]
    best: dict = {}
    for _ in range(a.rounds):
        for batch in batches:
            for name, engine in engines.items():
                s, n = timed(engine, jobs, batch, a.max_tokens)
                key = f"{name} batch {batch}"
                best[key] = max(best.get(key, 0.0), n / s)
    out = {"tokens_per_s": {k: round(v) for k, v in best.items()}}
    for batch in batches:
        line = f"batch {batch:3d}: eager {best[f'eager batch {batch}']:7,.0f} tok/s"
        if "compiled" in engines:
            ratio = best[f"compiled batch {batch}"] / best[f"eager batch {batch}"]
            out[f"compiled_vs_eager_batch{batch}"] = round(ratio, 2)
            line += f"   compiled {best[f'compiled batch {batch}']:7,.0f} tok/s   {ratio:.2f}x"
        print(line)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
