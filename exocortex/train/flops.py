"""Peak FLOP/s of the machine, for MFU (model FLOPs utilisation = achieved training FLOP/s / peak).

Training FLOPs per token come from GPT.flops_per_token() (6 x matmul params + attention, as nanochat
counts). GPUs: the vendor's dense (not 2:4-sparse) bf16 tensor-core number for the detected card. CPUs have
no datasheet number worth trusting, so the peak is a large bf16 (or fp32) matmul timed here, now.
"""
from __future__ import annotations

import functools
import re
import time

import torch

# Dense bf16 tensor-core FLOP/s (FP32 accumulate), from NVIDIA's datasheets / architecture whitepapers, which
# quote 2:4 sparsity figures at twice these. A row matches when all its words are words of
# torch.cuda.get_device_name() (so "a10" is not "a100", "l4" not "l40"); first match wins.
GPU_PEAK_BF16 = (
    (("gb200",), 2.5e15),            # GB200 NVL72 datasheet: 5 PF sparse per GPU
    (("b200",), 2.25e15),            # HGX B200: 4.5 PF sparse per GPU
    (("h200", "nvl"), 835e12),       # H200 NVL datasheet: 1,671 TF sparse
    (("h200",), 989e12),             # H200 SXM datasheet: 1,979 TF sparse
    (("h100", "nvl"), 835e12),       # H100 NVL datasheet: 1,671 TF sparse
    (("h100", "pcie"), 756e12),      # H100 PCIe datasheet: 1,513 TF sparse
    (("h100",), 989e12),             # H100 SXM datasheet: 1,979 TF sparse
    (("h800", "pcie"), 756e12),
    (("h800",), 989e12),
    (("gh200",), 989e12),            # GH200: the H100/H200 SXM tensor cores
    (("a100",), 312e12),             # A100 datasheet (SXM and PCIe): 624 TF sparse
    (("a800",), 312e12),
    (("l40s",), 362e12),             # L40S datasheet: 733 TF sparse
    (("l40",), 181e12),              # L40 datasheet: 362 TF sparse
    (("l4",), 121e12),               # L4 datasheet: 242 TF sparse
    (("a40",), 149.7e12),            # A40 datasheet: 299.4 TF sparse
    (("a30",), 165e12),              # A30 datasheet: 330 TF sparse
    (("a10",), 125e12),              # A10 datasheet: 250 TF sparse (the A10G has no NVIDIA datasheet: unknown)
    (("5090",), 209.5e12),           # RTX Blackwell whitepaper, BF16 w/ FP32 accumulate
    (("4090",), 165.2e12),           # Ada whitepaper, BF16 w/ FP32 accumulate: 165.2 (330.4 sparse)
    (("3090",), 71e12),              # GA102 whitepaper, BF16 w/ FP32 accumulate: 71 (142 sparse)
)


def gpu_peak_flops(name: str) -> float | None:
    """Dense bf16 peak of a GPU from its name, or None when the card is not in the table."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    for patterns, flops in GPU_PEAK_BF16:
        if all(p in words for p in patterns):
            return flops
    return None


def matmul_peak(dtype=torch.bfloat16, n: int = 2048, seconds: float = 2.0, device="cpu") -> float:
    """FLOP/s of an n x n matmul, timed for `seconds`: the practical peak of a CPU."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    t, it = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        a @ b
        it += 1
    return 2 * n ** 3 * it / (time.perf_counter() - t)


@functools.cache
def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one device (one rank) for training in `dtype`; None where unknown (MFU not shown).

    CUDA: the table above (bf16 only: fp32 training on a GPU has no meaningful tensor-core peak here).
    CPU: a 1024^2 matmul in the training dtype timed for 0.3 s, once per process (on a busy machine it
    reads low, and MFU high; bench/train.py times a 2048^2 one for longer)."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device)) if dtype == torch.bfloat16 else None
    if device.type == "cpu":
        return matmul_peak(dtype, n=1024, seconds=0.3)
    return None
