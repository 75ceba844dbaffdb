"""App `chat`: talk to your model in the terminal (interactive, or one-shot with -p).

Tokens stream as they are generated; tool calls and their responses are shown on a line of their own.
"""
from __future__ import annotations

import sys
import time

import torch

from exocortex.config import RunConfig
from exocortex.errors import ExocortexError
from exocortex.infer.decode import compile_status, warm_up_note
from exocortex.infer.docstore import citation
from exocortex.infer.notes import LOCAL_USER, NoteStore, default_notes_path
from exocortex.infer.engine import Engine, StreamDecoder, load_engine, unwrap
from exocortex.infer.sandbox import python_tool_status


def stream_reply(engine: Engine, messages: list[dict], out=sys.stdout, **sampling) -> list[int]:
    """Generate one assistant turn, printing it as it comes; returns its tokens (without the stop token).
    A tool call and its response are shown on their own line, `[tool call: {...}] -> result`, once each is
    complete (their text is JSON and a result, framed by newlines the display leaves out)."""
    tok = engine.tok
    dec = StreamDecoder(tok)
    prompt = tok.render_for_completion(messages)
    tokens: list[int] = []
    inside: list[int] | None = None  # the tokens of the call or response being written
    shown = {engine.call_end: "\n  [tool call: {}]", engine.out_end: " -> {}\n"}
    sources = []  # passages of the document index the reply read: cited after it
    for column, forced in engine.generate(prompt, **sampling):
        t = column[0]
        if t in engine.stop_ids:
            break
        tokens.append(t)
        if t in (engine.call_start, engine.out_start):
            inside = []
        elif t in shown and inside is not None:
            text = unwrap(tok.decode(inside))
            out.write(shown[t].format(text))
            cited = citation(text) if t == engine.out_end else None
            if cited and cited["source"] not in sources:
                sources.append(cited["source"])
            inside = None
        elif inside is not None:
            inside.append(t)
        elif not tok.is_special(t):
            out.write(dec.push(t))
        out.flush()
    if inside:  # cut short inside a call: show what there was
        out.write("\n  [" + unwrap(tok.decode(inside)))
    out.write("\n")
    if sources:
        out.write(f"  sources: {'; '.join(sources)}\n")
    out.flush()
    return tokens


def warm_up_decoder(engine: Engine, compile: bool, out=None) -> None:
    """Compile the one-row decode step before the first reply (which would otherwise stall at its first
    token), saying so in one line (on stderr: stdout is the reply); where it cannot be compiled, say why and
    decode eagerly."""
    out = out or sys.stderr
    if compile and not engine.compile:  # no toolchain here (decode.compile_status)
        print(f"decoding eagerly: {compile_status(engine.device)[1]}", file=out, flush=True)
    if not engine.compile:
        return
    print(warm_up_note(engine.device, dtype=engine.dtype), file=out, flush=True)
    t = time.perf_counter()
    try:
        with torch.inference_mode():
            dec = engine.decoder(1, 8)  # the one-row step serves every length: one compile for the chat
            bos = engine.tok.special["<|bos|>"]
            dec.prefill([bos, bos])
            dec.step([bos])
    except Exception as e:  # noqa: BLE001 - a broken toolchain must not take the chat down: eager
        engine.compile = False
        print(f"decoding eagerly: compiling the decode step failed ({type(e).__name__}: "
              f"{' '.join(str(e).split())[:300]})", file=out, flush=True)
        return
    print(f"decode step compiled in {time.perf_counter() - t:.1f} s", file=out, flush=True)


def run_chat(cfg: RunConfig, prompt: str | None = None, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, max_tokens: int | None = None, system: str | None = None,
             seed: int | None = None, stage: str | None = None, docs: list[str] | None = None,
             compile: bool = True, index: str | None = None, memory: bool = True, user: str = LOCAL_USER) -> None:
    """Sampling settings left out come from the run's config (`sampling` section). `compile`: decode with the
    compiled step (compiled before the first reply; eager where it cannot run, saying why)."""
    # memory: notes the model keeps about `user` across sessions (infer/notes.py; `exocortex memory`)
    notes = NoteStore(default_notes_path()).tools(user, "chat") if memory else None
    engine = load_engine(cfg, stage, docs, compile=compile, index=index, extra_tools=notes)
    note = python_tool_status()[1]  # the python tool off (or degraded) on this kernel: say so, once
    if note:
        print(note, file=sys.stderr, flush=True)
    warm_up_decoder(engine, compile)
    d = cfg.sampling
    sampling = dict(temperature=d.temperature if temperature is None else temperature,
                    top_k=(d.top_k if top_k is None else top_k) or None, top_p=d.top_p if top_p is None else top_p,
                    max_tokens=d.max_tokens if max_tokens is None else max_tokens, seed=seed)
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
