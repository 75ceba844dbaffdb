"""In-context copying: can a checkpoint reproduce what it has just read, and how long does training take to
teach it? Lookup, memory, citations, spelling and multiple choice all rest on it (docs/tiny.md).

    python bench/copying.py --run runs/tiny                       # probe each stage's checkpoint
    python bench/copying.py --run runs/tiny --train 300           # + train on repeated lists until copying forms
    python bench/copying.py --run runs/tiny --train 300 --from-scratch

Probes, per checkpoint:
- copy_em: the base eval's probe (tasks/core.py): a list of made-up words read back, exact match of the last two;
- world list: 12 words of the world's lexicon, then the same 12 again; next-token accuracy on the first pass and
  on the second (a model that copies gets the second right; one that does not is as lost as the first time);
- random tokens: 40 random token ids twice; next-token accuracy on the second pass (chance ~0);
- heads: on those repeated lists, the attention mass the strongest head of each layer puts on the previous
  token (a previous-token head) and, on the second pass, on the token after the earlier occurrence of the
  current one (an induction head). Copying takes both, in that order of layers.
--train N: N steps of nothing but repeated random token lists (rows of 96, lists of 8-40 tokens), with the run's
pretraining optimizer and learning rates, starting from the pretrained checkpoint (or a fresh model); it prints
the loss and the second-pass accuracy every 25 steps: the step where copying forms. The last line is one JSON
object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exocortex.checkpoint import load_model  # noqa: E402
from exocortex.config import load_config  # noqa: E402
from exocortex.data.world import World, spelling_words  # noqa: E402
from exocortex.errors import ExocortexError  # noqa: E402
from exocortex.evals import incontext_accuracy  # noqa: E402
from exocortex.model import GPT, apply_rotary  # noqa: E402
from exocortex.tasks.core import copy_items  # noqa: E402
from exocortex.tokenizer import Tokenizer  # noqa: E402
from exocortex.train.optim import build_optimizers  # noqa: E402


@torch.no_grad()
def second_pass_accuracy(model, seqs: list[list[int]], halves: list[int]) -> tuple[float, float]:
    """Mean next-token accuracy over each sequence's first and second halves (the boundary tokens left out)."""
    first = second = 0.0
    for ids, half in zip(seqs, halves):
        pred = model(torch.tensor([ids]))[0].argmax(-1)[:-1]
        hit = (pred == torch.tensor(ids[1:])).float()
        first += hit[1:half - 1].mean().item()
        second += hit[half + 1:].mean().item()
    return first / len(seqs), second / len(seqs)


def probe(model, tok: Tokenizer, words: list[str]) -> dict:
    model.eval()
    rng = random.Random(0)
    out = {"copy_em": incontext_accuracy(model, tok, {"kind": "em", "items": copy_items(100, rng)}, "cpu",
                                         torch.float32)}
    seqs, halves = [], []
    for _ in range(32):
        ws = rng.sample(words, 12)
        a, b = tok.encode("Words: " + ", ".join(ws) + "."), tok.encode(" Again: " + ", ".join(ws) + ".")
        seqs.append([tok.bos_id] + a + b)
        halves.append(1 + len(a))
    out["world_list_first"], out["world_list_second"] = second_pass_accuracy(model, seqs, halves)
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(300, min(4000, tok.vocab_size), (32, 40), generator=g)
    out["random_second"] = second_pass_accuracy(model, torch.cat([rand, rand], 1).tolist(), [40] * 32)[1]
    out["heads"] = attention_roles(model, torch.cat([rand[:8], rand[:8]], 1))
    return out


@torch.no_grad()
def attention_roles(model, lists: torch.Tensor) -> dict[str, list[float]]:
    """Per layer, the largest mean attention of any head on the previous token, and on the second pass of
    `lists` (each row a list read twice) on the token that followed the current token's first occurrence."""
    n = lists.shape[1] // 2
    maps: list[torch.Tensor] = []

    def keep(attn, inputs, _out):
        x, cos, sin = inputs
        B, T, _ = x.shape
        q = attn.q_norm(attn.q_proj(x).view(B, T, attn.n_heads, attn.hd)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).view(B, T, attn.n_kv, attn.hd)).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k = k.repeat_interleave(attn.n_heads // attn.n_kv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / attn.hd ** 0.5
        maps.append(scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1))

    hooks = [layer.self_attn.register_forward_hook(keep) for layer in model.model.layers]
    try:
        model(lists)
    finally:
        for h in hooks:
            h.remove()
    pos = torch.arange(1, lists.shape[1])
    later = torch.arange(n + 1, 2 * n)
    out = {"previous_token": [], "induction": []}
    for a in maps:  # (B, H, T, T)
        out["previous_token"].append(round(a[:, :, pos, pos - 1].mean((0, 2)).max().item(), 3))
        out["induction"].append(round(a[:, :, later, later - n + 1].mean((0, 2)).max().item(), 3))
    return out


def train_to_copy(model, cfg, steps: int, vocab: int) -> list[dict]:
    model.train()
    opts = build_optimizers(model, cfg.pretrain)
    gen = torch.Generator().manual_seed(1)

    def batch(rows: int = 32, width: int = 96):
        out = []
        for _ in range(rows):
            n = int(torch.randint(8, 40, (1,), generator=gen))
            x = torch.randint(300, min(4000, vocab), (n,), generator=gen)
            out.append(x.repeat(width // n + 2)[:width + 1])
        s = torch.stack(out)
        return s[:, :-1], s[:, 1:]

    held = torch.randint(300, min(4000, vocab), (32, 40), generator=torch.Generator().manual_seed(0))
    curve, t0 = [], time.time()
    for step in range(steps + 1):
        if step % 25 == 0:
            model.eval()
            acc = second_pass_accuracy(model, torch.cat([held, held], 1).tolist(), [40] * 32)[1]
            model.train()
            curve.append({"step": step, "loss": round(loss.item(), 3) if step else None, "second": round(acc, 3)})
            print(f"  step {step:4d}  loss {curve[-1]['loss']}  second-pass accuracy {acc:.2f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
        if step == steps:
            break
        x, y = batch()
        loss = model(x, y)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run directory")
    ap.add_argument("--stages", default="pretrain,midtrain,sft,rl")
    ap.add_argument("--train", type=int, default=0, help="steps of copy training after the probes (0: none)")
    ap.add_argument("--from-scratch", action="store_true", help="copy training from a fresh model")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config(args.run)
    tok = Tokenizer.load(cfg.run.tokenizer_dir)
    words = spelling_words(World(seed=cfg.data.world_seed))
    result = {"run": str(args.run), "probes": {}}
    trained = cfg.run.trained_stages()
    for stage in args.stages.split(","):
        if stage not in trained:
            print(f"{stage}: not trained in this run")
            continue
        r = probe(load_model(trained[stage])[0], tok, words)
        result["probes"][stage] = {k: v if k == "heads" else round(v, 3) for k, v in r.items()}
        print(f"{stage:9s} copy_em {r['copy_em']:.2f} | world list {r['world_list_first']:.2f} -> "
              f"{r['world_list_second']:.2f} | random tokens, 2nd pass {r['random_second']:.2f} | per layer: "
              f"previous-token head {r['heads']['previous_token']}, induction head {r['heads']['induction']}")
    if args.train:
        if args.from_scratch:  # unwired: how long copying takes to form on its own
            model = GPT(dataclasses.replace(cfg.model, induction_init=False))
        else:
            model, _ = load_model(cfg.run.require_checkpoint("pretrain"))
        print(f"copy training, {args.train} steps from {'scratch' if args.from_scratch else 'pretrain'}:")
        result["train"] = {"from": "scratch" if args.from_scratch else "pretrain",
                           "curve": train_to_copy(model, cfg, args.train, tok.vocab_size)}
    print(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    except ExocortexError as e:  # no such run, a damaged checkpoint: one line, as the CLI says it
        sys.exit(f"error: {e}")
