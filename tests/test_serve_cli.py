"""`exocortex serve` and `exocortex chat` as the CLI starts them: which checkpoint (--stage), and the compiled
decode step by default (--no-compile turns it off; without a toolchain, or when compiling fails, they decode
eagerly and say why in one line). No real compile here: the option is followed to the Engine and the batcher."""
import socket
import subprocess
import sys
import threading

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from exocortex import cli, registry  # noqa: E402
from exocortex.apps import chat  # noqa: E402
from exocortex.apps import serve as serve_app  # noqa: E402
from exocortex.checkpoint import save_checkpoint  # noqa: E402
from exocortex.config import load_config, make_config, save_config  # noqa: E402
from exocortex.infer import decode  # noqa: E402
from exocortex.infer.engine import Request  # noqa: E402
from exocortex.model import GPT  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tok, tmp_path_factory):
    """A run with a tokenizer and two chat checkpoints of different weights: midtrain, and sft (the newest)."""
    tmp = tmp_path_factory.mktemp("runs")
    cfg = make_config("tiny", ["model.depth=2", "model.width=64", "model.head_dim=16", "model.mlp_ratio=2.0",
                               "model.seq_len=32", f"tokenizer.vocab_size={tok.vocab_size}", "device=cpu",
                               "sft.dtype=float32"], name="r")
    cfg.runs_dir = str(tmp)
    cfg.model.vocab_size = tok.vocab_size
    save_config(cfg)
    tok.save(cfg.run_dir / "tokenizer")
    for seed, stage in ((1, "midtrain"), (2, "sft")):
        torch.manual_seed(seed)
        save_checkpoint(cfg.run_dir, stage, 5, GPT(cfg.model), cfg.model)
    return cfg.run_dir


def weights_of(run_dir, stage):
    from exocortex.checkpoint import load_model
    model, _ = load_model(load_config(run_dir).run.require_checkpoint(stage), torch.device("cpu"))
    return model.lm_head.weight


def served(monkeypatch, *args):
    """The app `exocortex serve <args>` would run (uvicorn.run is stubbed out), and what serve printed."""
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    cli.main(["serve", "--port", str(free_port()), *args])
    return apps[0].state.exocortex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_stage_picks_that_checkpoint(run_dir, monkeypatch, capsys):
    svc = served(monkeypatch, "--run", str(run_dir), "--stage", "midtrain", "--no-compile")
    assert torch.equal(svc.engine.model.lm_head.weight, weights_of(run_dir, "midtrain"))
    assert "(midtrain, step_000005)" in capsys.readouterr().out
    svc = served(monkeypatch, "--run", str(run_dir), "--no-compile")  # default: newest chat stage
    assert torch.equal(svc.engine.model.lm_head.weight, weights_of(run_dir, "sft"))
    assert "(sft, step_000005)" in capsys.readouterr().out
    assert svc.model_name == "r"  # the id /v1/models lists: the run's name


def test_a_wrong_stage_is_one_line(run_dir):
    r = subprocess.run([sys.executable, "-m", "exocortex", "serve", "--run", str(run_dir), "--stage", "rl",
                        "--no-compile"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no 'rl' checkpoint" in lines[0], r.stderr
    r = subprocess.run([sys.executable, "-m", "exocortex", "serve", "--run", str(run_dir), "--stage", "pretrain"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "invalid choice: 'pretrain'" in r.stderr


@pytest.mark.parametrize("name", ["chat", "serve"])
def test_chat_and_serve_compile_by_default(name, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "stage_config", lambda stage, args: "cfg")
    monkeypatch.setattr(registry.Stage, "load", lambda self: lambda cfg, **kw: seen.update(kw))
    cli.main([name])
    assert seen["compile"] is True
    cli.main([name, "--no-compile"])
    assert seen["compile"] is False


@pytest.mark.parametrize("compile", [True, False])
def test_the_option_reaches_the_engine(run_dir, compile, monkeypatch, capsys):
    monkeypatch.setattr(decode, "_compile_status", {"cpu": None})  # as where a compiler is installed
    engines = []
    monkeypatch.setattr(chat, "warm_up_decoder", lambda engine, compile: engines.append(engine))
    monkeypatch.setattr(chat, "stream_reply", lambda *a, **k: [])
    chat.run_chat(load_config(run_dir), prompt="hi", compile=compile)
    assert engines[0].compile is compile
    monkeypatch.setattr(serve_app, "warm_up_decoder", lambda batcher, compile: engines.append(batcher.engine))
    served(monkeypatch, "--run", str(run_dir), *([] if compile else ["--no-compile"]))
    assert engines[1].compile is compile


def test_without_a_toolchain_both_decode_eagerly_and_say_why(run_dir, monkeypatch, capsys):
    monkeypatch.setattr(decode, "_compile_status", {"cpu": "no C++ compiler for torch.compile's CPU kernels"})
    monkeypatch.setattr(chat, "stream_reply", lambda *a, **k: [])
    chat.run_chat(load_config(run_dir), prompt="hi")
    err = [line for line in capsys.readouterr().err.splitlines() if "compil" in line]
    assert err == ["decoding eagerly: no C++ compiler for torch.compile's CPU kernels"]
    svc = served(monkeypatch, "--run", str(run_dir))
    assert svc.engine.compile is False
    assert "decoding eagerly: no C++ compiler" in capsys.readouterr().out


def test_a_compile_that_fails_falls_back_to_eager(run_dir, monkeypatch, capsys):
    """The toolchain is there but compiling breaks (e.g. a compiler error): serve and chat still answer."""
    def broken(*a, **k):
        raise RuntimeError("inductor: C++ compile error")
    monkeypatch.setattr(decode, "_compile_status", {"cpu": None})
    monkeypatch.setattr(decode, "_compiled_step", lambda device_type: broken)  # fails when first called
    monkeypatch.setattr(decode, "_ahead_of_time_step", lambda *a, **k: None)
    svc = served(monkeypatch, "--run", str(run_dir))
    out = capsys.readouterr().out
    assert "compiling the decode step" in out and "decoding eagerly: compiling the decode step failed " \
        "(RuntimeError: inductor: C++ compile error)" in out
    assert svc.engine.compile is False and isinstance(svc.batcher.compile_error, RuntimeError)
    ends, done = [], threading.Event()
    svc.batcher.submit(Request([1, 2, 3], max_tokens=3, temperature=0,
                               on_end=lambda finish, steps, error: (ends.append((finish, steps, error)), done.set())))
    assert done.wait(30)
    svc.batcher.close()
    assert ends == [("length", 3, None)]  # decoded, eagerly

    replies = []
    monkeypatch.setattr(chat, "stream_reply", lambda engine, *a, **k: replies.append(engine) or [])
    chat.run_chat(load_config(run_dir), prompt="hi")
    assert replies[0].compile is False
    assert "decoding eagerly: compiling the decode step failed (RuntimeError" in capsys.readouterr().err



def test_escalation_options_reach_the_app_or_say_what_is_missing(run_dir, monkeypatch, capsys):
    """--escalate-to needs the stage's calibration (from `exocortex eval`); the options without it are an error."""
    from exocortex.infer.confidence import Calibration
    from exocortex.run import EvalSummary

    for args, said in ((["--threshold", "0.3"], "add --escalate-to"),
                       (["--escalate-to", "http://127.0.0.1:9/v1"], "run `exocortex eval --run r --stages sft`")):
        with pytest.raises(SystemExit):
            served(monkeypatch, "--run", str(run_dir), "--no-compile", *args)
        assert said in capsys.readouterr().err
    run = load_config(run_dir).run
    run.write_summary("eval", EvalSummary(calibration={"sft": {"calibration": vars(Calibration(bias=2.0))}}))
    try:
        svc = served(monkeypatch, "--run", str(run_dir), "--escalate-to", "http://127.0.0.1:9/v1", "--threshold",
                     "0.3", "--escalate-model", "big", "--no-compile")
        esc = svc.escalation
        assert (esc.url, esc.threshold, esc.model, esc.calibration.bias) == ("http://127.0.0.1:9/v1", 0.3, "big", 2.0)
        assert "escalation: to http://127.0.0.1:9/v1 when P(right) < 0.3" in capsys.readouterr().out
        # a probe fitted on another width (an eval of an older model of the run): said at start, not per request
        run.write_summary("eval", EvalSummary(calibration={"sft": {"calibration": vars(Calibration(
            hidden_mean=[0.0] * 3, hidden_scale=[1.0] * 3, hidden_weights=[0.1] * 3))}}))
        with pytest.raises(SystemExit):
            served(monkeypatch, "--run", str(run_dir), "--escalate-to", "http://127.0.0.1:9/v1", "--no-compile")
        assert "reads a hidden state of 3 numbers" in capsys.readouterr().err
    finally:
        (run.logs_dir / "eval_summary.json").unlink()
