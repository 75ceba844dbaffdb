"""The run directory: which checkpoint counts, typed summaries, rollback."""
import json

import pytest

from exocortex.errors import ExocortexError
from exocortex.run import EvalSummary, RunDir, SpeedrunSummary, most_recent_run


def _checkpoint(run: RunDir, stage: str, step: int, latest: bool = True):
    d = run.checkpoints(stage) / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"w")
    (d / "meta.json").write_text("{}")
    if latest:
        (run.checkpoints(stage) / "latest").write_text(d.name)
    return d


def test_parent_and_chat_checkpoints_follow_the_registry(tmp_path):
    run = RunDir(tmp_path / "r")
    with pytest.raises(ExocortexError, match="exocortex pretrain --run r"):
        run.parent_checkpoint("sft")
    base = _checkpoint(run, "pretrain", 10)
    assert run.parent_checkpoint("sft") == ("pretrain", base)  # no midtrain: sft starts from the base model
    mid = _checkpoint(run, "midtrain", 5)
    assert run.parent_checkpoint("sft") == ("midtrain", mid)
    assert run.parent_checkpoint("rl") == ("midtrain", mid)
    assert run.chat_checkpoint() == mid
    sft = _checkpoint(run, "sft", 3)
    assert run.chat_checkpoint() == sft and run.chat_checkpoint("midtrain") == mid
    with pytest.raises(ExocortexError, match="no 'rl' checkpoint"):
        run.chat_checkpoint("rl")


def test_roll_back_points_latest_at_an_earlier_checkpoint_or_clears(tmp_path):
    run = RunDir(tmp_path / "r")
    for step in (10, 20, 30):
        _checkpoint(run, "rl", step)
    assert run.roll_back("rl", 25).name == "step_000020"
    assert run.latest_checkpoint("rl").name == "step_000020"
    assert run.roll_back("rl", 5) is None and run.latest_checkpoint("rl") is None


def test_roll_back_removes_the_later_checkpoints(tmp_path):
    """The guard's rollback leaves no degenerate checkpoint behind: with `latest` lost afterwards, the newest
    remaining one is the kept one, not a post-guard one."""
    run = RunDir(tmp_path / "r")
    for step in (10, 20, 30, 40):
        _checkpoint(run, "rl", step)
    run.roll_back("rl", 25)
    (run.checkpoints("rl") / "latest").unlink()
    assert [c.name for c in run.checkpoint_dirs("rl")] == ["step_000020", "step_000010"]


def test_pruning_never_drops_the_checkpoint_just_saved(tmp_path):
    """Resumed from step 20 with a different checkpoint_every: the new step 25 is kept, the abandoned step 30
    goes, and `keep` counts back from the new one."""
    run = RunDir(tmp_path / "r")
    for step in (10, 20, 30):
        _checkpoint(run, "rl", step)
    new = _checkpoint(run, "rl", 25)
    run.prune_checkpoints("rl", new, keep=2)
    assert [c.name for c in run.checkpoint_dirs("rl")] == ["step_000025", "step_000020"]


def test_remove_tree_sweeps_trash_a_killed_process_left_and_never_collides(tmp_path, monkeypatch):
    import subprocess
    import sys

    from exocortex import fileio

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = tmp_path / "checkpoints"
    stale = root / f".trash_{dead.pid}_0_pretrain.previous"
    (stale / "step_000002").mkdir(parents=True)
    (stale / "step_000002" / "model.safetensors").write_bytes(b"w" * 1000)
    live = root / ".trash_1_0_sft"  # pid 1 is alive: another process's removal still in progress
    live.mkdir()
    fileio.remove_tree(root / "pretrain.previous")  # nothing to remove, but the leftovers beside it are swept
    assert not stale.exists() and live.exists()

    monkeypatch.setattr(fileio.shutil, "rmtree", lambda *a, **kw: None)  # trash that will not delete
    for _ in range(2):
        (root / "pretrain" / "step_000002").mkdir(parents=True)  # renaming onto a non-empty trash: ENOTEMPTY
        fileio.remove_tree(root / "pretrain")
    assert not (root / "pretrain").exists() and len(list(root.glob(".trash_*_pretrain"))) == 2


def test_latest_skips_an_incomplete_checkpoint(tmp_path):
    run = RunDir(tmp_path / "r")
    good = _checkpoint(run, "sft", 1, latest=False)
    broken = run.checkpoints("sft") / "step_000002"
    broken.mkdir()
    assert run.latest_checkpoint("sft") == good


def test_summaries_are_typed(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.summary("eval") is None
    run.write_summary("speedrun", SpeedrunSummary(stage_seconds={"pretrain": 1.5}, total_seconds=2.0))
    assert run.summary("speedrun").stage_seconds == {"pretrain": 1.5}
    with pytest.raises(TypeError):
        run.write_summary("eval", {"stages": {}})  # a dict is not the eval stage's summary
    (run.logs_dir / "eval_summary.json").write_text(json.dumps({"stages": {}, "from_a_newer_version": 1}))
    assert run.summary("eval").stages == {}
    (run.logs_dir / "rl_summary.json").write_text(json.dumps({"task": "word_problems"}))  # cut short
    with pytest.raises(ExocortexError, match="re-run `exocortex rl"):
        run.summary("rl")
    run.write_summary("eval", EvalSummary(stages={"sft": {"arithmetic_accuracy": 0.5}}))
    assert run.summary("eval").stages["sft"]["arithmetic_accuracy"] == 0.5


def test_a_pretrain_summary_from_an_older_version_still_reports(tmp_path):
    """Summaries written before FLOPs and MFU were measured lack those keys: the report shows the rest."""
    run = RunDir(tmp_path / "r")
    run.logs_dir.mkdir(parents=True)
    old = {"params": 5, "steps": 2, "tokens": 1000, "seconds": 60.0, "tokens_per_second": 16.7,
           "final_train_loss": 2.0, "final_val_loss": 2.1, "val_bpb": 1.0, "tokens_per_param": 200.0,
           "device": "cpu", "dtype": "torch.float32", "checkpoint": "x"}
    (run.logs_dir / "pretrain_summary.json").write_text(json.dumps(old))
    s = run.summary("pretrain")
    assert s.flops is None and s.spent_line() == "spent 1.0 min, 1,000 tokens"


def test_most_recent_run_is_the_one_written_last(tmp_path):
    with pytest.raises(ExocortexError, match="no runs in"):
        most_recent_run(tmp_path)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    _checkpoint(RunDir(tmp_path / "a"), "sft", 1)
    assert most_recent_run(tmp_path).name == "a"
