"""Serving throughput: aggregate generated tokens/s of `exocortex serve`, and of llama.cpp's `llama-server` on the
same weights, with 1 and 16 concurrent streaming clients.

    python bench/serve.py                       # runs/tiny if it exists, else a random tiny-preset model
    python bench/serve.py --preset d12          # a random model of the d12 preset's shape
    python bench/serve.py --run runs/tiny --requests 32 --max-tokens 64 [--no-compile] [--clients 1,4,16]
    python bench/serve.py --build-llama-server  # build llama-server first if it is not found (~6 min on 2 cores)

Starts `exocortex serve` (default flags: continuous batching over --max-concurrent rows, the compiled decode
step) on a free loopback port in a subprocess, and llama-server on the run's chat model exported as GGUF in the
dtype our server computes in (exocortex/apps/export/gguf.py), with continuous batching, one slot per client of
the largest count (`-np 16 -cb`), each slot our context (`-c 16x`), `--threads` threads with `--poll 0` (see
bench/_llama_server.py: where it is looked for, how it is built). For each client count it sends the same chat
requests (greedy, fixed max_tokens, streaming with usage) from that many concurrent streaming clients, each
taking the next request from a shared list; servers and client counts are interleaved in rounds and each keeps
its best, so load on a shared machine hits them alike. Greedy decoding of the same weights makes both servers
generate the same tokens (the table shows each side's token count: a mismatch is flagged), so tokens/s compares
like with like. The last line printed is one JSON object: tokens/s per side and client count, `clientsN_vs_1`
(ours), and `vs_llama_clientsN` (ours / llama-server).

With --preset, or without --run and without runs/tiny, a run with the preset's shape (default tiny) and random
weights is built in a temporary directory (bench/_runs.py); its replies run to max_tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import _llama_server  # noqa: E402  (bench/ is on the path when run as a script)
from _server import free_port, serving  # noqa: E402

QUESTIONS = ["Tell me about the town of Hiswick.", "What is 347 * 29?", "Who are you?",
             "Describe the market in Tarsk.", "What grows near the river?", "Write a short story about a fox.",
             "What is 12 + 30 * 2?", "Name three animals of the forest.", "How far is the coast?",
             "What do the people of the hills trade?", "Explain how a mill works.", "What is 1000 - 357?"]


# over kept-alive connections, requests to llama-server intermittently failed with "Server disconnected without
# sending a response" (a connection it had closed after a streamed reply, reused): every request gets its own
# connection, on both servers alike (a loopback connect is ~0.1 ms against a reply of 64 tokens)
HEADERS = {"Connection": "close"}
FIRST_CONTENT = re.compile(rb'"(?:content|text)":\s*"[^"]')  # a delta with text in it (not the empty role chunk)


async def one_request(client, url: str, question: str, max_tokens: int) -> tuple[int, int, float, float]:
    """Stream one chat reply; returns (prompt tokens, completion tokens, seconds to the first content, total
    seconds). The client reads raw bytes and parses only the final usage event: it shares the CPU with the
    servers, and a JSON parse per token would make it, not the server, what 16 clients measure."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tail = None, b""
    async with client.stream("POST", url, json=body, headers=HEADERS) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for data in r.aiter_raw():
            if first is None and FIRST_CONTENT.search(tail[-64:] + data):
                first = time.perf_counter() - t0
            tail = (tail + data)[-16384:]
    usage = None
    for event in tail.split(b"\n\n"):
        if event.startswith(b"data: {") and b'"usage"' in event:
            chunk = json.loads(event[6:])
            usage = chunk.get("usage") or usage
        elif b'"error"' in event:
            raise RuntimeError(event.decode(errors="replace"))
    if usage is None:
        raise RuntimeError("stream ended without usage")
    return usage["prompt_tokens"], usage["completion_tokens"], first or 0.0, time.perf_counter() - t0


async def workload(base: str, clients: int, questions: list[str], max_tokens: int) -> dict:
    import httpx

    todo = list(enumerate(questions))
    results = []

    async def client_loop(client):
        while todo:
            _, q = todo.pop(0)
            results.append(await one_request(client, base + "/v1/chat/completions", q, max_tokens))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - t
    tokens = sum(r[1] for r in results)
    ttft = sorted(r[2] for r in results)
    return {"clients": clients, "requests": len(results), "prompt_tokens": sum(r[0] for r in results),
            "tokens": tokens, "seconds": wall, "tok_s": tokens / wall, "ttft_median_s": ttft[len(ttft) // 2]}


def llama_server_binary(build: bool) -> str | None:
    """The llama-server to compare with, built if asked; None (and one line saying why) when there is none."""
    binary = _llama_server.find()
    if binary is None and build:
        print("building llama-server from llama-cpp-python's sdist (~6 min on 2 cores) ...", flush=True)
        try:
            binary = _llama_server.build()
        except (RuntimeError, OSError) as e:
            print(f"llama-server: the build failed, comparing skipped: {e}", flush=True)
            return None
    if binary is None:
        print(f"llama-server: not found ({_llama_server.where_looked()}); comparing skipped "
              "(--build-llama-server builds it)", flush=True)
    return binary


def export_for_llama(run: str, tmp: str) -> tuple[str, str]:
    """The model `exocortex serve` serves (newest chat stage) as GGUF in the dtype the server computes in."""
    from exocortex.apps.export.gguf import export_gguf
    from exocortex.config import load_config
    from exocortex.device import resolve_device, resolve_dtype

    cfg = load_config(run)
    dtype = str(resolve_dtype(cfg.sft.dtype, resolve_device(cfg.device))).removeprefix("torch.")
    stage = cfg.run.chat_checkpoint().parent.name
    return str(export_gguf(run, Path(tmp) / "model.gguf", stage=stage, dtype=dtype)), dtype


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="run directory (default: runs/tiny, else a random model)")
    ap.add_argument("--preset", default=None,
                    help="serve a random model of this preset's shape (default without --run: runs/tiny, else tiny)")
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--requests", type=int, default=32, help="requests per client count (same list each time)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each client count keeps its best")
    ap.add_argument("--no-compile", action="store_true", help="serve with --no-compile (eager decode step)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads of both servers: llama-server -t, ours OMP_NUM_THREADS (default: all cores)")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for `exocortex serve` (repeatable), e.g. --serve-arg=--stage=sft")
    ap.add_argument("--baseline", default=None, metavar="CHECKOUT",
                    help="also serve from another checkout of exocortex (e.g. a worktree of main), interleaved "
                         "with the others: an A/B of two versions under the same load")
    ap.add_argument("--baseline-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for the baseline's `exocortex serve` (repeatable)")
    ap.add_argument("--no-llama-server", action="store_true", help="only exocortex serve")
    ap.add_argument("--build-llama-server", action="store_true",
                    help="build llama-server into the cache if it is not found (needs cmake and a C++ compiler)")
    args = ap.parse_args()
    if args.run and args.preset:
        ap.error("--run serves that run and --preset a random model: give one of them")
    import httpx

    counts = [int(c) for c in args.clients.split(",")]
    binary = None if args.no_llama_server else llama_server_binary(args.build_llama_server)
    flags = ["--max-concurrent", str(max(counts)), "--max-queue", str(max(64, max(counts)))]
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the serve subprocess's intra-op threads (torch reads it)
    with contextlib.ExitStack() as stack:
        base, _, run = stack.enter_context(serving(args.run, *flags, *(["--no-compile"] if args.no_compile else []),
                                                   *args.serve_arg, preset=args.preset))
        health = httpx.get(base + "/health", timeout=5).json()
        servers = {"exocortex": base}
        if args.baseline:
            servers["baseline"] = stack.enter_context(serving(run, *flags, *args.baseline_arg,
                                                              root=Path(args.baseline).resolve()))[0]
        if binary:
            gguf, dtype = export_for_llama(run, stack.enter_context(tempfile.TemporaryDirectory()))
            servers["llama-server"] = stack.enter_context(_llama_server.running(
                binary, gguf, free_port(), max(counts), health["context_length"], args.threads))
            print(f"llama-server: {binary} on {Path(gguf).name} ({dtype}), -np {max(counts)} -cb "
                  f"-c {max(counts)}x{health['context_length']} -t {args.threads} --poll 0", flush=True)
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
        for name, url in servers.items():  # warm-up: allocations, caches, first-use paths
            t = time.perf_counter()
            asyncio.run(workload(url, max(counts), questions[:max(counts)], args.max_tokens))
            print(f"{name} warm-up {time.perf_counter() - t:.1f} s", flush=True)
        print(f"model {health['model']} from {run}; context {health['context_length']}; {args.threads} threads; "
              f"{args.requests} chat requests, max_tokens {args.max_tokens}, greedy, streaming; "
              f"load average {os.getloadavg()[0]:.2f} before", flush=True)
        best: dict[tuple[str, int], dict] = {}
        for _ in range(args.rounds):  # interleaved, best of each: load on a shared machine hits all alike
            for c in counts:
                for name, url in servers.items():
                    r = asyncio.run(workload(url, c, questions, args.max_tokens))
                    if (name, c) not in best or r["tok_s"] > best[(name, c)]["tok_s"]:
                        best[(name, c)] = r
        load = os.getloadavg()[0]
    print(f"\n{'server':>12} {'clients':>7} {'requests':>8} {'prompt':>7} {'tokens':>7} {'seconds':>8} {'tok/s':>8} "
          f"{'TTFT p50':>9} {'vs 1':>6} {'ours/llama':>10}")
    out = {}
    for name in servers:
        one = best.get((name, 1), best[(name, counts[0])])["tok_s"]
        for c in counts:
            r = best[(name, c)]
            theirs = best.get(("llama-server", c))
            ratio = f"{r['tok_s'] / theirs['tok_s']:9.2f}x" if name == "exocortex" and theirs else ""
            print(f"{name:>12} {c:7d} {r['requests']:8d} {r['prompt_tokens']:7d} {r['tokens']:7d} {r['seconds']:8.2f} "
                  f"{r['tok_s']:8.0f} {r['ttft_median_s'] * 1e3:7.0f}ms {r['tok_s'] / one:5.2f}x {ratio}")
            key = {"exocortex": "ours", "llama-server": "llama", "baseline": "baseline"}[name]
            out[f"{key}_clients{c}_tok_s"] = round(r["tok_s"], 1)
            if c != counts[0]:
                out[f"{key}_clients{c}_vs_{counts[0]}"] = round(r["tok_s"] / one, 2)
            if name == "exocortex" and ("baseline", c) in best:
                out[f"vs_baseline_clients{c}"] = round(r["tok_s"] / best[("baseline", c)]["tok_s"], 2)
            if name == "exocortex" and theirs:
                out[f"vs_llama_clients{c}"] = round(r["tok_s"] / theirs["tok_s"], 2)
                if (r["tokens"], r["prompt_tokens"]) != (theirs["tokens"], theirs["prompt_tokens"]):
                    print(f"  note: at {c} clients the two servers' token counts differ (prompt {r['prompt_tokens']} "
                          f"vs {theirs['prompt_tokens']}, generated {r['tokens']} vs {theirs['tokens']})")
    print(f"load average {load:.2f} after (1 min)")
    out["load_avg"] = round(load, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
