"""The one Hugging Face hub client: `exocortex data download` (pretraining shards) and hub references in
benchmark paths (tasks/benchmarks.py) both fetch through it, into one cache.

Why ours and not huggingface_hub: nothing to install; parallel downloads that resume (.part + Range) and
check every file against the hub's own checksum; a cache of plain files at the repo's own paths (what
`--data` reads); and an endpoint override, so tests run the real HTTP path (drops, 5xx, corruption)
against a local fake hub (tests/fakehub.py) with no network.

A hub reference is hf:<owner>/<name>[@<revision>][/<path in repo>] (a file, a glob or a folder; a revision
with a slash is URL-encoded: @refs%2Fconvert%2Fparquet).

Plain HTTP (urllib) against the hub's public URL layout:
    listing   {endpoint}/api/datasets/{repo}/tree/{revision}/{dir}?recursive=true  (paged by Link headers)
    file      {endpoint}/datasets/{repo}/resolve/{revision}/{path}                  (redirects to a CDN)
The endpoint is https://huggingface.co unless EXOCORTEX_HF_ENDPOINT or HF_ENDPOINT says otherwise (a
mirror; the tests' local server). HF_TOKEN, if set, is sent for gated or private datasets.

Each file downloads to <file>.part and is renamed into place only once its size and checksum match the
listing (sha256 for LFS files, the git blob id for small ones). A dropped connection, a 5xx or a 429 is
retried with exponential backoff, resuming the .part with a Range request; a checksum mismatch discards
the file and fetches it again. The cache keeps a manifest of verified files (.exocortex-manifest.json):
a re-run skips them, and re-hashes any file whose size or modification time changed since.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import random
import re
import shutil
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from exocortex.errors import ExocortexError
from exocortex.fileio import atomic_write_text

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
MANIFEST = ".exocortex-manifest.json"
LOCK = ".exocortex-lock"
CHUNK = 1 << 20


def endpoint() -> str:
    return (os.environ.get("EXOCORTEX_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def default_cache_dir(repo: str) -> Path:
    root = os.environ.get("EXOCORTEX_CACHE") or "~/.cache/exocortex"
    return Path(root).expanduser() / "datasets" / repo


def check_repo_id(repo: str) -> None:
    if not REPO_ID.match(repo) or ".." in repo:
        raise ExocortexError(f"'{repo}' is not a hub dataset id: expected <owner>/<name>, "
                             f"e.g. HuggingFaceFW/fineweb-edu")


def downloaded_dir(repo: str) -> Path:
    """The cache directory of a downloaded dataset (for --data hf:<owner>/<name>)."""
    check_repo_id(repo)
    d = default_cache_dir(repo)
    if not (d / MANIFEST).exists():
        raise ExocortexError(f"dataset {repo} is not downloaded (no {d / MANIFEST}); run "
                             f"`exocortex data download --dataset {repo}` first")
    return d


REF_FORM = "hf:<owner>/<name>[@<revision>][/<path in repo>]"


def parse_ref(ref: str) -> tuple[str, str, str]:
    """A hub reference -> (repo, revision, path in repo); the path is "" for the whole repo."""
    if not ref.startswith("hf:"):
        raise ExocortexError(f"'{ref}' is not a hub reference: write {REF_FORM}")
    body = ref[3:]
    if body.startswith("//"):  # huggingface_hub's hf://[datasets/]owner/name/path: say what we call it
        rest = body[2:].removeprefix("datasets/")
        raise ExocortexError(f"'{ref}': write hub references as {REF_FORM}, here hf:{rest}")
    parts = body.split("/")
    name, _, rev = parts[1].partition("@") if len(parts) > 1 else ("", "", "")
    repo = f"{parts[0]}/{name}"
    if not REPO_ID.match(repo) or ".." in repo:
        raise ExocortexError(f"'{ref}' is not a hub reference: write {REF_FORM}, "
                             "e.g. hf:openai/gsm8k/main/test-00000-of-00001.parquet")
    return repo, urllib.parse.unquote(rev) or "main", "/".join(p for p in parts[2:] if p)


def hub_files(ref: str, suffixes: tuple[str, ...]) -> list[tuple[Path, str]]:
    """(local file, path in repo) for a hub reference: a file, a glob, or a folder (its files ending in one of
    `suffixes`, at any depth; no path: the whole repo). Cache-first: what this reference fetched before is
    used without asking the hub, so loaders work offline (`exocortex data download` refreshes a branch)."""
    repo, revision, path = parse_ref(ref)
    if path.lower().endswith(suffixes) or any(c in path for c in "*?["):
        include: tuple[str, ...] = (path,)
    else:
        include = tuple(f"{path}/*{s}" if path else f"*{s}" for s in suffixes)
    root = default_cache_dir(repo)
    return [(p, p.relative_to(root).as_posix()) for p in sync(repo, include, revision, reuse=True)]


@dataclass
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None    # LFS (and Xet) files: sha256 of the content
    git_sha1: str | None = None  # files stored in git itself: the blob id

    @property
    def checksum(self) -> str:
        return f"sha256:{self.sha256}" if self.sha256 else f"git-sha1:{self.git_sha1}"


class _NoAuthAcrossHosts(urllib.request.HTTPRedirectHandler):
    """Follow the hub's redirects to its CDN, but never send the token to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


class _Retry(Exception):
    """A transient failure: try again after a backoff."""


class _Cancelled(Exception):
    """Another download failed or the user pressed Ctrl-C: stop (the .part file stays, to resume)."""


class Hub:
    def __init__(self, base: str | None = None, token: str | None = None, retries: int | None = None,
                 backoff: float | None = None, timeout: float = 60.0):
        self.base = (base or endpoint()).rstrip("/")
        self.token = token if token is not None else os.environ.get("HF_TOKEN")
        # env overrides exist for tests and flaky links; the defaults ride out a few minutes of outage
        self.retries = retries if retries is not None else int(os.environ.get("EXOCORTEX_HTTP_RETRIES", "8"))
        self.backoff = backoff if backoff is not None else float(os.environ.get("EXOCORTEX_HTTP_BACKOFF", "1.0"))
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_NoAuthAcrossHosts)
        self.cancelled = threading.Event()

    # ------------------------------------------------------------------ HTTP
    def _request(self, url: str, headers: dict | None = None):
        h = {"User-Agent": "exocortex", **(headers or {})}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return self._opener.open(urllib.request.Request(url, headers=h), timeout=self.timeout)

    def _sleep(self, attempt: int) -> None:
        if self.cancelled.wait(self.backoff * 2 ** min(attempt, 6) * (0.5 + random.random())):
            raise _Cancelled

    def _get_json(self, url: str, what: str):
        """GET a JSON document, retrying transient failures; returns (data, next page url)."""
        for attempt in range(self.retries + 1):
            try:
                with self._request(url) as r:
                    data = json.loads(r.read())
                    return data, _next_link(r.headers.get("Link", ""))
            except urllib.error.HTTPError as e:
                if e.code not in RETRY_STATUS or attempt == self.retries:
                    raise
            except (urllib.error.URLError, HTTPException, ConnectionError, TimeoutError, json.JSONDecodeError) as e:
                if attempt == self.retries:
                    raise ExocortexError(f"{what}: cannot reach {url} ({_reason(e)}) after {attempt + 1} tries; "
                                         f"check the network (or EXOCORTEX_HF_ENDPOINT / HF_ENDPOINT)") from None
            self._sleep(attempt)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ listing
    def list_files(self, repo: str, revision: str = "main", include: str | tuple[str, ...] = "*.parquet"
                   ) -> list[RemoteFile]:
        """Files of the dataset matching the glob `include` (or any of several), sorted by path."""
        check_repo_id(repo)
        patterns = (include,) if isinstance(include, str) else tuple(include)
        prefix = _glob_prefix(patterns)
        url = (f"{self.base}/api/datasets/{repo}/tree/{_q(revision, '')}"
               + (f"/{_q(prefix)}" if prefix else "") + "?recursive=true")
        files: list[RemoteFile] = []
        while url:
            try:
                entries, url = self._get_json(url, f"listing {repo}")
            except urllib.error.HTTPError as e:
                raise self._listing_error(e, repo, revision, prefix) from None
            for e in entries:
                if e.get("type") != "file" or e["path"].startswith("/") or ".." in e["path"].split("/"):
                    continue  # a listing may not write outside the cache
                if any(fnmatch.fnmatchcase(e["path"], p) for p in patterns):
                    lfs = e.get("lfs") or {}
                    files.append(RemoteFile(e["path"], int(lfs.get("size", e.get("size", 0))), lfs.get("oid"),
                                            None if lfs else e.get("oid")))
        return sorted(files, key=lambda f: f.path)

    def _listing_error(self, e: urllib.error.HTTPError, repo: str, revision: str, prefix: str) -> ExocortexError:
        # the hub names the cause in X-Error-Code (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound)
        code, body = e.headers.get("X-Error-Code", ""), _body(e)
        low = body.lower()
        if code == "GatedRepo" or "gated" in low:
            return ExocortexError(f"dataset {repo} is gated (HTTP {e.code}): accept its terms on the hub, then set "
                                  f"HF_TOKEN")
        if code == "RepoNotFound" or "repository not found" in low:
            hint = "" if self.token else " (if it is private, set HF_TOKEN)"
            return ExocortexError(f"dataset {repo} not found on {self.base} (HTTP {e.code}); check the id "
                                  f"(<owner>/<name>, e.g. HuggingFaceFW/fineweb-edu){hint}")
        if code == "RevisionNotFound" or "invalid rev" in low or "revision" in low:
            return ExocortexError(f"dataset {repo} has no revision '{revision}' (HTTP {e.code})")
        if e.code == 404 and prefix:
            return ExocortexError(f"dataset {repo} has no directory '{prefix}' at revision '{revision}' (HTTP 404)")
        if e.code in (401, 403):
            return ExocortexError(f"dataset {repo}: access denied (HTTP {e.code}); set HF_TOKEN if it is private")
        return ExocortexError(f"listing dataset {repo} failed: HTTP {e.code} {body[:200]}".strip())

    # ------------------------------------------------------------------ one file
    def fetch(self, repo: str, revision: str, f: RemoteFile, dest: Path, on_bytes=lambda n: None) -> None:
        """Download f to dest via dest.part: resumed with Range after a drop, retried with backoff,
        verified before the rename. on_bytes(n) reports progress (negative when bytes are discarded)."""
        url = f"{self.base}/datasets/{repo}/resolve/{_q(revision, '')}/{_q(f.path)}"
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        attempt = bad_checksums = 0
        while True:
            have = part.stat().st_size if part.exists() else 0
            if have > f.size:
                part.unlink()
                on_bytes(-have)
                have = 0
            try:
                if have < f.size or not part.exists():
                    self._stream(url, part, have, f, on_bytes)
                size = part.stat().st_size if part.exists() else 0
                if size < f.size:
                    raise _Retry(f"connection closed at byte {size:,} of {f.size:,}")
                if not verify_file(part, f):
                    bad_checksums += 1
                    part.unlink()
                    on_bytes(-size)
                    if bad_checksums > 2:
                        raise ExocortexError(f"{f.path}: checksum mismatch on {bad_checksums} downloads in a row "
                                             f"(expected {f.checksum}); the server or a proxy is corrupting it")
                    print(f"download: {f.path}: checksum mismatch; downloading it again", file=sys.stderr)
                    continue
                os.replace(part, dest)
                return
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:  # the server disagrees about what we hold: start over
                    part.unlink()
                    on_bytes(-have)
                    continue
                if e.code in (401, 403):
                    raise ExocortexError(f"{f.path}: access denied (HTTP {e.code}); set HF_TOKEN for gated or "
                                         f"private datasets") from None
                if e.code not in RETRY_STATUS or attempt >= self.retries:
                    raise ExocortexError(f"{f.path}: download failed (HTTP {e.code} from {url})") from None
                reason = f"HTTP {e.code}"
            except (_Retry, urllib.error.URLError, HTTPException, ConnectionError, TimeoutError) as e:
                if attempt >= self.retries:
                    raise ExocortexError(f"{f.path}: download failed after {attempt + 1} tries ({_reason(e)}); "
                                         f"run the same command again to resume") from None
                reason = _reason(e)
            now = part.stat().st_size if part.exists() else 0
            attempt = 0 if now > have else attempt + 1  # progress resets the budget: slow links finish
            if attempt:
                print(f"download: {f.path}: {reason}; retrying ({attempt}/{self.retries})", file=sys.stderr)
                self._sleep(attempt - 1)

    def _stream(self, url: str, part: Path, have: int, f: RemoteFile, on_bytes) -> None:
        headers = {"Range": f"bytes={have}-"} if have else {}
        with self._request(url, headers) as r:
            if have and r.status != 206:  # Range ignored: the body is the whole file
                on_bytes(-have)
                have = 0
            with open(part, "ab" if have else "wb") as out:
                while chunk := r.read(CHUNK):
                    if self.cancelled.is_set():
                        raise _Cancelled
                    out.write(chunk)
                    on_bytes(len(chunk))
                    if out.tell() > f.size:
                        raise _Retry(f"server sent more than the listed {f.size:,} bytes")


def verify_file(path: Path, f: RemoteFile) -> bool:
    if path.stat().st_size != f.size:
        return False
    if f.sha256:
        h = hashlib.sha256()
    elif f.git_sha1:
        h = hashlib.sha1(b"blob %d\0" % f.size)  # git's blob id: sha1 of a header and the content
    else:
        return True  # a listing without checksums: the size is all we can check
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest() == (f.sha256 or f.git_sha1)


def _q(s: str, safe: str = "/") -> str:
    return urllib.parse.quote(s, safe=safe)


def _glob_prefix(patterns: tuple[str, ...]) -> str:
    """The folder the globs share before their first wildcard: only that subtree needs listing."""
    common: list[str] | None = None
    for pattern in patterns:
        fixed = []
        for p in pattern.split("/")[:-1]:
            if any(c in p for c in "*?["):
                break
            fixed.append(p)
        n = 0
        while common is not None and n < min(len(common), len(fixed)) and common[n] == fixed[n]:
            n += 1
        common = fixed if common is None else common[:n]
    return "/".join(common or [])


def _shown(include: str | tuple[str, ...]) -> str:
    return f"'{include}'" if isinstance(include, str) else " or ".join(f"'{p}'" for p in include)


def _next_link(link: str) -> str | None:
    for part in link.split(","):
        m = re.match(r'\s*<([^>]+)>\s*;\s*rel="?next"?', part)
        if m:
            return m.group(1)
    return None


def _body(e: urllib.error.HTTPError) -> str:
    try:
        return e.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001
        return ""


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return str(e.reason)
    return str(e) or type(e).__name__


# ----------------------------------------------------------------------------- the cache
class _Manifest:
    """What was verified, keyed by path: size, checksum and the file's mtime at verification; and which
    files each request (revision, globs, shards) resolved to, so a repeated request needs no network."""

    def __init__(self, directory: Path, header: dict | None = None):
        self.root = directory
        self.path = directory / MANIFEST
        self.lock = threading.Lock()
        data = {}
        if self.path.exists():  # a damaged manifest only costs re-verification: start it afresh
            try:
                data = json.loads(self.path.read_bytes())
            except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or bad UTF-8
                data = {}
        data = data if isinstance(data, dict) else {}
        self.files: dict = data.get("files", {}) if isinstance(data.get("files"), dict) else {}
        self.listings: dict = data.get("listings", {}) if isinstance(data.get("listings"), dict) else {}
        self.header = header or {k: data[k] for k in ("repo", "revision", "endpoint") if k in data}

    def is_verified(self, dest: Path, f: RemoteFile) -> bool:
        rec = self.files.get(f.path)
        return bool(rec) and rec.get("checksum") == f.checksum and rec.get("size") == f.size and _same(dest, rec)

    def record(self, dest: Path, f: RemoteFile) -> None:
        with self.lock:
            self.files[f.path] = {"size": f.size, "checksum": f.checksum, "mtime_ns": dest.stat().st_mtime_ns}
            self._write()

    def remember(self, key: str, files: list[RemoteFile], forget_others: bool = False) -> None:
        with self.lock:
            if forget_others:  # an explicit `data download` refreshes: references ask the hub again
                self.listings = {}
            self.listings[key] = [[f.path, f.checksum] for f in files]
            self._write()

    def recall(self, key: str) -> list[str] | None:
        """The files a request resolved to before, if each is still here as verified; else None."""
        entries = self.listings.get(key)
        if not entries:
            return None
        for path, checksum in entries:
            rec = self.files.get(path)
            if not rec or rec.get("checksum") != checksum or not _same(self.root / path, rec):
                return None
        return [path for path, _ in entries]

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps({**self.header, "files": self.files, "listings": self.listings},
                                                indent=1))


def _same(dest: Path, rec: dict) -> bool:
    try:
        st = dest.stat()
    except FileNotFoundError:
        return False
    return rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns


@contextmanager
def _locked(root: Path):
    """One download at a time per cache directory: torchrun ranks (or two shells) asking for the same files
    wait for the first, then find them verified, instead of writing the same .part together."""
    try:
        import fcntl
    except ImportError:  # Windows: unlocked, as before
        yield
        return
    with open(root / LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def download(repo: str, shards: int = 0, include: str = "*.parquet", revision: str = "main",
             cache_dir: str | Path | None = None, workers: int = 8, verify: bool = False,
             progress: bool | None = None, hub: Hub | None = None) -> list[Path]:
    """`exocortex data download`: sync the files, then say how to train on them."""
    paths = sync(repo, include, revision, shards=shards, cache_dir=cache_dir, workers=workers, verify=verify,
                 progress=progress, hub=hub)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir(repo)
    print(f"pretrain on them: exocortex pretrain --data {root}" + (f"  (or --data hf:{repo})" if not cache_dir else ""))
    return paths


def sync(repo: str, include: str | tuple[str, ...] = "*.parquet", revision: str = "main", shards: int = 0,
         cache_dir: str | Path | None = None, workers: int = 8, verify: bool = False,
         progress: bool | None = None, hub: Hub | None = None, reuse: bool = False) -> list[Path]:
    """Download the first `shards` (0 = all) files of `repo` matching `include`; returns their local paths.
    reuse: if this same request was synced before and its files are unchanged, return them without listing."""
    check_repo_id(repo)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir(repo)
    key = json.dumps([revision, include if isinstance(include, str) else list(include), shards])
    if reuse and not verify and (known := _Manifest(root).recall(key)) is not None:
        return [root / p for p in known]
    hub = hub or Hub()
    files = hub.list_files(repo, revision, include)
    if not files:
        raise ExocortexError(f"dataset {repo} has no files matching {_shown(include)} at revision '{revision}'")
    total_available = len(files)
    if shards > 0:
        files = files[:shards]
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        manifest = _Manifest(root, {"repo": repo, "revision": revision, "endpoint": hub.base})
        todo = []
        for f in files:
            dest = root / f.path
            if dest.exists():
                if not verify and manifest.is_verified(dest, f):
                    continue
                if verify_file(dest, f):
                    manifest.record(dest, f)
                    continue
                print(f"download: {dest} does not match its checksum ({f.checksum}); downloading it again",
                      file=sys.stderr)
                dest.unlink()
            todo.append(f)
        need = sum(f.size for f in todo)
        have = sum((root / (f.path + ".part")).stat().st_size for f in todo if (root / (f.path + ".part")).exists())
        print(f"download: {repo}@{revision}: {len(files)} of {total_available} files matching {_shown(include)} "
              f"({_gb(sum(f.size for f in files))}); {len(files) - len(todo)} already here, {len(todo)} to fetch "
              f"({_gb(need - have)}) into {root}")
        free = shutil.disk_usage(root).free
        if need - have > free:
            raise ExocortexError(f"not enough disk space in {root}: need {_gb(need - have)}, {_gb(free)} free; "
                                 f"use --cache-dir or fewer --shards")

        from tqdm import tqdm

        interactive = sys.stderr.isatty() if progress is None else progress
        bar = tqdm(total=need, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc="download",
                   disable=not interactive, dynamic_ncols=True)
        bar_lock = threading.Lock()
        done = [0]

        def on_bytes(n: int) -> None:
            with bar_lock:
                bar.update(n)

        def one(f: RemoteFile) -> None:
            dest = root / f.path
            hub.fetch(repo, revision, f, dest, on_bytes)
            manifest.record(dest, f)
            with bar_lock:
                done[0] += 1
                if not interactive:
                    print(f"download: [{done[0]}/{len(todo)}] {f.path} ({_gb(f.size)})", flush=True)

        pool = ThreadPoolExecutor(max(1, workers))
        try:
            for fut in [pool.submit(one, f) for f in todo]:
                fut.result()  # the first failure ends the command: .part files resume next time
        except BaseException:
            hub.cancelled.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        manifest.remember(key, files, forget_others=not reuse)
    print(f"download: {len(files)} files verified in {root}")
    return [root / f.path for f in files]


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
