"""Fuzz: every `--set` key with bad values, and every file of a small trained run damaged six ways.

Whatever goes wrong, the CLI must end with exit != 0, exactly one line on stderr (no traceback), and leave the
run directory byte for byte as it was. Commands run in-process (cli.main) for speed; a few run as real
subprocesses to prove the `python -m exocortex` path says the same.
"""
import contextlib
import copy
import hashlib
import io
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

import pytest

from exocortex import cli
from exocortex.config import BUDGETS, RunConfig, apply_override, check_budget, config_fields, load_config, validate
from exocortex.errors import ExocortexError

TINY = {"data.world_bytes": 150000, "tokenizer.train_bytes": 100000, "tokenizer.vocab_size": 300,
        "model.width": 32, "model.depth": 1, "model.head_dim": 16, "model.induction_init": "false", "model.seq_len": 32, "pretrain.max_steps": 2,
        "pretrain.time_minutes": 0, "pretrain.compile": "false", "pretrain.device_batch": 2,
        "pretrain.batch_tokens": 64, "pretrain.eval_tokens": 64, "sft.compile": "false", "sft.device_batch": 4,
        "sft.batch_tokens": 128, "sft.max_steps": 1, "sft.time_minutes": 0, "sft.eval_tokens": 64,
        "sft_data.n_conversations": 20, "logging.tensorboard": "off", "data.workers": 1, "eval.core_n": 1,
        "eval.pass_k_n": 0, "eval.chat_tasks": "arithmetic=1", "eval.max_new_tokens": 4}
STAGES = (["tokenizer"], ["pretrain"], ["sft"], ["eval", "--stages", "pretrain,sft"], ["report"])


def invoke(argv: list[str]) -> tuple[object, str]:
    """cli.main in this process: (exit code, or 'traceback' for an escaped exception; stderr)."""
    err = io.StringIO()
    code: object = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc(file=err)
            code = "traceback"
    return code, err.getvalue()


def snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*"))}


def assert_one_line_failure(code, err: str, case: str) -> None:
    lines = err.strip().splitlines()
    assert code not in (0, "traceback") and "Traceback" not in err, f"{case}: exit {code}\n{err[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: {err[-2000:]}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run through every stage a fuzzed command reads (tokenizer, pretrain, sft, eval, report) in seconds."""
    root = tmp_path_factory.mktemp("fuzz")
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    for cmd in STAGES:
        code, err = invoke([*cmd, "--runs-dir", str(root), "--run", "fz", *(sets if cmd == ["tokenizer"] else [])])
        assert code == 0, err[-3000:]
    return root


# ----------------------------------------------------------------------------- --set keys x bad values

BAD_NUMBERS = ["0", "-1", "nan", "inf", "-inf", "", "abc", "1e400", str(10**30), "1.5", "[1]", "true"]
NEVER_A_NUMBER = ("nan", "inf", "-inf", "1e400", str(10**30), "", "abc", "[1]", "true")
BAD_VALUES = {bool: ["", "maybe", "2", "-1"], Literal: ["", "abc", "0"], dict: ["", "abc", "a=-1", "a=nan", "=",
              "a=1e400", "a=0", "a=1.5"], str: ["", "a/b", "\n", "x" * 300]}


def config_keys():
    """(dotted key, base type) for every field of every section, from the dataclasses themselves."""
    for key, hint in config_fields():
        base = get_args(hint)[0] if get_origin(hint) is Annotated else hint
        yield key, base if base in (int, float, bool, str) else get_origin(base)


def oracle(base: RunConfig, key: str, bad: str) -> str | None:
    """The run's config with this one value, checked in memory (not the CLI's path): None when valid, "any"
    when every command must refuse it, or the training stage it leaves without a budget (that stage refuses
    it when it starts; the others need no budget of it)."""
    cfg = copy.deepcopy(base)
    try:
        apply_override(cfg, key, bad.strip())  # as the CLI reads key=value
        validate(cfg)
    except ExocortexError:
        return "any"
    for stage in BUDGETS:
        try:
            check_budget(cfg, stage)
        except ExocortexError:
            return stage
    return None


def test_fuzz_set_values(trained, capsys):
    """Each invalid value through a different command (the tokenizer, which would replace the whole run, is
    one of them): one line, exit 1, the run untouched. Values the config accepts are valid settings, skipped."""
    run = trained / "fz"
    commands = [["tokenizer"], ["pretrain"], ["sft"], ["chat", "-p", "hi"], ["eval"], ["export"]]
    before, t0, base = snapshot(run), time.time(), load_config(run)
    invalid = valid = 0
    for key, kind in config_keys():
        for bad in BAD_NUMBERS if kind in (int, float) else BAD_VALUES[kind]:
            refused_by = oracle(base, key, bad)
            if refused_by is None:  # a valid setting; but no number field may take these
                assert kind not in (int, float) or bad not in NEVER_A_NUMBER, f"{key}={bad} accepted"
                valid += 1
                continue
            cmd = [refused_by] if refused_by in BUDGETS else commands[invalid % len(commands)]
            code, err = invoke([*cmd, "--runs-dir", str(trained), "--run", "fz", "--set", f"{key}={bad}"])
            assert_one_line_failure(code, err, f"{cmd[0]} --set {key}={bad!r}")
            assert code == 1 and (key in err or key.split(".")[-1] in err or "no budget" in err), err
            invalid += 1
    assert snapshot(run) == before, "a failed --set changed the run directory"
    assert invalid > 600
    with capsys.disabled():
        print(f"\n--set fuzz: {invalid} invalid values failed cleanly, {valid} valid ones skipped, "
              f"{time.time() - t0:.1f}s")


# ----------------------------------------------------------------------------- damaged run files

def damaged(data: bytes):
    yield "truncated", data[: len(data) // 2]
    yield "empty", b""
    yield "garbage", bytes(range(256)) * 4
    yield "bad utf-8", b"\xff\xfe\xfa" + data[3:]  # same length: only a check of the content finds it
    yield "nested", b"[" * 100_000  # deeper than the JSON parser's stack: a RecursionError, not a JSONDecodeError
    yield "a directory", None


def reader(rel: str, base: list[str]) -> list[str]:
    """The quickest command that reads this file."""
    if rel.startswith("logs/"):
        return ["report", *base]
    if rel.startswith("data/"):
        return ["pretrain", "--resume", *base]   # its train rows and val batches, before anything is written
    if rel.endswith("state.pt"):
        return [rel.split("/")[1], "--resume", *base]
    if "checkpoints/pretrain" in rel:
        return ["eval", "--stages", "pretrain", *base]
    if rel.startswith("tokenizer/"):
        return ["export", *base]
    return ["chat", "-p", "hi", "--max-tokens", "2", *base]


# may be damaged without failing the command: a `latest` pointer (the newest complete checkpoint is used,
# with a warning) and the jsonl logs (a torn line is skipped: they feed plots)
TOLERATED = ("latest", ".jsonl")
# train.bin damaged in place with its size kept: not read through at start (GPU corpora are tens of GB; the
# largest id meta.json recorded stands in), its batches are checked as they are made (test below); the fuzz's
# `pretrain --resume` of a finished run makes none
UNREAD_AT_START = {("data/train.bin", "bad utf-8")}


def test_fuzz_damaged_run_files(trained, tmp_path, capsys):
    run, pristine, t0, n, tolerated = trained / "fz", tmp_path / "pristine", time.time(), 0, 0
    shutil.copytree(run, pristine)  # each case damages the run in place, then gets it back from here
    files = [p for p in sorted(pristine.rglob("*")) if p.is_file() and p.suffix != ".png" and p.name != "report.md"]
    assert len(files) >= 17
    for f in files:
        rel = str(f.relative_to(pristine))
        for how, bad in damaged(f.read_bytes()):
            shutil.rmtree(run)
            shutil.copytree(pristine, run)
            target = run / rel
            target.unlink()
            target.mkdir() if bad is None else target.write_bytes(bad)
            before = snapshot(run)
            code, err = invoke(reader(rel, ["--runs-dir", str(trained), "--run", "fz"]))
            case = f"{rel} {how}"
            if code == 0 and (rel.endswith(TOLERATED) or (rel, how) in UNREAD_AT_START):
                tolerated += 1
                assert "Traceback" not in err, case
                continue
            assert_one_line_failure(code, err, case)
            assert snapshot(run) == before, f"{case}: the failed command changed the run directory"
            n += 1
    assert n >= 60
    shutil.rmtree(run)
    shutil.copytree(pristine, run)
    with capsys.disabled():
        print(f"\nfile fuzz: {n} damaged files failed cleanly, {tolerated} tolerated (pointers, logs), "
              f"{time.time() - t0:.1f}s")


def test_the_real_cli_says_the_same(trained, tmp_path):
    """The same failures through `python -m exocortex`: one line, exit 1, no traceback."""
    run = tmp_path / "fz"
    shutil.copytree(trained / "fz", run)
    (run / "checkpoints" / "sft" / "step_000001" / "meta.json").write_text('{"step": 1, "model_config": {"dep')
    cases = [(["pretrain", "--set", "pretrain.matrix_lr=nan"], "pretrain.matrix_lr=nan: must be between 0 and 10"),
             (["chat", "-p", "hi"], "sft/step_000001/meta.json (not valid JSON")]
    before = snapshot(run)
    for args, needle in cases:
        r = subprocess.run([sys.executable, "-m", "exocortex", *args, "--runs-dir", str(tmp_path), "--run", "fz"],
                           capture_output=True, text=True, timeout=120)
        assert_one_line_failure(r.returncode, r.stderr, " ".join(args))
        assert r.returncode == 1 and needle in r.stderr, r.stderr
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- one protection each

@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    shutil.copytree(trained / "fz", tmp_path / "fz")
    return tmp_path


def test_a_tokenizer_trained_again_with_another_vocab_is_refused(run_copy, texts):
    """`exocortex tokenizer` on a trained run (or a copied tokenizer) must not let chat answer garbage."""
    from exocortex.tokenizer import Tokenizer

    Tokenizer.train(texts, 290).save(run_copy / "fz" / "tokenizer")
    code, err = invoke(["chat", "-p", "hi", "--runs-dir", str(run_copy), "--run", "fz"])
    assert_one_line_failure(code, err, "replaced tokenizer")
    assert "trained with a vocabulary of 300 tokens" in err and "has 290" in err


def test_a_tokenizer_file_missing_its_last_ranks_is_refused(run_copy):
    """Fewer ranks than tokenizer.json (and the model) say: every line is well-formed, so only the count finds it."""
    f = run_copy / "fz" / "tokenizer" / "tokenizer.tiktoken"
    f.write_text("\n".join(f.read_text().splitlines()[:-5]) + "\n")
    code, err = invoke(["chat", "-p", "hi", "--runs-dir", str(run_copy), "--run", "fz"])
    assert_one_line_failure(code, err, "short tokenizer")
    assert "tokenizer.json says vocab_size 300" in err


def test_a_corpus_too_small_for_one_val_row_says_how_much_is_needed(tmp_path):
    (tmp_path / "a.txt").write_text("The river town sells glimmerfern at market. " * 40)
    sets = ["tokenizer.vocab_size=300", "model.width=32", "model.depth=1", "model.head_dim=16", "model.seq_len=64",
            "model.induction_init=false", "pretrain.max_steps=1", "pretrain.compile=false", "pretrain.device_batch=2", "logging.tensorboard=off"]
    code, err = invoke(["pretrain", "--runs-dir", str(tmp_path), "--run", "s", "--data", str(tmp_path / "a.txt"),
                        *[a for kv in sets for a in ("--set", kv)]])
    assert_one_line_failure(code, err, "tiny corpus")
    assert "the val split has 5 tokens, fewer than 65" in err and "needs at least about 6,500 tokens" in err


def test_config_json_that_is_a_directory_or_unreadable(run_copy):
    cfg = run_copy / "fz" / "config.json"
    cfg.unlink()
    cfg.mkdir()
    code, err = invoke(["chat", "-p", "hi", "--runs-dir", str(run_copy), "--run", "fz"])
    assert_one_line_failure(code, err, "config.json directory")
    assert "cannot read" in err and "config.json (Is a directory)" in err


def test_a_run_from_a_gpu_machine_with_an_unbudgeted_stage_still_loads(run_copy):
    """Reading a run checks neither its device nor its budgets: export and report need neither, chat needs no
    budget. The stages that would use them refuse in one line when they start, the run untouched."""
    import json

    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    run, base = run_copy / "fz", ["--runs-dir", str(run_copy), "--run", "fz"]
    raw = json.loads((run / "config.json").read_text())
    raw.update(device="cuda", rl={**raw["rl"], "steps": 0, "time_minutes": 0})
    (run / "config.json").write_text(json.dumps(raw))
    for cmd in (["export"], ["report"], ["chat", "-p", "hi", "--max-tokens", "2", "--set", "device=cpu"]):
        code, err = invoke([*cmd, *base])
        assert code == 0, f"{cmd[0]}: {err[-2000:]}"
    before = snapshot(run)
    for cmd, needle in ((["chat", "-p", "hi"], "device='cuda': this machine"),
                        (["pretrain", "--resume"], "device='cuda': this machine"),
                        (["rl"], "rl has no budget: set one of rl.steps, rl.time_minutes")):
        code, err = invoke([*cmd, *base])
        assert_one_line_failure(code, err, cmd[0])
        assert needle in err, err
    assert snapshot(run) == before


def test_token_ids_are_checked_from_meta_json_and_batch_by_batch(run_copy):
    """The train split is not read through at every start: tokenization records its largest id in meta.json,
    which is compared with the vocabulary; a train.bin overwritten in place (size kept) is found at the first
    batch holding a bad id, one line, its checkpoints untouched. Runs without the record are read through."""
    import json

    import numpy as np

    from exocortex.run import RunDir

    run, base = run_copy / "fz", ["--runs-dir", str(run_copy), "--run", "fz"]
    data, meta_path = run / "data", run / "data" / "meta.json"
    meta = json.loads(meta_path.read_text())
    splits = [np.fromfile(data / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")]
    assert meta["max_token_id"] == max(int(t.max()) for t in splits) < 300
    meta_path.write_text(json.dumps({**meta, "max_token_id": 300}))  # as if from a larger tokenizer
    before = snapshot(run)
    code, err = invoke(["pretrain", "--resume", *base])
    assert_one_line_failure(code, err, "max_token_id")
    assert "meta.json holds token id 300, outside the vocabulary of 300" in err and snapshot(run) == before

    meta_path.write_text(json.dumps(meta))
    np.full(len(splits[0]), 0xFFFF, dtype=meta["dtype"]).tofile(data / "train.bin")
    kept = snapshot(run / "checkpoints" / "pretrain")
    code, err = invoke(["pretrain", "--force", *base])  # a fresh run: it makes batches from step 1
    assert_one_line_failure(code, err, "train.bin overwritten in place")
    assert "train.bin holds token id 65535 (micro-batch 0)" in err
    latest = RunDir(run).latest_checkpoint("pretrain")  # the old run's, set aside, still counts
    assert latest.name == "step_000002" and snapshot(latest.parent) == kept

    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "max_token_id"}))  # an older run
    before = snapshot(run)
    code, err = invoke(["pretrain", "--resume", *base])
    assert_one_line_failure(code, err, "older run, train.bin overwritten")
    assert "train.* holds token id 65535" in err and snapshot(run) == before


def test_tokenizer_ranks_must_be_whole_and_cover_every_byte(tmp_path, tok):
    """Lines that each parse but together are no tokenizer: a rank twice (tiktoken would refuse it only with a
    panic), a single byte without a rank (encoding it would panic)."""
    from exocortex.tokenizer import Tokenizer

    tok.save(tmp_path)
    (tmp_path / "tokenizer.json").unlink()  # the ranks alone: tokenizer.json's count is a separate check
    f = tmp_path / "tokenizer.tiktoken"
    lines = f.read_text().splitlines()
    for broken, needle in [(lines[:-1] + [lines[-1].split()[0] + " 0"], "ranks are not 0.."),
                           ([" ".join((ln.split()[0], str(i))) for i, ln in enumerate(lines[1:])], "single byte")]:
        f.write_text("\n".join(broken) + "\n")
        with pytest.raises(ExocortexError, match=needle):
            Tokenizer.load(tmp_path)


def test_a_damaged_training_state_names_its_file(tmp_path):
    from exocortex.checkpoint import load_state

    (tmp_path / "state.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ExocortexError, match="cannot load the training state .*state.pt"):
        load_state(tmp_path)


def test_wrong_types_inside_meta_json_and_summaries_are_named(run_copy):
    import json

    from exocortex.run import RunDir

    run = run_copy / "fz"
    meta = run / "checkpoints" / "sft" / "step_000001" / "meta.json"
    good = json.loads(meta.read_text())
    for bad, needle in [({**good, "model_config": {**good["model_config"], "depth": "1"}}, "model_config.depth"),
                        ({**good, "model_config": {**good["model_config"], "head_dim": 0}}, "model_config.head_dim"),
                        ({k: v for k, v in good.items() if k != "step"}, "needs an object with 'step'")]:
        meta.write_text(json.dumps(bad))
        code, err = invoke(["chat", "-p", "hi", "--runs-dir", str(run_copy), "--run", "fz"])
        assert_one_line_failure(code, err, needle)
        assert "meta.json" in err and needle in err, err
    summary = run / "logs" / "pretrain_summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "val_bpb": "low"}))
    with pytest.raises(ExocortexError, match="pretrain_summary.json is unreadable .*val_bpb='low'"):
        RunDir(run).summary("pretrain")


def test_fuzz_chat_sampling_flags(trained):
    """chat's flags for sampling.* take the same ranges (NaN temperature was a torch traceback)."""
    run, n = trained / "fz", 0
    before = snapshot(run)
    for flag in ("--temperature", "--top-k", "--top-p", "--max-tokens"):
        for bad in ("nan", "inf", "-1", "1e400", str(10**30)):
            code, err = invoke(["chat", "-p", "hi", flag, bad, "--runs-dir", str(trained), "--run", "fz"])
            if code == 2 and "invalid int value" in err:  # argparse refused a non-integer for an int flag
                continue
            assert_one_line_failure(code, err, f"{flag} {bad}")
            assert flag in err
            n += 1
    assert n >= 12 and snapshot(run) == before
