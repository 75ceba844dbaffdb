"""Measuring a model: val bits-per-byte, in-context (CORE-style) accuracy, held-out chat task accuracy, pass@k.

- bits per byte: summed loss over the bytes the target tokens stand for, comparable across tokenizers.
- in-context: few-shot multiple choice scored by the lowest mean loss of each option, and exact-match
  generation; each task's accuracy is centred, (acc - chance) / (1 - chance), and CORE is their mean. One more
  exact-match task, copy_em (a list of made-up words read back), probes in-context copying and stays out of
  the mean: it is what lookup, memory and multiple choice rest on.
- chat tasks: held-out questions of a task, greedy, tools on; a task with phrasing families (exocortex/tasks/
  phrasing.py) is measured twice: `<task>_accuracy` on its test items asked in the families it trained on, and
  `<task>_heldout_accuracy` on the same kind of items asked in families it never saw (the gap is how much of
  the skill is tied to the training wordings); graded on the assistant's own words (a task
  about calling a client's functions also on its calls: Task.grade_reply), with the functions an example offers
  in the prompt and run as its client would (Task.client_tools).
- calibration: every graded reply of those tasks (seen and held-out families) is also described by the scores
  of the tokens the model chose and its mean hidden state (infer/confidence.py); a logistic fit on half of them
  predicts whether a reply is right, and `escalation_auroc` / `escalation_ece` measure that prediction on the
  other half (`escalation_auroc_unseen_task`: each task by a fit on the others). The fit on all of them is what
  `exocortex serve --escalate-to` uses to decide when to ask a stronger model.
"""
from __future__ import annotations

import contextlib
import math
import sys

import torch

from exocortex.config import EvalConfig
from exocortex.device import autocast
from exocortex.infer.confidence import Calibration, auroc, calibration_error, replies_features
from exocortex.tasks.base import prompt_ids
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


# ----------------------------------------------------------------------------- in-context (base) evaluation

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
        out[f"{name}_accuracy"] = acc
        if task.get("in_core", True):  # a probe (copy_em) is reported beside CORE, not averaged into it
            centred.append((acc - task["chance"]) / (1 - task["chance"]))
    out["core"] = sum(centred) / max(1, len(centred))
    return out


# ----------------------------------------------------------------------------- chat evaluation

@contextlib.contextmanager
def offering(engine, task):
    """The engine with the functions `task`'s examples offer, run as their client would, beside its own tools."""
    saved = engine.tools
    engine.tools = {**saved, **task.client_tools}
    try:
        yield engine
    finally:
        engine.tools = saved


def task_accuracy(engine, tok: Tokenizer, task, n: int, seed: int, max_new_tokens: int,
                  samples: list | None = None, stage: str = "", split: str = "test",
                  replies: list | None = None, families: dict | None = None,
                  transcript: list | None = None) -> float:
    """Greedy accuracy on n held-out examples of a task (prompts batched by length): split "test" asks them in
    the phrasing families trained on, "heldout" in the held-out families. `replies`, if given, gets one
    {"task", "split", "index", "ok", **features} per reply (infer/confidence.py) for the calibration;
    `families`, if given, counts [right, asked] per phrasing family (examples that carry one); `transcript`,
    if given, gets every graded reply (question, reply, expected, right, family)."""
    examples = task.examples(n, seed, split)
    prompts = [prompt_ids(tok, ex) for ex in examples]
    # a question longer than the positions the model has cannot be answered: scored wrong, and said
    limit = engine.model.rope_cos.shape[0]
    fits = [len(p) < limit for p in prompts]
    if not all(fits):
        print(f"eval: {fits.count(False)} of {len(fits)} {task.name} questions are longer than the model's {limit} "
              f"positions; scored wrong", file=sys.stderr)
    with offering(engine, task):
        answered = iter(engine.complete_many([p for p, f in zip(prompts, fits) if f], max_tokens=max_new_tokens,
                                             temperature=0.0) if any(fits) else [])
    outs = [next(answered) if f else None for f in fits]
    answered_at = [i for i, out in enumerate(outs) if out is not None]
    if replies is not None:
        features = dict(zip(answered_at, replies_features(engine, [prompts[i] for i in answered_at],
                                                          [outs[i] for i in answered_at])))
    correct = 0
    for i, (ex, out) in enumerate(zip(examples, outs)):
        if out is None:
            continue
        ok = task.grade_reply(engine.to_parts(out), ex)
        correct += ok
        if families is not None and "family" in ex:
            tally = families.setdefault(ex["family"], [0, 0])
            tally[0] += bool(ok)
            tally[1] += 1
        if replies is not None:
            replies.append({"task": task.name, "split": split, "index": i, "ok": bool(ok), **features[i]})
        if transcript is not None:
            q = ex["messages"][-2]["content"]
            transcript.append({"stage": stage, "task": task.name, "split": split, "index": i,
                               "family": ex.get("family"), "question": q if isinstance(q, str) else str(q),
                               "reply": engine.render(out), "expected": ex.get("answer"), "right": bool(ok)})
        if samples is not None and i < 2:
            q = ex["messages"][-2]["content"]
            samples.append({"stage": stage, "task": task.name + (" (held-out family)" if split == "heldout" else ""),
                            "question": q if isinstance(q, str) else str(q),
                            "reply": engine.render(out), "expected": ex["answer"], "correct": bool(ok)})
    return correct / max(1, len(examples))


def document_scores(engine, tok: Tokenizer, task, n: int, seed: int, max_new_tokens: int) -> dict:
    """The lookup task's held-out questions (people the model never read about) answered from a document index
    (infer/docstore.py) that holds the world's encyclopedia as files, one per entity, lines of ~80 characters:
    `documents_accuracy`, the share of replies that cited a passage (`documents_cited`), and of those the
    share whose cited passage holds the answer (`documents_citation_correct`)."""
    import tempfile
    import textwrap
    from pathlib import Path

    from exocortex.infer.docstore import DocumentStore, citation
    from exocortex.infer.tools import search_tool

    examples = task.examples(n, seed, "test")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "encyclopedia"
        folder.mkdir()
        for title, passage in zip(task.index.titles, task.index.passages):
            name = "-".join(title.lower().split()) or "untitled"
            (folder / f"{name}.md").write_text(textwrap.fill(passage, 80) + "\n")
        store = DocumentStore(Path(tmp) / "index.sqlite")
        store.update([folder])
        saved = engine.tools
        engine.tools = {**saved, "lookup": search_tool(store)}
        try:
            outs = engine.complete_many([prompt_ids(tok, ex) for ex in examples], max_tokens=max_new_tokens,
                                        temperature=0.0)
        finally:
            engine.tools = saved
            store.close()
    correct = cited = cited_right = 0
    for ex, out in zip(examples, outs):
        parts = engine.to_parts(out)
        correct += task.grade_reply(parts, ex)
        sources = [c for p in parts if p["type"] == "tool_output" and (c := citation(p["text"]))]
        cited += bool(sources)
        cited_right += any(ex["answer"].lower() in c["text"].lower() for c in sources)
    m = max(1, len(examples))
    return {"documents_accuracy": correct / m, "documents_cited": cited / m,
            "documents_citation_correct": cited_right / max(1, cited), "documents_n": len(examples)}


def memory_scores(engine, tok: Tokenizer, task, n: int, seed: int, max_new_tokens: int) -> dict:
    """Memory through a real note store (infer/notes.py), two sessions per item: the user tells a fact (test
    split values) and, in a fresh conversation, asks for it. `memory_saved`: a note holding the value was
    written; `memory_recalled`: the later answer has it; `memory_other_user`: the same question from another
    user got it (must stay 0: notes are per user)."""
    import random
    import tempfile
    from pathlib import Path

    from exocortex.infer.notes import NoteStore
    from exocortex.tasks.memory import RELATIONS

    rng = random.Random(seed)
    items = []
    while len(items) < n:
        ex = task.example(rng, "test")
        if ex["kind"] == "recall":  # its value and relation; the conversations are made below
            rel = next(r for r in RELATIONS if ex["messages"][0]["content"] in r[2])
            items.append((rel, ex["answer"]))
    saved = recalled = leaked = 0
    tools = engine.tools
    with tempfile.TemporaryDirectory() as tmp:
        store = NoteStore(Path(tmp) / "notes.sqlite")
        try:
            for i, (rel, value) in enumerate(items):
                me, other = f"user{i}", f"other{i}"
                tell = [{"role": "user", "content": task.told(rel, value, rng)}]
                ask = [{"role": "user", "content": rng.choice(rel[2])}]
                engine.tools = {**tools, **store.tools(me, "eval")}
                engine.complete(tok.render_for_completion(tell), max_tokens=max_new_tokens, temperature=0.0)
                saved += any(value.lower() in note.text.lower() for note in store.list(me))
                out = engine.complete(tok.render_for_completion(ask), max_tokens=max_new_tokens, temperature=0.0)[0]
                recalled += task.grade_reply(engine.to_parts(out), {"kind": "recall", "answer": value})
                engine.tools = {**tools, **store.tools(other, "eval")}
                out = engine.complete(tok.render_for_completion(ask), max_tokens=max_new_tokens, temperature=0.0)[0]
                leaked += task.grade_reply(engine.to_parts(out), {"kind": "recall", "answer": value})
        finally:
            engine.tools = tools
            store.close()
    m = max(1, n)
    return {"memory_saved": saved / m, "memory_recalled": recalled / m, "memory_other_user": leaked / m,
            "memory_n": n}


def pass_at_k(engine, tok: Tokenizer, task, n: int, k: int, seed: int, max_new_tokens: int) -> float:
    """Fraction of n held-out questions where at least one of k samples (temperature 1) is correct."""
    examples = task.examples(n, seed + 1, "test")
    with offering(engine, task):  # every sample of every question in one continuous batch
        outs = engine.complete_many([prompt_ids(tok, ex) for ex in examples for _ in range(k)],
                                    max_tokens=max_new_tokens, temperature=1.0, seed=seed)
    hits = sum(any(task.grade_reply(engine.to_parts(o), ex) for o in outs[i * k:(i + 1) * k])
               for i, ex in enumerate(examples))
    return hits / max(1, n)


def calibration_scores(replies: list[dict]) -> tuple[dict, dict]:
    """Fit P(right) on the even-numbered replies of each task and split, measure it on the odd ones: metrics
    (AUROC for telling right from wrong, expected calibration error, per task AUROC where a task has both), and
    what the report and the server keep: the fit on every reply, and the measured half with its predictions.
    `escalation_auroc_unseen_task` measures each task's replies with a fit on the other tasks only (pooled):
    how the signal does on a kind of question the calibration never saw, as a user's own may be."""
    fit_on = [r for r in replies if r["index"] % 2 == 0]
    held = [r for r in replies if r["index"] % 2 == 1]
    if not fit_on or not held:
        return {}, {}
    half = Calibration.fit(fit_on, [r["ok"] for r in fit_on])
    p = [half.p_correct(r) for r in held]
    ok = [r["ok"] for r in held]
    out = {"escalation_auroc": auroc(p, ok), "escalation_ece": calibration_error(p, ok), "escalation_n": len(held)}
    for name in dict.fromkeys(r["task"] for r in held):
        pick = [i for i, r in enumerate(held) if r["task"] == name]
        a = auroc([p[i] for i in pick], [ok[i] for i in pick])
        if a is not None:
            out[f"escalation_auroc_{name}"] = a
    unseen_p, unseen_ok = [], []
    for name in dict.fromkeys(r["task"] for r in replies):
        others = [r for r in replies if r["task"] != name]
        if len({r["ok"] for r in others}) == 2:
            fit = Calibration.fit(others, [r["ok"] for r in others])
            mine = [r for r in replies if r["task"] == name]
            unseen_p += [fit.p_correct(r) for r in mine]
            unseen_ok += [r["ok"] for r in mine]
    out["escalation_auroc_unseen_task"] = auroc(unseen_p, unseen_ok)
    out = {k: v for k, v in out.items() if v is not None}
    keep = {"calibration": vars(Calibration.fit(replies, [r["ok"] for r in replies])),
            "replies": [[r["task"], r["split"], r["index"], r["ok"], q] for r, q in zip(held, p)]}
    return out, keep


def tool_notes(engine, tasks) -> list[str]:
    """What the eval should say about tools it cannot run here: tasks whose replies call the python tool score
    near zero without it, which is the sandbox, not the model."""
    needing = [t.name for t in tasks if t.needs_python]
    if not needing or "python" not in engine.tools:
        return []
    from exocortex.infer.sandbox import python_tool_status

    enabled, note = python_tool_status()
    return [] if enabled else [f"{note}. {', '.join(needing)} call(s) it: expect those scores near zero here"]


def chat_scores(engine, tok, tasks, e: EvalConfig, samples: list, stage: str,
                calibration: dict | None = None, families: dict | None = None,
                transcript: list | None = None) -> dict:
    """Every chat task of e.chat_tasks on n held-out questions (and, for a task with held-out phrasing families,
    on e.heldout_n or n questions in those); lookup also with its tool off; pass@k; the calibration of P(right)
    over all those replies (what it keeps for the report and the server goes into `calibration`). `families`,
    if given, gets {task: {"seen"|"heldout": {family: [right, asked]}}} for the tasks with held-out families;
    `transcript`, if given, every graded reply of those questions (task_accuracy)."""
    out, replies = {}, []
    counts = e.chat_tasks
    for note in tool_notes(engine, [tasks[name] for name in counts]):
        print(f"eval: {note}")
    for name, n in counts.items():
        n = int(n)
        if name == "memory":  # two sessions through a real store, not one graded reply
            out.update(memory_scores(engine, tok, tasks[name], n, e.seed, e.max_new_tokens))
            continue
        by_family = None
        if tasks[name].heldout_families and e.heldout_n != 0 and families is not None:
            by_family = families[name] = {"seen": {}, "heldout": {}}
        out[f"{name}_accuracy"] = task_accuracy(engine, tok, tasks[name], n, e.seed, e.max_new_tokens, samples, stage,
                                                replies=replies, families=by_family and by_family["seen"],
                                                transcript=transcript)
        out[f"{name}_n"] = n
        if tasks[name].heldout_families and e.heldout_n != 0:
            m = n if e.heldout_n < 0 else e.heldout_n
            out[f"{name}_heldout_accuracy"] = task_accuracy(engine, tok, tasks[name], m, e.seed, e.max_new_tokens,
                                                            samples, stage, split="heldout", replies=replies,
                                                            families=by_family and by_family["heldout"],
                                                            transcript=transcript)
            out[f"{name}_heldout_n"] = m
        if name == "lookup":  # the same held-out questions with the tool switched off
            saved = engine.tools
            engine.tools = {k: v for k, v in saved.items() if k != "lookup"}
            out["lookup_no_tool_accuracy"] = task_accuracy(engine, tok, tasks[name], n, e.seed, e.max_new_tokens)
            engine.tools = saved
            out.update(document_scores(engine, tok, tasks[name], n, e.seed, e.max_new_tokens))
    if e.pass_k > 1 and "word_problems" in counts:
        out[f"word_problems_pass@{e.pass_k}"] = pass_at_k(engine, tok, tasks["word_problems"], e.pass_k_n, e.pass_k,
                                                           e.seed, e.max_new_tokens)
        out[f"word_problems_pass@{e.pass_k}_n"] = e.pass_k_n
    metrics, keep = calibration_scores(replies)
    out.update(metrics)
    if calibration is not None:
        calibration.update(keep)
    return out
