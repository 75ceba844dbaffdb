"""App `serve`: an OpenAI-compatible HTTP API and a web chat page for a run's chat model.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, and the chat page at /
(plain HTML/CSS/JS from exocortex/apps/static, nothing fetched from the internet). See docs/serve.md.

Continuous batching: one thread (engine.Batcher) owns the model and decodes all running requests in the same
step; a request joins the batch between two steps and leaves when it ends, with its own sampling, stop
sequences and tool calls. Its tokens are rendered on that thread and passed to the event loop through a queue;
the loop never runs the model. At most `max_concurrent` requests are in the batch and at most `max_queue` wait
for a place; past that a request gets 429. A client that disconnects (streaming or not) cancels its request,
whose row leaves the batch at the next step.

Scoring (logprobs, echo with the prompt's logprobs, n, best_of, lists of prompts; what lm-evaluation-harness's
loglikelihood tasks use) is in exocortex/apps/scoring.py: a choice is one row of the batch, and a prompt is scored
by a forward pass on the batcher's thread.

Tool calls are run by the engine. They appear in the text as the engine renders them
(`[tool call: {"name": "calculator", "arguments": {"expression": "347 * 29"}}] [tool output: 10063] `) and, structured, in a non-standard `parts` list
(`part` per streamed delta) that assistant messages may send back as their `content`.

Function calling (exocortex/apps/tool_calls.py): a client's `tools` are offered to the model; its calls to them
come back as OpenAI `tool_calls` (finish_reason "tool_calls") instead of being run, `role: "tool"` messages
answer them, and `tool_choice` is honoured by masking tokens. The built-ins above keep running here.

`response_format` json_object / json_schema (both endpoints) is honoured by constrained decoding
(exocortex/infer/constrain.py): each token of the reply is masked to what the schema allows, so such a reply is
JSON only (no tool calls); a format this server cannot honour is a 400, never ignored.

Escalation (`--escalate-to URL`, exocortex/apps/escalate.py): a chat request the model is unsure of is answered
by a stronger model behind another OpenAI-compatible endpoint; the reply says who answered.
"""
from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import re
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Optional, Union

from exocortex.apps import scoring, tool_calls
from exocortex.apps.escalate import API_KEY_ENV, Escalation, EscalationFailed, load_calibration
from exocortex.apps.guard import APIError, Guard, Limits, missing_extra, serve_limits, server_options
from exocortex.config import RunConfig, SamplingConfig, load_config
from exocortex.device import bound_memory
from exocortex.errors import ExocortexError
from exocortex.infer.constrain import (Constraint, ConstraintError, ConstraintUnavailable, json_object_constraint,
                                       json_schema_constraint)
from exocortex.infer.confidence import TOP_K, ConfidenceMeter, reply_hidden
from exocortex.infer.decode import compile_status, warm_up_note
from exocortex.infer.docstore import citation
from exocortex.infer.notes import LOCAL_USER, NoteStore, default_notes_path
from exocortex.infer.engine import Batcher, load_engine, unwrap
from exocortex.infer.engine import Request as GenRequest
from exocortex.infer.sandbox import python_tool_status
from exocortex.infer.tools import ToolError

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:
    raise missing_extra(e) from e

STATIC_DIR = Path(__file__).parent / "static"

MAX_STOP_SEQUENCES = 4
INT64 = 2 ** 63


# ----------------------------------------------------------------------------- errors

_LOC_NOISE = {"body", "query", "path", "header", "cookie", "str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple | list) -> str | None:
    """Pydantic's error location as OpenAI writes a param: messages[0].role (union branch tags dropped)."""
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif isinstance(item, str) and item.isidentifier() and item not in _LOC_NOISE:
            out += f".{item}" if out else item
    return out or None


def _validation_error(errors: list[dict]) -> APIError:
    """The first of pydantic's errors (the one a client fixes first) as a 400."""
    err = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    param = _param(err.get("loc", ()))
    kind, msg = err.get("type", ""), str(err.get("msg", "invalid value"))
    if kind in ("json_invalid", "json_type"):
        return APIError(400, f"We could not parse the JSON body of your request: {msg}", param=None,
                        code="invalid_json")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    where = f"'{param}'" if param else "the request body"
    return APIError(400, f"Invalid value for {where}: {msg}.", param=param, code="invalid_value")


# ----------------------------------------------------------------------------- request bodies

class _Strict(BaseModel):
    # strict: "0.5" is not a number and true is not an integer, as in OpenAI's API; unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    """OpenAI's text content part; assistant messages may also use exocortex's tool_call / tool_output parts."""
    type: Literal["text", "tool_call", "tool_output"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON, in a string (as OpenAI's API carries it)


class ToolCall(_Strict):
    """A call an assistant message made (function calling: exocortex/apps/tool_calls.py)."""
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    tool_calls: Optional[list[ToolCall]] = None  # assistant messages
    tool_call_id: Optional[str] = None  # tool messages: the call they answer

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, (str, list)):
            raise ValueError("content must be a string or a list of content parts")
        return v


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)  # not OpenAI's; 0 turns it off
    seed: Optional[int] = Field(None, ge=-INT64, lt=INT64)
    stop: Union[str, list[str], None] = None
    n: Optional[int] = Field(None, ge=1, le=scoring.MAX_N)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    response_format: Optional[Any] = None  # checked by _response_constraint, which words its own 400s

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) > MAX_STOP_SEQUENCES:
                raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
            if any(isinstance(s, str) and not s for s in v):
                raise ValueError("stop sequences must not be empty")
        elif v == "":
            raise ValueError("a stop sequence must not be empty")
        return v


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=scoring.MAX_TOP_LOGPROBS)
    # function calling: checked by tool_calls.plan, which words its own 400s
    tools: Optional[Any] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    builtin_tools: Optional[bool] = None  # exocortex's: false turns the server-side tools off for this request
    # exocortex's, with --escalate-to: "auto" (by the model's confidence), "never" (this model answers), "always"
    escalation: Optional[Literal["auto", "never", "always"]] = None
    functions: Optional[Any] = None  # OpenAI's deprecated names for tools / tool_choice: refused, not ignored
    function_call: Optional[Any] = None

    def tool_plan(self) -> tool_calls.ToolPlan:
        return tool_calls.plan(self.tools, self.tool_choice, self.parallel_tool_calls, self.builtin_tools,
                               {"functions": self.functions, "function_call": self.function_call})


class CompletionRequest(_Sampling):
    prompt: Any  # its shapes are checked by scoring.prompt_list, whose errors name the bad element
    max_tokens: Optional[int] = Field(None, ge=0)  # 0 with echo: only score the prompt
    echo: Optional[bool] = False
    logprobs: Optional[int] = Field(None, ge=0, le=scoring.MAX_LEGACY_LOGPROBS)
    best_of: Optional[int] = Field(None, ge=1, le=scoring.MAX_N)
    suffix: Optional[str] = None


# ----------------------------------------------------------------------------- structured output

RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _response_constraint(tok, rf: Any) -> Constraint | None:
    """response_format -> the constraint every token of the reply must satisfy (None for plain text).
    Anything this server cannot honour is a 400 naming response_format: never a reply that ignores it."""
    def bad(msg: str, code: str = "invalid_value") -> APIError:
        return APIError(400, msg, param="response_format", code=code)

    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise bad("response_format must be an object such as {\"type\": \"json_object\"}.")
    kind = rf.get("type")
    if kind not in RESPONSE_FORMATS:
        raise bad(f"Unsupported response_format type {kind!r}: this server supports "
                  f"{', '.join(repr(k) for k in RESPONSE_FORMATS)}.", "unsupported_value")
    if kind == "text":
        return None
    try:
        if kind == "json_object":
            return json_object_constraint(tok)
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise bad("response_format json_schema needs a 'json_schema' object with 'name' and 'schema'.")
        name = spec.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise bad("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'.")
        if spec.get("strict") not in (None, True, False):
            raise bad("response_format.json_schema.strict must be a boolean.")
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema must be a JSON schema object.")
        # strict or not, the schema is enforced: constrained decoding costs nothing extra
        return json_schema_constraint(tok, schema, f"JSON schema '{name}'")
    except ConstraintUnavailable as e:
        raise bad(str(e), "unsupported_value") from None
    except ConstraintError as e:
        raise bad(f"{e}.") from None


# ----------------------------------------------------------------------------- rendering

class _Renderer:
    """Engine tokens -> deltas {"content": str, "part": {"index", "type", "text"} | None}.

    `content` is the text as `Engine.render` shows it (tool calls and outputs in brackets, no final strip, so it
    streams); `part` is the structured view: parts are numbered in order and have type text / tool_call /
    tool_output, like `Engine.to_parts`. Each text part gets its own UTF-8 decoder, flushed at its end; a tool
    call's or output's text comes whole at its end marker, without the newlines that frame it in the format."""

    def __init__(self, engine):
        self.tok = engine.tok
        self.kind_of = {engine.call_start: "tool_call", engine.out_start: "tool_output"}
        self.ends = {engine.call_end, engine.out_end}
        self.markers = {engine.call_start: "[tool call: ", engine.call_end: "]",
                        engine.out_start: " [tool output: ", engine.out_end: "] "}
        self.index, self.kind, self.open = -1, "text", False
        self.held = b""  # the bytes of the tool call or output being written
        self.dec = self._decoder()

    @staticmethod
    def _decoder():
        return codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _text(self, s: str) -> list[dict]:
        if not s:
            return []
        if not self.open:  # a text part begins with its first character
            self.index, self.open = self.index + 1, True
        return [{"content": s, "part": {"index": self.index, "type": self.kind, "text": s}}]

    def _flush(self) -> list[dict]:
        if self.kind != "text":
            held, self.held = self.held, b""
            return self._text(unwrap(held.decode("utf-8", errors="replace")))
        out = self._text(self.dec.decode(b"", final=True))
        self.dec = self._decoder()
        return out

    def push(self, token: int) -> list[dict]:
        if token in self.kind_of:
            out = self._flush()
            self.index, self.kind, self.open = self.index + 1, self.kind_of[token], True
            start = {"index": self.index, "type": self.kind, "text": ""}
            return out + [{"content": self.markers[token], "part": start}]
        if token in self.ends:
            out = self._flush()
            self.kind, self.open = "text", False
            return out + [{"content": self.markers[token], "part": None}]
        if self.tok.is_special(token):
            return []  # other special tokens are not shown (as in Engine.render)
        if self.kind != "text":
            self.held += self.tok.decode_bytes([token])
            return []
        return self._text(self.dec.decode(self.tok.decode_bytes([token])))

    def finish(self) -> list[dict]:
        return self._flush()


class _StopFilter:
    """Applies stop sequences to the model's text parts (not to tool calls or outputs): text that may be the
    start of a stop sequence is held back until it is known not to be one; a match ends the reply before it."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held: tuple[int, str] | None = None  # (part index, text) of held-back text
        self.stopped = False

    def _release(self) -> list[dict]:
        if not self.held or not self.held[1]:
            self.held = None
            return []
        i, s = self.held
        self.held = None
        return [{"content": s, "part": {"index": i, "type": "text", "text": s}}]

    def feed(self, deltas: list[dict]) -> list[dict]:
        if not self.stops:
            return deltas
        out: list[dict] = []
        for d in deltas:
            if self.stopped:
                break
            part = d["part"]
            if part is None or part["type"] != "text":
                out += self._release() + [d]
                continue
            i = part["index"]
            buf = (self.held[1] if self.held else "") + part["text"]
            hits = [p for p in (buf.find(s) for s in self.stops) if p >= 0]
            if hits:
                self.held, self.stopped = (i, buf[:min(hits)]), True
                out += self._release()
                break
            keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                        if buf.endswith(s[:k])), default=0)
            self.held = (i, buf[len(buf) - keep:]) if keep else None
            if len(buf) > keep:
                s = buf[:len(buf) - keep]
                out.append({"content": s, "part": {"index": i, "type": "text", "text": s}})
        return out

    def finish(self, deltas: list[dict]) -> list[dict]:
        return self.feed(deltas) + ([] if self.stopped else self._release())


def _assemble(deltas: list[dict]) -> tuple[str, list[dict]]:
    """The full text and parts of a reply from its deltas (what a client assembling the stream gets)."""
    content, parts = [], []
    for d in deltas:
        content.append(d["content"])
        p = d["part"]
        if p is not None:
            if p["index"] == len(parts):
                parts.append({"type": p["type"], "text": ""})
            parts[p["index"]]["text"] += p["text"]
    return "".join(content), parts


# ----------------------------------------------------------------------------- admission and generation

class _Limiter:
    """At most max_concurrent generations running and max_queue requests waiting (event-loop side only)."""

    def __init__(self, max_concurrent: int, max_queue: int):
        if max_concurrent < 1 or max_queue < 0:
            raise ExocortexError(f"need max_concurrent >= 1 and max_queue >= 0 (got {max_concurrent}, {max_queue})")
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.active = self.waiting = 0
        self._sem: asyncio.Semaphore | None = None

    def reserve(self) -> "_Ticket | None":
        if self.active + self.waiting >= self.max_concurrent + self.max_queue:
            return None
        self.waiting += 1
        return _Ticket(self)


class _Ticket:
    """A request's place: queued -> running (holds a slot) -> done. release() is idempotent."""

    def __init__(self, limiter: _Limiter):
        self.limiter, self.state = limiter, "queued"

    async def acquire(self) -> bool:
        """Wait for a slot; False if the place was given up (release()) while waiting."""
        lim = self.limiter
        if lim._sem is None:
            lim._sem = asyncio.Semaphore(lim.max_concurrent)
        try:
            await lim._sem.acquire()
        except BaseException:
            self.release()
            raise
        if self.state != "queued":
            lim._sem.release()
            return False
        lim.waiting -= 1
        lim.active += 1
        self.state = "running"
        return True

    def release(self) -> None:
        lim = self.limiter
        if self.state == "queued":
            lim.waiting -= 1
        elif self.state == "running":
            lim.active -= 1
            lim._sem.release()
        self.state = "done"


class _Generation:
    """One choice's generation: waits for a slot, then runs as a row of the shared batch; sends
    ("deltas", [...]), then ("done", finish_reason, completion_tokens) or ("error", exception).
    With `logprobs` (k alternatives) each token's scores ride on the deltas (scoring.ScoreTracker)."""

    def __init__(self, engine, ticket: _Ticket, prompt: list[int], sampling: dict, stops: list[str],
                 batcher: Batcher, outbox: "_Outbox", constraint: Constraint | None = None,
                 tools: tool_calls.ToolPlan | None = None, logprobs: int | None = None,
                 with_stop_token: bool = False, meter: ConfidenceMeter | None = None):
        self.engine, self.ticket, self.prompt, self.sampling, self.stops = engine, ticket, prompt, sampling, stops
        self.batcher, self.outbox, self.request, self.constraint = batcher, outbox, None, constraint
        self.tools = tools
        self.logprobs = logprobs
        self.scores = scoring.ScoreTracker(with_stop_token) if logprobs is not None else None
        self.meter = meter  # escalation: how sure the model is of this reply (infer/confidence.py)
        self.cancelled = threading.Event()
        self.started = False

    def close(self) -> None:
        """Stop the generation after its current step (or give up the place in the queue). Idempotent."""
        self.cancelled.set()
        if self.request is not None:
            self.batcher.cancel(self.request)
        if not self.started:
            self.ticket.release()

    async def events(self) -> AsyncIterator[tuple]:
        try:
            if not await self.ticket.acquire() or self.cancelled.is_set():
                return  # close() (in finally) gives the slot back
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            self.started = True  # from here the batcher owns the slot and releases it at the end
            self._join_batch(loop, queue)
            held = None
            while True:
                item, held = (held, None) if held else (await queue.get(), None)
                # deltas already waiting (the loop fell behind a busy batch) go out together: one write, not many
                while item[0] == "deltas" and not queue.empty():
                    nxt = queue.get_nowait()
                    if nxt[0] != "deltas":
                        held = nxt
                        break
                    item = ("deltas", item[1] + nxt[1])
                yield item
                if item[0] != "deltas":
                    return
        finally:
            self.close()

    def _join_batch(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        """Submit this request to the shared batch; its callbacks render and send on the batcher's thread."""
        outbox = self.outbox

        first = [True]

        def send(item, urgent: bool = False) -> None:
            outbox.call(loop, queue.put_nowait, item, urgent=urgent or first[0])
            first[0] = False

        renderer, stopper, scores = _Renderer(self.engine), _StopFilter(self.stops), self.scores
        plan = self.tools or tool_calls.ToolPlan()
        if plan.names:  # calls to the client's tools come out as tool_calls deltas (before stops and scores see them)
            renderer = tool_calls.ClientCalls(renderer, self.engine, plan.names)

        def on_token(token: int, forced: bool) -> bool:
            rendered = renderer.push(token)
            deltas = stopper.feed(rendered)
            if scores is not None:
                deltas = scores.push(token, rendered, deltas)
            if deltas:
                send(("deltas", deltas))
            return not stopper.stopped  # a stop sequence matched: the row leaves the batch

        def on_end(finish: str | None, steps: int, error: BaseException | None) -> None:
            final = ("error", error) if error is not None else ("done", finish, steps)
            try:
                if error is None and finish is not None:
                    deltas = stopper.finish(renderer.finish())
                    if scores is not None:
                        deltas = scores.finish(deltas, finish, stopper.stopped)
                    if deltas:
                        send(("deltas", deltas))
            except Exception as e:  # noqa: BLE001 - reported to the client as a server error
                final = ("error", e)
            # the slot is free before the client hears the end, so its next request finds it free (the outbox
            # keeps the order)
            outbox.call(loop, self.ticket.release)
            send(final, urgent=True)

        self.request = GenRequest(self.prompt, on_token=on_token, on_end=on_end, cancelled=self.cancelled,
                                  constraint=self.constraint, tools=plan.engine_tools,
                                  client_tools=plan.names, parallel_calls=plan.parallel, **self.sampling)
        if scores is not None:
            self.request.logprobs, self.request.on_logprobs = self.logprobs, scores.scored
        if self.meter is not None:  # it needs TOP_K alternatives per token; the client gets the k it asked for
            k, meter = self.logprobs, self.meter

            def scored(token, logprob, top):
                meter.push(token, logprob, top)
                if scores is not None:
                    scores.scored(token, logprob, top[:k])
            self.request.logprobs, self.request.on_logprobs = max(TOP_K, k or 0), scored
        self.batcher.submit(self.request)


class _Outbox:
    """Calls from the batcher's thread to run on the event loop, in order, delivered together. The batcher offers
    a flush after every step (Batcher.after_callbacks); the loop is woken (call_soon_threadsafe: a write to its
    self-pipe, then a turn of the loop) at most once per `interval` seconds for tokens, at once for what a
    client waits on (a first token, the end of a reply) and whenever the batcher is about to sleep. A wake-up per
    step hands the GIL to the loop thread and back every token (the compiled step holds it while it runs), which
    cost a lone client about a third of its tokens/s; a few milliseconds of batching is invisible to a reader."""

    def __init__(self, interval: float = 0.005):
        self.lock = threading.Lock()
        self.calls: list[tuple] = []  # (loop, fn, args)
        self.interval, self.urgent, self.last = interval, False, 0.0

    def call(self, loop: asyncio.AbstractEventLoop, fn, *args, urgent: bool = False) -> None:
        with self.lock:
            self.calls.append((loop, fn, args))
            self.urgent = self.urgent or urgent

    def flush(self, force: bool = True) -> None:
        now = time.monotonic()
        with self.lock:
            if not self.calls or not (force or self.urgent or now - self.last >= self.interval):
                return
            calls, self.calls, self.urgent, self.last = self.calls, [], False, now
        by_loop: dict = {}
        for loop, fn, args in calls:
            by_loop.setdefault(loop, []).append((fn, args))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is gone (server shutting down)
                loop.call_soon_threadsafe(_run_calls, batch)


def _run_calls(batch: list[tuple]) -> None:
    for fn, args in batch:
        fn(*args)


class _EventStream(StreamingResponse):
    """An SSE response that always cleans up: cancels the generation when the client goes away, even when the
    body was never started."""

    def __init__(self, body: AsyncIterator[str], on_close, headers: dict | None = None):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()


class _Replay:
    """A generation that already ended (held back while escalation decided): its events again, for a stream."""

    def __init__(self, deltas: list[dict], finish: str | None, steps: int):
        self.items = [("deltas", deltas)] if deltas else []
        self.items.append(("done", finish, steps))

    async def events(self) -> AsyncIterator[tuple]:
        for item in self.items:
            yield item

    def close(self) -> None:
        pass


class _Nothing:
    """A choice with nothing to generate (max_tokens 0: an echo that only returns the prompt and its scores)."""

    async def events(self) -> AsyncIterator[tuple]:
        yield ("done", "length", 0)

    def close(self) -> None:
        pass


async def _merged(gens: list) -> AsyncIterator[tuple[int, tuple]]:
    """(choice index, event) from several generations as their events come; one is read directly (no extra hop
    for the common single-choice stream)."""
    if len(gens) == 1:
        async for item in gens[0].events():
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, gen):
        async for item in gen.events():
            await queue.put((i, item))
        await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        live = len(gens)
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _close_all(gens: list) -> None:
    for gen in gens:
        gen.close()


def _seeded(sampling: dict, j: int) -> dict:
    """Choice j's sampling: seed + j, so n choices with one seed differ from each other yet repeat exactly."""
    return sampling if sampling["seed"] is None or j == 0 else {**sampling, "seed": sampling["seed"] + j}


def _sse(obj: Any) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def _server_error(e: Exception) -> APIError:
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")


# ----------------------------------------------------------------------------- the app

class _Service:
    def __init__(self, engine, model_name: str, max_concurrent: int, max_queue: int, max_prompt_tokens: int | None,
                 sampling: SamplingConfig):
        self.engine, self.model_name = engine, model_name
        self.limiter = _Limiter(max_concurrent, max_queue)
        # one batch of up to max_concurrent rows shares every decode step (see exocortex/infer/engine.py: Batcher)
        self.batcher = Batcher(engine, max_concurrent)
        self.outbox = _Outbox()  # the batcher's callbacks reach the event loop through it, once per step
        self.batcher.after_callbacks = self.outbox.flush
        self.context = self.batcher.limit  # the rotary table
        cap = self.context - 1  # the prompt must leave room for at least one token
        self.max_prompt_tokens = min(cap, max_prompt_tokens) if max_prompt_tokens else cap
        self.defaults = sampling  # for what a request leaves out: the same as `exocortex chat`
        self.created = int(time.time())
        self.notes: NoteStore | None = None
        self.escalation: Escalation | None = None

    @staticmethod
    def user_key(user: str | None) -> str:
        """Whose notes a request reads and writes: its `user` field (as OpenAI's: the id of the end user, set by
        the holder of the API key), else "local", the same owner `exocortex chat` runs as by default."""
        if user is None:
            return LOCAL_USER
        if not 0 < len(user) <= 256 or not user.isprintable():
            raise APIError(400, "user must be 1 to 256 printable characters.", param="user", code="invalid_value")
        return user

    # ---------------------------------------------------------------- request -> prompt and sampling
    async def parse(self, request: Request, model_cls):
        body = await request.body()  # at most Limits.max_body_bytes: the guard stops reading past it

        def no_constants(c):
            raise ValueError(f"{c} is not valid JSON")
        try:
            # JSON is UTF-8 (RFC 8259); json.loads(bytes) would also let encoded surrogates through
            data = json.loads(body.decode("utf-8"), parse_constant=no_constants)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json")
        except RecursionError:  # [[[[...]]]] deeper than the interpreter's stack
            raise APIError(400, "The JSON body of your request is nested too deeply.", code="invalid_json")
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e.errors(include_url=False))

    def chat_prompt(self, req: ChatCompletionRequest, tools: list[dict] | None = None) -> list[int]:
        """The prompt for a chat request; `tools` (the client's function specs) go into the system turn."""
        msgs = []
        for i, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role
            if role == "system" and i != 0:
                raise APIError(400, "A system message may only come first.", param=f"messages[{i}].role",
                               code="invalid_value")
            content = m.content
            if content is None and role != "assistant":  # as OpenAI: only an assistant turn may omit content
                raise APIError(400, f"messages[{i}].content is required for a {role} message.",
                               param=f"messages[{i}].content", code="invalid_value")
            if content is None:
                content = ""
            elif isinstance(content, list):
                if role != "assistant" and any(p.type != "text" for p in content):
                    raise APIError(400, "tool_call and tool_output parts are only allowed in assistant messages.",
                                   param=f"messages[{i}].content", code="invalid_value")
                content = ("".join(p.text for p in content) if role != "assistant"
                           else [{"type": p.type, "text": p.text} for p in content])
            msgs.append({"role": role, "content": content})
            if m.tool_calls is not None and role != "assistant":
                raise APIError(400, "Only assistant messages may have tool_calls.", param=f"messages[{i}].tool_calls",
                               code="invalid_value")
            if m.tool_calls:
                msgs[-1]["tool_calls"] = tool_calls.assistant_calls(i, m.tool_calls)
            if role == "tool":
                if m.tool_call_id is None:
                    raise APIError(400, f"messages[{i}].tool_call_id is required for a tool message.",
                                   param=f"messages[{i}].tool_call_id", code="missing_required_parameter")
                msgs[-1]["tool_call_id"] = m.tool_call_id
        msgs = tool_calls.order_tool_messages(msgs)
        if msgs[-1]["role"] == "assistant":
            raise APIError(400, "The last message must not be the assistant's: there is nothing to reply to "
                           "(continuing a reply is not supported).", param="messages", code="invalid_value")
        try:
            return self.engine.tok.render_for_completion(msgs, tools=tools or None)
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value")

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        tok = self.engine.tok
        return scoring.prompt_list(req.prompt, tok.vocab_size, lambda text: tok.encode(text, bos=True))

    def check_common(self, req: _Sampling, prompt: list[int], max_tokens: int | None, what: str) -> dict:
        if len(prompt) > self.max_prompt_tokens:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens and prompts may have "
                           f"at most {self.max_prompt_tokens}; yours has {len(prompt)}.", param=what,
                           code="context_length_exceeded")
        room = self.context - len(prompt)
        d = self.defaults
        return dict(max_tokens=min(d.max_tokens if max_tokens is None else max_tokens, room),
                    temperature=d.temperature if req.temperature is None else req.temperature,
                    top_p=d.top_p if req.top_p is None else req.top_p,
                    top_k=(d.top_k if req.top_k is None else req.top_k) or None,
                    seed=req.seed)

    async def constraint(self, req: _Sampling, tools: tool_calls.ToolPlan | None = None) -> Constraint | None:
        """The request's response_format (and tool_choice) as a constraint; compiled off the event loop (a large
        schema can take a while, and other requests' streams must not wait for it). One constraint serves every
        choice: the batcher gives each row its own copy when it joins."""
        if req.response_format is None and (tools is None or tools.choice == "auto"):
            return None

        def build():
            fmt = _response_constraint(self.engine.tok, req.response_format)
            return fmt if tools is None else tool_calls.with_format(self.engine.tok, fmt, tools)
        return await asyncio.to_thread(build)

    @property
    def capacity(self) -> int:
        """Generations the server holds at once, running or queued: no request may need more."""
        return self.limiter.max_concurrent + self.limiter.max_queue

    def reserve(self, k: int) -> list[_Ticket]:
        """Places for k generations, all or none (429): a request's choices never wait on each other's admission."""
        lim = self.limiter
        if lim.active + lim.waiting + k > self.capacity:
            raise APIError(429, f"The server is busy: {lim.active} generations running and {lim.waiting} waiting "
                           f"(limits {lim.max_concurrent} and {lim.max_queue}). Try again shortly.",
                           type="rate_limit_error", code="server_busy", headers={"Retry-After": "1"})
        return [lim.reserve() for _ in range(k)]

    def start(self, choices: list[tuple[list[int], dict]], stop, logprobs: int | None = None,
              with_stop_token: bool = False, constraint: Constraint | None = None,
              tools: tool_calls.ToolPlan | None = None, meter: ConfidenceMeter | None = None) -> list[_Generation]:
        """One generation per (prompt, sampling), in the order given (the choices' order); each gets the request's
        constraint and tools (and the first, `meter`)."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return [_Generation(self.engine, ticket, prompt, sampling, stops, self.batcher, self.outbox, constraint, tools,
                            logprobs, with_stop_token, meter if i == 0 else None)
                for i, (ticket, (prompt, sampling)) in enumerate(zip(self.reserve(len(choices)), choices))]

    async def score_prompts(self, prompts: list[list[int]], k: int) -> list[list[scoring.TokenScore]]:
        """Each prompt's token scores (echo), computed on the batcher's thread between two decode steps."""
        futures = [self.batcher.call(partial(scoring.score_prompt, self.engine, p, k)) for p in prompts]
        try:
            return [await asyncio.wrap_future(f) for f in futures]
        except Exception as e:  # noqa: BLE001 - the model failed: a server error, as a generation's
            raise _server_error(e)
        finally:
            for f in futures:
                f.cancel()

    def render_prompt(self, prompt: list[int]) -> tuple[str, list[int]]:
        """A prompt's text as a reply would show it (echo), and where each token's text begins in it."""
        renderer, text, offsets, n = _Renderer(self.engine), [], [], 0
        for t in prompt:
            offsets.append(n)
            for d in renderer.push(t):
                text.append(d["content"])
                n += len(d["content"])
        text += [d["content"] for d in renderer.finish()]
        return "".join(text), offsets

    # ---------------------------------------------------------------- responses
    async def collect(self, request: Request, gens: list) -> list[tuple[list[dict], str | None, int]]:
        """Run generations to the end for a non-streaming reply: (deltas, finish, steps) each; a client
        disconnect cancels them all."""
        results: list[dict] = [{"deltas": []} for _ in gens]

        async def consume(gen, result):
            async for item in gen.events():
                if item[0] == "deltas":
                    result["deltas"].extend(item[1])
                elif item[0] == "done":
                    result["done"] = item[1:]
                else:
                    result["error"] = item[1]

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work = asyncio.ensure_future(asyncio.gather(*(consume(g, r) for g, r in zip(gens, results))))
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
            for gen in gens:
                gen.close()
            with contextlib.suppress(BaseException):
                await work
        for r in results:
            if "error" in r:
                raise _server_error(r["error"])
        if any("done" not in r for r in results):
            raise APIError(499, "client closed the request", code="client_closed")
        return [(r["deltas"], *r["done"]) for r in results]

    def usage(self, prompt_tokens: int, steps: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": steps, "total_tokens": prompt_tokens + steps}

    async def stream(self, gens: list, prompt_tokens: int, chunk, include_usage: bool) -> AsyncIterator[str]:
        """SSE body for one or more choices. chunk(kind, value, index) makes each event's object for choice
        `index`, kind being "start" (value None), "delta" (a rendered delta), "finish" (the finish reason) or
        "usage" (the usage object; index None). Choices' chunks interleave as their tokens come."""
        for i in range(len(gens)):
            yield _sse(chunk("start", None, i))
        steps, events = 0, _merged(gens)
        try:
            async for i, item in events:
                if item[0] == "deltas":
                    yield "".join(_sse(chunk("delta", d, i)) for d in item[1])
                elif item[0] == "error":
                    yield _sse(_server_error(item[1]).body())
                    break
                else:
                    finish, n = item[1], item[2]
                    if finish is None:
                        return
                    steps += n
                    yield _sse(chunk("finish", finish, i))
            else:
                if include_usage:
                    yield _sse(chunk("usage", self.usage(prompt_tokens, steps), None))
            yield _sse("[DONE]")
        finally:
            await events.aclose()
            _close_all(gens)

    async def chat(self, request: Request) -> Response:
        req = await self.parse(request, ChatCompletionRequest)
        tools = req.tool_plan()
        if self.notes is not None and tools.builtin:  # the memory tools, bound to this request's user
            tools.own = {**self.engine.tools, **self.notes.tools(self.user_key(req.user), "api")}
        prompt = self.chat_prompt(req, tools.specs)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        top = scoring.chat_top_logprobs(req.logprobs, req.top_logprobs)
        n, _ = scoring.choice_counts(req.n, None, bool(req.stream), 1, self.capacity)
        sampling = self.check_common(req, prompt, max_tokens, "messages")
        constraint = await self.constraint(req, tools)
        escalating = self.escalating(req, n)
        info = None
        if escalating and req.escalation == "always":  # no local reply to weigh: straight on (or, failing, here)
            escalated, info = await self.escalate(request, req, None, prompt)
            if escalated is not None:
                return escalated
            escalating = False
        meter = ConfidenceMeter(self.engine) if escalating else None
        gens = self.start([(prompt, _seeded(sampling, j)) for j in range(n)], req.stop, top,
                          constraint=constraint, tools=tools, meter=meter)
        results = None
        if escalating:  # the reply is held back until it ends: then it goes out, or the request goes on
            results = await self.collect(request, gens)
            escalated, info = await self.escalate(request, req, meter, prompt)
            if escalated is not None:
                return escalated
        headers = {}
        if info is not None:
            headers = {"X-Exocortex-Answered-By": self.model_name, "X-Exocortex-Escalated": "false"}
            if info["p_correct"] is not None:
                headers["X-Exocortex-P-Correct"] = f"{info['p_correct']:.4f}"
        tok = self.engine.tok
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": self.model_name, "system_fingerprint": None}
        if not req.stream:
            choices, steps = [], 0
            for i, (deltas, finish, used) in enumerate(results or await self.collect(request, gens)):
                content, parts = _assemble(deltas)
                message = {"role": "assistant", "content": content, "refusal": None, "parts": parts}
                cited = [c for p in parts if p["type"] == "tool_output" and (c := citation(p["text"]))]
                if cited:  # the document passages the reply read (lookup over `exocortex index`): file and lines
                    message["citations"] = cited
                calls = tool_calls.tool_calls_of(deltas)
                if calls:  # OpenAI's shape: the text before the calls, or null
                    message.update(content=content or None, tool_calls=calls)
                logprobs = scoring.chat_logprobs(tok, scoring.scores_of(deltas)) if top is not None else None
                choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
                steps += used
            body = {**base, "object": "chat.completion", "choices": choices, "usage": self.usage(len(prompt), steps)}
            if info is not None:
                body["exocortex"] = info
            return JSONResponse(body, headers=headers)

        def chunk(kind, value, index):
            head = {**base, "object": "chat.completion.chunk"}
            if kind == "usage":
                return {**head, "choices": [], "usage": value}
            delta, logprobs = ({"role": "assistant", "content": ""} if kind == "start" else {}), None
            if kind == "delta":
                delta = {"content": value["content"]}
                if value["part"] is not None:
                    delta["part"] = value["part"]
                if "tool_call" in value:
                    delta = {"tool_calls": [value["tool_call"]]}
                if "logprobs" in value:
                    logprobs = scoring.chat_logprobs(tok, value["logprobs"])
            return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": value if kind == "finish" else None}]}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if results is not None:
            gens = [_Replay(*r) for r in results]
        return _EventStream(self.stream(gens, len(prompt), chunk, include_usage), partial(_close_all, gens), headers)

    def escalating(self, req: ChatCompletionRequest, n: int) -> bool:
        """Whether this request's reply waits for the escalation decision (a 400 for what cannot be)."""
        mode = req.escalation or "auto"
        if self.escalation is None:
            if mode != "never" and req.escalation is not None:
                raise APIError(400, "this server does not escalate (start it with --escalate-to URL).",
                               param="escalation", code="invalid_value")
            return False
        if mode == "never":
            return False
        if n > 1:
            if mode == "always":
                raise APIError(400, "escalation 'always' is for one choice (n=1).", param="n", code="invalid_value")
            return False  # n choices: each is sampled here, as asked
        return True

    async def escalate(self, request: Request, req: ChatCompletionRequest, meter: ConfidenceMeter | None,
                       prompt: list[int]):
        """(the stronger model's response, info) when it should answer, else (None, info for the local reply).
        `meter`: the local reply's, already generated; None with escalation "always" (nothing local to weigh)."""
        esc = self.escalation
        p = None
        if meter is not None:
            features = meter.features()
            if esc.calibration.reads_hidden:  # one forward pass over the reply, between two decode steps
                job = self.batcher.call(partial(reply_hidden, self.engine, prompt, meter.tokens))
                try:
                    features["hidden"] = await asyncio.wrap_future(job)
                except Exception as e:  # noqa: BLE001 - the model failed: a server error, as a generation's
                    raise _server_error(e)
            p = esc.calibration.p_correct(features)
        info = {"answered_by": self.model_name, "escalated": False, "p_correct": None if p is None else round(p, 4),
                "threshold": esc.threshold}
        if p is not None and p >= esc.threshold:
            esc.counts["answered_locally"] += 1
            return None, info
        import httpx

        body = json.loads(await request.body())
        sent = {"X-Exocortex-Escalated": "true"} | ({} if p is None else {"X-Exocortex-P-Correct": f"{p:.4f}"})
        try:
            if req.stream:
                upstream = await esc.open_stream(body)
                esc.counts["escalated"] += 1
                answered = upstream.model or esc.model or "the endpoint's model"
                return StreamingResponse(upstream.relay(), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Exocortex-Answered-By": answered,
                                                  **sent}), info
            reply = await esc.complete(body)
        except (httpx.HTTPError, EscalationFailed) as e:
            esc.counts["escalation_failed"] += 1
            esc.counts["answered_locally"] += 1
            why = str(e) or type(e).__name__
            return None, {**info, "escalation_error": f"{esc.url}: {why}"[:400]}
        esc.counts["escalated"] += 1
        answered = reply.get("model") or esc.model or "the endpoint's model"
        reply["exocortex"] = {**info, "answered_by": answered, "escalated": True}
        return JSONResponse(reply, headers={"X-Exocortex-Answered-By": str(answered), **sent}), info

    async def completions(self, request: Request) -> Response:
        req = await self.parse(request, CompletionRequest)
        if req.suffix:
            raise APIError(400, "suffix is not supported.", param="suffix", code="invalid_value")
        prompts = self.completion_prompts(req)
        generate = req.max_tokens != 0  # max_tokens 0: nothing to generate (with echo: only the prompt's scores)
        n, best = scoring.choice_counts(req.n, req.best_of if generate else None, bool(req.stream), len(prompts),
                                        self.capacity)
        where = (lambda i: "prompt") if len(prompts) == 1 else (lambda i: f"prompt[{i}]")
        samplings = [self.check_common(req, p, req.max_tokens, where(i)) for i, p in enumerate(prompts)]
        k = req.logprobs
        # best_of ranks its candidates by their logprobs, so it needs them even when the reply does not
        gen_k = 0 if k is None and best > n else k
        choices = [(p, _seeded(s, j)) for p, s in zip(prompts, samplings) for j in range(best)]
        constraint = await self.constraint(req)
        gens = self.start(choices, req.stop, gen_k, with_stop_token=True, constraint=constraint) if generate else []
        hold = [] if generate else self.reserve(1)  # scoring the prompts takes a place like a generation
        try:
            rendered = [self.render_prompt(p) if req.echo else ("", []) for p in prompts]
            echoed = [text for text, _ in rendered]
            echo_scores = (await self.score_prompts(prompts, k) if req.echo and k is not None
                           else [[] for _ in prompts])
            for scores, (_, offsets) in zip(echo_scores, rendered):
                for s, offset in zip(scores, offsets):
                    s.offset = offset
        except BaseException:
            _close_all(gens)
            raise
        finally:
            for t in hold:
                t.release()
        if not generate:
            gens = [_Nothing() for _ in range(len(prompts) * n)]
        tok = self.engine.tok
        n_prompt = sum(len(p) for p in prompts)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "system_fingerprint": None}
        per = len(gens) // len(prompts)  # choices generated per prompt: best (n unless best_of > n)

        def logprobs_of(p: int, scores: list) -> dict | None:
            # the generated text comes after the echoed prompt, so its offsets shift by the prompt text's length
            if k is None:
                return None
            return scoring.legacy_logprobs(tok, scores, shift=len(echoed[p]), before=echo_scores[p])

        if not req.stream:
            results = await self.collect(request, gens)
            out, steps = [], sum(r[2] for r in results)
            for p in range(len(prompts)):
                group = results[p * per:(p + 1) * per]
                if per > n:  # best_of: the n candidates with the highest log-probability per token
                    group = sorted(group, key=lambda r: -scoring.mean_logprob(scoring.scores_of(r[0])))[:n]
                for j, (deltas, finish, _) in enumerate(group):
                    text, parts = _assemble(deltas)
                    out.append({"index": p * n + j, "text": echoed[p] + text,
                                "logprobs": logprobs_of(p, scoring.scores_of(deltas)), "finish_reason": finish,
                                "parts": parts})
            return JSONResponse({**base, "choices": out, "usage": self.usage(n_prompt, steps)})

        def chunk(kind, value, index):
            if kind == "usage":
                return {**base, "choices": [], "usage": value}
            p, text, logprobs = index // n, "", None
            if kind == "start" and req.echo:
                text = echoed[p]
                logprobs = scoring.legacy_logprobs(tok, [], before=echo_scores[p]) if k is not None else None
            elif kind == "delta":
                text = value["content"]
                if "logprobs" in value:
                    logprobs = scoring.legacy_logprobs(tok, value["logprobs"], shift=len(echoed[p]))
            choice = {"index": index, "text": text, "logprobs": logprobs,
                      "finish_reason": value if kind == "finish" else None}
            if kind == "delta" and value["part"] is not None:
                choice["part"] = value["part"]
            return {**base, "choices": [choice]}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _EventStream(self.stream(gens, n_prompt, chunk, include_usage), partial(_close_all, gens))

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "exocortex",
                "context_length": self.context}


# ----------------------------------------------------------------------------- the model's memory, for its owner

def _notes_of(svc: _Service, request: Request) -> tuple[NoteStore, str]:
    if svc.notes is None:
        raise APIError(404, "This server keeps no memory (it was started with --no-memory).",
                       type="not_found_error", code="memory_off")
    extra = sorted(set(request.query_params) - {"user"})
    if extra:
        raise APIError(400, f"Unknown query parameter {extra[0]!r}; the memory endpoints take only 'user'.",
                       param=extra[0], code="unknown_parameter")
    if len(request.query_params.getlist("user")) > 1:
        raise APIError(400, "Give 'user' once.", param="user", code="invalid_value")
    return svc.notes, svc.user_key(request.query_params.get("user"))


async def _note_text(request: Request) -> str:
    try:
        data = json.loads((await request.body()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json")
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise APIError(400, 'The body must be a JSON object {"text": "..."}.', param="text", code="invalid_value")
    if set(data) != {"text"}:
        other = sorted(set(data) - {"text"})[0]
        raise APIError(400, f"Unknown field {other!r}; a note is {{\"text\": ...}} (whose: ?user=).",
                       param=other, code="unknown_parameter")
    try:
        data["text"].encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): not text sqlite can store
        raise APIError(400, "The note's text is not valid Unicode (it holds a lone surrogate).", param="text",
                       code="invalid_value") from None
    return data["text"]


def _note_json(n) -> dict:
    return {"id": n.id, "object": "memory.note", "text": n.text, "source": n.source,
            "created_at": int(n.created), "updated_at": int(n.updated)}


def _missing_note(note_id: int, user: str) -> APIError:
    return APIError(404, f"No note {note_id} in the memory of user {user!r}.", type="not_found_error",
                    param="note_id", code="note_not_found")


def _change_note(store: NoteStore, user: str, note_id: int, act) -> dict:
    """Run `act` on note `note_id` of `user`: 404 when there is no such note (also when it went between the
    check and the change), 400 with the store's reason when the change breaks a limit."""
    if not 0 < note_id < INT64 or store.get(user, note_id) is None:  # sqlite's integers are 64-bit
        raise _missing_note(note_id, user)
    try:
        act()
    except ToolError as e:
        if store.get(user, note_id) is None:
            raise _missing_note(note_id, user) from None
        raise APIError(400, f"{e}.", param="text", code="invalid_value") from None
    note = store.get(user, note_id)
    return _note_json(note) if note else {"id": note_id, "object": "memory.note.deleted", "deleted": True}


def _add_note(store: NoteStore, user: str, text: str) -> dict:
    try:
        nid = store.add(user, text, "api")  # the same text again: the note it already has
    except ToolError as e:  # empty, too long, memory full: the limits the model's own tool meets
        raise APIError(400, f"{e}.", param="text", code="invalid_value") from None
    note = store.get(user, nid)
    if note is None:  # forgotten by another request in between
        raise _missing_note(nid, user)
    return _note_json(note)


def _memory_routes(app, svc: _Service) -> None:
    """/v1/memory: the model's notes for their owner, what `exocortex memory list|add|edit|forget` does, for the
    chat page and API clients; `?user=` says whose notes, as a chat request's `user` field does. The store's
    work runs in a worker thread (sqlite blocks), each check and change in one call."""
    @app.get("/v1/memory")
    async def memory_list(request: Request):
        store, user = _notes_of(svc, request)
        notes = await run_in_threadpool(store.list, user)
        return {"object": "list", "user": user, "data": [_note_json(n) for n in notes]}

    @app.post("/v1/memory")
    async def memory_add(request: Request):
        store, user = _notes_of(svc, request)
        return await run_in_threadpool(_add_note, store, user, await _note_text(request))

    @app.patch("/v1/memory/{note_id}")
    async def memory_edit(note_id: int, request: Request):
        store, user = _notes_of(svc, request)
        text = await _note_text(request)
        return await run_in_threadpool(_change_note, store, user, note_id, lambda: store.edit(user, note_id, text))

    @app.delete("/v1/memory/{note_id}")
    async def memory_forget(note_id: int, request: Request):
        store, user = _notes_of(svc, request)
        if await request.body():
            raise APIError(400, "DELETE /v1/memory/{id} takes no body (whose note: ?user=).", code="invalid_value")
        return await run_in_threadpool(_change_note, store, user, note_id, lambda: store.forget(user, note_id))


def create_app(engine, model_name: str, max_concurrent: int = 16, max_queue: int = 64,
               max_prompt_tokens: int | None = None, sampling: SamplingConfig | None = None,
               limits: Limits | None = None, notes: NoteStore | None = None,
               escalation: Escalation | None = None) -> FastAPI:
    """The HTTP app around an Engine. `max_prompt_tokens` caps prompts below the model's context
    (rotary table length); `sampling` holds the defaults for what a request leaves out (a run's config
    section); `limits` what clients may send (run it with uvicorn.Config(..., **server_options(limits)));
    `notes`: the model's memory, each chat request's tools bound to its user (the `user` field, else "local");
    `escalation`: where unsure chat replies go instead (apps/escalate.py)."""
    svc = _Service(engine, model_name, max_concurrent, max_queue, max_prompt_tokens, sampling or SamplingConfig())
    svc.notes, svc.escalation = notes, escalation
    # no /docs or /redoc: their pages load scripts from a CDN, and this server fetches nothing from the internet
    app = FastAPI(title="exocortex", docs_url=None, redoc_url=None)
    app.state.exocortex = svc
    app.state.limits = limits = limits or Limits()
    app.add_middleware(Guard, limits=limits)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError):
        return _validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = f"Unknown path {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, msg, type=kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return _server_error(exc).response()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await svc.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await svc.completions(request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [svc.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != svc.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist; this server has '{svc.model_name}'.",
                           type="not_found_error", param="model", code="model_not_found")
        return svc.model_card()

    @app.get("/health")
    async def health():
        lim = svc.limiter
        out = {"status": "ok", "model": svc.model_name, "active": lim.active, "queued": lim.waiting,
               "max_concurrent": lim.max_concurrent, "max_queue": lim.max_queue, "context_length": svc.context}
        if svc.escalation is not None:  # who answered the chat requests so far
            out["escalation"] = {"to": svc.escalation.url, "threshold": svc.escalation.threshold,
                                 **svc.escalation.counts}
        return out

    _memory_routes(app, svc)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def serve(run, host: str = "127.0.0.1", port: int = 8000, max_concurrent: int = 16, max_queue: int = 64,
          max_prompt_tokens: int | None = None, stage: str | None = None, log_level: str = "info",
          docs: list[str] | None = None, compile: bool = True, api_key: str | None = None,
          allowed_hosts: str | None = None, insecure_no_api_key: bool = False, index: str | None = None,
          memory: bool = True, escalate_to: str | None = None, escalate_model: str | None = None,
          threshold: float | None = None) -> None:
    """Load a run's chat model (its `stage` checkpoint) and serve it until interrupted (Ctrl-C).
    `run` is a run directory or an already loaded RunConfig (the CLI passes one, with --set overrides)."""
    import uvicorn

    cfg = run if isinstance(run, RunConfig) else load_config(run)
    _check_port_free(host, port)
    limits = serve_limits(host, api_key, allowed_hosts, insecure_no_api_key)
    bound_memory()  # the CLI did it already; serve() may also be called from Python
    checkpoint = cfg.run.chat_checkpoint(stage)
    escalation = None
    if not escalate_to and (escalate_model or threshold is not None):
        raise ExocortexError("--escalate-model and --threshold are for escalation: add --escalate-to URL")
    if escalate_to:
        import os

        escalation = Escalation(escalate_to, load_calibration(cfg.run, checkpoint.parent.name),
                                0.5 if threshold is None else threshold,
                                escalate_model, os.environ.get(API_KEY_ENV) or None)
    engine = load_engine(cfg, stage, docs, compile=compile, index=index)
    if escalation is not None and escalation.calibration.reads_hidden and \
            len(escalation.calibration.hidden_weights) != engine.model.cfg.width:
        raise ExocortexError(f"the {checkpoint.parent.name} calibration reads a hidden state of "
                             f"{len(escalation.calibration.hidden_weights)} numbers, the model has "
                             f"{engine.model.cfg.width}: run `exocortex eval --run {cfg.name} --stages "
                             f"{checkpoint.parent.name}` again")
    note = python_tool_status()[1]  # the python tool off (or degraded) on this kernel: say so at start
    if note:
        print(note, flush=True)
    notes = NoteStore(default_notes_path()) if memory else None
    app = create_app(engine, model_name=cfg.name, max_concurrent=max_concurrent, max_queue=max_queue,
                     max_prompt_tokens=max_prompt_tokens, sampling=cfg.sampling, limits=limits, notes=notes,
                     escalation=escalation)
    warm_up_decoder(app.state.exocortex.batcher, compile)  # before listening: no request waits for the compiler
    shown = f"[{host}]" if ":" in host else host
    print(f"exocortex serve — model '{cfg.name}' ({checkpoint.parent.name}, {checkpoint.name}) from {cfg.run_dir}\n"
          f"  chat page:  http://{shown}:{port}/\n  OpenAI API: http://{shown}:{port}/v1  "
          f"(limits: {max_concurrent} concurrent generations, {max_queue} queued)"
          + (f"\n  escalation: to {escalation.url} when P(right) < {escalation.threshold}" if escalation else ""))
    # on Ctrl-C, replies still streaming get 5 s; their generations are then cancelled
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, **server_options(limits))


def warm_up_decoder(batcher: Batcher, compile: bool) -> None:
    """Allocate the cache and, with the compiled step, compile it now, saying so in one line (and how long it
    took, or why it decodes eagerly instead)."""
    engine = batcher.engine
    if compile and not engine.compile:  # no toolchain here (decode.compile_status)
        print(f"decoding eagerly: {compile_status(engine.device)[1]}", flush=True)
    if not engine.compile:
        return
    print(warm_up_note(engine.device, dtype=engine.dtype), flush=True)
    t = time.perf_counter()
    batcher.warm_up()
    if batcher.compile_error is not None:
        e = batcher.compile_error
        print(f"decoding eagerly: compiling the decode step failed ({type(e).__name__}: "
              f"{' '.join(str(e).split())[:300]})", flush=True)
    else:
        print(f"decode step compiled in {time.perf_counter() - t:.1f} s", flush=True)


def _check_port_free(host: str, port: int) -> None:
    """Fail with one clear line before loading anything else, instead of uvicorn's log lines."""
    import socket

    if not 0 < port < 65536:
        raise ExocortexError(f"--port {port}: a port is a number from 1 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ExocortexError(f"cannot serve on host '{host}': {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ExocortexError(f"cannot listen on {host}:{port} ({e.strerror}); pick another with --port") from None
