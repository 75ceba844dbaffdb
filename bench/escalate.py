"""Escalation's quality/cost curve with two live servers: a run's SFT model answering, escalating to its RL model.

    python bench/escalate.py --run runs/tiny [--n 30] [--threshold T]

1. The local server (`serve --stage sft --escalate-to <rl server> --threshold 0`: it never escalates, but says
   its P(right) for each reply) and the stronger one (`--stage rl`) answer the same questions: held-out items of
   the run's chat tasks (seen and held-out phrasing families), another seed than the eval's, greedy.
2. From the grades: the curve of share answered locally vs accuracy over thresholds, against always-local and
   always-escalate (the baseline: every question sent to the stronger model).
3. The local server again with the chosen threshold (--threshold, default the one that answers the most locally
   at no less than always-escalate's accuracy), now escalating for real: the measured share and accuracy must
   match what the curve predicted. The issue's goal is read off the curve: the most answered locally at >= 95%.
Prints a table and a last JSON line with the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _server import serving  # noqa: E402

from exocortex.config import load_config  # noqa: E402
from exocortex.infer.confidence import best_point, escalation_curve  # noqa: E402
from exocortex.tasks import task_set  # noqa: E402

TASKS = ("arithmetic", "word_problems", "spelling", "facts", "facts_mc", "lookup", "identity")  # no client tools
SEED = 4242  # not the eval's (12345): questions neither the calibration nor the eval saw


def questions(run: str, n: int) -> list[tuple]:
    tasks = task_set(load_config(run))
    out = []
    for name in TASKS:
        for split in ("test", "heldout") if tasks[name].heldout_families else ("test",):
            out += [(tasks[name], ex) for ex in tasks[name].examples(n, SEED, split)]
    return out


def ask(base: str, ex: dict, max_tokens: int) -> tuple[dict, dict]:
    import httpx

    messages = [m for m in ex["messages"][:-1]]
    r = httpx.post(base + "/v1/chat/completions", timeout=300,
                   json={"messages": messages, "temperature": 0, "max_tokens": max_tokens})
    r.raise_for_status()
    body = r.json()
    return body["choices"][0]["message"], body.get("exocortex") or {}


def graded(base: str, qs: list, max_tokens: int) -> list[tuple[bool, dict]]:
    out = []
    for task, ex in qs:
        message, info = ask(base, ex, max_tokens)
        out.append((bool(task.grade_reply(message.get("parts") or [{"type": "text", "text": message["content"] or ""}],
                                          ex)), info))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/tiny", help="a trained run with sft and rl checkpoints, evaluated")
    ap.add_argument("--local", default="sft")
    ap.add_argument("--remote", default="rl")
    ap.add_argument("--n", type=int, default=30, help="questions per task and split")
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--max-tokens", type=int, default=128)
    a = ap.parse_args()
    os.environ["EXOCORTEX_HOME"] = tempfile.mkdtemp(prefix="exo-bench-home-")  # no notes of the user's touched
    qs = questions(a.run, a.n)
    common = ("--no-compile", "--no-memory")
    print(f"{len(qs)} questions ({', '.join(TASKS)}; seen and held-out families), {a.local} escalating to {a.remote}")
    with serving(a.run, "--stage", a.remote, *common) as (remote, _, _):
        t = time.time()
        remote_ok = [ok for ok, _ in graded(remote, qs, a.max_tokens)]
        print(f"{a.remote} alone: {sum(remote_ok) / len(qs):.1%} ({time.time() - t:.0f}s)")
        with serving(a.run, "--stage", a.local, "--escalate-to", remote + "/v1", "--threshold", "0", *common) as (
                local, _, _):
            t = time.time()
            mine = graded(local, qs, a.max_tokens)
        local_ok, p = [ok for ok, _ in mine], [info["p_correct"] for _, info in mine]
        print(f"{a.local} alone: {sum(local_ok) / len(qs):.1%} ({time.time() - t:.0f}s)")
        curve = escalation_curve(p, local_ok, remote_ok)
        best, even = best_point(curve, 0.95), best_point(curve, 1.0)
        threshold = a.threshold if a.threshold is not None else even["threshold"]
        predicted = escalation_curve(p, local_ok, remote_ok, (threshold,))[0]
        with serving(a.run, "--stage", a.local, "--escalate-to", remote + "/v1", "--threshold", str(threshold),
                     *common) as (local, _, _):
            t = time.time()
            live = graded(local, qs, a.max_tokens)
            seconds = time.time() - t
    share = sum(not info.get("escalated") for _, info in live) / len(qs)
    acc = sum(ok for ok, _ in live) / len(qs)
    always = curve[-1]["accuracy"]
    print(f"\n| threshold | answered by {a.local} | accuracy | vs always {a.remote} |\n|---|---|---|---|")
    for row in curve:
        if round(row["threshold"] * 100) % 5 and row is not best and row is not even:
            continue
        print(f"| {row['threshold']:.2f} | {row['local_share']:.0%} | {row['accuracy']:.1%} | "
              f"{row['accuracy'] / max(1e-9, always):.0%} |")
    print(f"\nlive, threshold {threshold:.2f}: {share:.0%} answered by {a.local}, accuracy {acc:.1%} "
          f"({acc / max(1e-9, always):.0%} of always-{a.remote}); the curve predicted {predicted['local_share']:.0%} "
          f"and {predicted['accuracy']:.1%} ({seconds:.0f}s)")
    print(json.dumps({"questions": len(qs), "always_local": curve[0]["accuracy"], "always_escalate": always,
                      "threshold": threshold, "live_local_share": share, "live_accuracy": acc,
                      "live_vs_always_escalate": acc / max(1e-9, always),
                      "predicted_local_share": predicted["local_share"], "predicted_accuracy": predicted["accuracy"],
                      "best_95": best, "best_100": even}))


if __name__ == "__main__":
    main()
