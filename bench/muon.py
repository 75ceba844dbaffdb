"""One Muon optimizer step over a model's matrices: torch.optim.Muon (Newton-Schulz in bf16) vs our Muon with float32 NS.

    python bench/muon.py                    # the tiny preset's matrices, on CPU
    python bench/muon.py --preset d12

torch.optim.Muon casts every update to bf16 for its Newton-Schulz iterations. On a CPU without native bf16
(AVX2: no AVX512-BF16/AMX) those matmuls are emulated and slow, so exocortex's build_optimizers runs its
Muon with float32 NS (same update) wherever bf16 is not native. This times both side by side (interleaved
rounds, medians) and prints the ratio; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from exocortex.device import resolve_dtype  # noqa: E402
from exocortex.config import make_config  # noqa: E402
from exocortex.model import GPT  # noqa: E402
from exocortex.train.optim import Muon  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = GPT(make_config(args.preset).model)
    matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    kw = dict(lr=0.02, momentum=0.95, weight_decay=0.0)
    opts = {"torch.optim.Muon (bf16 NS)": torch.optim.Muon(matrices, adjust_lr_fn="original", **kw),
            "Muon, float32 NS": Muon(matrices, ns_dtype=torch.float32, **kw)}
    for p in matrices:
        p.grad = torch.randn_like(p)
    native = resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU bf16 native: {native}; "
          f"{args.preset}: {len(matrices)} matrices, {sum(p.numel() for p in matrices) / 1e6:.2f}M params", flush=True)
    times = {name: [] for name in opts}
    for opt in opts.values():
        opt.step()  # warm-up (state allocation)
    for _ in range(args.rounds):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["torch.optim.Muon (bf16 NS)"])
    for name, ts in times.items():
        print(f"{name:>28}: {statistics.median(ts):8.3f} s per step   {base / statistics.median(ts):6.2f}x")
    print(json.dumps({"preset": args.preset, "bf16_native": native, "torch_muon_s": round(base, 4),
                      "float32_muon_s": round(statistics.median(times["Muon, float32 NS"]), 4),
                      "speedup": round(base / statistics.median(times["Muon, float32 NS"]), 2)}))


if __name__ == "__main__":
    main()
