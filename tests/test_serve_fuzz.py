"""Malformed requests against a live server: every one gets a 4xx error object, and the server stays healthy.
bench/serve_fuzz.py sends 5,000 and more of the same kinds (`malformed` is shared) to `exocortex serve`."""
import json
import random

import pytest
import torch

httpx = pytest.importorskip("httpx")
from test_serve import MODEL, Server, tiny_model  # noqa: E402

from exocortex.infer.engine import Engine  # noqa: E402
from exocortex.apps.serve import Limits, create_app  # noqa: E402

JSON = {"content-type": "application/json"}


def malformed(rng: random.Random, max_body: int = 4 * 1024 * 1024):
    """(method, path, raw body bytes, headers) for one bad request; `max_body` is the server's body cap."""
    kind = rng.randrange(22)
    if kind < 12:
        path, body, ctype = malformed_body(rng)
        return "POST", path, body, {"content-type": ctype}
    chat = "/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    if kind == 12:  # nested deeper than the interpreter's stack (or just deep)
        depth = rng.choice([100, 1000, 5000, 100_000])
        inner = "[" * depth + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
        where = rng.choice(["{inner}", '{{"messages": {inner}}}', '{{"messages": [{{"role": "user", "content": {inner}}}]}}'])
        return "POST", chat, where.format(inner=inner).encode(), JSON
    if kind == 13:  # numbers too large for any field, or for Python's int parser
        big = rng.choice(["1" * 5000, "1e999", "-1e999", str(2 ** 70), "1" * 200 + ".5"])
        field = rng.choice(["max_tokens", "temperature", "seed", "top_k", "top_p"]) if big[0] != "1" else "seed"
        big = "1" * 5000 if field == "seed" and rng.random() < 0.5 else big  # past int()'s 4300 digits
        return "POST", chat, ('{"messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (field, big)).encode(), JSON
    if kind == 14:  # not UTF-8 (JSON must be), a UTF-8-encoded surrogate included
        bad = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"])
        return "POST", chat, b'{"messages": [{"role": "user", "content": "a' + bad + b'"}]}', JSON
    if kind == 15:  # a form or plain text POST (what a cross-origin page can send without asking)
        ctype = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "", "json"])
        return "POST", chat, json.dumps({"messages": hi}).encode(), {"content-type": ctype}
    if kind == 16:  # an unknown path or method
        path = "/" + rng.choice(["x", "v1/x", "v1/chat", "v2/completions", "static/../../etc/passwd", "v1/models/a/b/c",
                                 "%00", "static/nope.js"])
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "POST", "TRACE"])
        return method, path, b"", JSON
    if kind == 17:  # a wrong method on a real path
        return rng.choice(["PUT", "DELETE", "PATCH", "GET"]), rng.choice([chat, "/v1/completions"]), b"", JSON
    if kind == 18:  # over the body cap
        return "POST", chat, b'{"messages": "' + b"x" * (max_body + rng.randint(1, 1000)) + b'"}', JSON
    if kind == 19:  # a foreign Host (DNS rebinding) or a cross-origin page
        if rng.random() < 0.5:
            return "GET", "/v1/models", b"", {"host": rng.choice(["evil.example", "127.0.0.1.nip.io", "[::1", "a b"])}
        return "POST", chat, json.dumps({"messages": hi}).encode(), {**JSON, "origin": "http://evil.example"}
    if kind == 20:  # strings and lists where numbers go, and far too many stop sequences or messages
        body = {"messages": hi * rng.choice([1, 2000]), "max_tokens": rng.choice(["1", [], {}, True, 0])}
        return "POST", chat, json.dumps(body).encode(), JSON
    prompt = rng.choice([[], [-1], [10 ** 12], [1.5], [[1], [-1]], [[]], ["a", 1], [[1], "a"], {"p": 1}, True])
    return "POST", "/v1/completions", json.dumps({"prompt": prompt}).encode(), JSON


def malformed_body(rng: random.Random):
    """(path, raw body bytes, content type) for one bad request body."""
    good = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    kind = rng.randrange(12)
    if kind == 0:  # not JSON at all
        return "/v1/chat/completions", bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))), "application/json"
    if kind == 1:  # truncated JSON
        raw = json.dumps(good)
        return "/v1/chat/completions", raw[: rng.randint(0, len(raw) - 1)].encode(), "application/json"
    if kind == 2:  # JSON of the wrong top-level type
        return "/v1/chat/completions", json.dumps(rng.choice([[], 1, "x", None, True])).encode(), "application/json"
    body = json.loads(json.dumps(good))
    if kind == 3:
        body["messages"] = rng.choice([[], None, "hi", 3, [{}], [{"role": "user"}], [{"content": "x"}]])
    elif kind == 4:
        body["messages"][0]["role"] = rng.choice(["wizard", "", None, 7, "tool"])
    elif kind == 5:
        body["messages"][0]["content"] = rng.choice([None, 5, {"a": 1}, [{"type": "image", "url": "x"}], [1, 2]])
    elif kind == 6:
        body["temperature"] = rng.choice([-1, 2.5, "hot", None and 0 or [], 1e9])
    elif kind == 7:
        body["top_p"] = rng.choice([0, -0.5, 1.5, "x"])
    elif kind == 8:
        body["max_tokens"] = rng.choice([0, -5, "many", 1.5])
    elif kind == 9:
        body["n"] = rng.choice([0, -2, 129, "two"])
    elif kind == 10:
        body["messages"][0]["content"] = "word " * 5000  # far past the context
    else:
        body["stop"] = rng.choice([5, [1, 2], ["a"] * 10, {"x": 1}])
    return rng.choice(["/v1/chat/completions", "/v1/chat/completions", "/v1/completions"]), json.dumps(body).encode(), \
        "application/json"


def test_thousand_malformed_requests(tok):
    limits = Limits(max_body_bytes=64 * 1024)  # so that oversized bodies are quick to send
    server = Server(create_app(Engine(tiny_model(tok), tok, torch.device("cpu")), MODEL, limits=limits))
    rng = random.Random(0)
    statuses = {}
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for _ in range(1000):
                method, path, body, headers = malformed(rng, limits.max_body_bytes)
                try:
                    r = c.request(method, path, content=body, headers=headers)
                except httpx.TransportError:
                    # refused (413) before the body was read, and the connection closed while the client still sent
                    assert len(body) > limits.max_body_bytes, (method, path, body[:200])
                    statuses["reset"] = statuses.get("reset", 0) + 1
                    continue
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert 400 <= r.status_code < 500, (method, path, body[:200], r.status_code, r.text[:200])
                err = r.json()["error"]
                assert err["message"] and err["type"]
            assert c.get("/health").status_code == 200
            ok = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()
    assert sum(statuses.values()) == 1000
    assert {400, 403, 404, 405, 415} <= set(statuses), statuses
