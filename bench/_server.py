"""`exocortex serve` in a subprocess for the serving benchmarks: a run to serve, a free port, its RSS."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _proc import stop, wait_healthy  # noqa: E402
from _runs import synthetic_run  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def checkout_env(root: Path) -> dict:
    """The environment that makes a `python -m exocortex` started in `root` import the checkout at `root`."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


@contextlib.contextmanager
def serving(run: str | None, *args: str, preset: str | None = None, root: Path = ROOT):
    """Yields (base URL, server pid, run) for `exocortex serve --run <run> <args>` from the checkout at `root`
    (default: this one). Without a run: with a `preset`, a random model of its shape is built (bench/_runs.py);
    else runs/tiny, or a random tiny one where there is none. The server's output goes to a file, shown if it
    dies."""
    with tempfile.TemporaryDirectory() as tmp:
        if run is None and preset is None and (Path("runs/tiny") / "config.json").exists():
            run = "runs/tiny"
        if run is None:
            print(f"building a random {preset or 'tiny'}-preset run ...", flush=True)
            run = str(synthetic_run(Path(tmp), preset or "tiny"))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = checkout_env(root)
        log = open(Path(tmp) / "server.log", "w+")  # a file, not a pipe: access logs must never block the server
        cmd = [sys.executable, "-m", "exocortex", "serve", "--run", str(Path(run).resolve()), "--port", str(port),
               *args]
        # started in `root`: `python -m` puts the working directory ahead of PYTHONPATH, so from another checkout
        # a baseline would import that checkout's exocortex, not its own
        server = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            try:
                wait_healthy(server, log, base + "/health", 300, "the server", need_200=False)
            except RuntimeError as e:
                sys.exit(f"error: {e}")
            yield base, server.pid, run
            if server.poll() is not None:
                log.seek(0)
                sys.exit(f"error: the server died:\n{log.read()[-3000:]}")
        finally:
            stop(server)
            log.close()
