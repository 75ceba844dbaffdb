"""Stage `report`: one markdown report card of the run (runs/<name>/report.md) with plots and every metric."""
from __future__ import annotations

import json
from pathlib import Path

from exocortex.config import ExocortexError, RunConfig, atomic_write_text


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a crash: skip it
    return out


def plot_losses(run_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    (run_dir / "plots").mkdir(exist_ok=True)
    stages = [s for s in ("pretrain", "sft") if (run_dir / "logs" / f"{s}.jsonl").exists()]
    if not stages:
        return plots
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        h = _read_jsonl(run_dir / "logs" / f"{stage}.jsonl")
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
    return plots


def _fmt(v, digits=4):
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def run_report(cfg: RunConfig) -> Path:
    from exocortex.pretrain import read_summary

    run_dir = cfg.run_dir
    if not (run_dir / "config.json").exists():
        raise ExocortexError(f"{run_dir} is not a run directory; run `exocortex speedrun` first")
    tok_s, pre, sft, ev, sr = (read_summary(run_dir, s) for s in ("tokenizer", "pretrain", "sft", "eval", "speedrun"))
    plots = plot_losses(run_dir)
    L = [f"# exocortex report card — run `{cfg.name}`", ""]
    L.append(f"Preset `{cfg.preset}`; model: {cfg.model.depth} layers, width {cfg.model.n_embd}, "
             f"{cfg.model.n_heads} heads ({cfg.model.kv_heads} KV) x {cfg.model.head_dim}, vocab "
             f"{cfg.model.vocab_size}, context {cfg.model.seq_len} — architecture Qwen3ForCausalLM.")
    L.append("")
    if sr:
        L += ["## Timings", "", "| stage | seconds |", "|---|---|"]
        L += [f"| {k} | {v:.1f} |" for k, v in sr.get("stage_seconds", {}).items()]
        L += [f"| **total** | **{sr.get('total_seconds', 0):.1f}** |", "",
              f"Peak memory (max RSS): {sr.get('peak_rss_mb', 0):,.0f} MB.", ""]
    if ev:
        L += ["## Evaluation", "", "| metric | BASE | SFT |", "|---|---|---|"]
        base, chat = ev.get("base", {}), ev.get("sft", {})
        L.append(f"| val bits per byte | {_fmt(base.get('val_bpb'))} | {_fmt(chat.get('val_bpb'))} |")
        for task in ("arithmetic", "facts", "identity"):
            if f"{task}_accuracy" in chat:
                L.append(f"| {task} accuracy (n={chat[f'{task}_n']}) | — | {chat[f'{task}_accuracy']:.1%} |")
        L += ["", "Arithmetic is answered by calling the calculator tool; facts are recalled from pretraining "
              "(no tool); identity checks the model names itself. All questions are held out from training.", ""]
    if pre:
        L += ["## Pretraining", "", "| | |", "|---|---|"]
        for k in ("params", "flops_per_token", "steps", "tokens", "tokens_per_param", "seconds", "tokens_per_second",
                  "final_train_loss", "final_val_loss", "val_bpb", "device", "dtype"):
            if k in pre:
                L.append(f"| {k.replace('_', ' ')} | {_fmt(pre[k])} |")
        L.append("")
    if sft:
        L += ["## SFT", "", "| | |", "|---|---|"]
        for k in ("conversations", "rows", "steps", "tokens", "seconds", "tokens_per_second", "final_train_loss",
                  "final_val_loss"):
            if k in sft:
                L.append(f"| {k.replace('_', ' ')} | {_fmt(sft[k])} |")
        L.append("")
    for p in plots:
        L += [f"![loss curves]({p})", ""]
    if tok_s:
        L += ["## Data and tokenizer", "", f"Source: {tok_s['source']}; {tok_s['documents']:,} documents; "
              f"{tok_s['train_tokens']:,} train / {tok_s['val_tokens']:,} val tokens; vocab {tok_s['vocab_size']:,}; "
              f"{tok_s['bytes_per_token']:.2f} bytes per token; BPE trained in {tok_s['seconds_train']:.1f}s.", ""]
        cs = tok_s.get("corpus_stats") or {}
        if cs:
            L += ["Corpus variety (synthetic data must not collapse):", "", "| statistic | value |", "|---|---|"]
            L += [f"| {k} | {_fmt(v)} |" for k, v in cs.items()]
            L.append("")
    if ev and ev.get("samples"):
        L += ["## Sample generations (greedy, held-out questions)", ""]
        for s in ev["samples"]:
            mark = "✅" if s["correct"] else "❌"
            L += [f"- {mark} **{s['task']}** — *{s['question']}*", f"  → {s['reply']}"]
        L.append("")
    L += ["## Config", "", "```json", json.dumps(cfg.to_dict(), indent=2), "```", ""]
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(L))
    print(f"report: wrote {out}")
    return out
