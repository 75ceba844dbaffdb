"""What the server refuses before a request reaches the model: oversized and slow bodies, slow headers, foreign
Host names (DNS rebinding), cross-origin and non-JSON POSTs (CSRF from a web page), requests without the API key,
and JSON nested too deeply. Each answer is a 4xx error object, and the server stays healthy.
"""
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
from test_serve import MODEL, Server, engine  # noqa: E402,F401  (engine: a fixture)

from exocortex.apps.guard import API_KEY_ENV, H11Protocol, Limits, check_protocol, serve_limits  # noqa: E402
from exocortex.apps.serve import create_app  # noqa: E402
from exocortex.config import make_config, save_config  # noqa: E402
from exocortex.errors import ExocortexError  # noqa: E402

CHAT = "/v1/chat/completions"
HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def guarded(engine, **limits) -> Server:
    return Server(create_app(engine, MODEL, limits=Limits(**limits)))


def head(path: str = CHAT, **headers) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_reply(sock: socket.socket, within: float) -> bytes:
    """Everything the server sends until it closes the connection, or what came within `within` seconds."""
    sock.settimeout(within)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def status(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:200]
    return int(reply.split()[1])


def test_content_length_over_the_cap_is_refused_before_the_body(engine):
    server = guarded(engine)  # 4 MiB
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            t = time.time()
            s.sendall(head(Content_Length=10 ** 12))  # a terabyte announced, nothing sent
            reply = read_reply(s, 5)
        assert status(reply) == 413 and b"request_too_large" in reply and time.time() - t < 3
    finally:
        server.stop()


def test_a_chunked_body_is_cut_off_at_the_cap(engine):
    """No Content-Length: the guard counts bytes as they arrive and answers 413 while the client still sends."""
    server = guarded(engine, max_body_bytes=1 << 20)
    chunk = b"x" * 65536
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent, reply = 0, b""
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(head(Transfer_Encoding="chunked"))
            while sent < 256 << 20:  # what an unprotected server would read to the end
                readable, writable, _ = select.select([s], [s], [], 5)
                if readable:
                    reply = read_reply(s, 5)
                    break
                try:
                    sent += s.send(frame)
                except (BrokenPipeError, ConnectionResetError):
                    reply = read_reply(s, 5)
                    break
            reply = reply or read_reply(s, 1)
        assert sent < 64 << 20, f"the server read {sent} bytes of a body capped at 1 MiB"  # (+ socket buffers)
        assert status(reply) == 413, reply[:300]
        assert server.health()["status"] == "ok"
    finally:
        server.stop()


def test_a_slow_body_times_out_and_frees_its_connection(engine):
    server = guarded(engine, body_timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(head(Content_Length=100) + b'{"messages": ')  # then nothing more
            t = time.time()
            reply = read_reply(s, 6)
        assert status(reply) == 408 and b"request_timeout" in reply and time.time() - t < 4
        assert server.health()["active"] == 0
    finally:
        server.stop()


def test_slow_headers_are_cut_off(engine):
    """Slowloris: a header line now and then keeps a connection open forever, unless headers have a deadline."""
    server = guarded(engine, header_timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            t, closed = time.time(), False
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            while time.time() - t < 6:
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                if select.select([s], [], [], 0.3)[0]:
                    reply = read_reply(s, 2)
                    closed = True
                    assert reply == b"" or status(reply) == 408
                    break
            assert closed and time.time() - t < 4
        # an unread body to an endpoint that never reads it is cut off the same way
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\nxx")
            t = time.time()
            reply = read_reply(s, 6)
            assert status(reply) == 200 and time.time() - t < 4
        assert server.health()["status"] == "ok"
    finally:
        server.stop()


def test_only_allowed_host_names_are_served(engine):
    server = guarded(engine)
    anyhost = guarded(engine, allowed_hosts=("*",))
    try:
        for name in ("localhost", "127.0.0.1", "LOCALHOST", "[::1]"):
            assert httpx.get(server.url + "/health", headers={"Host": f"{name}:{server.port}"}).status_code == 200
        for bad in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example", "a@localhost", "[::1"):
            r = httpx.get(server.url + "/v1/models", headers={"Host": bad})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", bad
        assert httpx.get(anyhost.url + "/v1/models", headers={"Host": "evil.example"}).status_code == 200
    finally:
        server.stop()
        anyhost.stop()


def test_cross_origin_and_non_json_posts_are_refused(engine):
    server = guarded(engine)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post(CHAT, json=HELLO, headers={"Origin": "http://evil.example"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin"
            assert c.post(CHAT, json=HELLO, headers={"Origin": "null"}).status_code == 403
            other_port = f"http://127.0.0.1:{server.port + 1}"
            assert c.post(CHAT, json=HELLO, headers={"Origin": other_port}).status_code == 403
            assert c.post(CHAT, json=HELLO, headers={"Origin": server.url}).status_code == 200  # the chat page
            assert c.post(CHAT, json=HELLO, headers={"Origin": "http://[::1"}).status_code == 403
            raw = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
            for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
                r = c.post(CHAT, content=raw, headers={"Content-Type": ctype} if ctype else {})
                assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", ctype
            r = c.post(CHAT, content=raw, headers={"Content-Type": "Application/JSON; charset=utf-8"})
            assert r.status_code == 200
            # a DELETE without a body has no type to check (past the guard: this server keeps no memory)
            assert c.delete("/v1/memory/1").json()["error"]["code"] == "memory_off"
            assert c.delete("/v1/memory/1", headers={"Origin": "http://evil.example"}).status_code == 403
            r = c.request("DELETE", "/v1/memory/1", content=b"x", headers={"Content-Type": "text/plain"})
            assert r.status_code == 415
            r = c.request("DELETE", "/v1/memory/1", content=iter([b"x"]))  # chunked, no type
            assert r.status_code == 415 and r.request.headers.get("transfer-encoding") == "chunked"
    finally:
        server.stop()


def test_a_refused_request_still_being_written_gets_its_answer(engine):
    """A client refused on its headers (415 here) may still be writing the body: the server reads it before
    answering and closing, or the client's next write meets a reset and it never reads the 415."""
    server = guarded(engine)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(head(Content_Type="text/plain", Content_Length=2000).replace(
                b"Content-Type: application/json\r\n", b""))
            for _ in range(2):  # a body that arrives after the refusal, in two writes
                time.sleep(0.3)
                s.sendall(b"x" * 1000)
            reply = read_reply(s, 5)
        assert status(reply) == 415 and b"unsupported_media_type" in reply
    finally:
        server.stop()


def test_the_api_key_guards_v1_only(engine):
    server = guarded(engine, api_key="sekrit-key")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for auth in (None, "Bearer wrong", "Bearer sekrit-ke", "Basic sekrit-key", "sekrit-key", "Bearer x sekrit-key"):
                r = c.get("/v1/models", headers={"Authorization": auth} if auth else {})
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", auth
                assert r.headers["WWW-Authenticate"] == "Bearer"  # RFC 6750: what the client should send
                assert c.post(CHAT, json=HELLO, headers={"Authorization": auth} if auth else {}).status_code == 401
            assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
            assert c.get("/v1/models", headers={"Authorization": "bearer sekrit-key"}).status_code == 200
        client = server.client().with_options(api_key="sekrit-key")  # the openai client sends it as Bearer
        assert client.chat.completions.create(model=MODEL, **HELLO).usage.completion_tokens >= 1
    finally:
        server.stop()


def test_behind_a_proxy_that_rewrites_host(engine):
    """The proxy sends Host: 127.0.0.1:<port>; the browser's Origin is the proxy's name, which --allowed-hosts
    lists (with its port, as users write it)."""
    server = guarded(engine, allowed_hosts=("127.0.0.1", "Chat.Example:443"))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.post(CHAT, json=HELLO, headers={"Origin": "https://chat.example"}).status_code == 200
            assert c.get("/health", headers={"Host": "chat.example:443"}).status_code == 200
            assert c.get("/health", headers={"Host": "chat.example"}).status_code == 200
            r = c.post(CHAT, json=HELLO, headers={"Origin": "https://chat.example.evil"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin"
    finally:
        server.stop()


def test_allowed_hosts_entries_are_host_names():
    limits = serve_limits("127.0.0.1", allowed_hosts="Chat.lan:8000, [fe80::1]:80,::2,127.0.0.1")
    assert limits.allowed_hosts == ("localhost", "127.0.0.1", "::1", "chat.lan", "fe80::1", "::2")
    for bad in ("a@chat.lan", "chat.lan:http", "[::1", "http://chat.lan/", ":8000"):
        with pytest.raises(ExocortexError, match="^--allowed-hosts: "):
            serve_limits("127.0.0.1", allowed_hosts=bad)


def test_a_key_on_a_wildcard_address_serves_any_host_name(monkeypatch, capsys):
    """The machine's names and addresses are unknown here, and a rebound name gains nothing without the key."""
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    for host in ("0.0.0.0", "::"):
        assert "*" in serve_limits(host, api_key="k").allowed_hosts
        assert "any host name" in capsys.readouterr().out
    assert "*" not in serve_limits("0.0.0.0", api_key="k", allowed_hosts="chat.lan").allowed_hosts
    assert "*" not in serve_limits("0.0.0.0", insecure_no_api_key=True).allowed_hosts  # no key: rebinding matters
    assert "*" not in serve_limits("192.168.1.5", api_key="k").allowed_hosts


def test_the_key_stays_out_of_reprs_and_uvicorn_is_checked():
    assert "sekrit" not in repr(Limits(api_key="sekrit"))
    check_protocol(H11Protocol)

    class Changed(H11Protocol):  # a uvicorn whose protocol no longer has the method the header deadline extends
        handle_events = None
    with pytest.raises(ExocortexError, match="^`exocortex serve` does not work with uvicorn .*handle_events"):
        check_protocol(Changed)


def test_serving_beyond_loopback_needs_a_key(monkeypatch, capsys):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert serve_limits("127.0.0.1").api_key is None
    with pytest.raises(ExocortexError, match="--api-key"):
        serve_limits("0.0.0.0")
    assert serve_limits("0.0.0.0", insecure_no_api_key=True).api_key is None
    assert "warning" in capsys.readouterr().out
    assert serve_limits("0.0.0.0", api_key="k").api_key == "k"
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    limits = serve_limits("192.168.1.5", allowed_hosts="chat.lan, Other.Host,")
    assert limits.api_key == "from-env"
    assert limits.allowed_hosts == ("localhost", "127.0.0.1", "::1", "192.168.1.5", "chat.lan", "other.host")


def test_deeply_nested_json_is_a_400(engine):
    server = guarded(engine)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for body in ("[" * 200_000 + "]" * 200_000, '{"a":' * 100_000 + "1" + "}" * 100_000,
                         '{"messages": ' + "[" * 50_000 + "]" * 50_000 + "}",
                         '{"messages": [{"role": "user", "content": "hi"}], "logprobs": ' + "[" * 900 + "]" * 900 + "}"):
                r = c.post(CHAT, content=body, headers={"Content-Type": "application/json"})
                assert r.status_code == 400, (body[:40], r.status_code, r.text[:200])
            assert c.post(CHAT, json=HELLO).status_code == 200
    finally:
        server.stop()


def test_the_cli_refuses_to_serve_beyond_loopback_without_a_key(tmp_path):
    cfg = make_config("tiny", name="guarded")
    cfg.runs_dir = str(tmp_path)
    save_config(cfg)
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "exocortex", "serve", "--run", str(cfg.run_dir), "--host", "0.0.0.0",
                          "--port", str(port)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: serving on 0.0.0.0") and out.stderr.count("\n") == 1, out.stderr
    assert "--api-key" in out.stderr and "--insecure-no-api-key" in out.stderr
