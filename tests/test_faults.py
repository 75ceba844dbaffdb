"""Nothing good is lost: kill -9 and a full disk (RLIMIT_FSIZE) while checkpoints, token files and exports are
written, a fresh run that fails early, and re-runs that would replace trained models. After each, the last good
state is byte-identical (or the new one is complete) and --resume works.

Crashes are made in forked children: `kill_at=N` SIGKILLs the child just before its N-th file-system step
(a rename, fsync, unlink or tree removal), and the tests walk N over every step of the write."""
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from exocortex import cli
from exocortex.checkpoint import load_model, load_state, save_checkpoint
from exocortex.config import load_config, make_config
from exocortex.data.tokens import has_token_data
from exocortex.errors import ExocortexError
from exocortex.run import RunDir
from exocortex.tokenizer import Tokenizer

SETS = ["data.world_bytes=200000", "tokenizer.train_bytes=150000", "tokenizer.vocab_size=512", "model.width=64", "model.induction_init=false",
        "model.depth=2", "model.seq_len=64", "pretrain.max_steps=6", "pretrain.time_minutes=0",
        "pretrain.compile=false", "pretrain.dtype=float32", "pretrain.device_batch=4", "pretrain.batch_tokens=256",
        "pretrain.eval_every=3", "pretrain.eval_tokens=1024", "pretrain.checkpoint_every=2",
        "pretrain.keep_checkpoints=2", "data.workers=1"]


# ----------------------------------------------------------------------------- helpers

def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) -> its sha256; every directory -> 'dir' (an empty one counts)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(root).rglob("*"))}


def _arm(n: int) -> None:
    """SIGKILL this process just before its n-th file-system step."""
    count = [0]

    def wrap(fn):
        def step(*a, **kw):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)
        return step

    for name in ("replace", "rename", "fsync", "unlink"):
        setattr(os, name, wrap(getattr(os, name)))
    shutil.rmtree = wrap(shutil.rmtree)


def in_child(fn, kill_at: int | None = None, fsize: int | None = None, kill_after: float | None = None) -> str:
    """fn() in a forked child: 'ok', 'killed', or the exception as 'Type: message'. fsize: a disk that is
    full once a file reaches that many bytes (RLIMIT_FSIZE; SIGXFSZ ignored, so writes fail with EFBIG)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        msg = "ok"
        try:
            os.close(r)
            if fsize:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            if kill_at:
                _arm(kill_at)
            fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            msg = f"{type(e).__name__}: {e}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        msg = f.read()
    return "killed" if os.WIFSIGNALED(status) else msg


def every_kill_point(setup, fn, check, limit: int = 300) -> int:
    """setup(); kill fn() at its 1st, 2nd, ... step; check() after each; until fn() runs through. Returns the
    number of points tried."""
    for n in range(1, limit):
        setup()
        out = in_child(fn, kill_at=n)
        check(n)
        if out != "killed":
            assert out == "ok", out
            return n
    raise AssertionError("never finished")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run: tokenizer and 6 pretraining steps (checkpoints at steps 4 and 6)."""
    from exocortex.stages.pretrain import run_pretrain
    from exocortex.stages.tokenizer import run_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fast on a shared CPU, and forked children never wait for OpenMP threads
    cfg = make_config("tiny", SETS, name="r")
    cfg.runs_dir = str(tmp_path_factory.mktemp("faults") / "runs")
    run_tokenizer(cfg)
    run_pretrain(cfg)
    yield cfg.run_dir
    torch.set_num_threads(threads)


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A fresh copy of the trained run, at tmp_path/runs/r."""
    d = tmp_path / "runs" / "r"
    shutil.copytree(trained, d)
    return d


def _restore(trained: Path, d: Path):
    def setup():
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(trained, d)
    return setup


def _fail_at_step(monkeypatch, n: int) -> None:
    from exocortex.train import loop

    real_step, calls = loop._Trainer.train_step, []

    def failing_step(self):
        calls.append(1)
        if len(calls) == n:
            raise ExocortexError(f"pretrain: loss became nan at step {n}")
        return real_step(self)

    monkeypatch.setattr(loop._Trainer, "train_step", failing_step)


def _model_and_state(run_dir: Path):
    ckpt = RunDir(run_dir).latest_checkpoint("pretrain")
    model, meta = load_model(ckpt)
    return model, load_state(ckpt)


# ----------------------------------------------------------------------------- checkpoints

def test_a_fresh_run_failing_before_its_first_checkpoint_leaves_the_old_one(run, monkeypatch):
    """NaN, OOM or a crash at step 2 of a fresh run: the old checkpoint still counts, byte for byte, and
    --resume continues the old run."""
    from exocortex.stages.pretrain import run_pretrain

    old = RunDir(run).latest_checkpoint("pretrain")
    before = snapshot(old)
    cfg = load_config(run, ["pretrain.checkpoint_every=0", "pretrain.max_steps=20"])
    _fail_at_step(monkeypatch, 2)
    with pytest.raises(ExocortexError, match="nan"):
        run_pretrain(cfg, force=True)
    monkeypatch.undo()
    latest = RunDir(run).latest_checkpoint("pretrain")
    assert latest is not None and snapshot(latest) == before
    res = run_pretrain(load_config(run), resume=True)  # the old run, which had finished
    assert res.steps == 6


def test_kill9_at_every_step_of_a_fresh_runs_first_checkpoint(trained, tmp_path):
    """A fresh run sets the old checkpoints aside and writes its first: killed at any point, a complete
    checkpoint (the old one or the new) is what counts, and it loads."""
    d = tmp_path / "runs" / "r"
    model, state = _model_and_state(trained)
    old = snapshot(RunDir(trained).latest_checkpoint("pretrain"))
    cfg = model.cfg

    def fresh_first_checkpoint():
        RunDir(d).set_aside_checkpoints("pretrain")
        save_checkpoint(d, "pretrain", 2, model, cfg, {**state, "step": 2}, keep=2)

    def check(n):
        latest = RunDir(d).latest_checkpoint("pretrain")
        assert latest is not None, f"no checkpoint after a kill at step {n}"
        assert latest.name == "step_000002" or snapshot(latest) == old, n
        load_model(latest)
        assert load_state(latest)["optimizers"]

    tried = every_kill_point(_restore(trained, d), fresh_first_checkpoint, check)
    assert tried > 8
    assert not (d / "checkpoints" / "pretrain.previous").exists()  # superseded once the new one was complete


def test_kill9_at_every_step_of_a_periodic_checkpoint(trained, tmp_path):
    """A later checkpoint of the same run (with the oldest pruned): killed at any point, the newest complete one
    counts and loads."""
    d = tmp_path / "runs" / "r"
    model, state = _model_and_state(trained)

    def check(n):
        latest = RunDir(d).latest_checkpoint("pretrain")
        assert latest is not None and latest.name in ("step_000006", "step_000008"), n
        load_model(latest)
        load_state(latest)

    every_kill_point(_restore(trained, d),
                     lambda: save_checkpoint(d, "pretrain", 8, model, model.cfg, {**state, "step": 8}, keep=2), check)


def test_a_full_disk_while_checkpointing_changes_nothing(run):
    model, state = _model_and_state(run)
    before = snapshot(run)
    out = in_child(lambda: save_checkpoint(run, "pretrain", 8, model, model.cfg, state, keep=1), fsize=100_000)
    assert out.startswith("ExocortexError:") and "step_000008" in out and "intact" in out and "\n" not in out
    assert snapshot(run) == before  # no temp directory left, nothing pruned


def _exo(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-m", "exocortex", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _full_disk():
    """A disk that is full once a file reaches 100 kB (for a subprocess: its preexec_fn)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_cli_kill9_and_full_disk_in_a_fresh_run_then_resume(run):
    """Through the CLI: `pretrain --force` killed -9 before its first checkpoint, then one that hits a full disk
    at its first checkpoint: the old checkpoint is intact both times and `--resume` continues the old run."""
    old = snapshot(RunDir(run).latest_checkpoint("pretrain"))
    log = run / "logs" / "pretrain.jsonl"
    log.unlink()
    p = _exo("pretrain", "--run", str(run), "--force", "--set", "pretrain.checkpoint_every=0",
             "--set", "pretrain.max_steps=500")
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    p.kill()
    p.communicate()
    assert snapshot(RunDir(run).latest_checkpoint("pretrain")) == old

    p = _exo("pretrain", "--run", str(run), "--force", "--set", "pretrain.checkpoint_every=1", preexec_fn=_full_disk)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: pretrain: could not write checkpoint") and "--resume" in err
    assert snapshot(RunDir(run).latest_checkpoint("pretrain")) == old
    p = _exo("pretrain", "--run", str(run), "--resume")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and "already finished at step 6" in out, err


# ----------------------------------------------------------------------------- tokenizer and token files

def _tokenize(run: Path, world_bytes: int, **kw):
    """`exocortex tokenizer --force` on the run, in a new process (the BPE trainer's thread pool does not
    survive a fork)."""
    sets = [a for s in [*SETS, f"data.world_bytes={world_bytes}"] for a in ("--set", s)]
    return _exo("tokenizer", "--run", str(run), "--force", *sets, **kw)


def test_a_full_disk_while_tokenizing_changes_nothing(run):
    """Even with --force on a trained run: the checkpoints go only once the new tokens are all written."""
    before = snapshot(run)
    p = _tokenize(run, 300_000, preexec_fn=_full_disk)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: tokenizer: could not write the token files") and "unchanged" in err
    assert snapshot(run) == before


def test_kill9_while_tokenizing(run):
    """Killed while importing and while encoding into the staged files: the run as it was."""
    before = snapshot(run)
    for encoding in (False, True):
        p = _tokenize(run, 4_000_000)
        deadline = time.time() + (120 if encoding else 0.5)
        while time.time() < deadline and not (encoding and list(run.glob(".tokenizer.tmp*/data/train.bin"))):
            time.sleep(0.01)
        p.kill()
        p.communicate()
        assert p.returncode == -signal.SIGKILL
        leftover = {k: v for k, v in snapshot(run).items() if not k.startswith(".tokenizer.tmp")}
        assert leftover == before, encoding
    p = _tokenize(run, 200_000)  # the next run clears what the killed ones left
    assert p.wait(timeout=300) == 0
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def _staged_replacement(run: Path, tok: Tokenizer, where: Path) -> None:
    """A new tokenizer (conftest's, vocab 400) and token files that name it, staged as run_tokenizer stages."""
    tok.save(where / "tokenizer")
    shutil.copytree(run / "data", where / "data")
    meta = json.loads((where / "data" / "meta.json").read_text())
    (where / "data" / "meta.json").write_text(json.dumps({**meta, "vocab_size": tok.vocab_size}))


def test_kill9_at_every_step_of_swapping_in_a_new_tokenizer(trained, tmp_path, tok):
    """`tokenizer --force` on a trained run, killed at each step of the swap: never a checkpoint with a tokenizer
    it was not trained with, never token files that look complete with another tokenizer."""
    from exocortex.stages.tokenizer import _replace

    d = tmp_path / "runs" / "r"
    staged = d / ".tokenizer.tmp1"
    old_tok = snapshot(trained / "tokenizer")
    restore = _restore(trained, d)

    def setup():
        restore()
        _staged_replacement(d, tok, staged)

    cfg = load_config(trained)
    cfg.runs_dir = str(d.parent)
    trained_stages = RunDir(trained).trained_stages()

    def check(n):
        if RunDir(d).trained_stages():
            assert snapshot(d / "tokenizer") == old_tok, n
        if has_token_data(d / "data"):
            assert json.loads((d / "data" / "meta.json").read_text())["vocab_size"] == \
                Tokenizer.load(d / "tokenizer").vocab_size, n

    every_kill_point(setup, lambda: _replace(cfg, staged, trained_stages), check)
    assert Tokenizer.load(d / "tokenizer").vocab_size == tok.vocab_size and has_token_data(d / "data")
    assert snapshot(d / "previous" / "tokenizer") == old_tok and not RunDir(d).trained_stages()


# ----------------------------------------------------------------------------- exports

def _export(fmt: str, run: Path, out: Path, dtype: str):
    from exocortex.apps.export import export_gguf, export_hf
    if fmt == "gguf":
        return lambda: export_gguf(run, out, stage="pretrain", dtype=dtype)
    return lambda: export_hf(run, out, stage="pretrain", dtype=dtype)


FORMATS = [("hf", "hf", "bfloat16", "float32"), ("gguf", "model.gguf", "float16", "float32")]


@pytest.mark.parametrize("fmt,name,first,second", FORMATS)
def test_a_full_disk_while_exporting_leaves_the_previous_export(run, fmt, name, first, second):
    if fmt == "gguf":
        pytest.importorskip("gguf")
    out = run.parent / "exports" / name
    _export(fmt, run, out, first)()
    before = snapshot(out.parent)
    msg = in_child(_export(fmt, run, out, second), fsize=100_000)
    assert msg.startswith("ExocortexError: could not write the export") and "unchanged" in msg
    assert snapshot(out.parent) == before  # no temp file or directory left either


@pytest.mark.parametrize("fmt,name,first,second", FORMATS)
def test_kill9_at_every_step_of_an_export(run, tmp_path, fmt, name, first, second):
    """Killed at any point, the export is the previous one byte for byte, the new one complete, or (an HF
    directory, killed while its files are renamed in) marked incomplete: no exocortex_export.json."""
    if fmt == "gguf":
        pytest.importorskip("gguf")
    ref = tmp_path / "ref" / name
    _export(fmt, run, ref, second)()
    pristine, out = tmp_path / "pristine", run.parent / "exports" / name
    _export(fmt, run, pristine / name, first)()
    previous, new = snapshot(pristine), snapshot(ref.parent)
    states = set()

    def setup():
        shutil.rmtree(out.parent, ignore_errors=True)
        shutil.copytree(pristine, out.parent)

    def check(n):
        now = {k: v for k, v in snapshot(out.parent).items() if not k.startswith(f".{name}.tmp")}
        if now == previous:
            states.add("previous")
        elif fmt == "hf" and not (out / "exocortex_export.json").exists():
            states.add("incomplete")
        else:
            assert {k: v for k, v in now.items() if "exocortex_export" not in k} == \
                {k: v for k, v in new.items() if "exocortex_export" not in k}, n
            states.add("new")

    every_kill_point(setup, _export(fmt, run, out, second), check)
    assert {"previous", "new"} <= states


# ----------------------------------------------------------------------------- re-runs that would replace

def _main(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv", [["tokenizer"], ["pretrain"], ["speedrun"], ["pretrain", "--data", "DATA"]])
def test_destructive_reruns_refuse_without_force(run, capsys, argv):
    (run.parent / "more.txt").write_text("some new text for the tokenizer\n" * 50)
    argv = [a.replace("DATA", str(run.parent / "more.txt")) for a in argv]
    before = snapshot(run)
    code, err = _main([*argv, "--run", str(run), "--set", "pretrain.max_steps=2"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "--force" in err and "step_000006" in err
    assert snapshot(run) == before


def test_tokenizer_with_force_sets_aside_the_checkpoints_it_made_useless(run, capsys):
    """They stop counting (chat would answer garbage) but stay restorable, with their tokenizer and tokens."""
    from exocortex.stages.tokenizer import run_tokenizer

    old = {part: snapshot(run / part) for part in ("tokenizer", "data", "checkpoints")}
    cfg = make_config("tiny", [*SETS, "tokenizer.vocab_size=320"], name="r")
    cfg.runs_dir = str(run.parent)
    run_tokenizer(cfg, force=True)
    assert f"kept in {run / 'previous'}" in capsys.readouterr().out
    assert RunDir(run).trained_stages() == {} and not (run / "checkpoints").exists()
    assert Tokenizer.load(run / "tokenizer").vocab_size == 320 and has_token_data(run / "data")
    assert {part: snapshot(run / "previous" / part) for part in old} == old
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_tokenizer_trained_again_byte_for_byte_keeps_the_models(run, capsys):
    """speedrun --force on an unchanged corpus and config re-trains the same tokenizer: the models stay valid."""
    from exocortex.stages.tokenizer import run_tokenizer

    before = RunDir(run).trained_stages()
    run_tokenizer(load_config(run), force=True)
    assert "kept in" not in capsys.readouterr().out and not (run / "previous").exists()
    assert RunDir(run).trained_stages() == before


@pytest.mark.parametrize("argv", [["speedrun", "--set", "data.world_bytes=150000"], ["pretrain", "--data", "DATA"]])
def test_a_forced_new_tokenizer_whose_pretraining_fails_leaves_the_old_set(run, capsys, monkeypatch, argv):
    """speedrun --force (another corpus) and pretrain --data X --force fail at pretraining step 1: the old
    tokenizer, tokens and checkpoints are all kept, uncounted, and moving them back gives the old run again."""
    (run.parent / "more.txt").write_text("".join(f"note {i}: {i * 7919 % 1000} apples and {i % 97} pears\n"
                                                 for i in range(6000)))
    argv = [a.replace("DATA", str(run.parent / "more.txt")) for a in argv]
    old = {part: snapshot(run / part) for part in ("tokenizer", "data", "checkpoints")}
    _fail_at_step(monkeypatch, 1)
    code, err = _main([*argv, "--run", str(run), "--force", *[a for s in SETS[1:] for a in ("--set", s)]], capsys)
    assert code == 1 and "nan at step 1" in err, err
    assert RunDir(run).trained_stages() == {}  # not counted beside the new tokenizer
    assert {part: snapshot(run / "previous" / part) for part in old} == old
    RunDir(run).restore_set()
    assert {part: snapshot(run / part) for part in old} == old and not (run / "previous").exists()
    load_model(RunDir(run).latest_checkpoint("pretrain"))  # its vocabulary matches the tokenizer again


def test_a_failed_tokenizer_swap_puts_the_old_set_back_and_says_so_on_one_line(run, capsys, monkeypatch):
    """A rename refused while the new tokens go in (a read-only or broken runs directory): the old set is
    back in place, and the CLI prints one line naming the file, no traceback."""
    before = snapshot(run)
    real_replace = os.replace

    def refused(src, dst, *a, **kw):
        if ".tokenizer.tmp" in str(src) and str(src).endswith("meta.json"):
            raise PermissionError(13, "Permission denied", str(src), None, str(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", refused)
    code, err = _main(["tokenizer", "--run", str(run), "--force", *[a for s in SETS for a in ("--set", s)],
                       "--set", "tokenizer.vocab_size=320"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and "meta.json" in err and "Permission denied" in err
    monkeypatch.undo()
    assert {k: v for k, v in snapshot(run).items() if not k.startswith(".tokenizer.tmp")} == before


def test_speedrun_starts_the_later_stages_over_on_purpose(run, monkeypatch):
    """speedrun --resume continues pretraining and re-trains the later stages: it passes them force."""
    from exocortex import registry
    from exocortex.stages.speedrun import run_speedrun

    calls = {}
    monkeypatch.setattr(registry.Stage, "load", lambda self: lambda cfg, **kw: calls.setdefault(self.name, kw))
    run_speedrun(load_config(run), resume=True)
    assert "tokenizer" not in calls and calls["pretrain"] == {"resume": True, "force": True}
    assert calls["sft"] == calls["rl"] == {"resume": False, "force": True}
    with pytest.raises(ExocortexError, match="--force to start it over"):
        run_speedrun(load_config(run))


def test_a_fresh_run_stopped_before_its_first_checkpoint_by_a_hook_keeps_the_old_result(run, small_cfg):
    """RL's guard trips before the new run's first checkpoint: the run has no result of its own (not the old
    run's checkpoint), and rolling back leaves the old checkpoints counting."""
    import numpy as np
    from exocortex.config import TrainConfig
    from exocortex.data.loader import TokenRows
    from exocortex.model import GPT
    from exocortex.train.loop import train

    old = RunDir(run).latest_checkpoint("pretrain")
    before = snapshot(old)
    tokens = np.random.default_rng(0).integers(0, small_cfg.vocab_size, 5000).astype(np.uint16)
    t = TrainConfig(batch_tokens=128, device_batch=4, checkpoint_every=0, dtype="float32")
    res = train(GPT(small_cfg), t, "pretrain", run, TokenRows(tokens, small_cfg.seq_len, rows=4, seed=1), [],
                torch.device("cpu"), torch.float32, total_steps=5, hooks=(lambda step, record: "degenerate",))
    assert res.stop_reason == "degenerate" and res.checkpoint == "None"
    kept = RunDir(run).roll_back("pretrain", 0)
    assert kept is not None and snapshot(kept) == before
