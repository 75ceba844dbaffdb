"""The benchmarks' own plumbing (bench/): what they compare must be what they say they compare."""
import json
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


def _evaluated_run(root: Path, name: str, sft: dict) -> Path:
    (root / name / "logs").mkdir(parents=True)
    (root / name / "logs" / "eval_summary.json").write_text(json.dumps({"stages": {"sft": sft}}))
    return root / name


def test_seeds_summary_is_each_arms_mean_and_spread_and_their_difference(tmp_path):
    """bench/seeds.py: the arithmetic gap per run (seen minus held-out), then mean and sample sd per arm."""
    import seeds

    base = [_evaluated_run(tmp_path, f"b{i}", {"arithmetic_accuracy": a, "arithmetic_heldout_accuracy": h,
                                                 "facts_mc_accuracy": f})
            for i, (a, h, f) in enumerate([(0.8, 0.6, 0.5), (0.7, 0.6, 0.7)])]
    change = [_evaluated_run(tmp_path, "c0", {"arithmetic_accuracy": 0.75, "arithmetic_heldout_accuracy": 0.7})]
    arms = {"base": seeds.summarize(base, ["sft"], ["arithmetic_gap", "facts_mc_accuracy"]),
            "change": seeds.summarize(change, ["sft"], ["arithmetic_gap", "facts_mc_accuracy"])}
    gap = arms["base"]["sft arithmetic_gap"]
    assert gap["n"] == 2 and gap["mean"] == pytest.approx(0.15) and gap["sd"] == pytest.approx(0.0707, abs=1e-4)
    assert arms["change"]["sft arithmetic_gap"]["sd"] is None and "sft facts_mc_accuracy" not in arms["change"]
    rows = {r.split(" | ")[0].strip("| "): r for r in seeds.table(arms).splitlines()}
    assert rows["sft arithmetic_gap"].endswith("| -10.0 |")  # 5 points against 15
    assert rows["sft facts_mc_accuracy"].endswith("| - | - |")  # not in the change arm: no difference made up
    with pytest.raises(SystemExit, match="not been evaluated"):
        seeds.summarize([tmp_path / "missing"], ["sft"], ["arithmetic_gap"])


def test_seeds_runs_are_valid_speedruns_with_fixed_steps(tmp_path):
    """Each (arm, seed) run: the seed, every stage's budget fixed in steps, the shared and the arm's overrides,
    all keys the config knows; runs already evaluated are not started again."""
    import seeds
    from exocortex.config import make_config

    args = seeds.argparse.Namespace(preset="tiny", runs_dir=tmp_path, steps="10,9,8,7", set=["sft_data.text_fraction=0.3"],
                                    threads=1, parallel=2)
    cmd = seeds.speedrun_command(args, "change-s5", 5, ["model.induction_init=false"])
    overrides = [cmd[i + 1] for i, c in enumerate(cmd) if c == "--set"]
    cfg = make_config("tiny", overrides)  # an unknown key would raise here
    assert (cfg.seed, cfg.rl.seed, cfg.pretrain.max_steps, cfg.midtrain.max_steps, cfg.sft.max_steps, cfg.rl.steps) \
        == (5, 5, 10, 9, 8, 7)
    assert cfg.pretrain.time_minutes == cfg.rl.time_minutes == 0 and not cfg.model.induction_init
    assert cfg.sft_data.text_fraction == 0.3
    _evaluated_run(tmp_path, "base-s5", {})
    started = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(seeds.subprocess, "Popen", lambda *a, **k: started.append(a) or pytest.fail("a done run restarted"))
        seeds.run_all(args, [("base-s5", cmd)])
    assert not started


@pytest.mark.parametrize("bad", [["--seeds", "a,b"], ["--steps", "1,2,x,4"], ["--steps", "1,2,3"],
                                 ["--steps", "0,1,1,1"], ["--parallel", "0"]])
def test_seeds_bad_flags_are_one_line_errors_before_any_run(tmp_path, bad):
    import seeds

    with pytest.raises(SystemExit, match="^error: "):
        seeds.main(["--runs-dir", str(tmp_path / "r"), *bad])
    assert not (tmp_path / "r").exists()
