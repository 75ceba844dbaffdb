import importlib.machinery
import json
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from exocortex.config import LoggingConfig, ModelConfig, TrainConfig, make_config
from exocortex.errors import ExocortexError
from exocortex.data.loader import TokenRows, eval_batches
from exocortex.train.metrics import MetricsSink
from exocortex.model import GPT
from exocortex.train.loop import train


class FakeWriter:
    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_log_sends_numeric_fields_by_stage():
    w = FakeWriter()
    MetricsSink("sft", writers=[w]).log({"step": 7, "loss": 1.5, "val_loss": 1.25, "tokens": 4096, "mfu": 0.31,
                                   "note": "text", "stopped": True})
    assert sorted(w.scalars) == [("sft/loss", 1.5, 7), ("sft/mfu", 0.31, 7), ("sft/tokens", 4096.0, 7),
                                 ("sft/val_loss", 1.25, 7)]


def test_train_logs_every_step_with_mfu_and_flops(tmp_path):
    cfg = ModelConfig(depth=2, width=64, head_dim=16, vocab_size=200, seq_len=32, mlp_ratio=2.0)
    tokens = np.random.default_rng(0).integers(0, 200, 5000).astype(np.uint16)
    src, val = TokenRows(tokens, 32, rows=4, seed=0), eval_batches(tokens[-1000:], 32, 4, 256)
    t = TrainConfig(batch_tokens=256, device_batch=4, checkpoint_every=0, eval_every=2, dtype="float32")
    w = FakeWriter()
    model = GPT(cfg)
    res = train(model, t, "pretrain", tmp_path, src, val, torch.device("cpu"), torch.float32, total_steps=3,
                metrics=MetricsSink("pretrain", tmp_path / "logs" / "pretrain.jsonl", writers=[w]))
    tags = {tag for tag, _, _ in w.scalars}
    assert {"pretrain/loss", "pretrain/tok_per_s", "pretrain/lr_mult", "pretrain/mfu", "pretrain/val_loss"} <= tags
    assert [s for tag, _, s in w.scalars if tag == "pretrain/loss"] == [1, 2, 3]
    assert [v for tag, v, _ in w.scalars if tag == "pretrain/loss"] == pytest.approx([h["loss"] for h in res.history])
    assert res.flops == res.tokens * model.flops_per_token() == 3 * 256 * model.flops_per_token()
    assert 0 < res.mfu < 1 and all(0 < h["mfu"] for h in res.history)
    assert w.closed  # train() closes the sink it was given
    logged = [json.loads(line) for line in (tmp_path / "logs" / "pretrain.jsonl").read_text().splitlines()]
    assert logged == res.history  # the jsonl and the writers get the same records


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsSink.from_config(LoggingConfig(tensorboard="on"), tmp_path, "r", "pretrain")
    for step, loss in ((1, 3.0), (2, 2.5), (3, 2.25)):
        log.log({"step": step, "loss": loss})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "pretrain"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("pretrain/loss")] == [(1, 3.0), (2, 2.5), (3, 2.25)]


def _missing(*names):
    real = importlib.util.find_spec
    return lambda name, *a: None if name in names else real(name, *a)


def test_asking_for_a_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", _missing("tensorboard", "wandb"))
    with pytest.raises(ExocortexError, match="pip install tensorboard"):
        MetricsSink.from_config(LoggingConfig(tensorboard="on"), tmp_path, "r", "pretrain")
    with pytest.raises(ExocortexError, match="pip install wandb"):
        MetricsSink.from_config(LoggingConfig(wandb_project="p"), tmp_path, "r", "pretrain")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    with pytest.raises(ExocortexError, match="from-env"):
        MetricsSink.from_config(LoggingConfig(), tmp_path, "r", "pretrain")
    monkeypatch.delenv("WANDB_PROJECT")
    log = MetricsSink.from_config(LoggingConfig(), tmp_path, "r", "pretrain")  # auto: nothing installed, no-op
    assert log.writers == [] and log.wandb is None
    with pytest.raises(ExocortexError, match="auto, on, off"):  # checked with every config value
        make_config("tiny", ["logging.tensorboard=yes please"])


def test_wandb_run_per_stage(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = MetricsSink.from_config(LoggingConfig(tensorboard="off", wandb_project="exo"), tmp_path, "tiny", "sft",
                                    {"seed": 1})
    log.log({"step": 4, "loss": 0.5})
    log.close()
    assert calls == [("init", {"project": "exo", "name": "tiny-sft", "group": "tiny", "config": {"seed": 1}}),
                     ("log", {"sft/loss": 0.5}, 4), ("finish",)]
