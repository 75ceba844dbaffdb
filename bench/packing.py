"""Best-fit vs stream packing for pretraining: the same model, seed and budget, two data loaders.

    python bench/packing.py                      # tiny preset, 1 minute of pretraining per arm
    python bench/packing.py --minutes 0 --steps 60 --run runs/bench_packing

Tokenizes the tiny preset's generated world once (into --run, reused if there), then pretrains the tiny
model twice from the same initialization: rows cut from the token stream (`stream`, the old loader) and
rows best-fit packed from whole documents (`bestfit`). Both final models are scored on three val sets: the
stream-cut rows, the best-fit packed rows (each loader's own yardstick), and each val document alone from
its <|bos|> (favours neither).
Also: training tokens/s, the loader's own time per micro-batch, and the share of training tokens one
best-fit epoch uses (the rest is lost to cropping). The last line is one JSON object with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from exocortex.device import resolve_device, resolve_dtype  # noqa: E402
from exocortex.config import load_config, make_config  # noqa: E402
from exocortex.data.tokens import has_token_data  # noqa: E402
from exocortex.evals import bits_per_byte  # noqa: E402
from exocortex.model import GPT  # noqa: E402
from exocortex.data.loader import load_splits, train_source, val_batches  # noqa: E402
from exocortex.stages.tokenizer import run_tokenizer  # noqa: E402
from exocortex.tokenizer import Tokenizer  # noqa: E402
from exocortex.train.loop import train  # noqa: E402


def doc_batches(split, seq_len: int, rows: int, max_tokens: int) -> list:
    """Each val document alone in its row, from its <|bos|> (cropped to the row, targets -1 past its end):
    a yardstick that favours neither packing."""
    import numpy as np

    out, batch, n = [], [], 0
    for s, e in zip(split.starts, list(split.starts[1:]) + [len(split.tokens)]):
        doc = np.asarray(split.tokens[s:min(e, s + seq_len + 1)], dtype=np.int64)
        row = np.full(seq_len + 1, -1, dtype=np.int64)
        row[:len(doc)] = doc
        batch.append(row)
        n += len(doc) - 1
        if len(batch) == rows or n >= max_tokens:
            t = torch.from_numpy(np.stack(batch))
            out.append((t[:, :-1].clamp(min=0), t[:, 1:]))
            batch = []
        if n >= max_tokens:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/bench_packing")
    ap.add_argument("--minutes", type=float, default=1.0, help="time budget per arm (0: use --steps)")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="config overrides, as for the CLI")
    args = ap.parse_args()

    run = os.path.abspath(args.run)
    if has_token_data(os.path.join(run, "data")):
        cfg = load_config(run, args.set)
    else:
        cfg = make_config("tiny", args.set, name=os.path.basename(run))
        cfg.runs_dir = os.path.dirname(run)
        run_tokenizer(cfg)
    tok = Tokenizer.load(cfg.run_dir / "tokenizer")
    cfg.model.vocab_size = tok.vocab_size
    t = cfg.pretrain
    t.time_minutes, t.max_steps, t.checkpoint_every = args.minutes, args.steps, 0
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(t.dtype, device)
    T, rows = cfg.model.seq_len, t.device_batch

    vals, sources = {}, {}
    for packing in ("stream", "bestfit"):
        cfg.data.packing = packing
        vals[packing] = val_batches(cfg, T, rows, t.eval_tokens * 4)
        sources[packing] = train_source(cfg, T, rows)
    vals["doc"] = doc_batches(load_splits(cfg)[1], T, rows, t.eval_tokens * 4)

    results = {}
    for packing in ("stream", "bestfit"):
        src = sources[packing]
        src.get(0)  # packs the first block
        t0 = time.perf_counter()
        for i in range(1, 101):
            src.get(i)
        loader_ms = (time.perf_counter() - t0) / 100 * 1000
        torch.manual_seed(cfg.seed)
        model = GPT(cfg.model)
        res = train(model, t, f"bench_{packing}", cfg.run_dir, src, vals[packing], device, dtype,
                    total_steps=args.steps or None)
        results[packing] = {"steps": res.steps, "tokens": res.tokens, "tok_per_s": res.tokens_per_second,
                            "loader_ms_per_batch": loader_ms,
                            **{f"bpb_{v}_val": bits_per_byte(model, tok, b, device, dtype) for v, b in vals.items()}}

    train_split, _ = load_splits(cfg)
    bf = sources["bestfit"]
    used = sum(int(bf._block(0, b)[3].sum()) for b in range(bf.n_blocks))
    epoch_use = used / len(train_split.tokens)

    print(f"\n{'loader':8} {'steps':>6} {'tokens':>10} {'tok/s':>8} {'loader ms':>9} {'bpb stream val':>15} "
          f"{'bpb packed val':>15} {'bpb doc val':>12}")
    for p, r in results.items():
        print(f"{p:8} {r['steps']:>6} {r['tokens']:>10,} {r['tok_per_s']:>8,.0f} {r['loader_ms_per_batch']:>9.2f} "
              f"{r['bpb_stream_val']:>15.4f} {r['bpb_bestfit_val']:>15.4f} {r['bpb_doc_val']:>12.4f}")
    print(f"one best-fit epoch uses {epoch_use:.1%} of the training tokens (the rest is cropped)")
    s, b = results["stream"], results["bestfit"]
    print(json.dumps({"bestfit_over_stream": {
        "bpb_stream_val": b["bpb_stream_val"] / s["bpb_stream_val"],
        "bpb_packed_val": b["bpb_bestfit_val"] / s["bpb_bestfit_val"],
        "bpb_doc_val": b["bpb_doc_val"] / s["bpb_doc_val"],
        "tok_per_s": b["tok_per_s"] / s["tok_per_s"]}, "epoch_token_use": epoch_use, **results}))


if __name__ == "__main__":
    main()
