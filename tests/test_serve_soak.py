"""Soak: 32 concurrent streaming clients for 60 s against a tiny random model over loopback.

Every request must succeed (status 200, well-formed chunks, a finish reason, [DONE]); some clients hang up
mid-reply (cancellation under load). Afterwards the server is healthy and idle (no slot or row leaked), and
greedy replies produced under load equal what the engine generates for the same request alone.
Run alone with `pytest -s tests/test_serve_soak.py` to see the throughput.
"""
import asyncio
import json
import random
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
from test_serve import MODEL, Server  # noqa: E402
from test_serve_batching import alone, random_model  # noqa: E402

from exocortex.infer.engine import Engine  # noqa: E402
from exocortex.apps.serve import create_app  # noqa: E402

pytestmark = pytest.mark.slow

CLIENTS, SECONDS, GRACE = 32, 60.0, 8.0  # requests still running GRACE s after the end are cut (client hangs up)
WORDS = ["the", "river", "town", "Mira", "lives", "in", "Tarsk", "and", "sells", "glimmerfern", "12", "+", "日本", "🙂"]


def make_request(rng: random.Random) -> dict:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25)))
    body = {"max_tokens": rng.randint(1, 80), "stream": True, "stream_options": {"include_usage": True}}
    if rng.random() < 0.5:
        body["temperature"] = 0
    else:
        body.update(temperature=rng.choice([0.3, 0.8, 1.5]), top_p=rng.choice([0.5, 0.9, 1.0]),
                    top_k=rng.choice([0, 5, 50]), seed=rng.randrange(1000))
    if rng.random() < 0.2:
        body["stop"] = rng.sample(WORDS, 2)
    if rng.random() < 0.7:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    return body


async def client(i: int, base: str, deadline: float, stats: dict) -> None:
    rng = random.Random(i)
    async with httpx.AsyncClient(timeout=60) as h:
        while time.time() < deadline:
            body = make_request(rng)
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            hang_up = rng.random() < 0.1  # this client goes away after a couple of chunks
            try:
                async with h.stream("POST", base + path, json=body) as r:
                    if r.status_code != 200:
                        stats["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]}")
                        continue
                    chunks, done = [], False
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            continue
                        chunk = json.loads(line[5:])
                        if "error" in chunk:
                            stats["errors"].append(chunk["error"]["message"])
                            break
                        chunks.append(chunk)
                        if hang_up and len(chunks) >= 2:
                            break
                    if hang_up:
                        stats["hung_up"] += 1
                        continue
                    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]
                                and c["choices"][0]["finish_reason"]]
                    usage = chunks[-1].get("usage") if chunks else None
                    if not done or finishes not in (["stop"], ["length"]) or not usage \
                            or not 1 <= usage["completion_tokens"] <= body["max_tokens"]:
                        stats["errors"].append(f"malformed stream: done={done} finishes={finishes} usage={usage}")
                        continue
                    stats["requests"] += 1
                    stats["tokens"] += usage["completion_tokens"]
                    if body.get("temperature") == 0 and "stop" not in body and len(stats["greedy"]) < 20:
                        key = "content" if "messages" in body else "text"
                        text = "".join((c["choices"][0].get("delta") or c["choices"][0]).get(key) or ""
                                       for c in chunks if c["choices"])
                        stats["greedy"].append((body, text, usage["completion_tokens"]))
            except (httpx.HTTPError, ValueError, KeyError) as e:
                stats["errors"].append(f"{type(e).__name__}: {e}")


def test_soak_32_streaming_clients(tok):
    eng = Engine(random_model(tok), tok, torch.device("cpu"))
    app = create_app(eng, MODEL, max_concurrent=16, max_queue=64)
    server = Server(app)
    stats = {"errors": [], "requests": 0, "tokens": 0, "hung_up": 0, "greedy": []}
    try:
        async def main():
            deadline = time.time() + SECONDS
            tasks = [asyncio.ensure_future(client(i, server.url, deadline, stats)) for i in range(CLIENTS)]
            _, late = await asyncio.wait(tasks, timeout=SECONDS + GRACE)  # bounded even on a starved machine
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            return len(late)
        t = time.time()
        cut = asyncio.run(main())
        elapsed = time.time() - t
        print(f"\nsoak: {CLIENTS} clients, {elapsed:.1f} s: {stats['requests']} replies + {stats['hung_up']} hang-ups "
              f"({cut} cut at the end), {stats['tokens']} tokens = {stats['tokens'] / elapsed:.0f} tokens/s, "
              f"{len(stats['errors'])} errors")
        assert not stats["errors"], stats["errors"][:5]
        assert stats["requests"] >= CLIENTS and stats["hung_up"] >= 1  # (a starved machine makes far fewer)
        deadline = time.time() + 10  # hung-up rows leave at the next step boundary
        while True:
            h = httpx.get(server.url + "/health").json()
            rows = sum(r is not None for r in app.state.exocortex.batcher.rows)
            if (h["active"], h["queued"], rows) == (0, 0, 0):
                break
            assert time.time() < deadline, (h, rows)
            time.sleep(0.05)
        assert h["status"] == "ok"
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "the river", "max_tokens": 5}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()
    # greedy replies made under load are the ones each request gets alone
    assert len(stats["greedy"]) >= 10
    for body, text, steps in stats["greedy"]:
        if "messages" in body:
            prompt = tok.render_for_completion(body["messages"])
        else:
            prompt = tok.encode(body["prompt"], bos=True)
        tokens, want_steps = alone(eng, prompt, body["max_tokens"])
        assert (text.strip(), steps) == (eng.render(tokens), want_steps), body
