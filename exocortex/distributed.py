"""torch.distributed, set up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).

`torchrun --nproc_per_node=N -m exocortex pretrain ...` runs data-parallel (DDP): NCCL on GPUs, gloo on
CPUs. Every rank computes the same schedule; micro-batch i of step s goes to rank (i mod world), so N ranks
see exactly the batches one process would see with N-times gradient accumulation. Only rank 0 writes.
"""
from __future__ import annotations

import builtins
import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    """Join the process group when launched by torchrun; a no-op for a plain single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    if dist.get_rank() != 0:  # one voice: other ranks stay quiet
        builtins.print = lambda *a, **k: None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_int(value: int) -> int:
    """Rank 0's value everywhere (e.g. the step count a time budget chose), so all ranks stop together."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.broadcast(t, src=0)
    return int(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
