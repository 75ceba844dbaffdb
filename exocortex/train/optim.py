"""Optimizers: Muon for the 2-D matrices inside the blocks, AdamW for embeddings, lm_head and norm gains."""
from __future__ import annotations

import math

import torch

from exocortex.config import TrainConfig, lr_dim_scale
from exocortex.device import resolve_dtype


def build_optimizers(model: torch.nn.Module, t: TrainConfig, lr_scale: float = 1.0) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon] over the model's parameters; `lr_scale` multiplies every learning rate (RL's small steps)."""
    scale = lr_dim_scale(model.cfg.n_embd)
    matrices, embed, head, scalars = [], [], [], []
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            embed.append(p)
        elif "lm_head" in name:
            head.append(p)
        elif p.ndim == 2:
            matrices.append(p)
        else:
            scalars.append(p)
    adam_groups = [
        {"params": embed, "lr": t.embedding_lr * lr_scale * scale},
        {"params": head, "lr": t.unembedding_lr * lr_scale * scale},
        {"params": scalars, "lr": t.scalar_lr * lr_scale},
    ]
    device = next(model.parameters()).device
    # the fused kernel is one pass over each tensor: much faster than the default loop of small ops on CPU
    kw = {"fused": True} if device.type in ("cpu", "cuda") else {}
    adamw = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, **kw)
    # Newton-Schulz in bf16 where bf16 matmuls are native (as torch.optim.Muon); elsewhere (AVX2 CPUs) bf16 is
    # emulated and dominates the step, so there it runs in float32 (bench/muon.py)
    ns_dtype = torch.bfloat16 if resolve_dtype("auto", device) == torch.bfloat16 else torch.float32
    muon = Muon(matrices, lr=t.matrix_lr * lr_scale, momentum=0.95, weight_decay=t.weight_decay, ns_dtype=ns_dtype)
    for opt in (adamw, muon):
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    return [adamw, muon]


class Muon(torch.optim.Muon):
    """torch.optim.Muon's update (Nesterov momentum, Keller Jordan's "original" lr adjustment, decoupled weight
    decay, the same Newton-Schulz ops) with two things torch fixes opened up:

    - `ns_dtype`: the Newton-Schulz dtype (torch's is bf16; bit-equal to torch with bf16, tests/test_train.py);
    - FSDP2-sharded (DTensor) matrices: Newton-Schulz needs the whole matrix, so the momentum-corrected update is
      all-gathered (one all-gather per matrix, the size of the forward's weight all-gather), orthogonalised on
      every rank, and each rank applies its own rows; momentum stays sharded. (Running NS on the DTensor itself
      redistributes inside every iteration: much slower (docs/benchmarks.md), and not bit-equal to one process.)"""

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_dtype: torch.dtype = torch.bfloat16, **kw):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, adjust_lr_fn="original", **kw)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import DTensor

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                sharded = isinstance(p, DTensor)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                g, buf = p.grad, state["momentum_buffer"]
                if sharded:
                    g, buf = g.to_local(), buf.to_local()
                buf.lerp_(g, 1 - mom)
                update = g.lerp(buf, mom) if group["nesterov"] else buf
                if sharded:  # gathered in ns_dtype: NS starts by casting to it anyway, so this costs nothing
                    update = DTensor.from_local(update.to(self.ns_dtype), p.device_mesh, p.placements, shape=p.shape,
                                                stride=p.stride()).full_tensor()
                ortho = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                if sharded:
                    ortho = _local_rows(ortho, p)
                A, B = p.shape[:2]
                weights = p.to_local() if sharded else p
                weights.mul_(1 - lr * group["weight_decay"])
                weights.add_(ortho, alpha=-lr * math.sqrt(max(1, A / B)))
        return loss


def newton_schulz(g: torch.Tensor, coeffs, steps: int, eps: float, dtype=torch.bfloat16) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of torch.optim.Muon (same ops, same order, so sharded and unsharded
    runs match): approximately orthogonalises g, computed in `dtype`."""
    a, b, c = coeffs
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _local_rows(full: torch.Tensor, p) -> torch.Tensor:
    """This rank's rows of a whole matrix, as FSDP2 splits dim 0 (torch.chunk: the last ranks may get fewer
    rows, or none)."""
    from torch.distributed.tensor import Shard

    if len(p.placements) != 1 or p.placements[0] != Shard(0):
        raise ValueError(f"Muon supports FSDP's Shard(0) on a 1-D mesh, got {p.placements}")
    n, r = p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunks = torch.chunk(full, n, dim=0)
    mine = chunks[r] if r < len(chunks) else full[:0]
    if mine.shape != p.to_local().shape:
        raise RuntimeError(f"unexpected FSDP shard shape {tuple(p.to_local().shape)} for {tuple(full.shape)}")
    return mine
