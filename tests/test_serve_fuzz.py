"""1000 malformed requests against a live server: every one gets a 4xx error object, and the server stays healthy."""
import json
import random

import pytest
import torch

httpx = pytest.importorskip("httpx")
from test_serve import MODEL, Server, tiny_model  # noqa: E402

from exocortex.infer.engine import Engine  # noqa: E402
from exocortex.apps.serve import create_app  # noqa: E402


def malformed(rng: random.Random):
    """(path, raw body bytes, content type) for one bad request."""
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
        body["n"] = rng.choice([0, 2, 5, "two"])
    elif kind == 10:
        body["messages"][0]["content"] = "word " * 5000  # far past the context
    else:
        body["stop"] = rng.choice([5, [1, 2], ["a"] * 10, {"x": 1}])
    return rng.choice(["/v1/chat/completions", "/v1/chat/completions", "/v1/completions"]), json.dumps(body).encode(), \
        "application/json"


def test_thousand_malformed_requests(tok):
    server = Server(create_app(Engine(tiny_model(tok), tok, torch.device("cpu")), MODEL))
    rng = random.Random(0)
    statuses = {}
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for _ in range(1000):
                path, body, ctype = malformed(rng)
                r = c.post(path, content=body, headers={"content-type": ctype})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert 400 <= r.status_code < 500, (path, body[:200], r.status_code, r.text[:200])
                err = r.json()["error"]
                assert err["message"] and err["type"]
            assert c.get("/health").status_code == 200
            ok = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()
    assert sum(statuses.values()) == 1000
