"""Bad input: a clear one-line error and a non-zero exit, never a traceback."""
import json
import subprocess
import sys

import pytest


def run(args, cwd):
    return subprocess.run([sys.executable, "-m", "exocortex", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def assert_clean_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in err[0], err[0]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("   \n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.txt").write_bytes(b"\x89PNG\x00\x00\x01binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json}\n')
    (tmp_path / "notext.jsonl").write_text('{"content": "no text field"}\n')
    return tmp_path


@pytest.mark.parametrize("args,needles", [
    (["tokenizer", "--data", "does/not/exist"], ["does not exist"]),
    (["tokenizer", "--data", "empty"], ["has no"]),
    (["tokenizer", "--data", "blank"], ["no text"]),
    (["tokenizer", "--data", "bin"], ["binary"]),
    (["tokenizer", "--data", "latin1.txt"], ["not UTF-8"]),
    (["tokenizer", "--data", "bad.jsonl"], ["bad.jsonl:2", "invalid JSON"]),
    (["tokenizer", "--data", "notext.jsonl"], ["notext.jsonl:1", '"text"']),
    (["speedrun", "--preset", "huge"], ["unknown preset 'huge'", "tiny"]),
    (["speedrun", "--set", "model.depthh=3"], ["unknown config key 'model.depthh'"]),
    (["speedrun", "--set", "model.depth=three"], ["expected a whole number"]),
    (["speedrun", "--set", "nonsense"], ["key=value"]),
    (["sft", "--run", "nothing_here"], ["no run at", "speedrun"]),
    (["eval", "--run", "nothing_here"], ["no run at"]),
    (["chat", "-p", "hi"], ["no runs in"]),
])
def test_bad_input_clean_errors(files, args, needles):
    assert_clean_error(run(args, files), *needles)
    assert not (files / "runs" / "tiny" / "tokenizer").exists()  # nothing half-written


def test_missing_stage(files):
    run_dir = files / "runs" / "r1"
    run_dir.mkdir(parents=True)
    from exocortex.config import make_config
    (run_dir / "config.json").write_text(json.dumps(make_config("tiny").to_dict()))
    assert_clean_error(run(["sft", "--run", "r1"], files), "no tokenizer")
    assert_clean_error(run(["pretrain", "--run", "r1"], files), "exocortex tokenizer")


def test_help_lists_stages(tmp_path):
    r = run(["--help"], tmp_path)
    assert r.returncode == 0
    for s in ["tokenizer", "pretrain", "sft", "eval", "chat", "report", "speedrun"]:
        assert s in r.stdout


def test_malformed_task_file_names_file_and_line(files):
    run_dir = files / "runs" / "r2"
    run_dir.mkdir(parents=True)
    from exocortex.config import make_config
    (run_dir / "config.json").write_text(json.dumps(make_config("tiny").to_dict()))
    (files / "tasks.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"\n')
    r = run(["sft", "--run", "r2", "--set", f"sft_data.mixture=jsonl:{files / 'tasks.jsonl'}=1"], files)
    assert_clean_error(r, "tasks.jsonl:2")
    r = run(["midtrain", "--run", "r2", "--set", "midtrain_data.mixture=arithmetic=1,spelin=2"], files)
    assert_clean_error(r, "unknown task 'spelin'")
    r = run(["eval", "--run", "r2", "--stages", "sft,bogus"], files)
    assert_clean_error(r, "unknown stage 'bogus'")


@pytest.mark.parametrize("name", ["chat", "serve", "eval", "speedrun"])
def test_degraded_sandbox_flag_is_the_environment_opt_in(name, monkeypatch):
    # the flag must reach the sandbox (through the environment, as grading workers read it), not the stage's kwargs
    import os

    from exocortex import cli, registry
    from exocortex.infer.sandbox import OPT_IN_VALUE, OPT_IN_VAR
    monkeypatch.setenv(OPT_IN_VAR, "")  # recorded, so the flag's setting is undone after the test
    seen = {}
    monkeypatch.setattr(cli, "stage_config", lambda stage, args: "cfg")
    monkeypatch.setattr(registry.Stage, "load", lambda self: lambda cfg, **kw: seen.update(kw, env=os.environ.get(OPT_IN_VAR)))
    cli.main([name])
    assert seen["env"] == "" and "degraded_sandbox" not in seen
    cli.main([name, "--allow-degraded-sandbox"])
    assert seen["env"] == OPT_IN_VALUE and "degraded_sandbox" not in seen
