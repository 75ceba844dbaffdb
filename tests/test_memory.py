"""Memory: peak RSS measured per stage and shown in the report; RL's update in micro-batches; freed heap handed back."""
import json
import subprocess
import sys

import pytest
import torch

from exocortex.config import RLConfig, TrainConfig, make_config, save_config
from exocortex.device import release_freed_memory
from exocortex.errors import ExocortexError
from exocortex.infer.engine import Engine
from exocortex.memory import peak_rss_mb, reset_peak_rss
from exocortex.model import GPT
from exocortex.run import PretrainSummary, RunDir, SpeedrunSummary
from exocortex.stages import rl
from exocortex.stages.report import run_report
from exocortex.tasks.base import Task

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and glibc")


@linux
def test_peak_rss_is_reset_between_stages():
    reset_peak_rss()
    base = peak_rss_mb()
    x = torch.ones(64 * 2**20)  # 256 MB, touched
    assert peak_rss_mb() > base + 200
    del x
    release_freed_memory()  # as the speedrun does between stages (an earlier test may have kept freed memory)
    assert reset_peak_rss()
    assert peak_rss_mb() < base + 100  # the next stage's peak does not include the last one's


_TRIM_SCRIPT = r"""
import sys, torch
import exocortex.train.loop  # the heap a training process has
from exocortex.device import keep_freed_memory, release_freed_memory
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20
assert keep_freed_memory()  # freed blocks stay in the heap, as while training
base = rss_mb()
for n in range(40, 72, 4):  # other lengths each time, like RL's rollouts: holes that fit nothing new
    x = torch.ones(n * 2**20)
    small = [str(i) for i in range(1000)]
    del x
kept = rss_mb()
release_freed_memory()
print(base, kept, rss_mb())
"""


@linux
def test_release_freed_memory_hands_the_heap_back():
    base, kept, released = map(int, subprocess.run([sys.executable, "-c", _TRIM_SCRIPT], capture_output=True,
                                                   text=True, check=True).stdout.split())
    assert kept > base + 200  # what keep_freed_memory keeps ...
    assert released < base + 100, (base, kept, released)  # ... goes back to the OS


class CountTask(Task):
    name = "count"

    def example(self, rng, split):
        return {"task": self.name, "answer": "", "messages": [{"role": "user", "content": "river town"},
                                                             {"role": "assistant", "content": ""}]}

    def grade(self, answer_text, example):
        return False

    def reward(self, answer_text, example):
        return len(answer_text) % 3 / 2


def test_rl_update_runs_in_micro_batches_with_the_same_gradient(tok, small_cfg, monkeypatch):
    """A rollout of 16 rows in micro-batches of 4: each micro-batch is 4 rows, the heap is released before each,
    and the summed gradient (as the loop computes it, loss / chunks per micro-batch) equals the one-batch one."""
    released = []
    monkeypatch.setattr(rl, "release_freed_memory", lambda: released.append(1))
    model = GPT(small_cfg)
    r = RLConfig(steps=1, prompts_per_step=2, samples_per_prompt=8, max_new_tokens=12, device_batch=4, seed=3)
    t = rl.rl_train_config(TrainConfig(), r, 16, small_cfg.seq_len)
    chunks = t.batch_tokens // (t.device_batch * small_cfg.seq_len)
    assert (t.device_batch, chunks) == (4, 4)

    def grads(n):
        source = rl.RolloutSource(Engine(model, tok, tools={}), CountTask(), r, chunks=n)
        model.zero_grad()
        for micro in range(n):
            x, y, w = source.get(micro)
            assert x.shape[0] == 16 // n
            ((model(x, y, reduction="none").view_as(y) * w).sum() / n).backward()
        return [p.grad.clone() for p in model.parameters()]

    one, four = grads(1), grads(4)
    assert len(released) == 5
    for a, b in zip(one, four):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ExocortexError, match="rl.device_batch=0"):
        make_config("tiny", ["rl.device_batch=0"])


def test_rl_micro_batches_hold_rows_of_like_length(tok, small_cfg):
    """Each micro-batch is padded to its longest row: the rollout's rows are sorted by length before they are
    cut into micro-batches, so every micro-batch is at most as long as the next one's shortest row."""
    torch.manual_seed(0)
    r = RLConfig(steps=1, prompts_per_step=4, samples_per_prompt=4, max_new_tokens=12, seed=5)
    engine = Engine(GPT(small_cfg), tok, tools={})
    with torch.no_grad():  # a model that ends its replies after a few tokens or runs to the limit, by chance
        head = engine.model.lm_head.weight
        head.zero_()
        for stop in engine.stop_ids:
            head[stop] = torch.randn(head.shape[1]) * 0.3
    source = rl.RolloutSource(engine, CountTask(), r, chunks=4)
    widths = [source.get(micro)[0].shape[1] for micro in range(4)]
    lengths = [len(s) for s, _, _ in source._rollout[0]]
    assert len(set(lengths)) > 1, lengths  # samples of different lengths, else the test shows nothing
    assert lengths == sorted(lengths) and widths == sorted(widths)
    assert widths == [max(lengths[i:i + 4]) - 1 for i in range(0, 16, 4)]


def _run_with_summaries(tmp_path, speedrun: bool):
    cfg = make_config("tiny", name="mem")
    cfg.runs_dir = str(tmp_path)
    save_config(cfg)
    run = RunDir(cfg.run_dir)
    pre = PretrainSummary(params=1, steps=2, tokens=3, seconds=4.0, tokens_per_second=1.0, final_train_loss=1.0,
                          final_val_loss=None, val_bpb=1.0, tokens_per_param=1.0, device="cpu", dtype="float32",
                          checkpoint="x")
    run.write_summary("pretrain", pre)  # stamps the stage's peak
    if speedrun:
        run.write_summary("speedrun", SpeedrunSummary(stage_seconds={"tokenizer": 12.5, "pretrain": 330.0},
                                                      total_seconds=342.5, peak_rss_mb=1234.0,
                                                      stage_peak_rss_mb={"tokenizer": 800.0, "pretrain": 1234.0}))
    return cfg, run


def test_report_shows_each_stage_time_and_peak_memory(tmp_path):
    cfg, run = _run_with_summaries(tmp_path, speedrun=True)
    peak = json.loads((run.logs_dir / "pretrain_summary.json").read_text())["peak_rss_mb"]
    assert 20 < peak < 100_000  # this test process's peak: plausible megabytes
    report = run_report(cfg).read_text()
    assert "| stage | seconds | peak RSS (MB) |" in report
    assert "| tokenizer | 12.5 | 800 |" in report and "| pretrain | 330.0 | 1,234 |" in report
    assert "| **total** | **342.5** | **1,234** |" in report


def test_report_memory_table_from_stages_run_alone(tmp_path):
    """No speedrun: the table comes from the stages' own summaries; old summaries without the field still load."""
    cfg, run = _run_with_summaries(tmp_path, speedrun=False)
    report = run_report(cfg).read_text()
    row = next(line for line in report.splitlines() if line.startswith("| pretrain |"))
    seconds, peak = [c.strip() for c in row.strip("|").split("|")][1:]
    assert seconds == "4.0" and 20 < float(peak.replace(",", "")) < 100_000
    p = run.logs_dir / "pretrain_summary.json"
    old = json.loads(p.read_text())
    del old["peak_rss_mb"]
    p.write_text(json.dumps(old))
    assert run.summary("pretrain").peak_rss_mb is None
