"""Decode speed: exocortex's engine vs HF transformers `generate` on the exported model, same run.

    python bench/decode.py --run runs/tiny [--new-tokens 128] [--stage sft] [--rounds 3] [--no-compile]
    python bench/decode.py --run none --preset d12 --device cuda --dtype bfloat16   # GPU, random d12 model

Same weights (exported with `exocortex export`), same prompt, same number of new tokens (stop tokens are
ignored on both sides so every row decodes the full length), greedy, same dtype on both sides (fp32 by
default); batch 1 and 16. Ours is measured twice: the default eager fast path and with `compile=True`
(torch.compile'd decode step; CUDA graphs on GPU; compile time is excluded, a warm-up run pays it); in bf16 on a
CPU with AVX512-BF16, where the compiled engine runs the step in C (exocortex/infer/native.py), a third time
with the torch step it replaces ("compiled_torch_step"). The
measurements are interleaved in rounds and each keeps its best, so load on a shared machine hits all sides
alike. llama.cpp runs batch 1 on the GGUF export in the same dtype (llama-cpp-python, f32 KV cache, all
layers offloaded if it was built with GPU support; skipped if not installed). The last line printed is one
JSON object with the ratios `vs_hf_batch1`, `vs_hf_batch16` and `vs_llamacpp_batch1` (our best
configuration) and per configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from exocortex.checkpoint import load_model  # noqa: E402
from exocortex.run import RunDir  # noqa: E402
from exocortex.infer import native  # noqa: E402
from exocortex.infer.engine import Engine  # noqa: E402
from exocortex.apps.export.hf import export_hf  # noqa: E402
from exocortex.apps.export.gguf import export_gguf  # noqa: E402
from exocortex.tokenizer import Tokenizer  # noqa: E402
from _runs import synthetic_run  # noqa: E402  (bench/ is on the path when run as a script)

PROMPT = [{"role": "user", "content": "Tell me about the town of Hiswick and the people who live there."}]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(engine: Engine, prompt: list[int], batch: int, new_tokens: int) -> float:
    engine.stop_ids = set()  # decode the full length, like min_new_tokens on the HF side
    sync(engine.device)
    t = time.perf_counter()
    n = sum(1 for _ in engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=0.0))
    sync(engine.device)
    assert n == new_tokens, n
    return batch * new_tokens / (time.perf_counter() - t)


def time_hf(model, prompt: list[int], batch: int, new_tokens: int) -> float:
    ids = torch.tensor([prompt] * batch, device=model.device)
    with torch.inference_mode():
        sync(model.device)
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        sync(model.device)
    assert out.shape[1] == len(prompt) + new_tokens
    return batch * new_tokens / (time.perf_counter() - t)


def llamacpp_runner(run: str, stage: str, dtype: str, prompt: list[int], new_tokens: int, tmp: str):
    """Batch 1 in llama.cpp on the GGUF export, or None without llama-cpp-python. Prefill is timed, as on
    the other sides; generate() ignores stop tokens; reset() so no run reuses the previous prompt cache."""
    try:
        from llama_cpp import GGML_TYPE_F32, Llama
    except ImportError:
        print("llama.cpp: skipped (pip install llama-cpp-python)")
        return None
    path = export_gguf(run, os.path.join(tmp, "model.gguf"), stage=stage, dtype=dtype)
    llm = Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_batch=512, n_gpu_layers=-1,
                n_threads=torch.get_num_threads(), type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)

    def run_once() -> float:
        llm.reset()
        t = time.perf_counter()
        for n, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True), 1):
            if n == new_tokens:
                break
        return new_tokens / (time.perf_counter() - t)

    return run_once


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/tiny", help="a run directory; if missing, a random model is built")
    ap.add_argument("--preset", default="tiny", help="shape of the random model built when --run is missing")
    ap.add_argument("--stage", default="sft")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each configuration keeps its best")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled configuration")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both sides (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tmp = tempfile.TemporaryDirectory()
    if not os.path.exists(os.path.join(args.run, "config.json")):
        print(f"no run at {args.run}: building a random {args.preset}-preset model ...", flush=True)
        args.run = str(synthetic_run(Path(tmp.name), args.preset))
    ckpt = RunDir(args.run).latest_checkpoint(args.stage)
    if ckpt is None:
        sys.exit(f"error: no {args.stage} checkpoint in {args.run}; run `exocortex speedrun` first")
    tok = Tokenizer.load(os.path.join(args.run, "tokenizer"))
    model, _ = load_model(ckpt, device)  # float32 master weights; the engine's decode copies are in `dtype`
    ours = {"eager": Engine(model, tok, device, dtype)}
    if not args.no_compile:
        ours["compiled"] = Engine(model, tok, device, dtype, compile=True)
        if device.type == "cpu" and dtype == torch.bfloat16 and native.unavailable() is None:
            # "compiled" runs the C step here (native.py); the torch step it replaces, side by side
            ours["compiled_torch_step"] = Engine(model, tok, device, dtype, compile=True)
            ours["compiled_torch_step"].native_step = False
    prompt = tok.render_for_completion(PROMPT)
    with tempfile.TemporaryDirectory() as d:
        export_hf(args.run, d, stage=args.stage)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    print(f"torch {torch.__version__}, {args.device} ({torch.get_num_threads()} threads); model "
          f"{model.num_params() / 1e6:.2f}M params; prompt {len(prompt)} tokens, {args.new_tokens} new tokens, "
          f"greedy, {args.dtype}", flush=True)
    llamacpp = llamacpp_runner(args.run, args.stage, args.dtype, prompt, args.new_tokens, tmp.name)
    runs = {("llamacpp", 1): llamacpp} if llamacpp else {}
    for batch in (1, 16):
        for name, eng in ours.items():
            runs[(name, batch)] = lambda eng=eng, batch=batch: time_ours(eng, prompt, batch, args.new_tokens)
        runs[("hf", batch)] = lambda batch=batch: time_hf(hf, prompt, batch, args.new_tokens)
    t = time.perf_counter()
    for fn in runs.values():  # warm-up (and compilation) outside the timings
        fn()
    print(f"warm-up {time.perf_counter() - t:.0f} s", flush=True)
    best = {k: 0.0 for k in runs}
    for _ in range(args.rounds):
        for k, fn in runs.items():
            best[k] = max(best[k], fn())
    out = {}
    print(f"\n{'batch':>5} {'setup':>32} {'tok/s':>9} {'vs HF':>7}")
    for batch in (1, 16):
        hf_tok_s = best[("hf", batch)]
        for name in [*ours, "hf"]:
            label = "HF generate" if name == "hf" else f"exocortex {name}"
            print(f"{batch:5d} {label:>32} {best[(name, batch)]:9,.0f} {best[(name, batch)] / hf_tok_s:6.2f}x")
            out[f"{name}_batch{batch}_tok_s"] = round(best[(name, batch)], 1)
            if name != "hf":
                out[f"{name}_vs_hf_batch{batch}"] = round(best[(name, batch)] / hf_tok_s, 2)
        out[f"vs_hf_batch{batch}"] = round(max(best[(n, batch)] for n in ours) / hf_tok_s, 2)
    if llamacpp:
        theirs = best[("llamacpp", 1)]
        print(f"{1:5d} {'llama.cpp':>32} {theirs:9,.0f}   (ours/llama.cpp {max(best[(n, 1)] for n in ours) / theirs:.2f}x)")
        out["llamacpp_batch1_tok_s"] = round(theirs, 1)
        out["vs_llamacpp_batch1"] = round(max(best[(n, 1)] for n in ours) / theirs, 2)
    tmp.cleanup()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
