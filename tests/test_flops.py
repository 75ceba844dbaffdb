import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from exocortex.config import ModelConfig
from exocortex.train.flops import gpu_peak_flops, peak_flops
from exocortex.model import GPT


@pytest.mark.parametrize("kv", [0, 2])
def test_flops_per_token_matches_counted_matmuls(kv):
    """6 x matmul params + 12 x layers x width x seq equals what torch counts for forward + backward (the math
    attention kernel computes the full T x T scores, as the formula assumes)."""
    cfg = ModelConfig(depth=2, width=128, head_dim=32, vocab_size=300, seq_len=64, mlp_ratio=3.0, n_kv_heads=kv)
    model = GPT(cfg)
    x = torch.randint(0, 300, (2, 64))
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        model(x, x).backward()
    assert fc.get_total_flops() == model.flops_per_token() * x.numel()


def test_gpu_peak_table():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert gpu_peak_flops("NVIDIA A10") == 125e12  # a word match: not the A100 row
    assert gpu_peak_flops("NVIDIA L4") == 121e12 and gpu_peak_flops("NVIDIA L40S") == 362e12
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090") == 165.2e12
    assert gpu_peak_flops("NVIDIA RTX A4000") is None and gpu_peak_flops("Tesla T4") is None


def test_cpu_peak_is_measured():
    p = peak_flops(torch.device("cpu"), torch.float32)
    assert 1e8 < p < 1e14
    assert peak_flops(torch.device("cpu"), torch.float32) == p  # measured once per process


def test_spent_line():
    from exocortex.run import PretrainSummary

    def summary(**kw):
        fields = dict(params=1, flops_per_token=1, steps=1, tokens=1, seconds=1.0, tokens_per_second=1.0, flops=0.0,
                      mfu=None, final_train_loss=1.0, final_val_loss=None, val_bpb=1.0, tokens_per_param=1.0,
                      packing="bestfit", device="cpu", dtype="float32", world_size=1, parallel="ddp",
                      time_budget_minutes=None, checkpoint="")
        return PretrainSummary(**{**fields, **kw})

    s = summary(seconds=390.0, flops=2.5e15, tokens=1234567, mfu=0.42, time_budget_minutes=6.5)
    assert s.spent_line() == "spent 6.5 min, 2.5 PFLOPs, 1,234,567 tokens at 42.0% MFU (time budget 6.5 min)"
    assert summary(seconds=60.0, flops=3e12, tokens=10).spent_line() == "spent 1.0 min, 0.003 PFLOPs, 10 tokens"
