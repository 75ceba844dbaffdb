"""Stage `eval`: every stage's model, measured the same way (the report's BASE / MID / SFT / RL table).

- val bits-per-byte: summed loss over the bytes the target tokens stand for, comparable across tokenizers.
- in-context (CORE-style): few-shot multiple choice scored by the lowest mean loss of each option, and
  exact-match generation; each task's accuracy is centred, (acc - chance) / (1 - chance), and CORE is their
  mean. Offline tasks come from the generated world; DCLM CORE bundles load with `eval.core_bundle`.
- chat tasks (finetuned stages): held-out questions of every task family, greedy, tools on; graded on the
  assistant's own words. Lookup is scored twice, with and without its tool. pass@k on word problems.
"""
from __future__ import annotations

import math
import random
import time

import torch

from exocortex.checkpoint import autocast, latest_checkpoint, load_model, resolve_device, resolve_dtype
from exocortex.config import ExocortexError, RunConfig
from exocortex.tokenizer import Tokenizer

STAGES = ["pretrain", "midtrain", "sft", "rl"]
LABELS = {"pretrain": "BASE", "midtrain": "MID", "sft": "SFT", "rl": "RL"}


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


# ----------------------------------------------------------------------------- in-context (base) evaluation

def world_incontext_tasks(world, n: int, seed: int) -> dict[str, dict]:
    """Offline CORE-style tasks from the generated world: {name: {"kind", "chance", "items"}}.

    world_cloze: "<subject> lives in" -> which of 4 values (mc). arithmetic_em: few-shot "a + b = " -> exact match.
    Item formats (shared with tasks/core.py's DCLM bundle loader): mc {"context", "choices", "gold"} or
    schema-style mc {"contexts", "continuation", "gold"}; em {"context", "continuation"}.
    """
    from exocortex.tasks.base import split_of

    rng = random.Random(f"incontext-{seed}")
    facts = [f for f in world.facts() if not world.is_held_out(f.subject) and f.answer.count(f.value) == 1]
    values: dict[str, list[str]] = {}
    for f in facts:
        values.setdefault(f.relation, [])
        if f.value not in values[f.relation]:
            values[f.relation].append(f.value)
    test = [f for f in facts if split_of(f.subject + "|" + f.relation) == "test" and len(values[f.relation]) >= 4]
    shots = [f for f in facts if split_of(f.subject + "|" + f.relation) == "train"]
    cloze = []
    for f in rng.sample(test, min(n, len(test))):
        demo = " ".join(s.answer for s in rng.sample(shots, 3))
        ctx = demo + " " + f.answer[: f.answer.index(f.value)].rstrip()
        opts = [f.value] + rng.sample([v for v in values[f.relation] if v != f.value], 3)
        rng.shuffle(opts)
        cloze.append({"context": ctx, "choices": [" " + o for o in opts], "gold": opts.index(f.value)})
    em = []
    for _ in range(n):
        def pair():
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            op = rng.choice("+-")
            return f"{a} {op} {b} =", str(a + b if op == "+" else a - b)
        demo = "\n".join(f"{q} {a}" for q, a in (pair() for _ in range(3)))
        q, a = pair()
        em.append({"context": f"{demo}\n{q}", "continuation": " " + a})
    return {"world_cloze": {"kind": "mc", "chance": 0.25, "items": cloze},
            "arithmetic_em": {"kind": "em", "chance": 0.0, "items": em}}


@torch.no_grad()
def option_losses(model, tok: Tokenizer, pairs: list[tuple[str, str]], device, dtype) -> list[float]:
    """Mean loss of each continuation's tokens after its context, for (context, continuation) pairs (one batch)."""
    rows, n_cont = [], []
    for ctx, cont in pairs:
        c = tok.encode(cont)
        rows.append(([tok.bos_id] + tok.encode(ctx) + c)[-(model.cfg.seq_len + 1):])  # keep the scored end
        n_cont.append(min(len(c), len(rows[-1]) - 1))
    T = max(len(r) for r in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (r, n) in enumerate(zip(rows, n_cont)):
        x[i, :len(r) - 1] = torch.tensor(r[:-1])
        y[i, len(r) - 1 - n:len(r) - 1] = torch.tensor(r[-n:])
    with autocast(device, dtype):
        loss = model(x.to(device), y.to(device), reduction="none").view(len(rows), T).float()
    valid = (y >= 0).to(device)
    return ((loss * valid).sum(1) / valid.sum(1).clamp(min=1)).tolist()


@torch.no_grad()
def incontext_accuracy(model, tok: Tokenizer, task: dict, device, dtype) -> float:
    model.eval()
    correct = 0
    for it in task["items"]:
        if task["kind"] == "mc":  # shared context + options, or (schema) options' contexts + shared continuation
            pairs = ([(it["context"], c) for c in it["choices"]] if "choices" in it
                     else [(c, it["continuation"]) for c in it["contexts"]])
            losses = option_losses(model, tok, pairs, device, dtype)
            correct += int(min(range(len(losses)), key=losses.__getitem__) == it["gold"])
        else:  # exact match: the greedy continuation starts with the reference
            ids = [tok.bos_id] + tok.encode(it["context"])
            want = tok.encode(it["continuation"])
            ids = ids[-(model.cfg.seq_len - len(want)):]
            got = []
            for _ in range(len(want)):
                with autocast(device, dtype):
                    logits = model(torch.tensor([ids + got], device=device))[0, -1]
                got.append(int(logits.argmax()))
            correct += int(got == want)
    return correct / max(1, len(task["items"]))


def core_scores(model, tok: Tokenizer, tasks: dict[str, dict], device, dtype) -> dict:
    out = {}
    centred = []
    for name, task in tasks.items():
        acc = incontext_accuracy(model, tok, task, device, dtype)
        c = (acc - task["chance"]) / (1 - task["chance"])
        out[f"{name}_accuracy"] = acc
        centred.append(c)
    out["core"] = sum(centred) / max(1, len(centred))
    return out


# ----------------------------------------------------------------------------- chat evaluation

def task_accuracy(engine, tok: Tokenizer, task, n: int, seed: int, max_new_tokens: int,
                  samples: list | None = None, stage: str = "") -> float:
    """Greedy accuracy on n held-out examples of a task (prompts batched by length)."""
    examples = task.examples(n, seed, "test")
    prompts = [tok.render_for_completion(ex["messages"][:-1]) for ex in examples]
    outs = engine.complete_many(prompts, max_tokens=max_new_tokens, temperature=0.0)
    correct = 0
    for i, (ex, out) in enumerate(zip(examples, outs)):
        ok = task.safe_grade(engine.answer_text(out), ex)
        correct += ok
        if samples is not None and i < 2:
            q = ex["messages"][-2]["content"]
            samples.append({"stage": stage, "task": task.name, "question": q if isinstance(q, str) else str(q),
                            "reply": engine.render(out), "expected": ex["answer"], "correct": bool(ok)})
    return correct / max(1, len(examples))


def pass_at_k(engine, tok: Tokenizer, task, n: int, k: int, seed: int, max_new_tokens: int) -> float:
    """Fraction of n held-out questions where at least one of k samples (temperature 1) is correct."""
    hits = 0
    for i, ex in enumerate(task.examples(n, seed + 1, "test")):
        prompt = tok.render_for_completion(ex["messages"][:-1])
        outs = engine.complete(prompt, num_samples=k, max_tokens=max_new_tokens, temperature=1.0, seed=seed + i)
        hits += any(task.safe_grade(engine.answer_text(o), ex) for o in outs)
    return hits / max(1, n)


def chat_scores(engine, tok, tasks, cfg: RunConfig, samples: list, stage: str) -> dict:
    from exocortex.tasks import parse_mixture

    e = cfg.eval
    out = {}
    counts = parse_mixture(e.chat_tasks)
    for name, n in counts.items():
        n = int(n)
        out[f"{name}_accuracy"] = task_accuracy(engine, tok, tasks[name], n, e.seed, e.max_new_tokens, samples, stage)
        out[f"{name}_n"] = n
        if name == "lookup":  # the same held-out questions with the tool switched off
            saved = engine.tools
            engine.tools = {k: v for k, v in saved.items() if k != "lookup"}
            out["lookup_no_tool_accuracy"] = task_accuracy(engine, tok, tasks[name], n, e.seed, e.max_new_tokens)
            engine.tools = saved
    if e.pass_k > 1 and "word_problems" in counts:
        out[f"word_problems_pass@{e.pass_k}"] = pass_at_k(engine, tok, tasks["word_problems"], e.pass_k_n, e.pass_k,
                                                           e.seed, e.max_new_tokens)
        out[f"word_problems_pass@{e.pass_k}_n"] = e.pass_k_n
    return out


def run_eval(cfg: RunConfig, stages: list[str] | None = None) -> dict:
    from exocortex.data.world import World
    from exocortex.engine import Engine
    from exocortex.lookup import tools_for_run
    from exocortex.pretrain import read_summary, val_batches, write_summary
    from exocortex.sft import task_set

    t0 = time.time()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.pretrain.dtype, device)
    tok = Tokenizer.load(cfg.run_dir / "tokenizer")
    present = [s for s in (stages or STAGES) if latest_checkpoint(cfg.run_dir, s) is not None]
    if not present:
        raise ExocortexError(f"{cfg.run_dir} has no checkpoints to evaluate; run `exocortex pretrain --run {cfg.name}` first")
    world = World(seed=cfg.data.world_seed)
    incontext = world_incontext_tasks(world, cfg.eval.core_n, cfg.eval.seed)
    if cfg.eval.core_bundle:
        from exocortex.tasks.core import load_core_bundle

        incontext.update(load_core_bundle(cfg.eval.core_bundle, max_items=cfg.eval.core_n))
    tasks = task_set(cfg)
    tools = tools_for_run(cfg)
    previous = read_summary(cfg.run_dir, "eval") or {}
    results: dict = {"stages": {s: v for s, v in previous.get("stages", {}).items() if s not in present}}
    samples: list = [s for s in previous.get("samples", []) if s.get("stage") not in present]
    for stage in present:
        ts = time.time()
        model, _ = load_model(latest_checkpoint(cfg.run_dir, stage), device)
        val = val_batches(cfg, model.cfg.seq_len, cfg.pretrain.device_batch, cfg.pretrain.eval_tokens * 4)
        r = {"val_bpb": bits_per_byte(model, tok, val, device, dtype)}
        r.update(core_scores(model, tok, incontext, device, dtype))
        if stage != "pretrain":
            r.update(chat_scores(Engine(model, tok, device, dtype, tools=tools), tok, tasks, cfg, samples, stage))
        r["seconds"] = time.time() - ts
        results["stages"][stage] = r
        shown = ", ".join(f"{k.replace('_accuracy', '')} {v:.1%}" if "accuracy" in k or "@" in k else f"{k} {v:.3f}"
                          for k, v in r.items() if k != "seconds" and not k.endswith("_n"))
        print(f"eval {LABELS[stage]}: {shown} ({r['seconds']:.0f}s)")
    results["samples"] = samples
    results["seconds"] = time.time() - t0
    write_summary(cfg.run_dir, "eval", results)
    return results
