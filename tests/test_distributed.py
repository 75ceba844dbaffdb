"""2-process torchrun (gloo, CPU) sees exactly what 1 process with 2x gradient accumulation sees."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SETS = ["--set", "data.world_bytes=400000", "--set", "tokenizer.train_bytes=300000", "--set", "tokenizer.vocab_size=512",
        "--set", "model.width=64", "--set", "model.induction_init=false", "--set", "model.depth=2", "--set", "model.seq_len=64",
        "--set", "pretrain.max_steps=5", "--set", "pretrain.time_minutes=0", "--set", "pretrain.compile=false",
        "--set", "pretrain.dtype=float32", "--set", "pretrain.device_batch=4", "--set", "pretrain.batch_tokens=512",
        "--set", "pretrain.eval_every=5", "--set", "pretrain.checkpoint_every=0"]


def _run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "logs" / "pretrain.jsonl").read_text().splitlines()]


def test_ddp_two_ranks_equals_grad_accumulation(tmp_path):
    _run([sys.executable, "-m", "exocortex", "tokenizer", "--run", "one", *SETS], tmp_path)
    shutil.copytree(tmp_path / "runs" / "one", tmp_path / "runs" / "two")
    # one process: 512 tokens per step = 2 micro-batches of 4 x 64
    _run([sys.executable, "-m", "exocortex", "pretrain", "--run", "one"], tmp_path)
    # two processes: one micro-batch each, gradients averaged by DDP
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "exocortex",
          "pretrain", "--run-name", "two"], tmp_path)
    one, two = _losses(tmp_path / "runs" / "one"), _losses(tmp_path / "runs" / "two")
    assert len(one) == len(two) == 5
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)
    assert one[-1] < one[0]
    w1 = load_file(str(tmp_path / "runs" / "one" / "checkpoints" / "pretrain" / "step_000005" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "runs" / "two" / "checkpoints" / "pretrain" / "step_000005" / "model.safetensors"))
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-4), k


def _ckpt(run, step):
    return run / "checkpoints" / "pretrain" / f"step_{step:06d}"


def _assert_same_weights(a, b):
    w1, w2 = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-4), k


def test_fsdp_matches_one_process_and_resumes_across_modes(tmp_path):
    """FSDP2 on 2 ranks = 1 process with 2x accumulation; its checkpoints are whole (same files as DDP's), so
    an FSDP run resumes in one process and a one-process run resumes under FSDP, landing on the same weights."""
    runs = tmp_path / "runs"
    ck = ["--set", "pretrain.checkpoint_every=3"]
    fsdp = ["--set", "pretrain.parallel=fsdp"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _run([sys.executable, "-m", "exocortex", "tokenizer", "--run", "one", *SETS], tmp_path)
    shutil.copytree(runs / "one", runs / "two")
    _run([sys.executable, "-m", "exocortex", "pretrain", "--run", "one", *ck], tmp_path)
    _run([*torchrun, "-m", "exocortex", "pretrain", "--run-name", "two", *ck, *fsdp], tmp_path)
    one, two = _losses(runs / "one"), _losses(runs / "two")
    assert len(one) == len(two) == 5 and one[-1] < one[0]
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)
    _assert_same_weights(_ckpt(runs / "one", 5), _ckpt(runs / "two", 5))
    shutil.copytree(_ckpt(runs / "one", 5), tmp_path / "one_final")
    # lose step 5 of both runs, then resume each from step 3 in the other mode
    for r in ("one", "two"):
        shutil.rmtree(_ckpt(runs / r, 5))
    _run([sys.executable, "-m", "exocortex", "pretrain", "--run", "two", "--resume", "--set", "pretrain.parallel=ddp"],
         tmp_path)
    _run([*torchrun, "-m", "exocortex", "pretrain", "--run-name", "one", "--resume", *fsdp], tmp_path)
    for r in ("one", "two"):
        assert _losses(runs / r) == pytest.approx(one, rel=1e-4, abs=1e-5), r
        _assert_same_weights(tmp_path / "one_final", _ckpt(runs / r, 5))


SHARDED_MUON = """
import os, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from exocortex.train.optim import Muon
dist.init_process_group("gloo")
torch.manual_seed(0)
shapes = [(7, 5), (5, 7), (2, 9)]  # rows split 3/3/1, 2/2/1 and 1/1/0 over 3 ranks
ref = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(*s)) for s in shapes])
sharded = torch.nn.ParameterList([torch.nn.Parameter(p.detach().clone()) for p in ref])
fully_shard(sharded)
kw = dict(lr=0.05, momentum=0.95, weight_decay=0.1)
opt_ref = torch.optim.Muon(list(ref), adjust_lr_fn="original", **kw)
opt = Muon(list(sharded), ns_dtype=torch.bfloat16, **kw)
for step in range(3):
    grads = [torch.randn(*s) for s in shapes]  # same on every rank (same seed)
    for p, g in zip(ref, grads):
        p.grad = g.clone()
    for p, g in zip(sharded, grads):
        p.grad = torch.distributed.tensor.distribute_tensor(g, p.device_mesh, p.placements)
    opt_ref.step()
    opt.step()
for a, b in zip(ref, sharded):
    assert torch.equal(a.detach(), b.full_tensor().detach()), (a, b.full_tensor())
print("OK")
dist.barrier()
dist.destroy_process_group()  # a gloo group left to interpreter exit can abort there ("terminate called ...")
sys.stdout.flush()
os._exit(0)  # and under load even after destroy: the check is done, skip the interpreter's teardown
"""


def test_sharded_muon_equals_muon_on_uneven_shards(tmp_path):
    script = tmp_path / "sharded_muon.py"
    script.write_text(SHARDED_MUON)
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", str(script)],
             tmp_path)
    assert "OK" in r.stdout


RUN_ON_MAIN = '''
import datetime, sys, time
import torch.distributed as dist
from exocortex.train import parallel
from exocortex.errors import ExocortexError

# the process group's own timeout is 2 s; rank 0's work takes 4 s: a plain barrier would fail
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
out = parallel.run_on_main(lambda: time.sleep(4) or "done", "slow work", timeout=datetime.timedelta(seconds=60))
assert out == ("done" if dist.get_rank() == 0 else None), out

def boom():
    raise ValueError("corpus is empty")
try:
    parallel.run_on_main(boom, "tokenization")
    raise SystemExit("no error raised")
except ExocortexError as e:  # the other ranks hear what went wrong on rank 0
    assert dist.get_rank() != 0 and "rank 0 failed during tokenization: ValueError: corpus is empty" in str(e)
except ValueError:
    assert dist.get_rank() == 0
dist.destroy_process_group()
print("OK", dist.get_rank() if dist.is_initialized() else "")
'''


def test_run_on_main_outlasts_collective_timeouts_and_reports_rank0_errors(tmp_path):
    script = tmp_path / "run_on_main.py"
    script.write_text(RUN_ON_MAIN)
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
             tmp_path)
    assert r.stdout.count("OK") == 2, r.stdout + r.stderr
