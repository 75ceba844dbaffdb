"""llama.cpp's own `llama-server` for the serving benchmark: find it, or build it, and run it on a GGUF file.

It is not packaged for these machines (pip's llama-cpp-python brings the library, not the server), so the
bench looks for a binary in $LLAMA_SERVER, on PATH, then in the cache ($EXOCORTEX_CACHE, default
~/.cache/exocortex, under llama-server/); with --build-llama-server it builds one there from the llama.cpp tree
vendored in llama-cpp-python's source distribution, at the version installed here (pip download; ~6 minutes
on 2 cores). A static build: the binary alone is the cache.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import stop, wait_healthy  # noqa: E402

NAME = "llama-server"


def cache_dir() -> Path:
    root = os.environ.get("EXOCORTEX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "exocortex")
    return Path(root) / NAME


def find() -> str | None:
    """The first llama-server that exists: $LLAMA_SERVER, PATH, then the cache."""
    for candidate in (os.environ.get("LLAMA_SERVER"), shutil.which(NAME), str(cache_dir() / NAME)):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def where_looked() -> str:
    return f"$LLAMA_SERVER, PATH, {cache_dir() / NAME}"


def build(jobs: int = 2) -> str:
    """Build llama-server from llama-cpp-python's sdist (the installed version) into the cache; returns its path.
    Raises RuntimeError with the failing step's last output lines."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("llama_cpp_python")
    except PackageNotFoundError:
        raise RuntimeError("llama-cpp-python is not installed: its sdist is where the llama.cpp sources come "
                           "from (pip install llama-cpp-python)") from None
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              f"llama-cpp-python=={ver}", "-d", tmp], "pip download")
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build_dir = Path(tmp) / "build"
        # no network during the build (curl, prebuilt web UI off), no TLS, a static binary we can copy
        _run(["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
              "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
              "-DBUILD_SHARED_LIBS=OFF"], "cmake configure")
        _run(["cmake", "--build", str(build_dir), "--target", NAME, f"-j{jobs}"], "cmake build")
        built = next(build_dir.rglob(NAME))
        out = cache_dir() / NAME
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(".partial")
        shutil.copy2(built, tmp_out)
        os.replace(tmp_out, out)  # a build interrupted half-way never leaves a binary that find() would take
        return str(out)


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed ({r.returncode}):\n{tail}")


@contextlib.contextmanager
def running(binary: str, gguf: str, port: int, slots: int, ctx_per_slot: int, threads: int, arch: str = "qwen3"):
    """llama-server on loopback: `slots` slots of `ctx_per_slot` tokens each, continuous batching, `threads`
    threads that sleep instead of spinning while they wait (--poll 0: on a small machine spinning threads
    starve the clients and the HTTP thread). Yields the base URL once /health answers 200.

    The GGUF's context_length is the model's training length (model.seq_len); exocortex serves the whole
    rotary table (4x that), and llama-server would cap each slot at the training length, so the bench
    overrides it: both servers then hold the same context per request."""
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots), "-cb",
           "-c", str(slots * ctx_per_slot), "--no-kv-unified", "-t", str(threads), "-tb", str(threads),
           "--poll", "0", "--jinja", "--no-webui", "--no-warmup",
           "--override-kv", f"{arch}.context_length=int:{ctx_per_slot}"]
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            wait_healthy(server, log, base + "/health", 120, "llama-server")
            yield base
        finally:
            stop(server)
