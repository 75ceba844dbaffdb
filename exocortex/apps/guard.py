"""The request guard of `exocortex serve`: what a client may send, checked before a request reaches an endpoint.

Host and Origin checks (DNS rebinding, CSRF from web pages), the API key, JSON-only POSTs, the body's size and
time limits, and a deadline for each request's headers (uvicorn's HTTP/1.1 protocol, subclassed). Every refusal
is an OpenAI-style error object (`APIError`). See docs/serve.md, Security.
"""
from __future__ import annotations

import asyncio
import hmac
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from exocortex.errors import ExocortexError


def missing_extra(e: ImportError) -> ExocortexError:
    """The server's packages are an optional extra: say how to get them instead of a traceback."""
    return ExocortexError(f"`exocortex serve` needs FastAPI and uvicorn ({e.name} is missing): "
                          "pip install 'exocortex[serve]'")


try:
    from fastapi.responses import JSONResponse
    import h11
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as e:
    raise missing_extra(e) from e

# What _HeaderDeadline uses of uvicorn's HTTP/1.1 protocol, which is not uvicorn's public API: each method and
# the attributes it sets. pyproject.toml pins the uvicorn versions this was tested with; a different uvicorn
# without them stops the server at start rather than breaking every connection.
PROTOCOL_INTERNALS = {"__init__": {"conn", "scope", "loop"}, "connection_made": {"transport"},
                      "handle_events": {"scope"}, "on_response_complete": set(), "connection_lost": set()}


def check_protocol(protocol: type) -> None:
    for method, attrs in PROTOCOL_INTERNALS.items():
        code = getattr(getattr(protocol, method, None), "__code__", None)
        if code is None or not attrs <= set(code.co_names):
            raise ExocortexError(f"`exocortex serve` does not work with uvicorn {uvicorn.__version__} (its HTTP/1.1 "
                                 f"protocol's {method} is not the one it extends): pip install 'exocortex[serve]'")


check_protocol(H11Protocol)

MAX_BODY_BYTES = 4 * 1024 * 1024
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
API_KEY_ENV = "EXOCORTEX_API_KEY"


# ----------------------------------------------------------------------------- errors

class APIError(Exception):
    """An error answered as an OpenAI-style error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------- what a client may send

def _hostname(netloc: str) -> str | None:
    """The lower-cased name in a Host header or an Origin's netloc ("[::1]:8000" -> "::1"); None if malformed."""
    if not netloc or any(c in netloc for c in "@/?#\\ "):
        return None
    try:
        parts = urlsplit("//" + netloc)
        parts.port  # raises on a bad port
    except ValueError:
        return None
    return parts.hostname


def _allowed_name(entry: str) -> str:
    """An allowed-hosts entry as the Host check compares it: the Host header's port and brackets are dropped
    before the check, so "Chat.lan:8000" -> "chat.lan" and "[::1]" or "::1" -> "::1"; "*" stays."""
    entry = entry.strip()
    if entry == "*":
        return entry
    if entry.count(":") > 1 and not entry.startswith("["):  # a bare IPv6 address
        entry = f"[{entry}]"
    name = _hostname(entry)
    if not name:
        raise ExocortexError(f"--allowed-hosts: '{entry[:100]}' is not a host name (write name, name:port, "
                             "an IP address, or *)")
    return name


@dataclass(frozen=True)
class Limits:
    """What the server accepts, checked before a request reaches an endpoint (or while its body arrives)."""
    max_body_bytes: int = MAX_BODY_BYTES
    body_timeout: float = 30.0       # seconds for a whole request body to arrive
    header_timeout: float = 10.0     # seconds for a request's headers to arrive (uvicorn itself has no limit)
    keep_alive: int = 5              # seconds an idle connection stays open between requests
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS  # Host header names served (any port); "*" serves any
    api_key: str | None = field(default=None, repr=False)  # when set, /v1 needs "Authorization: Bearer <key>"

    def __post_init__(self):
        object.__setattr__(self, "allowed_hosts", tuple(dict.fromkeys(map(_allowed_name, self.allowed_hosts))))


class _Refused(Exception):
    """A request turned away by the guard, answered as an OpenAI-style error that closes the connection
    (its unread body would otherwise be taken for the next request)."""

    def __init__(self, status: int, message: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.error = APIError(status, message, code=code, headers={"Connection": "close", **(headers or {})})


class Guard:
    """ASGI middleware: Host and Origin checks (DNS rebinding, CSRF from web pages), the API key, JSON-only
    POSTs, and the body's size and time limits, enforced while it is read so no more than the cap is held."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits
        self.any_host = "*" in limits.allowed_hosts
        self.hosts = set(limits.allowed_hosts)
        # pages on these names may POST from any port; not loopback's, where another port is another program
        self.origin_hosts = self.hosts - set(LOOPBACK_HOSTS)
        self.key = limits.api_key.encode() if limits.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message):
            nonlocal started
            started = True
            await send(message)

        try:
            self.check(scope)
        except _Refused as e:
            if e.error.status != 413:
                await self.drain(receive)
            return await e.error.response()(scope, receive, send)
        try:
            await self.app(scope, _BodyReader(receive, self.limits), tracked_send)
        except _Refused as e:
            if started:  # too late to answer: the connection is closed instead
                raise
            await e.error.response()(scope, receive, send)

    async def drain(self, receive) -> None:
        """Read and drop a refused request's body (up to the size cap, for at most a second) before answering:
        a connection closed with unread bytes is reset, and the reset can reach the client before the answer
        (it saw 'connection reset by peer' instead of its 415)."""
        loop = asyncio.get_running_loop()
        deadline, size = loop.time() + min(1.0, self.limits.body_timeout), 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if size > self.limits.max_body_bytes or not message.get("more_body", False):
                return

    def check(self, scope) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if not self.any_host and _hostname(host) not in self.hosts:
            raise _Refused(400, f"The Host header '{host[:100]}' is not one this server answers to (allowed: "
                           f"{', '.join(sorted(self.hosts))}; start it with --allowed-hosts to add names).",
                           "invalid_host")
        if self.key is not None and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            given = headers.get("authorization", "")
            token = given[7:].strip().encode("latin-1") if given[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(token, self.key):
                raise _Refused(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                               "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # RFC 6750
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return
        origin = headers.get("origin")
        if origin is not None and not self.origin_ok(origin, host):
            raise _Refused(403, f"Cross-origin requests are not accepted (Origin '{origin[:100]}').",
                           "cross_origin")
        if scope["method"] == "DELETE" and headers.get("content-length", "0") == "0" \
                and "transfer-encoding" not in headers:
            return  # no body to type-check (a browser sends another site's DELETE only after a CORS preflight)
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise _Refused(415, "The request body must be JSON, sent with 'Content-Type: application/json'.",
                           "unsupported_media_type")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limits.max_body_bytes:
            raise _Refused(413, f"The request body is over {self.limits.max_body_bytes} bytes.", "request_too_large")


    def origin_ok(self, origin: str, host: str) -> bool:
        """The page's own origin (the request's Host), or a page on a name the server was told to answer to:
        behind a reverse proxy that rewrites Host, the page's origin is the proxy's name, which --allowed-hosts
        lists."""
        try:
            netloc = urlsplit(origin).netloc.lower()
        except ValueError:  # "http://[::1"
            return False
        return netloc == host.lower() or _hostname(netloc) in self.origin_hosts


class _BodyReader:
    """The app's `receive` while the body arrives: counts its bytes (chunked bodies have no Content-Length)
    and gives it body_timeout seconds in all; afterwards (disconnect watching) it passes messages through."""

    def __init__(self, receive, limits: Limits):
        self.receive, self.limits = receive, limits
        self.size, self.done, self.deadline = 0, False, None

    async def __call__(self):
        if self.done:
            return await self.receive()
        loop = asyncio.get_running_loop()
        if self.deadline is None:
            self.deadline = loop.time() + self.limits.body_timeout
        try:
            message = await asyncio.wait_for(self.receive(), max(0.0, self.deadline - loop.time()))
        except asyncio.TimeoutError:  # (TimeoutError itself only from Python 3.11)
            raise _Refused(408, f"The request body did not arrive within {self.limits.body_timeout:g} s.",
                           "request_timeout") from None
        if message["type"] != "http.request":
            self.done = True
            return message
        self.size += len(message.get("body", b""))
        if self.size > self.limits.max_body_bytes:
            raise _Refused(413, f"The request body is over {self.limits.max_body_bytes} bytes.", "request_too_large")
        self.done = not message.get("more_body", False)
        return message


class _HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers: uvicorn closes idle keep-alive
    connections but waits forever for headers that trickle in (slowloris), or for the rest of a body that no
    endpoint reads. From the connection's start, and again after each response, a new request must arrive
    within header_timeout seconds or the connection is closed."""
    header_timeout = Limits.header_timeout

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._armed_scope = self.scope  # the request before the one awaited (None on a new connection)
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:  # (no request begun: answer why before closing)
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.scope is not self._armed_scope:  # a new request's headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._arm()
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def server_options(limits: Limits) -> dict:
    """uvicorn.Config keywords that apply `limits` at the connection level (the guard does the rest)."""
    protocol = type("HeaderDeadline", (_HeaderDeadline,), {"header_timeout": limits.header_timeout})
    return dict(http=protocol, timeout_keep_alive=limits.keep_alive)


def serve_limits(host: str, api_key: str | None = None, allowed_hosts: str | None = None,
                 insecure_no_api_key: bool = False) -> Limits:
    """The Limits for serving on `host`. The key comes from --api-key or EXOCORTEX_API_KEY; beyond loopback it
    is required unless the user says, with --insecure-no-api-key, that anyone who can reach the server may use
    it (its tools run code). Host names served: loopback, the bound host, and --allowed-hosts ("*": any); on a
    wildcard address with a key, any name by default, since a rebound name gains a page nothing without the key
    while the machine's own names and addresses are many and unknown here."""
    key = api_key or os.environ.get(API_KEY_ENV) or None
    loopback = host in LOOPBACK_HOSTS
    if not loopback and not key:
        if not insecure_no_api_key:
            raise ExocortexError(f"serving on {host} reaches beyond this machine: set an API key (--api-key or "
                                 f"{API_KEY_ENV}=...), or pass --insecure-no-api-key to let anyone who can reach "
                                 "it use the model and its tools (sandboxed python included)")
        print(f"warning: serving on {host} without an API key (--insecure-no-api-key): anyone who can reach it can "
              "use the model and its tools (sandboxed python included)", flush=True)
    names = [h for h in (allowed_hosts or "").split(",") if h.strip()]
    wildcard = host in WILDCARD_HOSTS
    if wildcard and key and not names:
        print(f"serving on {host} with an API key: requests for any host name are answered "
              "(--allowed-hosts limits them)", flush=True)
        names = ["*"]
    bound = [] if loopback or wildcard else [host]
    return Limits(allowed_hosts=(*LOOPBACK_HOSTS, *bound, *names), api_key=key)
