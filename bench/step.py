"""The CPU decode step alone: the step in C (exocortex/infer/native.py) against the torch step it replaces.

    python bench/step.py                          # tiny preset shape, random weights, torch's threads
    python bench/step.py --preset d12 --threads 1

Two bf16 Decoders over the same random model of the preset's shape, both compiled (`compile=True`): one runs
its steps and prefill in C (where this CPU has AVX512-BF16), the other with the C step turned off (the
ahead-of-time compiled torch step, torch's prefill). Timed: a step of 1 row and of 16 rows (rows at positions
15..30), and the prefill of prompts of 13, 100 and 500 tokens; the two alternate in rounds and each keeps its
best. The last line printed is one JSON object: milliseconds per call for each side and the ratios
torch / C (above 1: the C step is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from exocortex.config import make_config  # noqa: E402
from exocortex.infer import native  # noqa: E402
from exocortex.infer.decode import Decoder  # noqa: E402
from exocortex.model import GPT  # noqa: E402


def best_ms(fn, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if native.unavailable() is not None:
        sys.exit(f"error: the C step cannot run here: {native.unavailable()}")
    torch.manual_seed(0)
    model = GPT(make_config(args.preset).model).eval()
    sides = {name: Decoder(model, 16, 1024, torch.bfloat16, compile=True, native_step=name == "c")
             for name in ("c", "torch")}
    small = args.preset == "tiny"
    cases = {}
    for rows in (1, 16):
        def step(d, rows=rows):
            for s in range(rows):
                d.prefill(list(range(5, 20 + s)), [s])
            advance = [r < rows for r in range(16)]
            return lambda: d.step([7] * 16, advance)
        cases[f"step_{rows}_rows"] = (step, 200 if small else 10)
    for n in (13, 100, 500):
        cases[f"prefill_{n}"] = (lambda d, n=n: (lambda: d.prefill(list(range(5, 5 + n)), [0])), 20 if small else 2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset} shape "
          f"({model.num_params() / 1e6:.1f}M params), bf16", flush=True)
    out = {}
    print(f"{'case':>16} {'C ms':>9} {'torch ms':>9} {'torch / C':>10}")
    for case, (make, calls) in cases.items():
        for d in sides.values():
            make(d)()  # the first call builds the step (kept on disk after the first run)
        best = {}
        for _ in range(args.rounds):
            for name, d in sides.items():
                fn = make(d)  # rows back at their start: every round times the same positions
                best[name] = min(best.get(name, float("inf")), best_ms(fn, calls))
        ratio = best["torch"] / best["c"]
        print(f"{case:>16} {best['c']:9.3f} {best['torch']:9.3f} {ratio:9.2f}x", flush=True)
        out.update({f"{case}_c_ms": round(best["c"], 4), f"{case}_torch_ms": round(best["torch"], 4),
                    f"{case}_torch_vs_c": round(ratio, 2)})
    assert isinstance(sides["c"]._one_row, native.NativeStep) and not isinstance(sides["torch"]._one_row,
                                                                                  native.NativeStep)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
