"""Stage `chat`: talk to your model in the terminal (interactive, or one-shot with -p).

Tokens stream as they are generated; tool calls and their outputs are shown inline.
"""
from __future__ import annotations

import sys
from pathlib import Path

from exocortex.checkpoint import latest_checkpoint, load_model, require_checkpoint, resolve_device, resolve_dtype
from exocortex.config import ExocortexError, RunConfig
from exocortex.engine import Engine, StreamDecoder
from exocortex.tokenizer import Tokenizer


CHAT_STAGES = ["rl", "sft", "midtrain"]  # the newest chat stage a run has is the one to talk to


def chat_checkpoint(cfg: RunConfig, stage: str | None = None) -> Path:
    if stage:
        return require_checkpoint(cfg.run_dir, stage, f"exocortex {stage} --run {cfg.name}")
    for s in CHAT_STAGES:
        ckpt = latest_checkpoint(cfg.run_dir, s)
        if ckpt is not None:
            return ckpt
    return require_checkpoint(cfg.run_dir, "sft", f"exocortex sft --run {cfg.name}")  # raises with a hint


def load_chat_engine(cfg: RunConfig, stage: str | None = None, docs: list[str] | None = None) -> Engine:
    """The run's chat model with its tools: calculator, python, and lookup (over `docs`, or the world)."""
    from exocortex.lookup import tools_for_run

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.sft.dtype, device)
    model, _ = load_model(chat_checkpoint(cfg, stage), device)
    return Engine(model, Tokenizer.load(cfg.run_dir / "tokenizer"), device, dtype, tools=tools_for_run(cfg, docs))


def stream_reply(engine: Engine, messages: list[dict], out=sys.stdout, **sampling) -> list[int]:
    """Generate one assistant turn, printing it as it comes; returns its tokens (without the stop token)."""
    tok = engine.tok
    dec = StreamDecoder(tok)
    prompt = tok.render_for_completion(messages)
    tokens: list[int] = []
    for column, forced in engine.generate(prompt, **sampling):
        t = column[0]
        if t in engine.stop_ids:
            break
        tokens.append(t)
        if t == engine.call_start:
            out.write("\n  [tool call: ")
        elif t == engine.call_end:
            out.write("]")
        elif t == engine.out_start:
            out.write(" -> ")
        elif t == engine.out_end:
            out.write("\n")
        elif not tok.is_special(t):
            out.write(dec.push(t))
        out.flush()
    out.write("\n")
    out.flush()
    return tokens


def run_chat(cfg: RunConfig, prompt: str | None = None, temperature: float = 0.6, top_k: int = 50,
             top_p: float | None = 0.95, max_tokens: int = 256, system: str | None = None, seed: int | None = None,
             stage: str | None = None, docs: list[str] | None = None) -> None:
    engine = load_chat_engine(cfg, stage, docs)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_tokens, seed=seed)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        if not prompt.strip():
            raise ExocortexError("-p needs a non-empty prompt")
        stream_reply(engine, messages + [{"role": "user", "content": prompt}], **sampling)
        return
    print(f"exocortex chat — run {cfg.run_dir}. Type /clear for a new chat, /quit (or Ctrl-D) to leave.")
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/clear":
            messages = messages[:1] if system else []
            print("(new chat)")
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("exocortex> ")
        tokens = stream_reply(engine, messages, **sampling)
        messages.append({"role": "assistant", "content": engine.to_parts(tokens) or ""})


def most_recent_run(runs_dir: str | Path) -> Path:
    """The run whose chat model (or any checkpoint) was written last."""
    root = Path(runs_dir)
    runs = [p for p in root.glob("*") if (p / "config.json").exists()] if root.exists() else []
    if not runs:
        raise ExocortexError(f"no runs in {root}/; train one with `exocortex speedrun` (or name one with --run)")

    def stamp(p: Path) -> float:
        files = list((p / "checkpoints").glob("*/latest"))
        return max((f.stat().st_mtime for f in files), default=(p / "config.json").stat().st_mtime)

    return max(runs, key=stamp)
