"""The transformer, readable top to bottom.

A modern decoder-only GPT: rotary position embeddings, RMSNorm (pre-norm), QK-norm, no biases, SwiGLU MLP,
grouped-query attention (optional), causal scaled-dot-product attention (flash kernels where available),
untied input/output embeddings. This is *exactly* HF transformers' `Qwen3ForCausalLM` architecture (which
llama.cpp runs as `qwen3`), and parameters carry Qwen3's names, so export is a rename-free copy.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from exocortex.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * gain, computed in float32 like Qwen3 for stability under bf16."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(max_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # HF's "rotate_half" layout: first half pairs with second half
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (T, D)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        d = cfg.n_embd
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.norm_eps)  # QK-norm: keeps attention logits bounded
        self.k_norm = RMSNorm(self.hd, cfg.norm_eps)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.model = Backbone(cfg)  # "model." prefix = HF Qwen3 parameter names
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # rotary tables cover generation past the training length; not parameters, not saved
        cos, sin = rotary_tables(cfg.head_dim, cfg.seq_len * 4, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        d = self.cfg.n_embd
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # norm gains
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0, generator=g)
            elif "lm_head" in name:
                p.normal_(0.0, 0.001, generator=g)  # near-uniform predictions at step 0
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()  # each block starts as the identity on the residual stream
            else:
                bound = math.sqrt(3.0 / d)  # uniform with std 1/sqrt(fan_in)
                p.uniform_(-bound, bound, generator=g)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if exclude_embedding else n

    def flops_per_token(self) -> float:
        """Training FLOPs per token, counted as nanochat does: 6 x matmul params (incl. lm_head) + attention."""
        c = self.cfg
        matmul_params = self.num_params(exclude_embedding=True) - sum(p.numel() for p in self.parameters() if p.ndim == 1)
        return 6 * matmul_params + 12 * c.depth * c.n_embd * c.seq_len

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """idx (B, T) -> logits (B, T, V), or the loss when targets are given (-1 = ignored position).
        Generation does not come here: it decodes token by token with exocortex/infer/decode.py."""
        B, T = idx.shape
        if T > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.rope_cos.shape[0]})")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.model.embed_tokens(idx)
        for block in self.model.layers:
            x = block(x, cos, sin)
        x = self.model.norm(x)
        logits = self.lm_head(x)
        if targets is None:
            return logits
        flat = targets.reshape(-1)
        if reduction != "mean":
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), flat, ignore_index=-1, reduction=reduction)
        # a mean over the counted positions, 0 (not NaN) for a batch with none: a short SFT row may hold no reply
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), flat, ignore_index=-1, reduction="sum")
        return loss / (flat != -1).sum().clamp(min=1)
