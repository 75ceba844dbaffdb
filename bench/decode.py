"""Decode speed: exocortex's engine vs HF transformers `generate` on the exported model, same run.

    python bench/decode.py --run runs/tiny [--new-tokens 128] [--stage sft]

Same weights (exported with `exocortex export`), same prompt, same number of new tokens (stop tokens are
ignored on both sides so every row decodes the full length), greedy, fp32 on both sides; batch 1 and 16.
llama.cpp (GGUF) is not measured yet: the GGUF export does not exist (issue #4). The last line printed is one
JSON object with the ratios `vs_hf_batch1` and `vs_hf_batch16`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from exocortex.checkpoint import latest_checkpoint, load_model  # noqa: E402
from exocortex.engine import Engine  # noqa: E402
from exocortex.export import export_hf  # noqa: E402
from exocortex.tokenizer import Tokenizer  # noqa: E402

PROMPT = [{"role": "user", "content": "Tell me about the town of Hiswick and the people who live there."}]


def time_ours(engine: Engine, prompt: list[int], batch: int, new_tokens: int, repeats: int) -> float:
    engine.stop_ids = set()  # decode the full length, like min_new_tokens on the HF side
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        n = sum(1 for _ in engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=0.0))
        best = min(best, time.perf_counter() - t)
    assert n == new_tokens, n
    return batch * new_tokens / best


def time_hf(model, prompt: list[int], batch: int, new_tokens: int, repeats: int) -> float:
    ids = torch.tensor([prompt] * batch)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            best = min(best, time.perf_counter() - t)
    assert out.shape[1] == len(prompt) + new_tokens
    return batch * new_tokens / best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/tiny")
    ap.add_argument("--stage", default="sft")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    ckpt = latest_checkpoint(args.run, args.stage)
    if ckpt is None:
        sys.exit(f"error: no {args.stage} checkpoint in {args.run}; run `exocortex speedrun` first")
    tok = Tokenizer.load(os.path.join(args.run, "tokenizer"))
    model, _ = load_model(ckpt)
    engine = Engine(model, tok, torch.device("cpu"), torch.float32)
    prompt = tok.render_for_completion(PROMPT)
    with tempfile.TemporaryDirectory() as d:
        export_hf(args.run, d, stage=args.stage)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {model.num_params() / 1e6:.2f}M params; "
          f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens, greedy, fp32")
    rows, out = [], {}
    for batch in (1, 16):
        ours = time_ours(engine, prompt, batch, args.new_tokens, args.repeats)
        theirs = time_hf(hf, prompt, batch, args.new_tokens, args.repeats)
        rows.append((batch, ours, theirs))
        out[f"ours_batch{batch}_tok_s"] = ours
        out[f"hf_batch{batch}_tok_s"] = theirs
        out[f"vs_hf_batch{batch}"] = ours / theirs
    print(f"\n{'batch':>5} {'exocortex tok/s':>16} {'HF generate tok/s':>18} {'ratio':>7}")
    for batch, ours, theirs in rows:
        print(f"{batch:5d} {ours:16,.0f} {theirs:18,.0f} {ours / theirs:6.2f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
