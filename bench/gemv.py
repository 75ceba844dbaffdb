"""One-row matmuls (GEMV) on CPU: PyTorch's BLAS vs the multiply-and-sum the compiled decode step uses.

    python bench/gemv.py                 # the tiny preset's 17 matrices (18 MB fp32), 1 and 2 threads
    python bench/gemv.py --preset d12 --threads 2

A decode step at batch 1 reads every weight once to multiply it by one row. PyTorch's CPU BLAS runs a
one-row matmul on one thread; `exocortex/infer/decode.py` (compiled, CPU, one row) writes it as
`(x[:, None, :] * w).sum(-1)` over the (out, in) weight, which inductor turns into a reduction split across
threads. This times the model's matrices in sequence (so they come from cache/memory as in a real step):
eager `x @ w_t` with (in, out) weights (the eager decode path's layout), eager `F.linear` with (out, in), and
the compiled multiply-and-sum; ratios against the first, same process, interleaved rounds, medians.
The last line is one JSON object with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from exocortex.config import make_config  # noqa: E402


KEYS = {"eager x @ w_t (BLAS)": "blas_in_out", "eager F.linear (BLAS)": "blas_linear",
        "compiled multiply-and-sum": "mul_sum"}


def matrices(preset: str) -> list[tuple[int, int]]:
    """(out, in) of every matrix a decode step reads: fused q/k/v, o, fused gate/up, down per layer, head."""
    c = make_config(preset).model
    qkv = (c.n_heads + 2 * c.kv_heads) * c.head_dim
    layer = [(qkv, c.n_embd), (c.n_embd, c.n_heads * c.head_dim), (2 * c.mlp_hidden, c.n_embd),
             (c.n_embd, c.mlp_hidden)]
    return layer * c.depth + [(c.vocab_size, c.n_embd)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200, help="chains timed per round")
    args = ap.parse_args()
    torch.manual_seed(0)
    shapes = matrices(args.preset)
    ws = [torch.randn(o, i) for o, i in shapes]  # (out, in), as nn.Linear stores them
    ws_t = [w.t().contiguous() for w in ws]  # (in, out)
    inputs = {i: torch.randn(1, i) for _, i in shapes}
    mb = sum(o * i for o, i in shapes) * 4 / 1e6

    def blas_in_out(ws_t):
        return [inputs[w.shape[0]] @ w for w in ws_t]

    def blas_linear(ws):
        return [F.linear(inputs[w.shape[1]], w) for w in ws]

    def mul_sum(ws, inputs):
        return [(inputs[w.shape[1]][:, None, :] * w).sum(-1) for w in ws]

    compiled = torch.compile(mul_sum, dynamic=False)
    configs = {"eager x @ w_t (BLAS)": lambda: blas_in_out(ws_t), "eager F.linear (BLAS)": lambda: blas_linear(ws),
               "compiled multiply-and-sum": lambda: compiled(ws, inputs)}
    ref = blas_in_out(ws_t)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in zip(ref, compiled(ws, inputs)))
    print(f"torch {torch.__version__}; {args.preset}: {len(shapes)} matrices, {mb:.1f} MB fp32 per chain", flush=True)
    out = {"preset": args.preset, "mb": round(mb, 1)}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        times = {name: [] for name in configs}
        for fn in configs.values():  # warm-up (and compilation) outside the timings
            for _ in range(20):
                fn()
        for _ in range(args.rounds):
            for name, fn in configs.items():
                t = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                times[name].append((time.perf_counter() - t) / args.calls * 1e3)
        base = statistics.median(times["eager x @ w_t (BLAS)"])
        print(f"\n{threads} thread(s)            setup    ms/chain    GB/s   vs BLAS x @ w_t")
        for name, ts in times.items():
            ms = statistics.median(ts)
            print(f"{name:>33} {ms:9.3f} {mb / ms:7.1f}   {base / ms:.2f}x")
            out[f"threads{threads}_{KEYS[name]}_ms"] = round(ms, 4)
        out[f"threads{threads}_mul_sum_vs_blas"] = round(base / statistics.median(times["compiled multiply-and-sum"]), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
