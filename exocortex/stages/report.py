"""Stage `report`: one markdown report card of the run (runs/<name>/report.md) with plots and every metric."""
from __future__ import annotations

import json
import math
from pathlib import Path

from exocortex import registry
from exocortex.config import RunConfig
from exocortex.errors import ExocortexError
from exocortex.fileio import atomic_write_text, read_jsonl
from exocortex.run import EvalSummary, RunDir


def plot_losses(run_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    (run_dir / "plots").mkdir(exist_ok=True)
    run = RunDir(run_dir)
    stages = [s for s in registry.MODEL_STAGES if s != "rl" and run.log_path(s).exists()]
    if not stages:
        return plots
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        h = read_jsonl(run.log_path(stage))
        if not h:
            continue
        tokens = [r["tokens"] / 1e6 for r in h]
        ax.plot(tokens, [r["loss"] for r in h], lw=0.8, alpha=0.6, label="train")
        # smoothed train loss reads better than the raw noisy one
        k = max(1, len(h) // 50)
        sm = [sum(r["loss"] for r in h[max(0, i - k):i + 1]) / len(h[max(0, i - k):i + 1]) for i in range(len(h))]
        ax.plot(tokens, sm, lw=1.5, label=f"train (avg {k + 1})")
        val = [(r["tokens"] / 1e6, r["val_loss"]) for r in h if "val_loss" in r]
        if val:
            ax.plot(*zip(*val), "o-", lw=1.5, label="val")
        ax.set_title(f"{stage} loss")
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("cross-entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = run_dir / "plots" / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    plots.append("plots/loss.png")
    rl = read_jsonl(run.log_path("rl"))
    if rl:
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
        steps = [r["step"] for r in rl]
        axes[0].plot(steps, [r["reward"] for r in rl], lw=0.8, label="train reward (mean of group samples)")
        held = [(r["step"], r.get("test_accuracy", r.get("heldout_accuracy")))  # older runs: heldout_accuracy
                for r in rl if "test_accuracy" in r or "heldout_accuracy" in r]
        if held:
            axes[0].plot(*zip(*held), "o-", label="held-out accuracy (greedy)")
        axes[0].set_title("RL reward")
        axes[1].plot(steps, [r["entropy"] for r in rl], lw=0.8)
        axes[1].set_title("sampling entropy (nats/token)")
        axes[2].plot(steps, [r["repeat_3gram"] for r in rl], lw=0.8, label="repeated 3-grams")
        axes[2].plot(steps, [r["length"] / max(1, max(x["length"] for x in rl)) for r in rl], lw=0.8,
                     label="length (relative)")
        axes[2].set_title("degeneration watch")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        axes[2].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / "plots" / "rl.png", dpi=110)
        plt.close(fig)
        plots.append("plots/rl.png")
    return plots


ROW_NAMES = {"val_bpb": "val bits per byte ↓", "core": "CORE-style in-context (centred) ↑",
             "world_cloze_accuracy": "in-context: world cloze (4-way)", "arithmetic_em_accuracy": "in-context: arithmetic exact match",
             "copy_em_accuracy": "in-context: copying a list read before",
             "lookup_no_tool_accuracy": "lookup — same questions, tool off",
             "documents_accuracy": "lookup — same questions, your-documents index (exocortex index)",
             "documents_cited": "  replies citing a passage (file, lines)",
             "documents_citation_correct": "  cited passage holds the answer",
             "memory_saved": "memory — a told fact saved as a note",
             "memory_recalled": "memory — recalled in a later session",
             "memory_other_user": "memory — another user got it (must be 0)"}


def stage_table(ev: EvalSummary) -> list[str]:
    """Metrics x stages (BASE / MID / SFT / RL), every number measured by `exocortex eval`."""
    stages = [s for s in registry.MODEL_STAGES if s in ev.stages]
    cols = [ev.stages[s] for s in stages]
    keys: list[str] = []
    for c in cols:
        keys += [k for k in c if k not in keys and k != "seconds" and not k.endswith("_n")
                 and not k.startswith("escalation_")]  # those have their own section
    L = ["| metric | " + " | ".join(registry.LABELS[s] for s in stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for k in keys:
        nk = k.replace("_accuracy", "_n") if k.endswith("_accuracy") else k + "_n"
        n = next((c[nk] for c in cols if nk in c), None)
        name = ROW_NAMES.get(k, k.replace("_accuracy", "").replace("_", " ") + (f" (n={n})" if n else ""))
        vals = []
        for c in cols:
            v = c.get(k)
            vals.append("—" if v is None else f"{v:.4f}" if k in ("val_bpb", "core") else f"{v:.1%}")
        L.append(f"| {name} | " + " | ".join(vals) + " |")
    return L


def generalisation_table(ev: EvalSummary) -> list[str]:
    """Task x stage: accuracy on test items in the phrasing families trained on (seen), on test items in
    families never trained on (held-out), and the gap (seen - held-out, in points). Empty when no task
    was measured on held-out families."""
    stages = [s for s in registry.MODEL_STAGES if s in ev.stages]
    tasks = []
    for s in stages:
        tasks += [k[:-len("_heldout_accuracy")] for k in ev.stages[s]
                  if k.endswith("_heldout_accuracy") and k[:-len("_heldout_accuracy")] not in tasks]
    if not tasks:
        return []
    L = ["## Generalisation: seen vs held-out phrasing families", "",
         "Held-out items in the wordings the task trained on (seen) and in whole phrasing families it never "
         "trained on (held-out); gap = seen − held-out, in points. A large gap means the skill is tied to the "
         "training templates.", "", "| task | stage | seen | held-out | gap |", "|---|---|---|---|---|"]
    for t in tasks:
        for s in stages:
            r = ev.stages[s]
            if f"{t}_heldout_accuracy" not in r or f"{t}_accuracy" not in r:
                continue
            seen, held = r[f"{t}_accuracy"], r[f"{t}_heldout_accuracy"]
            L.append(f"| {t} | {registry.LABELS[s]} | {seen:.1%} (n={r.get(f'{t}_n', '?')}) | "
                     f"{held:.1%} (n={r.get(f'{t}_heldout_n', '?')}) | {(seen - held) * 100:+.1f} |")
    return L + [""]


def family_table(ev: EvalSummary) -> list[str]:
    """Task x phrasing family: accuracy per chat stage, seen families first, then the held-out ones; where the
    generalisation gap comes from. Empty when no stage counted families (older runs)."""
    stages = [s for s in registry.MODEL_STAGES if ev.families.get(s)]
    if not stages:
        return []
    L = ["### By phrasing family", "",
         "Accuracy (questions asked) per wording family; the held-out ones were never trained on. Every graded "
         "reply is in logs/eval_replies.jsonl.", "",
         "| task | family | " + " | ".join(registry.LABELS[s] for s in stages) + " |",
         "|---|---|" + "---|" * len(stages)]
    tasks = list(dict.fromkeys(t for s in stages for t in ev.families[s]))
    for t in tasks:
        for side in ("seen", "heldout"):
            names = list(dict.fromkeys(f for s in stages for f in ev.families[s].get(t, {}).get(side, {})))
            for f in sorted(names):
                cells = []
                for s in stages:
                    right, asked = ev.families[s].get(t, {}).get(side, {}).get(f, (0, 0))
                    cells.append(f"{right / asked:.0%} ({asked})" if asked else "—")
                label = f"{f} (held out)" if side == "heldout" else f
                L.append(f"| {t} | {label} | " + " | ".join(cells) + " |")
    return L + [""]


ESCALATION_PAIR = ("sft", "rl")  # the curve: SFT answers, RL is the stronger model it may escalate to


def escalation_section(ev: EvalSummary | None, run_dir: Path) -> list[str]:
    """How well each chat stage knows when it is wrong (infer/confidence.py, evals.calibration_scores), and the
    quality/cost curve of escalating SFT's unsure replies to RL on the same questions."""
    stages = [s for s in registry.MODEL_STAGES if ev and "escalation_auroc" in ev.stages.get(s, {})]
    if not stages:
        return []
    L = ["## Knowing when it doesn't know: escalation", "",
         "P(reply is right) from the scores of the tokens the model chose (and its own hidden state, where the "
         "eval fitted it), fitted on "
         "half of the eval's graded replies (every chat task, seen and held-out families) and measured on the "
         "other half. AUROC: the chance a right reply gets a higher P than a wrong one (0.5 = no signal). "
         "Unseen task: each task's replies measured by a fit on the other tasks only, as a user's own kind of "
         "question would be. ECE: expected calibration error. `exocortex serve --escalate-to URL --threshold T` "
         "sends a request on when P < T.", "",
         "| stage | AUROC (n) | unseen task | ECE | AUROC per task |", "|---|---|---|---|---|"]
    for s in stages:
        r = ev.stages[s]
        per = ", ".join(f"{k[len('escalation_auroc_'):]} {v:.2f}" for k, v in r.items()
                        if k.startswith("escalation_auroc_") and k != "escalation_auroc_unseen_task")
        unseen = r.get("escalation_auroc_unseen_task")
        L.append(f"| {registry.LABELS[s]} | {r['escalation_auroc']:.3f} ({r.get('escalation_n', '?')}) | "
                 f"{'—' if unseen is None else f'{unseen:.3f}'} | {r['escalation_ece']:.3f} | {per or '—'} |")
    L.append("")
    local, remote = (ev.calibration.get(s, {}).get("replies") for s in ESCALATION_PAIR)
    if not local or not remote:
        return L
    from exocortex.infer.confidence import best_point, escalation_curve

    theirs = {tuple(r[:3]): r[3] for r in remote}
    both = [r for r in local if tuple(r[:3]) in theirs]
    if not both:
        return L
    curve = escalation_curve([r[4] for r in both], [r[3] for r in both], [theirs[tuple(r[:3])] for r in both])
    best = best_point(curve)
    a, b = (registry.LABELS[s] for s in ESCALATION_PAIR)
    L += [f"Escalating {a}'s unsure replies to {b} ({len(both)} questions both answered): always {a} "
          f"{curve[0]['accuracy']:.1%}, always {b} {curve[-1]['accuracy']:.1%}."
          + (f" Answering {best['local_share']:.0%} locally (threshold {best['threshold']:.2f}) keeps "
             f"{best['accuracy']:.1%}, {best['accuracy'] / max(1e-9, curve[-1]['accuracy']):.0%} of always-{b}."
             if best else ""), "",
          "| threshold | answered by " + a + " | accuracy |", "|---|---|---|"]
    L += [f"| {row['threshold']:.2f} | {row['local_share']:.0%} | {row['accuracy']:.1%} |"
          for row in curve if round(row["threshold"] * 100) % 10 == 0 or row["threshold"] > 1 or row is best]
    L.append("")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return L
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([r["local_share"] for r in curve], [r["accuracy"] for r in curve], "o-", ms=3, label="by threshold")
    ax.axhline(curve[-1]["accuracy"], ls="--", lw=1, color="gray", label=f"always {b}")
    ax.axhline(0.95 * curve[-1]["accuracy"], ls=":", lw=1, color="gray", label=f"95% of always {b}")
    ax.set_xlabel(f"share answered by {a} (locally)")
    ax.set_ylabel("accuracy")
    ax.set_title("escalation: quality vs cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    (run_dir / "plots").mkdir(exist_ok=True)
    fig.savefig(run_dir / "plots" / "escalation.png", dpi=110)
    plt.close(fig)
    return L + ["![plots/escalation.png](plots/escalation.png)", ""]


def rl_gain_line(ev: EvalSummary | None, task: str) -> str:
    """RL's held-out gain over SFT on its task, with the binomial standard error of that difference."""
    stages = ev.stages if ev else {}
    sft, rl = stages.get("sft", {}), stages.get("rl", {})
    k, nk = f"{task}_accuracy", f"{task}_n"
    if k not in sft or k not in rl:
        return ""
    p0, p1, n0, n1 = sft[k], rl[k], sft.get(nk, 0), rl.get(nk, 0)
    if not n0 or not n1:
        return ""
    se = math.sqrt(p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1)
    return (f"Held-out {task.replace('_', ' ')}: SFT {p0:.1%} → RL {p1:.1%} (n={n1}), "
            f"**{(p1 - p0) * 100:+.1f} points** (± {se * 100:.1f}: one binomial standard error of the difference).")


def _fmt(v, digits=4):
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


EVAL_NOTE = ("All questions are held out from training (hashed train/test splits). Chat tasks are greedy with "
             "tools on and graded on the assistant's own words: arithmetic and word problems (GSM8K-style `#### N`) "
             "call the calculator; facts are recalled from pretraining; facts_mc is multiple choice; lookup asks "
             "about people who were *never in the pretraining data* and must be looked up with the lookup tool "
             "(also scored with the tool switched off); spelling spells a word or counts a letter by copying the "
             "word into a python call; functions offers one or two client functions in the system turn and needs "
             "the right call (name and arguments exact), an answer with the function's response, or no call when "
             "none fits. pass@k: k samples at temperature 1. In-context tasks (base-model style, few-shot) score "
             "options by mean loss; CORE is their mean centred accuracy.")
PRETRAIN_ROWS = ("params", "flops_per_token", "steps", "tokens", "tokens_per_param", "seconds", "tokens_per_second",
                 "flops", "mfu", "final_train_loss", "final_val_loss", "val_bpb", "device", "dtype", "world_size",
                 "parallel")
FINETUNE_ROWS = ("parent", "conversations", "rows", "steps", "epochs", "tokens", "seconds", "tokens_per_second",
                 "final_train_loss", "final_val_loss")


def _timings(sr, summaries: dict) -> list[str]:
    """Time and peak memory (RSS) per stage: the speedrun's numbers, or a stage's own summary where it ran alone."""
    L = ["## Time and memory", "", "| stage | seconds | peak RSS (MB) |", "|---|---|---|"]
    stages = list(sr.stage_seconds) if sr else [s for s in summaries if summaries[s] is not None]
    for stage in stages:
        own = summaries.get(stage)
        seconds = sr.stage_seconds.get(stage) if sr else getattr(own, "seconds", None)
        peak = (sr.stage_peak_rss_mb.get(stage) if sr else None) or getattr(own, "peak_rss_mb", None)
        L.append(f"| {stage} | {'—' if seconds is None else f'{seconds:.1f}'} | "
                 f"{'—' if peak is None else f'{peak:,.0f}'} |")
    if sr:
        L.append(f"| **total** | **{sr.total_seconds:.1f}** | **{sr.peak_rss_mb:,.0f}** |")
    return L + ["", "Peak RSS is each stage's own (Linux: VmHWM, reset between stages; elsewhere the process's "
                "peak so far). docs/tiny.md has the tiny preset's before/after.", ""]


def _rl(rl, ev) -> list[str]:
    L = ["## RL", "", f"Task `{rl.task}`, {rl.steps} steps in {rl.seconds:.0f}s; mean group reward "
         f"{_fmt(rl.reward_first, 3)} (first step) → {_fmt(rl.reward_last, 3)} (last 5 steps). "
         "Held-out greedy accuracy during RL: " + ", ".join(f"step {s}: {a:.1%}" for s, a in rl.heldout) + "."]
    gain = rl_gain_line(ev, rl.task)
    if gain:
        L += ["", gain]
    g = rl.guard
    return L + ["", f"**Reward-hacking guard tripped** at step {g['step']}: {g['reason']}. Kept checkpoint: "
                f"{g.get('kept') or 'none (RL discarded)'}." if g else "Reward-hacking guard: not tripped.", ""]


def _table(title: str, summary, rows: tuple[str, ...]) -> list[str]:
    L = [f"## {title}", "", "| | |", "|---|---|"]
    for k in rows:
        v = getattr(summary, k)
        if v is not None:
            v = f"{v:.3g}" if k == "flops" else f"{v:.1%}" if k == "mfu" else _fmt(v)
            L.append(f"| {k.replace('_', ' ')} | {v} |")
    return L


def _data(tok_s) -> list[str]:
    L = ["## Data and tokenizer", "", f"Source: {tok_s.source}; {tok_s.documents:,} documents; "
         f"{tok_s.train_tokens:,} train / {tok_s.val_tokens:,} val tokens; vocab {tok_s.vocab_size:,}; "
         f"{tok_s.bytes_per_token:.2f} bytes per token; BPE trained in {tok_s.seconds_train:.1f}s.", ""]
    if tok_s.corpus_stats:
        L += ["Corpus variety (synthetic data must not collapse):", "", "| statistic | value |", "|---|---|"]
        L += [f"| {k} | {_fmt(v)} |" for k, v in tok_s.corpus_stats.items()]
        L.append("")
    return L


def _samples(ev) -> list[str]:
    L = ["## Sample generations (greedy, held-out questions)", ""]
    for s in ev.samples:
        mark = "✅" if s["correct"] else "❌"
        stage = f"{s['stage']} · " if s.get("stage") else ""
        L += [f"- {mark} **{stage}{s['task']}** — *{s['question']}*", f"  → {s['reply']}"]
    return L + [""]


COLLAPSE_COLUMNS = (("n", "n"), ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"),
                    ("distinct_3", "distinct-3"), ("self_bleu", "self-BLEU"),
                    ("template_distinct_2", "template distinct-2"), ("template_self_bleu", "template self-BLEU"), ("compression_ratio", "zlib ratio"),
                    ("exact_duplicate_rate", "exact dup"), ("near_duplicate_rate", "near dup"))


def collapse_section(ev: EvalSummary | None, tok_s) -> list[str]:
    """Does the data or the model say the same few things over and over (data/collapse.py)? One row per dataset
    the run trained on and per stage's samples, with the alarms; and what deduplication removed."""
    from exocortex.data.collapse import MIN_TEXTS, THRESHOLDS

    L = ["## Collapse: datasets and samples", ""]
    order = {s: i for i, s in enumerate(registry.MODEL_STAGES)}
    rows = dict(sorted((ev.collapse if ev else {}).items(),  # datasets first, each group in stage order
                       key=lambda kv: (not kv[0].startswith("data"), order.get(kv[1].get("stage"), 99))))
    if rows:
        L += ["| set | " + " | ".join(h for _, h in COLLAPSE_COLUMNS) + " | asked ×10: distinct replies | alarm |",
              "|---" * (len(COLLAPSE_COLUMNS) + 3) + "|"]
        for name, r in rows.items():
            cells = [_fmt(r.get(k), 3) if k != "n" else _fmt(r.get(k)) for k, _ in COLLAPSE_COLUMNS]
            a = r.get("ask_ten_times")
            ask = f"{a['distinct_mean']:.1f} of {a['n']} (fewest {a['distinct_min']})" if a else "—"
            alarm = "⚠ " + ", ".join(x.split()[0] for x in r["alarms"]) if r.get("alarms") else "—"
            L.append(f"| {name} | " + " | ".join(cells) + f" | {ask} | {alarm} |")
        limits = ", ".join(f"{k} {'≥' if side == 'min' else '≤'} {v}" for k, (side, v, _) in THRESHOLDS.items())
        L += ["", "Datasets: a strided sample of the pretraining documents, the first conversations of each "
              "finetuning mixture (user and assistant turns), RL prompts; template: numbers masked. Samples: one reply "
              "at temperature 1 to each of a stage's held-out prompts (base: openings of val documents); asked ×10: "
              f"the first few of those prompts sampled ten times each. Healthy when {limits} (docs/data.md says why; "
              f"sets under {MIN_TEXTS} texts are not judged)."]
        L += [f"- ⚠ **{name}**: {a}" for name, r in rows.items() for a in r.get("alarms", [])]
        L.append("")
    d = getattr(tok_s, "duplicates", None) if tok_s else None
    if d:
        L += [f"Deduplication before the train/val split: {d['read']:,} documents read, {d['exact']:,} exact and "
              f"{d['near']:,} near duplicates removed ({(d['exact'] + d['near']) / max(1, d['read']):.1%}).", ""]
    elif tok_s:
        L += ["Deduplication: the generated world corpus is not deduplicated (0.1% of its documents are "
              "duplicates; docs/data.md).", ""]
    return L if len(L) > 2 else []


def run_report(cfg: RunConfig) -> Path:
    run = cfg.run
    if not (run.path / "config.json").exists():
        raise ExocortexError(f"{run.path} is not a run directory; run `exocortex speedrun` first")
    summaries = {s: run.summary(s) for s in ("tokenizer", "pretrain", "midtrain", "sft", "rl", "eval", "speedrun")}
    pre, ev = summaries["pretrain"], summaries["eval"]
    plots = plot_losses(run.path)
    L = [f"# exocortex report card — run `{cfg.name}`", "",
         f"Preset `{cfg.preset}`; model: {cfg.model.depth} layers, width {cfg.model.n_embd}, {cfg.model.n_heads} heads "
         f"({cfg.model.kv_heads} KV) x {cfg.model.head_dim}, vocab {cfg.model.vocab_size}, context {cfg.model.seq_len} "
         "— architecture Qwen3ForCausalLM.", ""]
    if summaries["speedrun"] or any(getattr(v, "peak_rss_mb", None) for v in summaries.values()):
        L += _timings(summaries["speedrun"], {k: v for k, v in summaries.items() if k != "speedrun"})
    if ev and ev.stages:
        L += ["## Evaluation: every stage", ""] + stage_table(ev) + ["", EVAL_NOTE, ""]
        L += generalisation_table(ev)
        L += family_table(ev)
        L += escalation_section(ev, run.path)
    L += collapse_section(ev, summaries["tokenizer"])
    if summaries["rl"]:
        L += _rl(summaries["rl"], ev)
    if pre:
        L += _table("Pretraining", pre, PRETRAIN_ROWS) + ["", f"Pretraining {pre.spent_line()}.", ""]
    for title, stage in (("Midtraining", "midtrain"), ("SFT", "sft")):
        if summaries[stage]:
            L += _table(title, summaries[stage], FINETUNE_ROWS) + [""]
    L += [line for p in plots for line in (f"![{p}]({p})", "")]
    if summaries["tokenizer"]:
        L += _data(summaries["tokenizer"])
    if ev and ev.samples:
        L += _samples(ev)
    L += ["## Config", "", "```json", json.dumps(cfg.to_dict(), indent=2), "```", ""]
    out = run.path / "report.md"
    atomic_write_text(out, "\n".join(L))
    print(f"report: wrote {out}")
    return out
