"""Escalation for `exocortex serve --escalate-to URL`: a chat request the local model is unsure of goes to a
stronger model behind any OpenAI-compatible endpoint (a bigger exocortex run, Ollama, llama.cpp, vLLM, a
provider).

The local model answers first. Its reply is held back (not streamed) until it ends; then P(reply is right)
comes from the scores of the tokens it chose (infer/confidence.py, calibrated by `exocortex eval` on the run's
own graded replies). At or above the threshold the local reply goes out; below it the request is sent on and
the stronger model's reply (its stream, as it comes) is what the client gets. Either way the reply says who
answered (`exocortex.answered_by`, and the X-Exocortex-Answered-By header). If the endpoint fails, the local
reply goes out with the reason (`exocortex.escalation_error`): escalation never turns an answer into an error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from exocortex.errors import ExocortexError
from exocortex.infer.confidence import Calibration

API_KEY_ENV = "EXOCORTEX_ESCALATE_API_KEY"
# request fields only exocortex knows: the stronger model's server may refuse them (OpenAI does)
OWN_FIELDS = ("builtin_tools", "escalation", "top_k")


@dataclass
class Escalation:
    url: str                       # the endpoint's base URL, e.g. http://host:8000/v1
    calibration: Calibration
    threshold: float = 0.5         # escalate when P(right) is below it
    model: str | None = None       # the model name the endpoint serves (None: the request's own `model`)
    api_key: str | None = None
    timeout: float = 120.0
    counts: dict = field(default_factory=lambda: {"answered_locally": 0, "escalated": 0, "escalation_failed": 0})

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ExocortexError(f"--escalate-to {self.url!r}: give the endpoint's base URL, e.g. http://host:8000/v1")
        if not 0.0 <= self.threshold <= 1.0:
            raise ExocortexError(f"--threshold {self.threshold}: a probability, from 0 (never escalate) to 1 "
                                 "(always)")
        self.url = self.url.rstrip("/")
        self._client = None

    def client(self):
        import httpx

        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.timeout, connect=10.0))
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def body(self, request: dict) -> dict:
        """The request as the stronger model gets it: its model name, no exocortex-only fields, and assistant
        messages whose content is exocortex's parts list written out as text."""
        out = {k: v for k, v in request.items() if k not in OWN_FIELDS}
        if self.model:
            out["model"] = self.model
        out["messages"] = [_plain_message(m) for m in request.get("messages", [])]
        return out

    async def complete(self, request: dict) -> dict:
        """A non-streaming reply from the endpoint (its JSON), or an exception saying why not."""
        r = await self.client().post(self.url + "/chat/completions", json=self.body({**request, "stream": False}))
        if r.status_code != 200:
            raise EscalationFailed(f"{self.url} answered {r.status_code}: {_error_text(r.text)}")
        try:
            reply = r.json()
        except ValueError:
            raise EscalationFailed(f"{self.url} answered something that is not JSON") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list):
            raise EscalationFailed(f"{self.url} answered JSON without choices")
        return reply

    async def open_stream(self, request: dict) -> "Upstream":
        """Start a streaming reply (its status checked, its first event read to learn which model answers)."""
        client = self.client()
        req = client.build_request("POST", self.url + "/chat/completions", json=self.body({**request, "stream": True}))
        r = await client.send(req, stream=True)
        if r.status_code != 200:
            text = (await r.aread()).decode("utf-8", "replace")
            await r.aclose()
            raise EscalationFailed(f"{self.url} answered {r.status_code}: {_error_text(text)}")
        up = Upstream(r)
        try:
            await up.first_event()
        except BaseException:
            await r.aclose()
            raise
        return up


class Upstream:
    """An open SSE reply from the endpoint: `model` from its first event, then `relay()` passes every byte on."""

    def __init__(self, response):
        self.response, self.head, self.model = response, b"", None
        self.chunks = response.aiter_raw()

    async def first_event(self) -> None:
        while b"\n\n" not in self.head.replace(b"\r\n", b"\n"):
            try:
                self.head += await self.chunks.__anext__()
            except StopAsyncIteration:
                break
        for line in self.head.decode("utf-8", "replace").splitlines():
            if line.startswith("data:"):
                try:
                    self.model = json.loads(line[5:]).get("model")
                except (ValueError, AttributeError):
                    pass
                break

    async def relay(self) -> AsyncIterator[bytes]:
        try:
            if self.head:
                yield self.head
            async for chunk in self.chunks:
                yield chunk
        finally:
            await self.response.aclose()


class EscalationFailed(Exception):
    pass


def _plain_message(m: Any) -> Any:
    if not isinstance(m, dict) or not isinstance(m.get("content"), list):
        return m
    parts = m["content"]
    if all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
        return m
    text = "".join(p.get("text", "") if p.get("type") == "text" else f"[{p.get('type')}: {p.get('text', '')}] "
                   for p in parts if isinstance(p, dict))
    return {**m, "content": text}


def _error_text(body: str) -> str:
    try:
        err = json.loads(body).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:300]
    except (ValueError, AttributeError):
        pass
    return " ".join(body.split())[:300] or "(empty body)"


def load_calibration(run, stage: str) -> Calibration:
    """The calibration `exocortex eval` fitted for a stage of a run (RunDir)."""
    ev = run.summary("eval")
    kept = (ev.calibration.get(stage) or {}).get("calibration") if ev else None
    if not kept:
        raise ExocortexError(f"escalation needs the {stage} model's calibration, which `exocortex eval` writes: "
                             f"run `exocortex eval --run {run.name} --stages {stage}` first")
    try:
        return Calibration(**kept)
    except TypeError:
        raise ExocortexError(f"the {stage} calibration in {run.logs_dir} is from another version: run `exocortex "
                             f"eval --run {run.name} --stages {stage}` again") from None
