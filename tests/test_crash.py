"""kill -9 mid-run, --resume: the resumed run's losses and final weights equal an uninterrupted run's."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SETS = ["--set", "data.world_bytes=400000", "--set", "tokenizer.train_bytes=300000", "--set", "tokenizer.vocab_size=512",
        "--set", "model.width=64", "--set", "model.induction_init=false", "--set", "model.depth=2", "--set", "model.seq_len=64",
        "--set", "pretrain.max_steps=40", "--set", "pretrain.time_minutes=0", "--set", "pretrain.compile=false",
        "--set", "pretrain.dtype=float32", "--set", "pretrain.device_batch=4", "--set", "pretrain.batch_tokens=512",
        "--set", "pretrain.eval_every=10", "--set", "pretrain.checkpoint_every=4", "--set", "pretrain.keep_checkpoints=2"]


def exo(*args):
    return [sys.executable, "-m", "exocortex", *args]


def test_kill9_then_resume_equals_uninterrupted(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # deterministic kernels for an exact comparison
    r = subprocess.run(exo("tokenizer", "--run", "a", *SETS), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shutil.copytree(tmp_path / "runs" / "a", tmp_path / "runs" / "b")
    r = subprocess.run(exo("pretrain", "--run", "a"), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    log = tmp_path / "runs" / "b" / "logs" / "pretrain.jsonl"
    p = subprocess.Popen(exo("pretrain", "--run", "b"), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 14):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)  # no handler runs: only the periodic checkpoints survive
    p.wait()
    latest = (tmp_path / "runs" / "b" / "checkpoints" / "pretrain" / "latest").read_text().strip()
    killed_at = int(latest.split("_")[1])
    assert 4 <= killed_at < 40

    r = subprocess.run(exo("pretrain", "--run", "b", "--resume"), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {latest}" in r.stdout

    def losses(run):
        return [json.loads(l)["loss"] for l in (tmp_path / "runs" / run / "logs" / "pretrain.jsonl").read_text().splitlines()]

    assert losses("a") == losses("b")  # exactly: same data position, optimizer state and RNG
    wa = load_file(str(tmp_path / "runs" / "a" / "checkpoints" / "pretrain" / "step_000040" / "model.safetensors"))
    wb = load_file(str(tmp_path / "runs" / "b" / "checkpoints" / "pretrain" / "step_000040" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
