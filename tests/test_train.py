import subprocess
import sys

import numpy as np
import pytest
import torch

from exocortex.checkpoint import load_model
from exocortex.run import RunDir
from exocortex.config import ModelConfig, TrainConfig
from exocortex.errors import ExocortexError
from exocortex.data.loader import PackedRows, TokenRows, eval_batches, pack_conversations
from exocortex.model import GPT
from exocortex.train.budget import StepBudget, lr_multiplier
from exocortex.train.loop import train
from exocortex.train.optim import build_optimizers


def _source(vocab, seq_len):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, 20_000).astype(np.uint16)
    return TokenRows(tokens, seq_len, rows=4, seed=1), eval_batches(tokens[-2000:], seq_len, 4, 256)


class Interrupting:
    """Wraps a source and raises KeyboardInterrupt (as Ctrl-C or SIGTERM would) at a given batch."""

    def __init__(self, inner, at):
        self.inner, self.at, self.rows = inner, at, inner.rows

    def get(self, index):
        if index == self.at:
            raise KeyboardInterrupt
        return self.inner.get(index)


def _cfg():
    return TrainConfig(batch_tokens=256, device_batch=4, checkpoint_every=0, eval_every=3, dtype="float32",
                       keep_checkpoints=3, warmup_frac=0.2, warmdown_frac=0.4)


def test_resume_continues_identically(small_cfg, tmp_path):
    src, val = _source(small_cfg.vocab_size, small_cfg.seq_len)
    t = _cfg()  # 256 tokens per step = 2 micro-batches of 4 x 32: accumulation is exercised too
    torch.manual_seed(0)
    a = GPT(small_cfg)
    ra = train(a, t, "pretrain", tmp_path / "a", src, val, torch.device("cpu"), torch.float32, total_steps=8)

    torch.manual_seed(0)
    b = GPT(small_cfg)
    with pytest.raises(ExocortexError, match="resume"):
        train(b, t, "pretrain", tmp_path / "b", Interrupting(src, at=2 * 5), val, torch.device("cpu"),
              torch.float32, total_steps=8)
    assert RunDir(tmp_path / "b").latest_checkpoint("pretrain").name == "step_000005"
    torch.manual_seed(123)  # a fresh process: different RNG, fresh weights
    c = GPT(small_cfg)
    rc = train(c, t, "pretrain", tmp_path / "b", src, val, torch.device("cpu"), torch.float32, total_steps=8,
               resume=True)
    assert [h["loss"] for h in ra.history] == pytest.approx([h["loss"] for h in rc.history], rel=1e-6, abs=1e-6)
    for (n, p), (_, q) in zip(a.state_dict().items(), c.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), n
    # the final checkpoint loads back into the same model
    m, meta = load_model(RunDir(tmp_path / "b").latest_checkpoint("pretrain"))
    assert meta["step"] == 8
    assert torch.allclose(m.lm_head.weight, c.lm_head.weight)


def test_training_lowers_loss(small_cfg, tmp_path):
    tokens = np.tile(np.arange(50, dtype=np.uint16), 400)  # a learnable sequence
    src = TokenRows(tokens, small_cfg.seq_len, rows=8, seed=0)
    val = eval_batches(tokens, small_cfg.seq_len, 8, 512)
    t = TrainConfig(batch_tokens=256, device_batch=8, checkpoint_every=0, eval_every=10, dtype="float32")
    r = train(GPT(small_cfg), t, "pretrain", tmp_path, src, val, torch.device("cpu"), torch.float32, total_steps=30)
    assert r.final_val_loss < 1.0 < r.history[0]["loss"]


def test_lr_schedule():
    t = TrainConfig(warmup_frac=0.1, warmdown_frac=0.5, final_lr_frac=0.0)
    m = [lr_multiplier(s, 100, t) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == 1.0 and m[49] == 1.0
    assert m[50] == pytest.approx(1.0) and m[99] == pytest.approx(0.02)
    assert all(a >= b for a, b in zip(m[50:], m[51:]))


def _simulated_stage(budget: StepBudget, t: TrainConfig, step_seconds) -> tuple[float, list[float]]:
    """Drive a time budget with a fake clock (step_seconds(step) per step, a 54 s compile in the first, a 3 s
    eval every 100 steps, counted as the loop counts them); the time spent and the learning rate of each step."""
    elapsed, step, lrs = 0.0, 0, []
    while not budget.done(step):
        lrs.append(lr_multiplier(step, budget.schedule_total, t))
        dt = step_seconds(step) + (54.0 if step == 0 else 0.0)
        step += 1
        elapsed += dt
        budget.measure(step, dt, elapsed)
        if step % 100 == 0:
            elapsed += 3.0
    return elapsed, lrs


@pytest.mark.parametrize("warmdown", [0.4, 0.5])
def test_time_budget_follows_a_machine_that_slows_down(warmdown):
    # steps slow from 0.70 s to 0.79 s a third of the way in (as a pretraining in a cold speedrun did): the stage
    # still ends near its budget, and the learning rate never rises again once the warmdown has begun
    t = TrainConfig(time_minutes=5.5, warmup_frac=0.0, warmdown_frac=warmdown)
    budget = StepBudget("pretrain", None, t.time_minutes, t.warmdown_frac)
    elapsed, lrs = _simulated_stage(budget, t, lambda s: 0.70 if s < 120 else 0.79)
    assert abs(elapsed - 330) / 330 < (0.03 if warmdown < 0.5 else 0.05)  # one re-measure: 6.8% over
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    steady, _ = _simulated_stage(StepBudget("pretrain", None, 5.5, warmdown), t, lambda s: 0.7)
    assert abs(steady - 330) < 5


def test_token_rows_deterministic_and_cover_epoch():
    tokens = np.arange(10_001, dtype=np.uint16)
    src = TokenRows(tokens, 100, rows=10, seed=3)
    x, y = src.get(4)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(src.get(4)[0], TokenRows(tokens, 100, rows=10, seed=3).get(4)[0])
    starts = sorted(int(src.get(i)[0][r, 0]) for i in range(10) for r in range(10))
    assert starts == list(range(0, 10_000, 100))  # one epoch visits every row once


def test_pack_conversations_masks():
    convs = [([1, 2, 3, 4], [0, 0, 1, 1]), ([5, 6, 7], [0, 1, 1]), (list(range(10, 30)), [1] * 20)]
    x, y = pack_conversations(convs, seq_len=8, pad_id=0)
    assert x.shape[1] == 8 and y.shape == x.shape
    assert x[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 0]
    assert y[0].tolist() == [-1, 3, 4, -1, 6, 7, -1, -1]  # loss only where the mask says, never on padding
    rows = PackedRows(x, y, rows=2, seed=0)
    assert rows.get(0)[0].shape == (2, 8)


def test_fresh_run_supersedes_old_checkpoints(small_cfg, tmp_path):
    src, val = _source(small_cfg.vocab_size, small_cfg.seq_len)
    t = _cfg()
    train(GPT(small_cfg), t, "pretrain", tmp_path, src, val, torch.device("cpu"), torch.float32, total_steps=8)
    with pytest.raises(ExocortexError):
        train(GPT(small_cfg), t, "pretrain", tmp_path, Interrupting(src, at=2 * 3), val, torch.device("cpu"),
              torch.float32, total_steps=8)
    # --resume continues the interrupted run, not the finished step_000008 of the earlier one
    assert RunDir(tmp_path).latest_checkpoint("pretrain").name == "step_000003"
    r = train(GPT(small_cfg), t, "pretrain", tmp_path, src, val, torch.device("cpu"), torch.float32, total_steps=8,
              resume=True)
    assert r.steps == 8 and r.final_val_loss is not None
    again = train(GPT(small_cfg), t, "pretrain", tmp_path, src, val, torch.device("cpu"), torch.float32, resume=True)
    assert again.steps == 8 and again.final_val_loss == pytest.approx(r.final_val_loss)  # finished: nothing to do


class OOM:
    rows = 4

    def get(self, index):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")


def test_out_of_memory_suggests_smaller_batch(small_cfg, tmp_path):
    with pytest.raises(ExocortexError, match=r"device_batch=2"):
        train(GPT(small_cfg), _cfg(), "pretrain", tmp_path, OOM(), [], torch.device("cpu"), torch.float32,
              total_steps=3)


def test_resume_skips_a_corrupt_checkpoint(small_cfg, tmp_path, capsys):
    src, val = _source(small_cfg.vocab_size, small_cfg.seq_len)
    t = _cfg()
    t.checkpoint_every = 2
    torch.manual_seed(0)
    ref = train(GPT(small_cfg), t, "pretrain", tmp_path / "ref", src, val, torch.device("cpu"), torch.float32,
                total_steps=8)
    torch.manual_seed(0)
    with pytest.raises(ExocortexError):
        train(GPT(small_cfg), t, "pretrain", tmp_path / "b", Interrupting(src, at=2 * 5), val,
              torch.device("cpu"), torch.float32, total_steps=8)
    root = tmp_path / "b" / "checkpoints" / "pretrain"
    assert {"step_000004", "step_000005"} <= {p.name for p in root.glob("step_*")}
    assert (root / "latest").read_text() == "step_000005"
    weights = root / "step_000005" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a full disk
    r = train(GPT(small_cfg), t, "pretrain", tmp_path / "b", src, val, torch.device("cpu"), torch.float32,
              total_steps=8, resume=True)
    out = capsys.readouterr().out
    assert "skipping unreadable checkpoint" in out and "resuming from step_000004" in out
    assert [h["loss"] for h in r.history] == pytest.approx([h["loss"] for h in ref.history], rel=1e-6, abs=1e-6)


_FAULTS_SCRIPT = r"""
import resource, sys, torch
import exocortex.train.loop  # the heap a training process has (how many blocks it takes to settle depends on it)
from exocortex.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20
def step():  # like a training step: a big buffer, some small Python objects, the buffer freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(64 * 2**20)  # 256 MB, touched
    small = [str(i) for i in range(1000)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del x
    return faults, rss_mb()
print(" ".join(f"{f},{r}" for f, r in (step() for _ in range(12))))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_large_blocks():
    """Training re-allocates the same big buffers every step. By default glibc maps and unmaps a 256 MB
    block each time (65k fresh page faults per step); after keep_freed_memory() the steps settle on reusing
    freed blocks: no faults and a flat RSS once settled. Small allocations can split a freed hole, so the heap
    may take a few more blocks first (1 here, 4 on a CI machine): only the last steps are judged."""
    def steps(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
        return [tuple(map(int, pair.split(","))) for pair in out.stdout.split()]
    pages = 256 * 2**20 // 4096
    assert all(f > pages // 2 for f, _ in steps("default")[2:])
    keep = steps("keep")
    assert all(f < pages // 20 for f, _ in keep[-4:]), keep
    assert abs(keep[-1][1] - keep[-4][1]) < 16, keep  # memory stops growing (MB)
    assert keep[-1][1] < 8 * 256, keep  # and settles at a few blocks, not one per step


def test_muon_is_torch_muon_with_a_choice_of_newton_schulz_dtype():
    """Our Muon is torch.optim.Muon's update (same momentum, lr adjustment, weight decay, same NS ops): with bf16
    Newton-Schulz it equals torch's bit for bit; in float32 it is the same direction. build_optimizers picks
    float32 exactly where bf16 is not native (emulated bf16 NS is many times slower there: bench/muon.py)."""
    from exocortex.device import resolve_dtype
    from exocortex.train.optim import Muon

    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (32, 32)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    kw = dict(lr=0.02, momentum=0.95, weight_decay=0.1)

    def run(make):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params]

    ref = run(lambda ps: torch.optim.Muon(ps, adjust_lr_fn="original", **kw))
    assert all(torch.equal(a, b) for a, b in zip(ref, run(lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **kw))))
    for a, b, s in zip(ref, run(lambda ps: Muon(ps, ns_dtype=torch.float32, **kw)), start):
        assert not torch.equal(a, b)  # float32: same update direction, not the same bits
        assert torch.nn.functional.cosine_similarity((a - s).flatten(), (b - s).flatten(), dim=0) > 0.99
    model = GPT(ModelConfig(depth=1, width=32, head_dim=16, vocab_size=64, seq_len=16))
    muon = build_optimizers(model, TrainConfig())[1]
    native = resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert isinstance(muon, Muon) and muon.ns_dtype == (torch.bfloat16 if native else torch.float32)
