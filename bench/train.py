"""Training throughput and memory: tokens/s, achieved FLOP/s as a fraction of a bf16 matmul measured in the same
run, and peak memory, side by side with baselines.

    python bench/train.py                                   # tiny preset shape + nanochat's d4/d8 CPU shapes
    python bench/train.py --nanochat /tmp/nanochat          # + karpathy/nanochat's own model at d4 and d8
    python bench/train.py --shapes tiny --seconds 10
    python bench/train.py --device cuda --shapes d12,d20

For each shape it times full optimizer steps of exocortex's training setup: as in a real run, forward + backward
over enough micro-batches to reach --batch-tokens (default: TrainConfig's 16,384; gradient accumulation), then one
Muon + AdamW step (Muon's Newton-Schulz iterations cost ~300 GFLOP per step at d8, so the optimizer's share
depends on the batch: --batch-tokens 0 steps after every micro-batch)
(bf16 autocast, torch.compile), a plain fp32 eager step of the same model (the naive baseline) and, with
--nanochat, nanochat's GPT + optimizer at the same depth, width, heads, vocab, sequence length, rows and dtype
(compiled, random tokens). Every setup runs in a fresh subprocess so that its peak memory (max RSS on CPU,
max allocated on CUDA) is its own. FLOPs per token are counted as nanochat does: 6 x matmul params (incl.
lm_head) plus 12 x layers x width x seq_len for attention, each model its own. The machine's practical peak is
a 2048^2 bf16 matmul timed here, now (GPUs: the datasheet peak). The last printed line is one JSON object:
`mfu` and `tok_s` of the main shape (d8 on CPU), `vs_nanochat` (our tokens/s / nanochat's at d4) and
`mem_vs_nanochat` (our peak memory / nanochat's at d4) when nanochat ran.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from exocortex.config import ModelConfig, TrainConfig  # noqa: E402
from exocortex.train.flops import gpu_peak_flops, matmul_peak  # noqa: E402
from exocortex.model import GPT  # noqa: E402
from exocortex.device import keep_freed_memory  # noqa: E402
from exocortex.train.optim import build_optimizers  # noqa: E402

SHAPES = {  # name: (depth, width, vocab, seq_len, device_batch)
    "tiny": (4, 256, 4096, 256, 32),
    "d4": (4, 256, 32768, 512, 8),   # nanochat's smallest CPU shape
    "d8": (8, 512, 32768, 512, 8),
    # GPU shapes (presets d12 / d20 at their real sequence length; rows per micro-batch fit an 80 GB card)
    "d12": (12, 768, 32768, 2048, 8),
    "d20": (20, 1280, 32768, 2048, 8),
}
SETUPS = {"ours": "exocortex (bf16, compile)", "fp32": "plain fp32 eager", "nanochat": "nanochat (bf16, compile)"}


def build(setup: str, shape: str, device: str, nanochat_path: str, batch_tokens: int = 0):
    """(step function, params, flops per token, tokens per step) for one setup at one shape."""
    depth, width, vocab, seq_len, rows = SHAPES[shape]
    accum = max(1, batch_tokens // (rows * seq_len))
    gpu = device != "cpu"
    head_dim = 128 if gpu else 64
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (rows, seq_len), device=device)
    y = torch.randint(0, vocab, (rows, seq_len), device=device)
    if setup == "nanochat":
        from _nanochat import nanochat_setup

        model, opt, flops = nanochat_setup(nanochat_path, depth, width, head_dim, vocab, seq_len, device,
                                           torch.bfloat16)
        opts, bf16 = [opt], False  # nanochat casts to its compute dtype itself
        params = sum(p.numel() for p in model.parameters())
    else:
        cfg = ModelConfig(depth=depth, width=width, head_dim=head_dim, vocab_size=vocab, seq_len=seq_len,
                          mlp_ratio=4.0 if gpu else 3.0)
        model = GPT(cfg).to(device)
        opts, bf16 = build_optimizers(model, TrainConfig()), setup == "ours"
        flops, params = model.flops_per_token(), model.num_params()
    fwd = torch.compile(model, dynamic=False) if setup != "fp32" else model

    def step():
        for _ in range(accum):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                loss = fwd(x, y) / accum
            loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)

    return step, params, flops, accum * rows * seq_len


def measure(setup: str, shape: str, device: str, seconds: float, nanochat_path: str, batch_tokens: int) -> dict:
    """Runs in its own process: warmup (and compilation), then steps for `seconds`."""
    gpu = device != "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if not gpu and setup == "ours":
        keep_freed_memory()  # as exocortex's training loop does on CPU
    step, params, flops, tokens = build(setup, shape, device, nanochat_path, batch_tokens)
    t0 = time.perf_counter()
    for _ in range(3):
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
    tok_s = tokens * n / (time.perf_counter() - t)
    peak_mb = (torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"tok_s": tok_s, "tokens_per_step": tokens, "flops": tok_s * flops, "flops_per_token": flops, "params": params, "warmup_s": warm,
            "peak_mb": peak_mb, "steps": n}


def run_child(args, setup: str, shape: str) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{setup}:{shape}", "--device", args.device,
           "--seconds", str(args.seconds), "--nanochat", args.nanochat or "", "--batch-tokens", str(args.batch_tokens)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"error: {setup} at {shape} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="tiny,d4,d8")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (GPU shapes: d12, d20)")
    ap.add_argument("--nanochat", default="", help="a karpathy/nanochat checkout: run its model beside ours")
    ap.add_argument("--nanochat-shapes", default="d4,d8")
    ap.add_argument("--batch-tokens", type=int, default=TrainConfig().batch_tokens,
                    help="tokens per optimizer step (gradient accumulation); 0 = one micro-batch per step")
    ap.add_argument("--skip-fp32", action="store_true", help="leave out the fp32 eager baseline")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        setup, shape = args.child.split(":")
        print(json.dumps(measure(setup, shape, args.device, args.seconds, args.nanochat, args.batch_tokens)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; each setup in a fresh process; "
          f"optimizer step every {args.batch_tokens or 'micro-batch'} tokens")
    if args.device == "cpu":
        peak = matmul_peak()
        print(f"measured peak: bf16 2048^2 matmul = {peak / 1e9:.0f} GFLOP/s")
    else:
        name = torch.cuda.get_device_name()
        measured = matmul_peak(n=8192, device=args.device)
        peak = gpu_peak_flops(name) or measured  # MFU against the datasheet peak, as is customary on GPUs
        print(f"{name}: datasheet bf16 peak {peak / 1e12:.0f} TFLOP/s; measured 8192^3 matmul {measured / 1e12:.0f} TFLOP/s")
    rows, out = [], {"peak_gflops": peak / 1e9}
    nano_shapes = set(args.nanochat_shapes.split(",")) if args.nanochat else set()
    for shape in args.shapes.split(","):
        setups = ["ours"] + ([] if args.skip_fp32 else ["fp32"]) + (["nanochat"] if shape in nano_shapes else [])
        res = {}
        for setup in setups:
            res[setup] = r = run_child(args, setup, shape)
            rows.append((shape, SETUPS[setup], r))
            print(f"  {shape} {SETUPS[setup]}: {r['tok_s']:,.0f} tok/s, peak {r['peak_mb']:,.0f} MB", flush=True)
        ours = res["ours"]
        out[shape] = {"tok_s": ours["tok_s"], "tokens_per_step": ours["tokens_per_step"], "mfu": ours["flops"] / peak, "params": ours["params"],
                      "peak_mb": ours["peak_mb"], "compile_warmup_s": ours["warmup_s"]}
        if "fp32" in res:
            out[shape] |= {"fp32_eager_tok_s": res["fp32"]["tok_s"], "vs_fp32_eager": ours["tok_s"] / res["fp32"]["tok_s"]}
        if "nanochat" in res:
            n = res["nanochat"]
            out[shape] |= {"nanochat_tok_s": n["tok_s"], "nanochat_mfu": n["flops"] / peak,
                           "nanochat_peak_mb": n["peak_mb"], "vs_nanochat": ours["tok_s"] / n["tok_s"],
                           "mem_vs_nanochat": ours["peak_mb"] / n["peak_mb"]}
    mem = "peak RSS" if args.device == "cpu" else "peak alloc"
    print(f"\n{'shape':6} {'setup':26} {'tok/s':>9} {'of bf16 peak':>12} {'params':>9} {'FLOPs/tok':>10} {mem:>10}")
    for shape, label, r in rows:
        print(f"{shape:6} {label:26} {r['tok_s']:9,.0f} {r['flops'] / peak:12.1%} {r['params'] / 1e6:8.2f}M "
              f"{r['flops_per_token'] / 1e6:9.1f}M {r['peak_mb']:8,.0f}MB")
    main_shape = next((s for s in ("d20", "d12", "d8") if s in out), args.shapes.split(",")[0])
    out["mfu"] = out[main_shape]["mfu"]
    out["tok_s"] = out[main_shape]["tok_s"]
    vs = next((s for s in ("d4", "d12", "d8", "d20") if "vs_nanochat" in out.get(s, {})), None)
    if vs:
        out["vs_nanochat"] = out[vs]["vs_nanochat"]
        out["mem_vs_nanochat"] = out[vs]["mem_vs_nanochat"]
        print(f"\nvs nanochat at {vs}: {out['vs_nanochat']:.2f}x tokens/s, {out['mem_vs_nanochat']:.2f}x peak memory")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
