"""Server subprocesses for the benchmarks: wait until one answers, stop it (shared by _server.py and
_llama_server.py)."""
from __future__ import annotations

import subprocess
import time


def wait_healthy(server: subprocess.Popen, log, url: str, timeout: float, name: str, need_200: bool = True) -> None:
    """Poll `url` until it answers (200 when need_200) -> None; RuntimeError with the tail of `log` (the
    server's output file) if the process exits first, or after `timeout` seconds."""
    import httpx

    deadline = time.time() + timeout
    while True:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{name} exited ({server.returncode}):\n{log.read()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200 or not need_200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{name} did not answer in {timeout:.0f} s")
        time.sleep(0.3)


def stop(server: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 15 s."""
    server.terminate()
    try:
        server.wait(15)
    except subprocess.TimeoutExpired:
        server.kill()
