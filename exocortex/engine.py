"""Generation: KV cache, batched sampling (temperature / top-k / top-p), streaming, and tool use.

When a row emits <|tool_call_end|>, the engine parses the call, runs the tool, and *forces* the tokens
<|tool_output_start|> result <|tool_output_end|> into that row; sampling resumes after them. Forced tokens
are marked so callers can show (or skip) them, and they never count as the model's own words.
"""
from __future__ import annotations

import codecs
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from exocortex.checkpoint import autocast
from exocortex.model import GPT, KVCache
from exocortex.tokenizer import Tokenizer
from exocortex.tools import TOOLS, run_tool_call


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(dim=-1)
        sorted_p = sorted_p.masked_fill(cum - sorted_p > top_p, 0.0)  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class RowState:
    forced: deque = field(default_factory=deque)
    in_tool_call: bool = False
    call_tokens: list = field(default_factory=list)
    done: bool = False


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32, tools: dict[str, Callable[[str], str]] | None = None):
        self.model = model.eval()
        self.tok = tokenizer
        self.device = device or next(model.parameters()).device
        self.dtype = dtype
        self.tools = TOOLS if tools is None else tools
        sp = tokenizer.special
        self.stop_ids = {sp["<|assistant_end|>"], sp["<|bos|>"]}
        self.call_start, self.call_end = sp["<|tool_call_start|>"], sp["<|tool_call_end|>"]
        self.out_start, self.out_end = sp["<|tool_output_start|>"], sp["<|tool_output_end|>"]

    @torch.inference_mode()
    def generate(self, prompt: list[int] | list[list[int]], num_samples: int = 1, max_tokens: int = 256,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stats: dict | None = None) -> Iterator[tuple[list[int], list[bool]]]:
        """Yield, each step, one token per row and whether it was forced (tool output) rather than sampled.
        Rows that finished keep yielding their stop token; iteration ends when all rows are done.

        `prompt` is one prompt, or a list of prompts of equal length (rows = prompts x num_samples, prompt-major).
        `stats`, if given, accumulates the entropy of the sampling distribution over sampled tokens
        ("entropy_sum", "sampled"): RL's guard watches it."""
        prompts = prompt if prompt and isinstance(prompt[0], list) else [prompt]
        if not prompts[0] or any(len(p) != len(prompts[0]) for p in prompts):
            raise ValueError("empty prompt" if not prompts[0] else "batched prompts must have equal lengths")
        prompt = prompts[0]
        cfg = self.model.cfg
        limit = self.model.rope_cos.shape[0]
        max_len = min(len(prompt) + max_tokens, limit)
        if len(prompt) >= max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room to generate (limit {limit})")
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        n_rows = len(prompts) * num_samples
        cache = KVCache(cfg, n_rows, max_len, self.device, self.dtype if self.dtype != torch.float32 else torch.float32)
        ids = torch.tensor([p for p in prompts for _ in range(num_samples)], dtype=torch.long, device=self.device)
        with autocast(self.device, self.dtype):
            logits = self.model(ids, cache=cache)[:, -1, :]
        rows = [RowState() for _ in range(n_rows)]
        for _ in range(max_len - len(prompt)):
            if stats is not None and temperature > 0:
                logp = torch.log_softmax(logits.float() / temperature, dim=-1)
                ent = -(logp.exp() * logp).sum(-1)
                live = torch.tensor([not (r.done or r.forced) for r in rows], device=ent.device)
                stats["entropy_sum"] = stats.get("entropy_sum", 0.0) + float(ent[live].sum())
                stats["sampled"] = stats.get("sampled", 0) + int(live.sum())
            sampled = sample_next(logits, temperature, top_k, top_p, gen).tolist()
            column, forced_mask = [], []
            for r, row in enumerate(rows):
                if row.done:
                    column.append(next(iter(self.stop_ids)))
                    forced_mask.append(True)
                    continue
                forced = bool(row.forced)
                token = row.forced.popleft() if forced else sampled[r]
                column.append(token)
                forced_mask.append(forced)
                if forced:
                    continue
                if token in self.stop_ids:
                    row.done = True
                elif token == self.call_start:
                    row.in_tool_call, row.call_tokens = True, []
                elif token == self.call_end and row.in_tool_call:
                    row.in_tool_call = False
                    result = run_tool_call(self.tok.decode(row.call_tokens), self.tools)
                    row.forced.extend([self.out_start] + self.tok.encode(result) + [self.out_end])
                elif row.in_tool_call:
                    row.call_tokens.append(token)
            yield column, forced_mask
            if all(row.done for row in rows) or cache.pos >= max_len:
                return
            with autocast(self.device, self.dtype):
                logits = self.model(torch.tensor(column, device=self.device).unsqueeze(1), cache=cache)[:, -1, :]

    def complete(self, prompt: list[int] | list[list[int]], num_samples: int = 1, **kw) -> list[list[int]]:
        """Finished completions (without the stop token), one list of token ids per row (see generate)."""
        n_rows = num_samples * (len(prompt) if prompt and isinstance(prompt[0], list) else 1)
        outs: list[list[int]] = [[] for _ in range(n_rows)]
        done = [False] * n_rows
        for column, _ in self.generate(prompt, num_samples=num_samples, **kw):
            for r, t in enumerate(column):
                if done[r]:
                    continue
                if t in self.stop_ids:
                    done[r] = True
                else:
                    outs[r].append(t)
        return outs

    def complete_many(self, prompts: list[list[int]], batch_size: int = 32, **kw) -> list[list[int]]:
        """Greedy/sampled completions for many different prompts: prompts of equal length share a batch."""
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        outs: list[list[int]] = [[] for _ in prompts]
        for idx in by_len.values():
            for j in range(0, len(idx), batch_size):
                chunk = idx[j:j + batch_size]
                for i, out in zip(chunk, self.complete([prompts[i] for i in chunk], **kw)):
                    outs[i] = out
        return outs

    def render(self, tokens: list[int]) -> str:
        """Readable text of a completion: tool calls and outputs shown inline in brackets."""
        out, buf = [], []
        names = {self.call_start: "[tool call: ", self.call_end: "]", self.out_start: " [tool output: ",
                 self.out_end: "] "}
        for t in tokens:
            if t in names:
                out.append(self.tok.decode(buf)); buf = []
                out.append(names[t])
            elif not self.tok.is_special(t):
                buf.append(t)
        out.append(self.tok.decode(buf))
        return "".join(out).strip()

    def to_parts(self, tokens: list[int]) -> list[dict]:
        """A completion as assistant message parts (text / tool_call / tool_output), for the chat history."""
        parts: list[dict] = []
        kind, buf = "text", []

        def flush():
            if buf or kind != "text":
                parts.append({"type": kind, "text": self.tok.decode(buf)})

        for t in tokens:
            if t in (self.call_start, self.out_start):
                flush()
                kind, buf = ("tool_call" if t == self.call_start else "tool_output"), []
            elif t in (self.call_end, self.out_end):
                flush()
                kind, buf = "text", []
            elif not self.tok.is_special(t):
                buf.append(t)
        if buf:
            parts.append({"type": kind, "text": self.tok.decode(buf)})
        return parts

    def answer_text(self, tokens: list[int]) -> str:
        """Only the assistant's own text (no tool calls or outputs): what a grader reads."""
        out, inside = [], False
        for t in tokens:
            if t in (self.call_start, self.out_start):
                inside = True
            elif t in (self.call_end, self.out_end):
                inside = False
            elif not inside and not self.tok.is_special(t):
                out.append(t)
        return self.tok.decode(out).strip()


class StreamDecoder:
    """Turns tokens into text incrementally without splitting multi-byte UTF-8 characters."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.dec.decode(self.tok.decode_bytes([token]))
