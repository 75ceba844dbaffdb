"""Which device and precision to compute in: one answer for training, evaluation and inference."""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys

import torch

from exocortex.errors import ExocortexError


def resolve_device(name: str = "auto") -> torch.device:
    """The device to compute on. Checked here, where a stage is about to use it, not when a run's config is
    read: a run copied from a GPU machine still exports and reports on a CPU one."""
    reason = why_unavailable(name)
    if reason:  # one line, not a torch assertion deep inside the first tensor moved there
        raise ExocortexError(f"device={name!r}: {reason}; use --set device=auto (or cpu)")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())  # torchrun: set per rank
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def why_unavailable(name: str) -> str | None:
    """Why this machine cannot compute on device `name` (auto, cpu, mps, cuda, cuda:N), or None if it can."""
    kind, _, index = name.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        return "this machine (or this torch build) has no CUDA GPU"
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        return f"there are only {torch.cuda.device_count()} CUDA GPU(s)"
    if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        return "MPS (Apple GPU) is not available here"
    return None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware computes it natively (GPUs, CPUs with AVX512-BF16/AMX), else fp32."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        fast = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
            getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if fast else torch.float32
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of handing it back to the OS.

    A training step frees and re-allocates the same large buffers every step (the logits alone are 268 MB at
    vocab 32768 x 4096 tokens). glibc serves blocks over 32 MB with fresh mmaps and unmaps them on free, so
    every step page-faults them in again, which is slow (very slow in VMs). With mmap off and trimming off,
    freed blocks are reused (bench/train.py measures it). Small allocations can split a freed hole, so the heap
    may take a few more blocks before it settles, then stays flat (tests/test_train.py). CPU only; a no-op
    (False) off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def release_freed_memory() -> bool:
    """Hand the memory glibc holds as freed back to the OS (malloc_trim); False where that is not glibc.

    keep_freed_memory pays off while a loop allocates the same shapes every step. Where shapes change (from one
    stage to the next, or every RL step: rollouts vary in length) the kept holes fit nothing new and split, and
    the heap grows by the difference each time: RL on the tiny preset grew ~100-400 MB a step, to 5 GB. Trimming
    at those boundaries costs a few page faults (small next to an RL step) and keeps the peak to one step's."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


KERNEL_CACHE_SIZE = 32  # a training step's matrix shapes fit (forward and backward); decoding's ever-new ones don't pile up


def bound_memory() -> None:
    """Keep memory flat where shapes keep changing (generation: the attention span grows by one every step;
    RL rollouts; eval). Call before the first matrix product (the CLI does, for every command):
    - oneDNN, and torch's own oneDNN cache, keep a primitive with its scratch memory for each of the last 1024
      shapes; every decode step brings a new one, so the process grew by gigabytes that it never gave back
      (docs/serve.md, docs/tiny.md: the measurements). A few dozen keep the shapes that repeat;
    - glibc raises its mmap threshold as large blocks are freed, so the buffers of ever larger shapes then come
      from the heap and stay there; a fixed threshold returns them to the OS (training's keep_freed_memory
      turns mmap off altogether, on purpose, for its fixed shapes).
    Settings the user made in the environment win. glibc's part is a no-op off glibc."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):  # read at their first use
        os.environ.setdefault(name, str(KERNEL_CACHE_SIZE))
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            M_MMAP_THRESHOLD = -3  # from <malloc.h>
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
