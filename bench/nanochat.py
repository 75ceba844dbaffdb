"""Training throughput side by side with nanochat: the same shape, the same batch, N steps each.

    python bench/nanochat.py --nanochat /tmp/nanochat                     # CPU, nanochat's d4 CPU shape
    python bench/nanochat.py --nanochat /tmp/nanochat --device cuda \\
        --depth 12 --seq 2048 --batch 16 --vocab 32768 --head-dim 128 --steps 30   # one GPU, d12

Nothing is downloaded at run time: --nanochat is a checkout of github.com/karpathy/nanochat (its `nanochat`
package is imported from there; it needs only torch and filelock). Both sides get the same depth, width,
heads, vocab, sequence length, rows per step, dtype, torch.compile setting and random tokens, and each its
own optimizer (ours: Muon + AdamW from exocortex.train.loop; nanochat: its MuonAdamW). nanochat runs with
full-context attention in every layer (window pattern "L"), as ours does. The models are not identical
(ours: Qwen3 with a SwiGLU MLP; nanochat: relu^2 MLP, value embeddings, smear/backout scalars, logit
softcap), so FLOPs per token differ: the table shows tokens/s and, from each model's own FLOPs-per-token
count, achieved FLOP/s and MFU. The last line is one JSON object; `tok_s_ratio` = ours / nanochat.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _nanochat import nanochat_setup  # noqa: E402
from exocortex.device import autocast, resolve_dtype  # noqa: E402
from exocortex.config import ModelConfig, TrainConfig  # noqa: E402
from exocortex.train.flops import gpu_peak_flops, matmul_peak  # noqa: E402
from exocortex.model import GPT  # noqa: E402
from exocortex.train.optim import build_optimizers  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds of the warmup steps, which include compilation; mean seconds per timed step)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return t1 - t0, (time.perf_counter() - t1) / steps


def ours(a, device, dtype, x, y) -> dict:
    cfg = ModelConfig(depth=a.depth, width=a.width, head_dim=a.head_dim, vocab_size=a.vocab, seq_len=a.seq,
                      mlp_ratio=a.mlp_ratio)
    model = GPT(cfg).to(device)
    opts = build_optimizers(model, TrainConfig())
    fwd = torch.compile(model, dynamic=False) if a.compile else model

    def step():
        with autocast(device, dtype):
            loss = fwd(x, y)
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)

    warm, dt = time_steps(step, device, a.warmup, a.steps)
    return {"params": model.num_params(), "flops_per_token": model.flops_per_token(), "warmup_s": warm,
            "step_s": dt}


def nanochat(a, device, dtype, x, y) -> dict:
    model, opt, flops_per_token = nanochat_setup(a.nanochat, a.depth, a.width, a.head_dim, a.vocab, a.seq,
                                                 device, dtype)
    fwd = torch.compile(model, dynamic=False) if a.compile else model

    def step():
        loss = fwd(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)

    warm, dt = time_steps(step, device, a.warmup, a.steps)
    return {"params": sum(p.numel() for p in model.parameters()), "flops_per_token": flops_per_token,
            "warmup_s": warm, "step_s": dt}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nanochat", required=True, help="path of a nanochat checkout")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=0, help="model width; 0 = 64 x depth (both projects' rule)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--mlp-ratio", type=float, default=4.0, help="ours (SwiGLU); nanochat's MLP is 4x relu^2")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="rows per step (one micro-batch, no accumulation)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    a = ap.parse_args()
    a.width = a.width or 64 * a.depth
    device = torch.device(a.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)  # set_device needs an index
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # as nanochat sets up CUDA (tf32 for fp32 matmuls); same for both
    dtype = resolve_dtype(a.dtype, device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name) if dtype == torch.bfloat16 else None
    else:
        name, peak = f"CPU, {torch.get_num_threads()} threads", matmul_peak(dtype)
    print(f"torch {torch.__version__}; {name}; {str(dtype).replace('torch.', '')}; compile={a.compile}; "
          f"depth {a.depth}, width {a.width}, head_dim {a.head_dim}, vocab {a.vocab}, seq {a.seq}, "
          f"{a.batch} rows/step; peak " + (f"{peak / 1e12:.1f} TFLOP/s" if peak else "unknown"))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device)
    y = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device)
    results = {}
    for label, fn in (("exocortex", ours), ("nanochat", nanochat)):
        torch.manual_seed(0)
        r = fn(a, device, dtype, x, y)
        r["tok_s"] = a.batch * a.seq / r["step_s"]
        r["flops_s"] = r["tok_s"] * r["flops_per_token"]
        r["mfu"] = r["flops_s"] / peak if peak else None
        results[label] = r
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{'':10} {'params':>9} {'FLOPs/token':>12} {'tok/s':>11} {'TFLOP/s':>8} {'MFU':>6} {'warmup':>7}")
    for label, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{label:10} {r['params'] / 1e6:8.1f}M {r['flops_per_token'] / 1e6:11.1f}M {r['tok_s']:11,.0f} "
              f"{r['flops_s'] / 1e12:8.2f} {mfu:>6} {r['warmup_s']:6.1f}s")
    ratio = results["exocortex"]["tok_s"] / results["nanochat"]["tok_s"]
    flops_ratio = results["exocortex"]["flops_s"] / results["nanochat"]["flops_s"]
    print(f"\nexocortex / nanochat: {ratio:.2f}x tokens/s, {flops_ratio:.2f}x model FLOP/s")
    print(json.dumps({"device": name, "dtype": str(dtype), "tok_s_ratio": ratio, "flops_ratio": flops_ratio,
                      **{k: {kk: vv for kk, vv in v.items()} for k, v in results.items()}}))


if __name__ == "__main__":
    main()
