"""End to end through the CLI on a miniature budget: every stage, the report, chat, SIGTERM + resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

SMALL = ["--set", "data.world_bytes=1500000", "--set", "tokenizer.train_bytes=1000000",
         "--set", "tokenizer.vocab_size=1024", "--set", "model.width=64", "--set", "model.induction_init=false", "--set", "model.depth=2",
         "--set", "model.seq_len=128", "--set", "pretrain.max_steps=12", "--set", "pretrain.time_minutes=0",
         "--set", "pretrain.compile=false", "--set", "sft.compile=false", "--set", "pretrain.device_batch=8",
         "--set", "pretrain.batch_tokens=1024", "--set", "sft.device_batch=8", "--set", "sft.batch_tokens=1024",
         "--set", "sft_data.n_conversations=300", "--set", "sft.time_minutes=0", "--set", "sft.max_steps=6",
         "--set", "midtrain.compile=false", "--set", "midtrain.device_batch=8", "--set", "midtrain.batch_tokens=1024",
         "--set", "midtrain_data.n_conversations=300", "--set", "midtrain.time_minutes=0",
         "--set", "midtrain.max_steps=6", "--set", "rl.steps=3", "--set", "rl.time_minutes=0",
         "--set", "rl.prompts_per_step=2", "--set", "rl.samples_per_prompt=2", "--set", "rl.max_new_tokens=12",
         "--set", "rl.eval_n=2", "--set", "rl.eval_every=2", "--set", "eval.core_n=4", "--set", "eval.pass_k_n=2",
         "--set", "eval.chat_tasks=arithmetic=4,word_problems=4,facts=4,lookup=3,identity=2",
         "--set", "eval.max_new_tokens=16", "--set", "pretrain.eval_every=5", "--set", "identity_name=Ada"]


def cli(args, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "exocortex", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("e2e")
    r = cli(["speedrun", "--run", "mini", *SMALL], cwd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return cwd


def test_speedrun_outputs(run_dir):
    d = run_dir / "runs" / "mini"
    report = (d / "report.md").read_text()
    assert (d / "plots" / "loss.png").stat().st_size > 1000
    assert "![plots/loss.png](plots/loss.png)" in report and (d / "plots" / "rl.png").exists()
    for needle in ["val bits per byte", "| metric | BASE | MID | SFT | RL |", "arithmetic (n=4)", "identity (n=2)",
                   "lookup — same questions, tool off", "word problems pass@4", "CORE-style", "| stage | seconds | peak RSS (MB) |",
                   "distinct_4", "## RL", "Held-out word problems: SFT", "one binomial standard error"]:
        assert needle in report, needle
    ev = json.loads((d / "logs" / "eval_summary.json").read_text())["stages"]
    assert set(ev) == {"pretrain", "midtrain", "sft", "rl"}
    assert 0 < ev["pretrain"]["val_bpb"] < 20 and 0 <= ev["sft"]["arithmetic_accuracy"] <= 1
    assert "arithmetic_accuracy" not in ev["pretrain"] and "core" in ev["pretrain"]
    # every graded reply of the chat stages, one line each; the by-family counts add up to the same questions
    replies = [json.loads(line) for line in (d / "logs" / "eval_replies.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in replies} == {"midtrain", "sft", "rl"}
    sft_arith = [r for r in replies if r["stage"] == "sft" and r["task"] == "arithmetic"]
    assert sum(r["right"] for r in sft_arith if r["split"] == "test") == round(ev["sft"]["arithmetic_accuracy"] * 4)
    families = json.loads((d / "logs" / "eval_summary.json").read_text())["families"]["sft"]["arithmetic"]
    assert sum(n for _, n in families["seen"].values()) + sum(n for _, n in families["heldout"].values()) == len(sft_arith)
    assert "### By phrasing family" in report
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model"]["width"] == 64 and cfg["pretrain"]["max_steps"] == 12  # the resolved config is kept
    assert (d / "checkpoints" / "sft" / "latest").read_text().strip() == "step_000%03d" % json.loads(
        (d / "logs" / "sft_summary.json").read_text())["steps"]


class Captured(Exception):
    pass


def test_a_custom_identity_is_taught_and_graded_by_its_name(run_dir, monkeypatch):
    """identity_name is the run's: midtrain/sft teach it and eval and RL grade against it (not the default)."""
    import random

    from exocortex.config import load_config
    from exocortex.stages import rl

    d = run_dir / "runs" / "mini"
    samples = json.loads((d / "logs" / "eval_summary.json").read_text())["samples"]
    graded = [s["expected"] for s in samples if s["task"] == "identity"]
    assert graded and set(graded) == {"Ada"}
    seen = {}

    def capture(model, tok, task, *args, **kw):  # RL's task, as run_rl built it; no training
        seen["answers"] = {task.example(random.Random(i), split)["answer"] for i in range(8)
                           for split in ("train", "test")}
        raise Captured

    saved = (d / "config.json").read_text()
    monkeypatch.setattr(rl, "rl_train", capture)
    try:
        with pytest.raises(Captured):
            rl.run_rl(load_config(d, ["rl.task=identity"]), force=True)
    finally:
        (d / "config.json").write_text(saved)
    assert seen["answers"] == {"Ada"}


def test_chat_one_shot_uses_most_recent_run(run_dir):
    r = cli(["chat", "-p", "who are you?", "--max-tokens", "8", "--seed", "1"], run_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_rerun_single_stage(run_dir):
    r = cli(["eval", "--run", "mini"], run_dir)
    assert r.returncode == 0, r.stderr
    r = cli(["report", "--run", "mini"], run_dir)
    assert r.returncode == 0 and "report.md" in r.stdout


def test_export_cli_verifies(run_dir):
    pytest.importorskip("transformers")
    r = cli(["export", "--run", "mini", "--verify"], run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "verified against exocortex" in r.stdout and (run_dir / "runs" / "mini" / "hf" / "config.json").exists()
    r = cli(["export", "--run", "mini", "--stage", "pretrain", "--out", "exported"], run_dir)
    assert r.returncode == 0 and (run_dir / "exported" / "model.safetensors").exists(), r.stderr[-2000:]


def test_serve_cli_answers_health_and_chat(run_dir):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "exocortex", "serve", "--run", "mini", "--port", str(port)],
                         cwd=run_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and p.poll() is None, "server did not come up"
            time.sleep(0.3)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_sigterm_saves_and_resume_finishes(run_dir):
    args = ["pretrain", "--run", "mini", "--set", "pretrain.max_steps=400", "--set", "pretrain.checkpoint_every=0"]
    log = run_dir / "runs" / "mini" / "logs" / "pretrain.jsonl"
    log.unlink()  # so we wait for this run's own steps
    p = subprocess.Popen([sys.executable, "-m", "exocortex", *args, "--force"], cwd=run_dir, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.5)
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "--resume" in err and "Traceback" not in err, err
    ckpt = (run_dir / "runs" / "mini" / "checkpoints" / "pretrain" / "latest").read_text().strip()
    stopped_at = int(ckpt.split("_")[1])
    assert 0 < stopped_at < 400
    r = cli([*args, "--resume", "--set", "pretrain.max_steps=400"], run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from step_{stopped_at:06d}" in r.stdout
    assert (run_dir / "runs" / "mini" / "checkpoints" / "pretrain" / "latest").read_text().strip() == "step_000400"


def test_speedrun_resume_keeps_the_tokens_and_pretraining_and_redoes_the_rest(run_dir):
    """--resume on a run with tokens: its config (plus --set), pretraining continued from its latest checkpoint
    (here already finished), the later stages trained fresh from it."""
    d = run_dir / "runs" / "mini"
    r = cli(["speedrun", "--run", "mini", "--resume", "--set", "rl.steps=2"], run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "=== tokenizer ===" not in r.stdout and "pretrain: already finished" in r.stdout
    assert json.loads((d / "logs" / "rl_summary.json").read_text())["steps"] == 2  # --set applies on resume
    assert json.loads((d / "logs" / "sft_summary.json").read_text())["steps"] == 6  # trained anew
    assert "## Time and memory" in (d / "report.md").read_text()


def test_serve_on_a_busy_port_is_a_clean_error(run_dir):
    pytest.importorskip("fastapi")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = cli(["serve", "--run", "mini", "--port", str(s.getsockname()[1])], run_dir)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: cannot listen on 127.0.0.1:") and "--port" in r.stderr
