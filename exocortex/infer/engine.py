"""Generation: KV cache, batched sampling (temperature / top-k / top-p), streaming, and tool use.

Tool calls are in the Hermes/Qwen format (exocortex/infer/tools.py), inside the assistant's turn:

    <tool_call>\n{"name": "calculator", "arguments": {"expression": "347 * 29"}}\n</tool_call>

When a row emits </tool_call>, the engine parses the JSON, runs the tool, and *forces* the tokens
<tool_response>\n10063\n</tool_response> into that row; sampling resumes after them, in the same turn, until
<|assistant_end|>. Forced tokens are marked so callers can show (or skip) them, and they never count as the
model's own words.

A row may carry a Constraint (exocortex/infer/constrain.py: a JSON schema, a tool call): its logits are masked
to the tokens the grammar allows before sampling (greedy or not), and every sampled token advances it. Forced
tokens are engine text, not the model's, so they never reach it: the first forced token (a tool's output)
drops the row's constraint, which thus covers the reply up to the first call the engine runs.
"""
from __future__ import annotations

import codecs
import contextlib
import glob
import os
import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from exocortex.checkpoint import load_model
from exocortex.config import RunConfig
from exocortex.device import resolve_device, resolve_dtype
from exocortex.infer.constrain import Constraint, ConstraintError, mask_logits
from exocortex.infer.decode import MIN_SPAN, Decoder, DecoderLike, FusedWeights, compile_status
from exocortex.infer.lookup import tools_for_run
from exocortex.model import GPT
from exocortex.infer.tools import TOOLS, ToolError, parse_tool_call, run_tool_call
from exocortex.tokenizer import CALL_END, CALL_START, RESPONSE_END, RESPONSE_START, Tokenizer, plain_text

TOOL_THREADS = 8  # calls of one decode step run side by side (a sandboxed python call mostly waits on its process)


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
    # inverse CDF: one uniform per row against the running sum. torch.multinomial does the same draw ~20x
    # slower on a CPU (sample_next 5.6 vs 0.44 ms for 64 rows of 4,096): a seventh of a tiny RL step.
    # `right=True` never lands on a token of probability 0 (a masked one); a draw past the sum (rounding) takes
    # the likeliest token
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[..., -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return torch.where(idx < cdf.shape[-1], idx, probs.argmax(dim=-1))


def _row_constraints(constraint, n_rows: int) -> list | None:
    """Each row's own copy of its constraint (the caller's stay as given, to be used again), or None when no
    row has one: then the decode loop never looks at constraints again."""
    if constraint is None:
        return None
    if not isinstance(constraint, (list, tuple)):  # one for every row (any object with Constraint's methods)
        constraint = [constraint] * n_rows
    if len(constraint) != n_rows:
        raise ValueError(f"{len(constraint)} constraints for {n_rows} rows")
    if all(c is None for c in constraint):
        return None
    return [c.fork() if c is not None else None for c in constraint]


def _masked(logits: torch.Tensor, cons: list) -> torch.Tensor:
    """logits (B, V) with each constrained row masked (rows past the computed ones are idle)."""
    if all(c is None for c in cons[:logits.shape[0]]):
        return logits
    logits = logits.clone()
    for r, c in enumerate(cons[:logits.shape[0]]):
        if c is not None:
            logits[r] = mask_logits(logits[r], c)
    return logits


@dataclass
class RowState:
    forced: deque = field(default_factory=deque)
    in_tool_call: bool = False
    call_tokens: list = field(default_factory=list)
    done: bool = False
    context: str = ""  # the user's last message: what `lookup` without a query searches for
    client_calls: int = 0  # calls this reply made to the client's tools (Request.client_tools)
    between_calls: bool = False  # a client's call just closed: the next token is another call or the end


class Engine:
    """Generation over a GPT. `decoder(batch_size, max_len)` makes the prefill/step machinery (default: the
    static-cache Decoder over `model`); tests pass scripted or paced ones."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32, tools: dict[str, Callable[[dict], str]] | None = None,
                 compile: bool = False, decoder: Callable[[int, int], DecoderLike] | None = None):
        self.model = model.eval()
        self.compile = compile  # torch.compile the decode step (worth it for long runs: the first one compiles)
        self.native_step = True  # compiled on CPU in bf16: the steps in C where they run (decode.Decoder, native.py)
        self.weights = FusedWeights(model, dtype)  # shared by this engine's decoders: fused once per update
        self.make_decoder = decoder if decoder is not None else self._static_decoder
        self.tok = tokenizer
        self.device = device or next(model.parameters()).device
        self.dtype = dtype
        self.tools = TOOLS if tools is None else tools
        sp = tokenizer.special
        self.stop_ids = {sp["<|assistant_end|>"], sp["<|bos|>"]}
        self.call_start, self.call_end = sp[CALL_START], sp[CALL_END]
        self.out_start, self.out_end = sp[RESPONSE_START], sp[RESPONSE_END]

    @torch.inference_mode()
    def generate(self, prompt: list[int] | list[list[int]], num_samples: int = 1, max_tokens: int = 256,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stats: dict | None = None,
                 constraint: Constraint | list[Constraint | None] | None = None,
                 ) -> Iterator[tuple[list[int], list[bool]]]:
        """Yield, each step, one token per row and whether it was forced (tool output) rather than sampled.
        Rows that finished keep yielding their stop token; iteration ends when all rows are done.

        `prompt` is one prompt, or a list of prompts (any lengths: each row has its own position in the static
        cache); rows = prompts x num_samples, prompt-major. `stats`, if given, accumulates the entropy of the
        sampling distribution over sampled tokens ("entropy_sum", "sampled"): RL's guard watches it.
        `constraint` is one Constraint for every row or one per row (None: that row is free); each row
        advances its own copy. A row whose constraint allows no token raises ConstraintError."""
        prompts = prompt if prompt and isinstance(prompt[0], list) else [prompt]
        if any(not p for p in prompts):
            raise ValueError("empty prompt")
        limit = self.model.rope_cos.shape[0]
        longest = max(len(p) for p in prompts)
        max_len = min(longest + max_tokens, limit)
        if longest >= max_len:
            raise ValueError(f"prompt of {longest} tokens leaves no room to generate (limit {limit})")
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        n_rows = len(prompts) * num_samples
        dec = self.decoder(n_rows, max_len)
        if len(prompts) == 1:
            logits = dec.prefill(prompts[0])
        else:
            logits = torch.cat([dec.prefill(p, list(range(i * num_samples, (i + 1) * num_samples)))
                                for i, p in enumerate(prompts)])
        contexts = [self.last_user_text(p) for p in prompts]
        rows = [RowState(context=contexts[r // num_samples]) for r in range(n_rows)]
        cons = _row_constraints(constraint, n_rows)
        n_steps = max_len - longest
        for i in range(n_steps):
            if stats is not None and temperature > 0:
                logp = torch.log_softmax(logits.float() / temperature, dim=-1)
                ent = -(logp.exp() * logp).sum(-1)
                live = torch.tensor([not (r.done or r.forced) for r in rows[:len(ent)]], device=ent.device)
                stats["entropy_sum"] = stats.get("entropy_sum", 0.0) + float(ent[live].sum())
                stats["sampled"] = stats.get("sampled", 0) + int(live.sum())
            if cons is not None:
                logits = _masked(logits, [None if r.done or r.forced else c for r, c in zip(rows, cons)])
            column, forced_mask = self._take(rows, sample_next(logits, temperature, top_k, top_p, gen).tolist(), cons)
            yield column, forced_mask
            if all(row.done for row in rows) or i == n_steps - 1:
                return
            # finished rows stop advancing (and rows past the last busy one are not computed)
            logits = dec.step(column, [not r.done for r in rows])

    def _take(self, rows: list[RowState], sampled: list[int], cons: list | None = None,
              closed: list | None = None) -> tuple[list[int], list[bool]]:
        """Each row's next token: its queued forced token (a tool's output) if any, else the sampled one; a done
        row repeats a stop token. Advances the rows' constraints and call tracking, and runs the calls that
        closed (their outputs are queued as forced tokens), or, given `closed`, lists their rows there for the
        caller to run. -> (tokens, forced) per row."""
        column, forced_mask, calls = [], [], []
        for r, row in enumerate(rows):
            if row.done:
                column.append(next(iter(self.stop_ids)))
                forced_mask.append(True)
                continue
            forced = bool(row.forced)
            token = row.forced.popleft() if forced else sampled[r]
            column.append(token)
            forced_mask.append(forced)
            if cons is not None and cons[r] is not None:
                if forced:
                    cons[r] = None  # a tool's output: the constraint covered the call, the row goes on free
                elif token not in self.stop_ids:
                    cons[r].advance(token)
            if forced:
                continue
            if token in self.stop_ids:
                row.done = True
            elif token == self.call_start:
                row.in_tool_call, row.call_tokens = True, []
            elif token == self.call_end and row.in_tool_call:
                row.in_tool_call = False
                calls.append(row)
            elif row.in_tool_call:
                row.call_tokens.append(token)
        if closed is not None:
            closed.extend(calls)
            return column, forced_mask
        for row, result in zip(calls, self._run_calls(calls)):
            row.forced.extend(self.response_tokens(result))
        return column, forced_mask

    def _run_calls(self, rows: list[RowState]) -> list[str]:
        """The results of the calls these rows just closed. Several at once run side by side: a python call is a
        sandbox process (~50 ms), and a batch of 32 questions that all call it would otherwise wait for each."""
        jobs = [(self.tok.decode(row.call_tokens), row.context) for row in rows]
        if len(jobs) < 2:
            return [run_tool_call(text, self.tools, context) for text, context in jobs]
        with ThreadPoolExecutor(max_workers=min(len(jobs), TOOL_THREADS), thread_name_prefix="exocortex-tool") as pool:
            return list(pool.map(lambda job: run_tool_call(job[0], self.tools, job[1]), jobs))

    def last_user_text(self, prompt: list[int]) -> str:
        """The text of the last user message in a rendered prompt ('' if there is none)."""
        sp = self.tok.special
        start, end = sp.get("<|user_start|>"), sp.get("<|user_end|>")
        if start is None or start not in prompt:
            return ""
        i = len(prompt) - 1 - prompt[::-1].index(start)
        j = prompt.index(end, i) if end in prompt[i:] else len(prompt)
        return self.tok.decode(prompt[i + 1:j])

    def decoder(self, batch_size: int, max_len: int) -> DecoderLike:
        """Prefill/step machinery for `batch_size` rows of up to `max_len` tokens."""
        return self.make_decoder(batch_size, max_len)

    def _static_decoder(self, batch_size: int, max_len: int) -> Decoder:
        if self.compile and self.device.type == "cuda":  # a few cache lengths, so a few CUDA graphs serve all calls
            max_len = min(self.model.rope_cos.shape[0], max(MIN_SPAN, 1 << (max_len - 1).bit_length()))
        return Decoder(self.model, batch_size, max_len, self.dtype, self.compile, self.weights, self.native_step)

    def warm_up(self) -> None:
        """Build (or load from the cache) the compiled decode steps, for one row and for several, now: a timed
        loop (RL's budget) then spends its time on its work. If they cannot be built, the engine decodes eagerly
        from then on, and says why."""
        if not self.compile:
            return
        try:
            d = self.decoder(2, 8)
            d.prefill([0, 0])
            d.step([0, 0])
            d.step([0, 0], [True, False])
        except Exception as e:  # noqa: BLE001 - any failure to compile leaves the eager step, which always runs
            self.compile = False
            print(f"could not compile the decode step ({type(e).__name__}: {str(e)[:200]}); decoding eagerly",
                  flush=True)

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

    @torch.inference_mode()
    def complete_many(self, prompts: list[list[int]], batch_size: int = 32, max_tokens: int = 256,
                      temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                      seed: int | None = None) -> list[list[int]]:
        """One finished completion per prompt (as `complete`: without the stop token, tool outputs included), at
        most `batch_size` rows decoding at a time. A row that finishes takes the next prompt at once, so a batch
        never waits on its longest reply, and a row whose tool runs waits alone while the others decode
        (continuous batching, as the server does). Greedy replies are those of `complete`; sampled ones draw
        from one generator, seeded once."""
        if not prompts:
            return []
        if any(not p for p in prompts):
            raise ValueError("empty prompt")
        limit = self.model.rope_cos.shape[0]
        max_len = min(max(len(p) for p in prompts) + max_tokens, limit)
        too_long = [len(p) for p in prompts if len(p) >= max_len]
        if too_long:
            raise ValueError(f"prompt of {max(too_long)} tokens leaves no room to generate (limit {limit})")
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        waiting = deque(sorted(range(len(prompts)), key=lambda i: len(prompts[i])))  # alike lengths side by side
        width = min(batch_size, len(prompts))
        dec = self.decoder(width, max_len)
        outs: list[list[int]] = [[] for _ in prompts]
        rows: list[RowState | None] = [None] * width  # a free slot is None
        owner, left = [0] * width, [0] * width  # the prompt a slot answers, and the tokens it may still take
        tools: dict[int, Future] = {}  # slot -> its running tool call: the row sits out until it returns
        logits = None  # (width, V): each slot's next-token logits, from its prefill or the last step
        idle = RowState(done=True)

        def admit(slot: int) -> None:
            nonlocal logits
            i = waiting.popleft()
            first = dec.prefill(prompts[i], [slot])[0]
            if logits is None:
                logits = torch.zeros(width, first.shape[-1], device=first.device)
            logits[slot] = first
            rows[slot], owner[slot] = RowState(context=self.last_user_text(prompts[i])), i
            left[slot] = min(max_tokens, max_len - len(prompts[i]))

        for slot in range(width):
            admit(slot)
        with ThreadPoolExecutor(max_workers=TOOL_THREADS, thread_name_prefix="exocortex-tool") as pool:
            while any(r is not None for r in rows):
                if tools and all(r is None or s in tools for s, r in enumerate(rows)):
                    wait(tools.values(), return_when=FIRST_COMPLETED)  # nothing else to decode meanwhile
                for slot in [s for s, f in tools.items() if f.done()]:
                    rows[slot].forced.extend(self.response_tokens(tools.pop(slot).result()))
                live = [r is not None and s not in tools for s, r in enumerate(rows)]
                if not any(live):
                    continue
                n = max(s for s, ok in enumerate(live) if ok) + 1  # slots past the last live one are idle
                busy = [r if ok else idle for r, ok in zip(rows[:n], live)]
                closed: list[RowState] = []
                column, _ = self._take(busy, sample_next(logits[:n], temperature, top_k, top_p, gen).tolist(),
                                       closed=closed)
                for slot in range(n):
                    if not live[slot]:
                        continue
                    row = rows[slot]
                    if not row.done:
                        outs[owner[slot]].append(column[slot])
                        left[slot] -= 1
                    if row.done or left[slot] == 0:
                        rows[slot] = None
                        live[slot] = False
                    elif any(row is c for c in closed):  # its call's last token goes in below; then it waits
                        tools[slot] = pool.submit(run_tool_call, self.tok.decode(row.call_tokens), self.tools,
                                                  row.context)
                if any(live):
                    stepped = dec.step(column + column[:1] * (width - n), live)
                    logits[:stepped.shape[0]] = stepped
                for slot in range(width):
                    if rows[slot] is None and waiting:
                        admit(slot)
        return outs

    def response_tokens(self, result: str) -> list[int]:
        """What the engine forces after a call: <tool_response>\nRESULT\n</tool_response>, encoded as the chat
        format renders a tool_output part (Tokenizer.render_conversation), so training and inference agree."""
        return [self.out_start] + self.tok.encode("\n" + plain_text(result) + "\n") + [self.out_end]

    def segments(self, tokens: list[int]) -> list[tuple[str, str]]:
        """A completion as (kind, text) in order: kind text / tool_call / tool_output. A call's or response's
        text is without the newlines the format puts around it (the JSON, the result); an unclosed one (a
        reply cut short) is kept as far as it got. Special tokens other than the markers are dropped."""
        out: list[tuple[str, str]] = []
        kind, buf = "text", []

        def flush():
            text = self.tok.decode(buf)
            if kind != "text":
                text = unwrap(text)
            if buf or kind != "text":
                out.append((kind, text))

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
            flush()
        return out

    def render(self, tokens: list[int]) -> str:
        """Readable text of a completion: tool calls and outputs shown inline in brackets."""
        shown = {"text": "{}", "tool_call": "[tool call: {}]", "tool_output": " [tool output: {}] "}
        segments = self.segments(tokens)
        parts = [shown[kind].format(text) for kind, text in segments]
        at = [i for i, t in enumerate(tokens) if t in (self.call_start, self.out_start, self.call_end, self.out_end)]
        if at and tokens[at[-1]] in (self.call_start, self.out_start):
            # a reply cut inside a call or output: no closing bracket, as the server streams it
            if all(self.tok.is_special(t) for t in tokens[at[-1] + 1:]):  # cut right after the marker: an empty part
                parts.append(shown["tool_call" if tokens[at[-1]] == self.call_start else "tool_output"].format(""))
            parts[-1] = parts[-1][:parts[-1].rindex("]")]
        return "".join(parts).strip()

    def to_parts(self, tokens: list[int]) -> list[dict]:
        """A completion as assistant message parts (text / tool_call / tool_output), for the chat history:
        rendered again by Tokenizer.render_conversation, they give back the same tokens."""
        return [{"type": kind, "text": text} for kind, text in self.segments(tokens)]

    def answer_text(self, tokens: list[int]) -> str:
        """Only the assistant's own text (no tool calls or outputs): what a grader reads."""
        return "".join(text for kind, text in self.segments(tokens) if kind == "text").strip()


def client_call(text: str, names: frozenset[str] | set[str]) -> tuple[str, dict] | None:
    """(name, arguments) if `text` (between the call markers) is a well-formed call to one of `names`, else None:
    a call that does not parse goes to the engine's tools, which answer the model with the reason."""
    try:
        name, arguments = parse_tool_call(unwrap(text))
    except ToolError:
        return None
    return (name, arguments) if name in names else None


def unwrap(text: str) -> str:
    """A call's or response's text without the one newline on each side that the format puts there."""
    text = text[1:] if text.startswith("\n") else text
    return text[:-1] if text.endswith("\n") else text


# ----------------------------------------------------------------------------- continuous batching

@dataclass(eq=False)
class Request:
    """One generation in a Batcher: a prompt, its own sampling parameters, and two callbacks that run on the
    batcher's thread (keep them short). on_token(token, forced) sees every token but the stop token and
    returns False to end the reply there (a stop string matched: finish "stop"). on_end(finish, steps, error)
    comes once: finish is "stop", "length" or None (cancelled); steps counts every token produced, stop
    token and tool output included (as iterating Engine.generate would). `constraint`, if any, is copied
    when the request joins (the request's own stays as given, so one may serve several requests) and masks
    the row's sampled tokens as in Engine.generate; if it allows no token, on_end(None, steps, ConstraintError).

    Function calling (the server's `tools`): `tools` are the tools the engine runs for this request (None: the
    engine's own). A call to a name in `client_tools` is not run: it is the client's to run, so the reply ends
    after it with finish "tool_calls" — at once, or with `parallel_calls` once the model has written every call
    it wants (after each, the only tokens allowed are <tool_call> and <|assistant_end|>). A call the engine
    would run that comes after a client's call ends the reply there, unrun (the client's calls answer first).
    Only the Batcher knows client tools; Engine.generate runs every call."""
    prompt: list[int]
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    constraint: Constraint | None = None
    tools: dict[str, Callable[[dict], str]] | None = None
    client_tools: frozenset[str] = frozenset()
    parallel_calls: bool = True
    on_token: Callable[[int, bool], bool] = lambda token, forced: True
    on_end: Callable[[str | None, int, BaseException | None], None] = lambda finish, steps, error: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Scoring (off by default, and then free): with logprobs=k, on_logprobs(token, logprob, top) comes just before
    # each token's on_token (and for the stop token too, which on_token never sees) with the token's log-probability
    # under the model and the k most likely tokens [(id, logprob)], best first. These are the raw model's
    # (before temperature, top-k/top-p or any mask), as OpenAI and vLLM report them.
    logprobs: int | None = None
    on_logprobs: Callable[[int, float, list[tuple[int, float]]], None] = lambda token, logprob, top: None


@dataclass(eq=False)
class _Row:
    req: Request
    max_steps: int
    gen: torch.Generator | None
    state: RowState = field(default_factory=RowState)
    steps: int = 0
    logits: torch.Tensor | None = None  # next-token logits, waiting for a decision
    feed: int | None = None  # the token this row feeds at the next step
    tool: Future | None = None  # a running tool call; the row pauses until its output is forced in
    constraint: Constraint | None = None  # a copy of the request's, until the row's first forced token


def one_row_threads_beside_a_server(weight_bytes: int) -> int:
    """Threads for a server's one-row steps (a lone request). Where the weights fit in the CPU's last-level
    cache a step is short and compute-bound, and a team holding every core waits at its barriers whenever one of
    its threads is descheduled for the event loop that streams the tokens (or, on the same machine, a client):
    there all cores but one serve better (2 cores, tiny model, 1 streaming client: 1,594 tokens/s on 2 threads,
    2,171 on 1). Where they do not fit, the step streams them from memory and every core's bandwidth counts
    (d12: 98-101 tokens/s on 2 threads, 88-92 on 1). docs/benchmarks.md."""
    cores = torch.get_num_threads()
    return cores if weight_bytes > _last_level_cache_bytes() else max(1, cores - 1)


def _last_level_cache_bytes() -> int:
    """The size of the CPU's largest cache (Linux's sysfs), or 32 MiB where it cannot be read."""
    best = (0, 32 << 20)
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(d, "level")) as f, open(os.path.join(d, "size")) as g:
                level, size = int(f.read()), g.read().strip()
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            best = max(best, (level, int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)))
        except (OSError, ValueError):
            continue
    return best[1]


class Batcher:
    """Continuous batching: one thread owns the model and decodes every running request in the same step.

    A request joins at a step boundary (its prompt is prefilled into a free row of the static cache) and leaves
    when it finishes or is cancelled; the others never wait for it. Each row keeps its own sampling parameters
    and seed (the same sampling as Engine.generate, so a request's tokens do not depend on its neighbours up to
    float rounding), its own tool calls (run in a thread pool: a row waiting for a tool's output sits out the
    steps, the others go on), and its own length limit. At most `max_rows` run at once; more wait in a queue."""

    def __init__(self, engine: Engine, max_rows: int):
        self.engine, self.max_rows = engine, max_rows
        self.limit = engine.model.rope_cos.shape[0]
        self.rows: list[_Row | None] = [None] * max_rows
        self.pending: deque[Request] = deque()
        self.cv = threading.Condition()
        self.closed = False
        self.decoder: DecoderLike | None = None  # made by the thread on first use: serving nothing costs nothing
        self.thread: threading.Thread | None = None
        self.tool_pool: ThreadPoolExecutor | None = None
        self.ready = threading.Event()  # set once the thread is ready to decode (see warm_up)
        sp = engine.tok.special  # what may follow a client's call: another call, or the end of the reply
        self.after_call = torch.tensor([engine.call_start, sp["<|assistant_end|>"]])
        self.jobs: deque[tuple[Callable, Future]] = deque()  # see call()
        self.compile_error: BaseException | None = None  # why the step could not be compiled (then: eager)
        # called on the batcher's thread after each round of on_token/on_end callbacks (the tokens of one step),
        # so a consumer can be woken once for all of them rather than once per token; force=False after a step
        # (the consumer may hold them back a little longer), True when the batcher is about to sleep
        self.after_callbacks: Callable[[bool], None] | None = None

    def submit(self, req: Request) -> None:
        with self.cv:
            if self.closed:
                raise RuntimeError("the batcher is closed")
            self.pending.append(req)
            self._start()
            self.cv.notify()

    def _start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, daemon=True, name="exocortex-batcher")
            self.thread.start()

    def warm_up(self, timeout: float | None = None) -> bool:
        """Start the thread now and wait until the cache is allocated and (with engine.compile) the decode
        step is compiled for one row and for several, so the first requests do not wait for the compiler.
        If compiling fails, the batcher decodes eagerly (engine.compile turns False) and `compile_error` says
        why."""
        with self.cv:
            self._start()
        return self.ready.wait(timeout)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the batcher's thread between two steps and return a future of its result. That thread owns
        the model, so anything else that runs it (a full forward to score a prompt) goes through here rather than
        racing the decode steps from another thread."""
        fut: Future = Future()
        with self.cv:
            if self.closed:
                raise RuntimeError("the batcher is closed")
            self.jobs.append((fn, fut))
            self._start()
            self.cv.notify()
        return fut

    def cancel(self, req: Request) -> None:
        """End a request at the next step boundary (on_end(None, ...)); a no-op once it ended."""
        req.cancelled.set()
        with self.cv:
            self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(10)

    # ------------------------------------------------------------------ the batcher's thread
    @torch.inference_mode()
    def _run(self) -> None:
        self.tool_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="exocortex-tool")
        broken = None
        try:
            self.decoder = self.engine.decoder(self.max_rows, self.limit)  # the cache: max_rows x context
            if hasattr(self.decoder, "one_row_threads"):
                size = torch.tensor([], dtype=self.engine.dtype).element_size()
                self.decoder.one_row_threads = one_row_threads_beside_a_server(self.engine.model.num_params() * size)
            if self.engine.compile:
                try:
                    self._compile_steps()
                except Exception as e:  # noqa: BLE001 - a broken toolchain must not take serving down: eager
                    self.compile_error, self.engine.compile, self.decoder = e, False, None
                    self.decoder = self.engine.decoder(self.max_rows, self.limit)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: every request hears why
            broken = e
        self.ready.set()
        while True:
            if not (self.closed or self.pending or self.jobs or self._runnable()):
                self._after_callbacks()  # about to sleep: nothing the consumer holds back may wait for the next step
            with self.cv:
                self.cv.wait_for(lambda: self.closed or self.pending or self.jobs or self._runnable())
                if self.closed:
                    break
                joining = []
                while self.pending and (broken or len(joining) < self.rows.count(None)):
                    joining.append(self.pending.popleft())
                jobs, self.jobs = list(self.jobs), deque()
            self._run_jobs(jobs, broken)
            if broken is not None:
                for req in joining:
                    self._call(req.on_end, None, 0, broken)
                self._after_callbacks()
                continue
            free = [i for i, row in enumerate(self.rows) if row is None]
            for slot, req in zip(free, joining):
                self._admit(slot, req)
            for slot, row in enumerate(self.rows):
                if row is not None and row.req.cancelled.is_set():
                    self._end(slot, None)
            self._decide()
            self._after_callbacks(False)  # before the step: the consumer takes this step's tokens while it runs
            if any(row is not None and row.feed is not None for row in self.rows):
                self._step()
                self._after_callbacks(False)  # a failed step ended its rows
        for slot, row in enumerate(self.rows):
            if row is not None:
                self._end(slot, None)
        for req in self.pending:
            self._call(req.on_end, None, 0, None)
        self._run_jobs(list(self.jobs), RuntimeError("the batcher is closed"))
        self._after_callbacks()
        self.tool_pool.shutdown(wait=False)

    @staticmethod
    def _run_jobs(jobs: list, broken: BaseException | None) -> None:
        for fn, fut in jobs:
            if not fut.set_running_or_notify_cancel():
                continue  # its caller gave up
            if broken is not None:
                fut.set_exception(broken)
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - the caller hears it; the batch goes on
                fut.set_exception(e)

    def _compile_steps(self) -> None:
        """Compile (dynamic shapes) the step for one row and for several, then free the rows again."""
        self.decoder.prefill([0, 0])
        for rows in (1, min(2, self.max_rows)):
            self.decoder.step([0] * self.max_rows, [r < rows for r in range(self.max_rows)])
        for slot in range(self.max_rows):
            self.decoder.release(slot)

    def _runnable(self) -> bool:
        """Some row has work now: a token to feed, a decision to make, or a cancellation to process."""
        for row in self.rows:
            if row is None:
                continue
            if row.req.cancelled.is_set() or row.feed is not None:
                return True
            if row.logits is not None and (row.tool is None or row.tool.done()):
                return True
        return False

    def _admit(self, slot: int, req: Request) -> None:
        if req.cancelled.is_set():
            self._call(req.on_end, None, 0, None)
            return
        try:
            n = len(req.prompt)
            max_len = min(n + req.max_tokens, self.limit)
            if not req.prompt or n >= max_len:
                raise ValueError(f"prompt of {n} tokens leaves no room to generate (limit {self.limit})")
            gen = None
            if req.seed is not None:
                gen = torch.Generator(device=self.engine.device).manual_seed(req.seed)
            row = _Row(req, max_len - n, gen,
                       constraint=req.constraint.fork() if req.constraint is not None else None)
            row.logits = self.decoder.prefill(req.prompt, [slot])[0]
        except Exception as e:  # noqa: BLE001 - this request fails, the batch goes on
            self.decoder.release(slot)
            self._call(req.on_end, None, 0, e)
            return
        self.rows[slot] = row

    def _decide(self) -> None:
        """Pick the next token of every row that has fresh logits: forced tool output, else sampled."""
        waiting = [(slot, row) for slot, row in enumerate(self.rows)
                   if row is not None and row.logits is not None and row.feed is None]
        raw = {}  # logprobs are the raw model's: kept from before any mask below (masks make new tensors)
        for slot, row in waiting:
            if row.req.logprobs is not None:
                raw[slot] = row.logits
            if row.constraint is not None and row.tool is None and not row.state.forced:
                try:
                    row.logits = mask_logits(row.logits, row.constraint)
                except ConstraintError as e:  # nothing can follow: this request ends, never loops
                    self._end(slot, None, e)
                    continue
            if row.state.between_calls:
                keep = row.logits.new_full(row.logits.shape, float("-inf"))
                ids = self.after_call.to(row.logits.device)
                row.logits = keep.index_copy_(0, ids, row.logits.index_select(0, ids))
        waiting = [(slot, row) for slot, row in waiting if self.rows[slot] is row]
        greedy = [(slot, row) for slot, row in waiting if row.req.temperature <= 0 and not row.state.forced
                  and row.tool is None]
        picks = {}
        if greedy:  # one argmax (and one device->host copy) for all greedy rows
            best = ([greedy[0][1].logits.argmax().item()] if len(greedy) == 1
                    else torch.stack([row.logits for _, row in greedy]).argmax(dim=-1).tolist())
            picks = {slot: t for (slot, _), t in zip(greedy, best)}
        for slot, row in waiting:
            if row.tool is not None:
                if not row.tool.done():
                    continue  # sits out this step
                result, row.tool = row.tool.result(), None
                row.state.forced.extend(self.engine.response_tokens(result))
            forced = bool(row.state.forced)
            if forced:
                token = row.state.forced.popleft()
            elif slot in picks:
                token = picks[slot]
            else:
                r = row.req
                token = sample_next(row.logits[None], r.temperature, r.top_k, r.top_p, row.gen).item()
            if row.req.logprobs is not None:
                top, chosen = token_logprobs(raw[slot][None], [token], row.req.logprobs)
                self._call(row.req.on_logprobs, token, chosen[0], top[0])
            row.logits = None
            self._take(slot, row, token, forced)

    def _take(self, slot: int, row: _Row, token: int, forced: bool) -> None:
        eng, st = self.engine, row.state
        row.steps += 1
        if not forced:
            st.between_calls = False
        if not forced and token in eng.stop_ids:
            self._end(slot, "tool_calls" if st.client_calls else "stop")
            return
        if row.constraint is not None:
            if forced:
                row.constraint = None  # a tool's output: the constraint covered the call, the row goes on free
            else:
                try:
                    row.constraint.advance(token)
                except ConstraintError as e:
                    self._end(slot, None, e)
                    return
        try:
            go_on = row.req.on_token(token, forced)
        except Exception as e:  # noqa: BLE001 - the caller's bug ends its own request only
            self._end(slot, None, e)
            return
        if not go_on:
            self._end(slot, "stop")
            return
        run = None  # the call the engine runs now, if this token closed one
        if not forced:
            if token == eng.call_start:
                st.in_tool_call, st.call_tokens = True, []
            elif token == eng.call_end and st.in_tool_call:
                st.in_tool_call = False
                text = eng.tok.decode(st.call_tokens)
                if row.req.client_tools and client_call(text, row.req.client_tools) is not None:
                    st.client_calls += 1  # the client runs it: no output is forced, the reply ends after the calls
                    if not row.req.parallel_calls:
                        self._end(slot, "tool_calls")
                        return
                    st.between_calls = True
                elif st.client_calls:  # the client's calls come back first; this one stays unrun
                    self._end(slot, "tool_calls")
                    return
                else:
                    run = text
            elif st.in_tool_call:
                st.call_tokens.append(token)
        if row.steps >= row.max_steps:
            self._end(slot, "tool_calls" if st.between_calls else "length")
            return
        row.feed = token
        if run is not None:
            if not st.context:
                st.context = eng.last_user_text(row.req.prompt)
            tools = eng.tools if row.req.tools is None else row.req.tools
            row.tool = self.tool_pool.submit(run_tool_call, run, tools, st.context)
            row.tool.add_done_callback(lambda _: self._wake())

    def _wake(self) -> None:
        with self.cv:
            self.cv.notify()

    def _step(self) -> None:
        feed = [row.feed if row is not None and row.feed is not None else 0 for row in self.rows]
        advance = [row is not None and row.feed is not None for row in self.rows]
        try:
            logits = self.decoder.step(feed, advance)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: every running request hears it
            for slot, row in enumerate(self.rows):
                if row is not None:
                    self._end(slot, None, e)
            return
        for slot, row in enumerate(self.rows):
            if advance[slot]:
                row.feed, row.logits = None, logits[slot]

    def _end(self, slot: int, finish: str | None, error: BaseException | None = None) -> None:
        row, self.rows[slot] = self.rows[slot], None
        self.decoder.release(slot)
        if row.tool is not None:
            row.tool.cancel()
        self._call(row.req.on_end, finish, row.steps, error)

    def _after_callbacks(self, force: bool = True) -> None:
        if self.after_callbacks is not None:
            self._call(self.after_callbacks, force)

    @staticmethod
    def _call(fn, *args) -> None:
        """Run a request's on_end (or on_logprobs); a failing callback must not take the batch down with it."""
        with contextlib.suppress(Exception):
            fn(*args)


def token_logprobs(logits: torch.Tensor, tokens: list[int],
                   k: int) -> tuple[list[list[tuple[int, float]]], list[float]]:
    """logits (T, V) and the token taken after each position -> the k most likely tokens at each position
    [(id, logprob)] best first, and each taken token's logprob. float32 log-softmax of the raw logits: the model's
    own distribution, whatever sampling then did with it."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    if k <= 0:
        return [[] for _ in tokens], chosen
    vals, ids = logp.topk(min(k, logp.size(-1)), dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())], chosen


class StreamDecoder:
    """Turns tokens into text incrementally without splitting multi-byte UTF-8 characters."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.dec.decode(self.tok.decode_bytes([token]))


# new tokens below which "auto" decodes eagerly: ~1 min of eager batched decoding, about what building the compiled
# steps costs the first time for a model shape (later processes load them in seconds)
COMPILE_PAYS_TOKENS = 100_000


def decode_compile(setting: str, device: torch.device, new_tokens: int) -> tuple[bool, str | None]:
    """Whether a batch job (eval's replies, RL's rollouts) that samples up to `new_tokens` tokens should use the
    compiled decode step, and a line to show when "on" cannot be honoured. "on": wherever it can run
    (decode.compile_status); "off": never; "auto": on a CPU where it can run and the job is big enough to
    repay the first build. The tiny model on 2 CPU cores, batches of 32 (`python bench/eval_decode.py`):
    eager ~1,600 tokens/s, compiled ~4,200. Not auto on CUDA, where eager decoding of a batch is already fast
    and the compiled step replays CUDA graphs, whose handling of the weights RL rebuilds after every update
    has not been measured."""
    if setting == "off":
        return False, None
    ok, why = compile_status(device)
    if not ok:
        return False, f"decoding eagerly: {why}" if setting == "on" else None
    return setting == "on" or (device.type == "cpu" and new_tokens >= COMPILE_PAYS_TOKENS), None


def load_engine(cfg: RunConfig, stage: str | None = None, docs: list[str] | None = None,
                compile: bool = False, index: str | None = None, extra_tools: dict | None = None) -> Engine:
    """A run's chat model (its `stage` checkpoint, default the newest chat stage) with its tools: calculator,
    python, and lookup (over `docs`, the document `index`, or the generated world: lookup.tools_for_run). `compile`: the compiled decode step where it can
    run here (decode.compile_status says why not; the caller tells the user)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.sft.dtype, device)
    tools = {**tools_for_run(cfg, docs, index), **(extra_tools or {})}  # before the model: a bad --index fails fast
    model, _ = load_model(cfg.run.chat_checkpoint(stage), device)
    return Engine(model, Tokenizer.load(cfg.run.tokenizer_dir), device, dtype, tools=tools,
                  compile=compile and compile_status(device)[0])
