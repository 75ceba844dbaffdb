"""The benchmarks' own plumbing (bench/): what they compare must be what they say they compare."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _server  # noqa: E402


def test_a_baseline_server_imports_its_own_checkout(tmp_path, monkeypatch):
    """bench/serve.py --baseline CHECKOUT serves with `_server.serving(run, root=CHECKOUT)` while the bench runs
    from our checkout. The server it starts must import CHECKOUT's package: `python -m` puts the working
    directory first on sys.path, which once made every baseline measure our own code."""
    other = tmp_path / "checkout"
    (other / "exocortex").mkdir(parents=True)
    (other / "exocortex" / "__init__.py").write_text("")
    (other / "exocortex" / "__main__.py").write_text("print(__file__)\n")
    started = {}

    class Started(Exception):
        pass

    def popen(cmd, **kw):
        started.update(cmd=cmd, **kw)
        raise Started

    monkeypatch.setattr(_server.subprocess, "Popen", popen)
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(Started):
        with _server.serving(str(run), root=other):
            pass
    monkeypatch.undo()
    cmd = started["cmd"]
    assert cmd[1:3] == ["-m", "exocortex"] and Path(cmd[cmd.index("--run") + 1]) == run.resolve()
    out = subprocess.run(cmd[:3], env=started["env"], cwd=started.get("cwd"), capture_output=True, text=True,
                         check=True).stdout.strip()
    assert Path(out).resolve() == (other / "exocortex" / "__main__.py").resolve()
