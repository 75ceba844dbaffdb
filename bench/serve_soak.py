"""Server memory under load: RSS after rounds of long replies, then a soak of streaming clients.

    python bench/serve_soak.py                         # runs/tiny if it exists, else a random tiny-preset model
    python bench/serve_soak.py --rounds 3 --clients 32 --seconds 60

1. `--rounds` rounds of 16 concurrent completions of up to 1000 tokens each (sampled, seeded; with a random
   model they run to the end of the context): the server's RSS after each round.
2. `--clients` streaming chat clients for `--seconds` (short random prompts, up to 200 tokens, one in ten
   hanging up after two chunks) while the server's RSS is sampled every 0.5 s: its maximum, and what the
   clients got.
The last line printed is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import rss_mb, serving  # noqa: E402

WORDS = ["the", "river", "town", "Mira", "lives", "in", "Tarsk", "and", "sells", "glimmerfern", "12", "+", "7", "?"]


async def long_round(base: str, seed: int) -> int:
    import httpx

    async def one(client, i):
        r = await client.post(base + "/v1/completions", json={"prompt": "the river", "max_tokens": 1000,
                                                               "temperature": 1.0, "seed": seed * 100 + i})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=900) as client:
        return sum(await asyncio.gather(*(one(client, i) for i in range(16))))


async def soak_client(i: int, base: str, deadline: float, stats: dict) -> None:
    import httpx

    rng = random.Random(i)
    async with httpx.AsyncClient(timeout=120) as client:
        while time.time() < deadline:
            body = {"messages": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 20)))}],
                    "max_tokens": rng.randint(1, 200), "stream": True, "seed": rng.randrange(1000)}
            hang_up = rng.random() < 0.1
            try:
                async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        stats["errors"].append(f"HTTP {r.status_code}")
                        continue
                    chunks = 0
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunks += 1
                            if '"error"' in line[:20]:
                                stats["errors"].append(line[:200])
                        if hang_up and chunks >= 2:
                            break
                    stats["hung_up" if hang_up else "replies"] += 1
                    stats["chunks"] += chunks
            except httpx.HTTPError as e:
                stats["errors"].append(f"{type(e).__name__}: {e}")


async def soak(base: str, pid: int, clients: int, seconds: float) -> dict:
    stats = {"replies": 0, "hung_up": 0, "chunks": 0, "errors": []}
    samples = []
    deadline = time.time() + seconds
    tasks = [asyncio.ensure_future(soak_client(i, base, deadline, stats)) for i in range(clients)]
    while not all(t.done() for t in tasks):
        samples.append(rss_mb(pid))
        await asyncio.sleep(0.5)
    await asyncio.gather(*tasks)
    return {"clients": clients, "seconds": seconds, "replies": stats["replies"], "hung_up": stats["hung_up"],
            "chunks": stats["chunks"], "errors": len(stats["errors"]), "first_errors": stats["errors"][:3],
            "rss_start_mb": round(samples[0]), "rss_max_mb": round(max(samples)), "rss_end_mb": round(rss_mb(pid))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="run directory (default: runs/tiny, else a random model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    with serving(args.run, "--max-concurrent", "16", "--max-queue", "64") as (base, pid, run):
        out = {"run": run, "rss_idle_mb": round(rss_mb(pid)), "rounds": []}
        print(f"serving {run} at {base}: RSS {out['rss_idle_mb']} MB", flush=True)
        for i in range(args.rounds):
            t = time.time()
            tokens = asyncio.run(long_round(base, i))
            out["rounds"].append({"tokens": tokens, "seconds": round(time.time() - t, 1), "rss_mb": round(rss_mb(pid))})
            print(f"long round {i}: {out['rounds'][-1]}", flush=True)
        if args.seconds > 0:
            out["soak"] = asyncio.run(soak(base, pid, args.clients, args.seconds))
            print(f"soak: {out['soak']}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
