"""Training throughput: tokens/s and achieved FLOP/s as a fraction of a bf16 matmul measured in the same run.

    python bench/train.py                  # tiny preset shape + nanochat's d4/d8 CPU shapes
    python bench/train.py --shapes tiny --seconds 10

For each shape it times full optimizer steps (forward, backward, Muon + AdamW) of exocortex's training
setup (bf16 autocast, torch.compile) and, side by side, a plain fp32 eager step of the same model: the
naive baseline. FLOPs per token are counted as nanochat does: 6 x matmul params (incl. lm_head) plus
12 x layers x width x seq_len for attention. The machine's practical peak is a 2048^2 bf16 matmul timed
here, now. The last printed line is one JSON object with the results (`mfu` = the d8 shape when run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from exocortex.config import ModelConfig, TrainConfig  # noqa: E402
from exocortex.flops import gpu_peak_flops, matmul_peak  # noqa: E402
from exocortex.model import GPT  # noqa: E402
from exocortex.train import build_optimizers  # noqa: E402

SHAPES = {  # name: (depth, width, vocab, seq_len, device_batch)
    "tiny": (4, 256, 4096, 256, 32),
    "d4": (4, 256, 32768, 512, 8),   # nanochat's smallest CPU shape
    "d8": (8, 512, 32768, 512, 8),
    # GPU shapes (presets d12 / d20 at their real sequence length; rows per micro-batch fit an 80 GB card)
    "d12": (12, 768, 32768, 2048, 8),
    "d20": (20, 1280, 32768, 2048, 8),
}


def time_steps(depth, width, vocab, seq_len, rows, bf16: bool, compile: bool, seconds: float, device="cpu") -> dict:
    torch.manual_seed(0)
    gpu = device != "cpu"
    cfg = ModelConfig(depth=depth, width=width, head_dim=128 if gpu else 64, vocab_size=vocab, seq_len=seq_len,
                      mlp_ratio=4.0 if gpu else 3.0)
    model = GPT(cfg).to(device)
    opts = build_optimizers(model, TrainConfig())
    fwd = torch.compile(model, dynamic=False) if compile else model
    x = torch.randint(0, vocab, (rows, seq_len), device=device)
    y = torch.randint(0, vocab, (rows, seq_len), device=device)
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(x, y)
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(3):  # warmup (and compilation)
        step()
    sync()
    warm = time.perf_counter() - t0
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds or n < 2:
        step()
        n += 1
        if gpu and n % 5 == 0:
            sync()
    sync()
    dt = (time.perf_counter() - t) / n
    tok_s = rows * seq_len / dt
    out = {"tok_s": tok_s, "flops": tok_s * model.flops_per_token(), "params": model.num_params(), "warmup_s": warm}
    del model, opts, fwd, x, y
    torch._dynamo.reset()  # compiled graphs hold the model's memory otherwise
    if gpu:
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="tiny,d4,d8")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (GPU shapes: d12, d20)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.device == "cpu":
        peak = matmul_peak()
        print(f"measured peak: bf16 2048^2 matmul = {peak / 1e9:.0f} GFLOP/s")
    else:
        name = torch.cuda.get_device_name()
        measured = matmul_peak(n=8192, device=args.device)
        peak = gpu_peak_flops(name) or measured  # MFU against the datasheet peak, as is customary on GPUs
        print(f"{name}: datasheet bf16 peak {peak / 1e12:.0f} TFLOP/s; measured 8192^3 matmul {measured / 1e12:.0f} TFLOP/s")
    rows, out = [], {"peak_gflops": peak / 1e9}
    for name in args.shapes.split(","):
        d, w, v, T, b = SHAPES[name]
        ours = time_steps(d, w, v, T, b, bf16=True, compile=not args.no_compile, seconds=args.seconds, device=args.device)
        base = time_steps(d, w, v, T, b, bf16=False, compile=False, seconds=args.seconds, device=args.device)
        for label, r in (("exocortex (bf16, compile)", ours), ("plain fp32 eager", base)):
            rows.append((name, label, r["tok_s"], r["flops"] / peak, r["params"]))
        out[name] = {"tok_s": ours["tok_s"], "mfu": ours["flops"] / peak, "fp32_eager_tok_s": base["tok_s"],
                     "vs_fp32_eager": ours["tok_s"] / base["tok_s"], "params": ours["params"],
                     "compile_warmup_s": ours["warmup_s"]}
    print(f"\n{'shape':6} {'setup':28} {'tok/s':>9} {'of bf16 peak':>12} {'params':>9}")
    for name, label, tok_s, mfu, params in rows:
        print(f"{name:6} {label:28} {tok_s:9,.0f} {mfu:12.1%} {params / 1e6:8.2f}M")
    main_shape = next((s for s in ("d20", "d12", "d8") if s in out), args.shapes.split(",")[0])
    out["mfu"] = out[main_shape]["mfu"]
    out["tok_s"] = out[main_shape]["tok_s"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
