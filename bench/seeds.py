"""A change measured across seeds, side by side with the code as it is: one speedrun per (arm, seed) at fixed
steps, then each eval metric's mean and spread per arm. One tiny run's arithmetic gap (seen minus held-out
phrasing families) moves ~10 points with the seed alone (docs/tiny.md, 2026-12-03), so a single run cannot
tell two configs apart; this can, by as much as its spread says.

    python bench/seeds.py --runs-dir /tmp/seeds --seeds 42,43 --against model.induction_init=false
    python bench/seeds.py --runs-dir /tmp/seeds --seeds 42,43,44 --set sft_data.text_fraction=0.3   # one arm only
    python bench/seeds.py --summarize runs/a-s42 runs/a-s43 --summarize-change runs/b-s42 runs/b-s43  # runs there

Each run is `exocortex speedrun --preset P --set seed=S --set rl.seed=S` with every stage's time budget off
and its steps fixed (--steps: pretrain, midtrain, sft, rl; the default is what the tiny preset's minutes give on
a 2-core EPYC), `--set` for both arms, `--against` for the second. Runs go `--parallel` at a time with
`--threads` each; a run whose eval summary exists is not run again, so an interrupted comparison resumes.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("pretrain", "midtrain", "sft", "rl")
METRICS = ("arithmetic_gap", "arithmetic_accuracy", "arithmetic_heldout_accuracy", "word_problems_accuracy",
           "facts_mc_accuracy", "facts_accuracy", "spelling_accuracy", "lookup_accuracy", "documents_accuracy")


def stage_metrics(run_dir: Path) -> dict[str, dict[str, float]]:
    """{stage: {metric: value}} from a run's logs/eval_summary.json, with the arithmetic gap added."""
    path = Path(run_dir) / "logs" / "eval_summary.json"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist: the run has not been evaluated (exocortex eval --run {run_dir})")
    stages = json.loads(path.read_text())["stages"]
    out = {}
    for stage, values in stages.items():
        m = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "arithmetic_accuracy" in m and "arithmetic_heldout_accuracy" in m:
            m["arithmetic_gap"] = m["arithmetic_accuracy"] - m["arithmetic_heldout_accuracy"]
        out[stage] = m
    return out


def summarize(runs: list[Path], stages: list[str], metrics: list[str]) -> dict[str, dict]:
    """{"stage metric": {"mean", "sd", "n", "values"}} over the runs that have that stage and metric."""
    per_run = [stage_metrics(r) for r in runs]
    out = {}
    for stage in stages:
        for metric in metrics:
            values = [m[stage][metric] for m in per_run if metric in m.get(stage, {})]
            if values:
                out[f"{stage} {metric}"] = {"mean": statistics.fmean(values), "n": len(values), "values": values,
                                            "sd": statistics.stdev(values) if len(values) > 1 else None}
    return out


def _cell(s: dict | None) -> str:
    if s is None:
        return "-"
    sd = f" ± {100 * s['sd']:.1f}" if s["sd"] is not None else ""
    return f"{100 * s['mean']:.1f}{sd} (n={s['n']})"


def table(arms: dict[str, dict[str, dict]]) -> str:
    """A markdown table, one row per stage and metric, one column per arm, and the difference of the last arm
    from the first (in points) when there are two."""
    names = list(arms)
    keys = list(dict.fromkeys(k for a in arms.values() for k in a))
    head = ["stage metric"] + names + (["difference"] if len(names) == 2 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        row = [k] + [_cell(arms[n].get(k)) for n in names]
        if len(names) == 2 and k in arms[names[0]] and k in arms[names[1]]:
            row.append(f"{100 * (arms[names[1]][k]['mean'] - arms[names[0]][k]['mean']):+.1f}")
        elif len(names) == 2:
            row.append("-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def counts(text: str, flag: str, n: int | None = None, least: int = 0) -> list[int]:
    """A comma-separated list of whole numbers, or a one-line error naming the flag."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or (n is not None and len(values) != n) or min(values) < least:
        what = f"{n} whole numbers" if n else "whole numbers"
        raise SystemExit(f"error: {flag} takes {what} >= {least}, comma-separated; got '{text}'")
    return values


def speedrun_command(args, name: str, seed: int, overrides: list[str]) -> list[str]:
    steps = counts(args.steps, "--steps (pretrain,midtrain,sft,rl)", 4, least=1)
    cmd = [sys.executable, "-m", "exocortex", "speedrun", "--preset", args.preset, "--runs-dir", str(args.runs_dir),
           "--run", name, "--set", f"seed={seed}", "--set", f"rl.seed={seed}"]
    for stage, n in zip(STAGES, steps):
        cmd += ["--set", f"{stage}.time_minutes=0", "--set", f"{stage}.{'steps' if stage == 'rl' else 'max_steps'}={n}"]
    for o in args.set + overrides:
        cmd += ["--set", o]
    return cmd


def run_all(args, jobs: list[tuple[str, list[str]]]) -> None:
    """Run the speedruns `--parallel` at a time; a failed run stops the comparison with its log's tail."""
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    pending = [(n, c) for n, c in jobs if not (args.runs_dir / n / "logs" / "eval_summary.json").exists()]
    running: list[tuple[str, subprocess.Popen, float]] = []
    print(f"seeds: {len(jobs)} runs, {len(jobs) - len(pending)} already done; {args.parallel} at a time, "
          f"{args.threads} thread(s) each; logs in {args.runs_dir}/<run>.log", flush=True)
    while pending or running:
        while pending and len(running) < args.parallel:
            name, cmd = pending.pop(0)
            log = open(args.runs_dir / f"{name}.log", "w")
            running.append((name, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                            time.time()))
        time.sleep(2)
        for name, proc, t0 in list(running):
            if proc.poll() is None:
                continue
            running.remove((name, proc, t0))
            if proc.returncode:
                for _, p, _ in running:
                    p.terminate()
                tail = (args.runs_dir / f"{name}.log").read_text().splitlines()[-5:]
                raise SystemExit(f"error: run {name} failed (exit {proc.returncode}):\n  " + "\n  ".join(tail))
            print(f"seeds: {name} done in {(time.time() - t0) / 60:.1f} min", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs-dir", type=Path, help="where the runs go (required unless --summarize)")
    ap.add_argument("--seeds", default="42,43", help="comma-separated seeds (default 42,43)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", default="288,220,83,38", help="pretrain,midtrain,sft,rl steps (default 288,220,83,38)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for both arms")
    ap.add_argument("--against", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for the second arm only; without any, only the first arm runs")
    ap.add_argument("--threads", type=int, default=1, help="threads per run (default 1)")
    ap.add_argument("--parallel", type=int, default=max(1, (os.cpu_count() or 1)), help="runs at once (default: CPUs)")
    ap.add_argument("--stages", default="sft,rl", help="stages to summarize (default sft,rl)")
    ap.add_argument("--metrics", default=",".join(METRICS), help="metrics to summarize")
    ap.add_argument("--summarize", nargs="+", metavar="RUN", help="only summarize these runs (the first arm)")
    ap.add_argument("--summarize-change", nargs="+", default=[], metavar="RUN", help="and these (the second arm)")
    args = ap.parse_args(argv)
    stages, metrics = args.stages.split(","), args.metrics.split(",")
    if args.threads < 1 or args.parallel < 1:
        raise SystemExit("error: --threads and --parallel take 1 or more")
    if args.summarize:
        arms = {"base": summarize([Path(r) for r in args.summarize], stages, metrics)}
        if args.summarize_change:
            arms["change"] = summarize([Path(r) for r in args.summarize_change], stages, metrics)
    else:
        if args.runs_dir is None:
            raise SystemExit("error: --runs-dir is required (or --summarize RUN ...)")
        seeds = counts(args.seeds, "--seeds")
        arm_overrides = {"base": []} | ({"change": args.against} if args.against else {})
        jobs = {arm: [(f"{arm}-s{s}", speedrun_command(args, f"{arm}-s{s}", s, o)) for s in seeds]
                for arm, o in arm_overrides.items()}
        # interleaved, so that a machine that slows down part way slows both arms alike
        run_all(args, [j for pair in zip(*jobs.values()) for j in pair])
        arms = {arm: summarize([args.runs_dir / n for n, _ in js], stages, metrics) for arm, js in jobs.items()}
    print(table(arms))
    print(json.dumps({"arms": {a: {k: {"mean": v["mean"], "sd": v["sd"], "n": v["n"]} for k, v in s.items()}
                               for a, s in arms.items()}}))


if __name__ == "__main__":
    main()
