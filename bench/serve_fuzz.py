"""Malformed requests and huge uploads against `exocortex serve`: every answer must be a 4xx, the server's RSS
must not follow the uploads, and /health must stay fast while they are refused.

    python bench/serve_fuzz.py                        # runs/tiny if it exists, else a random tiny-preset model
    python bench/serve_fuzz.py --requests 5000 --uploads 3 --upload-mb 1024

1. `--requests` requests from tests/test_serve_fuzz.py's `malformed` (bad JSON, wrong types, huge numbers, deep
   nesting, bad UTF-8, form posts, unknown paths and methods, oversized bodies, foreign Host and Origin), plus
   one in ten sent as raw bytes that are not valid HTTP (bad header lines, oversized headers, conflicting
   lengths, garbage). Counts each status; a 5xx or a dead server fails the run. Server RSS before and after.
2. `--uploads` concurrent uploads of `--upload-mb` MB each (half chunked, half with a Content-Length), sent as
   fast as loopback takes them while /health is polled: how much each got to send before its 413, the
   server's peak RSS, and /health's worst latency meanwhile.
The last line printed is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _server import rss_mb, serving  # noqa: E402
from test_serve_fuzz import malformed  # noqa: E402  (the same kinds the test sends)

RAW = [  # not HTTP, or not HTTP this server accepts: h11 answers 400 (or the connection just closes)
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",  # (past one read)
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1, 2\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(200)),  # a TLS hello
]


def raw_status(port: int, data: bytes) -> str:
    """The status a raw request gets, or 'closed' when the server closes without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        reply = b""
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # closed by the server before all was sent
            pass
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    return reply.split()[1].decode() if reply.startswith(b"HTTP/1.1 ") else "closed"


def fuzz(base: str, pid: int, n: int) -> dict:
    import httpx

    rng, statuses = random.Random(0), collections.Counter()
    port = int(base.rsplit(":", 1)[1])
    before = rss_mb(pid)
    t = time.time()
    with httpx.Client(base_url=base, timeout=60) as c:
        for i in range(n):
            if i % 10 == 9:
                data = rng.choice(RAW)
                status = raw_status(port, data)
                statuses[status] += 1
                if status.isdigit() and not status.startswith("4"):
                    sys.exit(f"error: raw {data[:200]!r} -> {status}")
                continue
            method, path, body, headers = malformed(rng)
            try:
                r = c.request(method, path, content=body, headers=headers)
            except httpx.TransportError:  # an oversized body refused before it was read (413 + close)
                statuses["reset"] += 1
                continue
            statuses[str(r.status_code)] += 1
            if not 400 <= r.status_code < 500:
                sys.exit(f"error: {method} {path} {body[:200]!r} -> {r.status_code} {r.text[:300]}")
        assert c.get("/health").json()["status"] == "ok"
    bad = {s: k for s, k in statuses.items() if s.isdigit() and not s.startswith("4")}
    if bad:
        sys.exit(f"error: statuses other than 4xx: {bad}")
    return {"requests": n, "seconds": round(time.time() - t, 1), "statuses": dict(sorted(statuses.items())),
            "rss_before_mb": round(before), "rss_after_mb": round(rss_mb(pid))}


def upload(port: int, mb: int, chunked: bool, out: dict) -> None:
    """Send up to `mb` MB as one request body; records the bytes sent and the status that came back."""
    block = b"x" * (1 << 20)
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {mb << 20}\r\n\r\n"
    frame = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
    sent, reply = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head.encode())
        try:
            while sent < mb << 20:
                s.sendall(frame)
                sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            reply = s.recv(65536)
        except OSError:
            pass
    out.update(sent_mb=round(sent / (1 << 20), 1), status=reply.split()[1].decode() if reply[:5] == b"HTTP/" else
               "reset", chunked=chunked)


def uploads(base: str, pid: int, count: int, mb: int) -> dict:
    import httpx

    port = int(base.rsplit(":", 1)[1])
    before, peak, latencies = rss_mb(pid), 0.0, []
    results = [{} for _ in range(count)]
    threads = [threading.Thread(target=upload, args=(port, mb, i % 2 == 0, results[i])) for i in range(count)]
    for th in threads:
        th.start()
    with httpx.Client(base_url=base, timeout=60) as c:
        while any(th.is_alive() for th in threads):
            t = time.perf_counter()
            c.get("/health")
            latencies.append(time.perf_counter() - t)
            peak = max(peak, rss_mb(pid))
            time.sleep(0.05)
    for th in threads:
        th.join()
    return {"uploads": results, "upload_mb": mb, "rss_before_mb": round(before), "rss_peak_mb": round(peak),
            "rss_after_mb": round(rss_mb(pid)), "health_polls": len(latencies),
            "health_max_ms": round(max(latencies, default=0) * 1e3, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="run directory (default: runs/tiny, else a random model)")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--uploads", type=int, default=3)
    ap.add_argument("--upload-mb", type=int, default=1024)
    args = ap.parse_args()
    with serving(args.run) as (base, pid, run):
        print(f"serving {run} at {base}", flush=True)
        f = fuzz(base, pid, args.requests)
        print(f"fuzz: {f}", flush=True)
        u = uploads(base, pid, args.uploads, args.upload_mb)
        print(f"uploads: {u}", flush=True)
    print(json.dumps({"fuzz": f, "uploads": u}))


if __name__ == "__main__":
    main()
