"""A local stand-in for the Hugging Face hub: same URL layout, in a thread, with injectable faults.

    GET /api/datasets/<owner>/<name>/tree/<rev>/<dir>?recursive=true   JSON listing, paged by Link headers
    GET /datasets/<owner>/<name>/resolve/<rev>/<path>                  302 to /cdn/... (as the hub does)
    GET /cdn/<owner>/<name>/<rev>/<path>                                the bytes; honours Range
Files of 1,000 bytes or more are listed as LFS (sha256); smaller ones by their git blob sha1. `repos` holds
each repo's main branch, `revisions` any other revision (URL-encoded in URLs, as the hub's are).
"""
from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.revisions: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> revision -> files
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.fail: dict[str, int] = {}       # url path substring -> how many more 500s to answer
        self.drop: dict[str, list[int]] = {}  # file path -> bytes to send on each next request, then hang up
        self.corrupt: dict[str, int] = {}    # file path -> how many more responses get a flipped byte
        self.page_size = 1000
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                hub._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def resolves(self, path: str | None = None) -> list[str | None]:
        """Range headers of the file requests (for one file path, or all)."""
        return [r for p, r in self.requests if p.startswith("/cdn/") and (path is None or p.endswith("/" + path))]

    # ------------------------------------------------------------------ handler
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        path = urllib.parse.unquote(url.path)
        with self.lock:
            self.requests.append((path, h.headers.get("Range")))
            for key, n in self.fail.items():
                if n > 0 and key in path:
                    self.fail[key] = n - 1
                    return self._send(h, 500, b"internal error")
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]  # a revision may hold %2F
        if parts[:2] == ["api", "datasets"] and len(parts) >= 6 and parts[4] == "tree":
            repo, rev, prefix = "/".join(parts[2:4]), parts[5], "/".join(parts[6:])
            return self._tree(h, repo, rev, prefix, urllib.parse.parse_qs(url.query))
        if parts[0] == "datasets" and len(parts) >= 6 and parts[3] == "resolve":
            repo, rev, fpath = "/".join(parts[1:3]), parts[4], "/".join(parts[5:])
            if fpath not in (self.files(repo, rev) or {}):
                return self._send(h, 404, b"Entry not found")
            h.send_response(302)
            h.send_header("Location", f"/cdn/{repo}/{urllib.parse.quote(rev, safe='')}/{urllib.parse.quote(fpath)}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if parts[0] == "cdn" and len(parts) >= 5:
            return self._file(h, "/".join(parts[1:3]), parts[3], "/".join(parts[4:]))
        self._send(h, 404, b"not found")

    def files(self, repo: str, rev: str) -> dict[str, bytes] | None:
        return self.repos.get(repo) if rev == "main" else self.revisions.get(repo, {}).get(rev)

    def _send(self, h, code: int, body: bytes, headers: dict | None = None) -> None:
        h.send_response(code)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _tree(self, h, repo, rev, prefix, query) -> None:
        if repo not in self.repos and repo not in self.revisions:
            return self._send(h, 401, json.dumps({"error": "Repository not found"}).encode(),
                              {"X-Error-Code": "RepoNotFound"})  # the hub answers 401 when not logged in
        files = self.files(repo, rev)
        if files is None:
            return self._send(h, 404, json.dumps({"error": f"Invalid rev id: {rev}"}).encode(),
                              {"X-Error-Code": "RevisionNotFound"})
        entries = []
        for p, data in sorted(files.items()):
            if prefix and not p.startswith(prefix + "/"):
                continue
            e = {"type": "file", "path": p, "size": len(data) if len(data) < 1000 else 134}
            if len(data) >= 1000:
                e["oid"] = "0" * 40
                e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            else:
                e["oid"] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            entries.append(e)
        if prefix and not entries:
            return self._send(h, 404, json.dumps({"error": f"Entry not found: {prefix}"}).encode(),
                              {"X-Error-Code": "EntryNotFound"})
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start:start + self.page_size]
        headers = {"Content-Type": "application/json"}
        if start + self.page_size < len(entries):
            nxt = f"{self.url}{urllib.parse.urlsplit(h.path).path}?recursive=true&cursor={start + self.page_size}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._send(h, 200, json.dumps(page).encode(), headers)

    def _file(self, h, repo, rev, fpath) -> None:
        data = (self.files(repo, rev) or {}).get(fpath)
        if data is None:
            return self._send(h, 404, b"no such file")
        with self.lock:
            if self.corrupt.get(fpath, 0) > 0:
                self.corrupt[fpath] -= 1
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            drop = self.drop[fpath].pop(0) if self.drop.get(fpath) else None
        start, code = 0, 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                return self._send(h, 416, b"")
            code = 206
        body = data[start:]
        h.send_response(code)
        h.send_header("Content-Length", str(len(body)))
        if code == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if drop is not None:  # hang up mid-body, as a flaky link does
            h.wfile.write(body[:drop])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)
