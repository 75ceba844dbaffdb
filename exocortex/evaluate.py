"""Stage `eval`: base model bits-per-byte on val, and chat accuracy on held-out generated tasks.

bits-per-byte divides the summed loss by the bytes the target tokens stand for, so it compares models with
different tokenizers. Chat tasks are graded on the assistant's own words (tool calls and tool outputs are
excluded), from greedy generations with tools enabled.
"""
from __future__ import annotations

import math
import random
import time

import torch

from exocortex.checkpoint import autocast, load_model, require_checkpoint, resolve_device, resolve_dtype
from exocortex.config import RunConfig
from exocortex.tokenizer import Tokenizer


@torch.no_grad()
def bits_per_byte(model, tok: Tokenizer, batches, device, dtype) -> float:
    model.eval()
    byte_len = torch.tensor(tok.token_byte_lengths(), dtype=torch.long, device=device)
    nats, nbytes = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            loss = model(x, y, reduction="none").view_as(y)
        valid = y >= 0
        b = torch.where(valid, byte_len[y.clamp(min=0)], torch.zeros_like(y))
        counted = b > 0  # special tokens stand for no bytes
        nats += loss[counted].sum().item()
        nbytes += int(b.sum())
    return nats / math.log(2) / max(1, nbytes)


def chat_accuracy(engine, tok: Tokenizer, task: str, n: int, seed: int, world, max_new_tokens: int,
                  samples: list | None = None) -> float:
    from exocortex.tasks import GRADERS, make_example

    rng = random.Random(f"{seed}-{task}")
    correct = 0
    for i in range(n):
        ex = make_example(task, rng, "test", world)
        prompt = tok.render_for_completion(ex["messages"][:-1])
        out = engine.complete(prompt, max_tokens=max_new_tokens, temperature=0.0)[0]
        ok = GRADERS[task](engine.answer_text(out), ex["answer"])
        correct += ok
        if samples is not None and i < 3:
            samples.append({"task": task, "question": ex["messages"][-2]["content"], "reply": engine.render(out),
                            "expected": ex["answer"], "correct": bool(ok)})
    return correct / max(1, n)


def run_eval(cfg: RunConfig) -> dict:
    from exocortex.data.world import World
    from exocortex.data.loader import eval_batches
    from exocortex.engine import Engine
    from exocortex.pretrain import load_token_data, write_summary

    t0 = time.time()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.pretrain.dtype, device)
    tok = Tokenizer.load(cfg.run_dir / "tokenizer")
    results: dict = {}
    base_ckpt = require_checkpoint(cfg.run_dir, "pretrain", f"exocortex pretrain --run {cfg.name}")
    base, _ = load_model(base_ckpt, device)
    _, val_tokens = load_token_data(cfg)
    val = eval_batches(val_tokens, base.cfg.seq_len, cfg.pretrain.device_batch, cfg.pretrain.eval_tokens * 4)
    results["base"] = {"val_bpb": bits_per_byte(base, tok, val, device, dtype)}
    print(f"eval: base val bpb {results['base']['val_bpb']:.4f}")

    sft_ckpt = require_checkpoint(cfg.run_dir, "sft", f"exocortex sft --run {cfg.name}")
    chat, _ = load_model(sft_ckpt, device)
    results["sft"] = {"val_bpb": bits_per_byte(chat, tok, val, device, dtype)}
    engine = Engine(chat, tok, device, dtype)
    world = World(seed=cfg.data.world_seed) if not cfg.data.path else World(seed=cfg.data.world_seed)
    samples: list = []
    e = cfg.eval
    for task, n in (("arithmetic", e.n_arithmetic), ("facts", e.n_facts), ("identity", e.n_identity)):
        acc = chat_accuracy(engine, tok, task, n, e.seed, world, e.max_new_tokens, samples)
        results["sft"][f"{task}_accuracy"] = acc
        results["sft"][f"{task}_n"] = n
        print(f"eval: {task} accuracy {acc:.1%} ({n} held-out questions)")
    results["samples"] = samples
    results["seconds"] = time.time() - t0
    write_summary(cfg.run_dir, "eval", results)
    return results
