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
        if self.cfg.induction_init:
            self.wire_copying(g)

    @torch.no_grad()
    def wire_copying(self, g: torch.Generator | None = None) -> None:
        """Wire one in-context copying circuit into the fresh weights (ModelConfig.induction_init).

        A tiny model trained for a few hundred steps never learns to copy from its context on its own, and
        reading a tool's output, a note or a multiple-choice option needs exactly that (docs/tiny.md). The
        residual stream is split into lanes: token content | a constant | the token one back | two back |
        copy-out. In layer 0 two heads (on different key/value heads) attend one and two positions back: their
        queries and keys read only the constant lane, with rotary phases that differ by that offset. Each
        writes a fingerprint of that token (12 numbers; fewer below head_dim 48) into its lane. In layer 1 one
        head matches the fingerprints of the current and the previous token against every earlier position's
        two lanes, in the slowest rotary pairs (at head_dim 64 they stay in phase for some 600 tokens; the
        match fades beyond), and writes what followed into the copy-out lane, which the unembedding reads.
        Untrained, it copies a list read twice (tests/test_model.py; below width 128 the fingerprints are too
        short to tell tokens apart). The QK-norm gains it raises are shared by the other heads of layers 0 and
        1, whose outputs start at zero. The weights are plain Qwen3 weights: exports are unaffected.
        """
        d, hd = self.cfg.n_embd, self.cfg.head_dim
        half = hd // 2
        fp = min(12, hd // 4) // 2 * 2  # fingerprint size (even: half of it in each of a query's two matches)
        content = d - 2 * fp - hd - 1
        const = content
        back1, back2 = slice(content + 1, content + 1 + fp), slice(content + 1 + fp, content + 1 + 2 * fp)
        out = slice(content + 1 + 2 * fp, d)
        emb = self.model.embed_tokens.weight
        emb[:, content:] = 0.0
        emb[:, const] = 4.0
        fingerprint = torch.randn(fp, content, generator=g) / math.sqrt(content)
        readout = torch.randn(hd, content, generator=g) / math.sqrt(content)
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        fast = list(range(min(8, half - fp)))  # the fastest-turning rotary pairs: a sharp peak at the offset
        slow = list(range(half - fp, half))  # the slowest: a match that hardly depends on distance
        look_back, match = self.model.layers[0].self_attn, self.model.layers[1].self_attn
        group = self.cfg.n_heads // self.cfg.kv_heads  # query heads per key/value head
        for kv, (offset, lane) in enumerate(((1, back1), (2, back2))):
            q, k = kv * group * hd, kv * hd  # first row of the query head, and of its key/value head
            look_back.q_proj.weight[q:q + hd] = 0.0
            look_back.k_proj.weight[k:k + hd] = look_back.v_proj.weight[k:k + hd] = 0.0
            for p in fast:
                look_back.q_proj.weight[q + p, const] = 1.0
                look_back.k_proj.weight[k + p, const] = math.cos(offset * inv_freq[p])
                look_back.k_proj.weight[k + p + half, const] = math.sin(offset * inv_freq[p])
            look_back.v_proj.weight[k:k + fp, :content] = fingerprint
            look_back.o_proj.weight[lane, q:q + fp] = torch.eye(fp)
        now = slow[:fp // 2] + [p + half for p in slow[:fp // 2]]
        before = slow[fp // 2:] + [p + half for p in slow[fp // 2:]]
        for proj in (match.q_proj, match.k_proj, match.v_proj):
            proj.weight[:hd] = 0.0
        match.q_proj.weight[now, :content] = fingerprint
        match.q_proj.weight[before, back1] = torch.eye(fp)
        match.k_proj.weight[now, back1] = torch.eye(fp)
        match.k_proj.weight[before, back2] = torch.eye(fp)
        match.v_proj.weight[:hd, :content] = readout
        match.o_proj.weight[out, :hd] = torch.eye(hd)
        sharp = fast + [p + half for p in fast]
        look_back.q_norm.weight[sharp] = look_back.k_norm.weight[sharp] = 1.5
        match.q_norm.weight[now + before] = match.k_norm.weight[now + before] = 2.0
        # a weak vote at the start: a strong one is wrong so often on ordinary text that training tears it down
        self.lm_head.weight.zero_()
        self.lm_head.weight[:, out] = 0.04 * emb[:, :content] @ readout.T

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
