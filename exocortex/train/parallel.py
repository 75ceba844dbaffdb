"""torch.distributed, set up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).

`torchrun --nproc_per_node=N -m exocortex pretrain ...` runs data-parallel (DDP): NCCL on GPUs, gloo on
CPUs. Every rank computes the same schedule; micro-batch i of step s goes to rank (i mod world), so N ranks
see exactly the batches one process would see with N-times gradient accumulation. Only rank 0 writes.

`--set pretrain.parallel=fsdp` shards weights, gradients and optimizer state over the ranks instead (FSDP2,
`fully_shard` on every block and the root, torchtitan-style): the same batches and the same math, 1/N of
the memory per GPU for the model and optimizer. Checkpoints stay one full safetensors file (gathered on
save, re-sharded on load), so a run can be resumed with either mode. Muon orthogonalises whole matrices:
train/optim.py's Muon all-gathers each sharded matrix's update, runs Newton-Schulz on it (on every rank, as DDP
does) and keeps its own rows; momentum stays sharded. See docs/benchmarks.md for the tradeoff.
"""
from __future__ import annotations

import builtins
import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from exocortex.errors import ExocortexError

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


def run_on_main(fn, what: str, timeout: datetime.timedelta = datetime.timedelta(hours=72)):
    """fn() on rank 0 while the other ranks wait for it, however long it takes (tokenizing a hub-scale corpus
    takes hours; NCCL's collectives would time out after 10 minutes): the wait is a broadcast on a gloo group
    made with `timeout`, and it carries rank 0's outcome, so a failure on rank 0 stops every rank with its
    message instead of leaving them hanging. Returns fn()'s result on rank 0, None elsewhere."""
    if not dist.is_initialized():
        return fn()
    group = dist.new_group(backend="gloo", timeout=timeout)  # made by all ranks together, before the long work
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below after the other ranks were told
            error = e
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(status, src=0, group=group)
    dist.destroy_process_group(group)
    if error is not None:
        raise error
    if status[0] is not None:
        raise ExocortexError(f"rank 0 failed during {what}: {status[0]}")
    return result


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- FSDP2

def _ensure_process_group() -> None:
    """FSDP needs a process group even for one process (`python -m exocortex pretrain` on one GPU)."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def apply_fsdp(model: torch.nn.Module, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Shard `model` in place over all ranks: each transformer block is one FSDP unit (all-gathered just
    before it runs, freed after), the root holds embeddings, final norm and lm_head. `param_dtype` (bf16)
    makes the all-gathers and the compute bf16 while the sharded master weights stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _ensure_process_group()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    # the root's weights (lm_head) are needed again at once by backward: keep them gathered after forward
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def gradient_sync(wrapped: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else wrapped.no_sync()


def full_model_state(model: torch.nn.Module) -> dict:
    """Whole weights on rank 0's CPU (an empty dict elsewhere); every rank must call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: torch.nn.Module, weights: dict) -> None:
    """Load whole weights (read by every rank) into a sharded model; each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """`opt.state_dict()` with sharded states gathered whole: the same layout an unsharded run saves, so
    checkpoints resume under DDP or FSDP alike. Every rank must call this."""
    from torch.distributed.tensor import DTensor

    sd = opt.state_dict()
    state = {i: {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in s.items()}
             for i, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict) -> None:
    """Load a whole (unsharded) optimizer state, then cut each per-parameter tensor to this rank's shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    opt.load_state_dict(sd)
    for group in opt.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            st = opt.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    st[k] = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
