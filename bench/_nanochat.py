"""nanochat's own model and optimizer, built from a checkout for side-by-side benchmarks (nothing downloaded)."""
from __future__ import annotations

import os
import sys

import torch


def nanochat_setup(path: str, depth: int, width: int, head_dim: int, vocab: int, seq_len: int, device, dtype):
    """(model, optimizer, flops_per_token) of karpathy/nanochat's GPT at this shape, full-context attention in
    every layer (window pattern "L", as ours), initialised and optimised the way its base_train does."""
    # nanochat picks its compute dtype from this variable when its modules are first imported
    os.environ["NANOCHAT_DTYPE"] = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    sys.path.insert(0, os.path.abspath(path))  # ahead of bench/, whose nanochat.py would shadow the package
    try:
        from nanochat.gpt import GPT, GPTConfig
    except ImportError as e:
        sys.exit(f"error: cannot import nanochat from {path} ({e}); pass a nanochat checkout "
                 "(git clone https://github.com/karpathy/nanochat)")
    heads = width // head_dim
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=depth, n_head=heads, n_kv_head=heads,
                    n_embd=width, window_pattern="L")
    with torch.device("meta"):  # nanochat builds shapes first, then allocates and initialises
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model, model.setup_optimizer(), model.estimate_flops()
