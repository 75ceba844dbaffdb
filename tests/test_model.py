import torch

from exocortex.model import GPT, KVCache


def test_shapes_and_param_names(small_cfg):
    m = GPT(small_cfg)
    x = torch.randint(0, small_cfg.vocab_size, (3, 10))
    assert m(x).shape == (3, 10, small_cfg.vocab_size)
    names = set(m.state_dict())
    # HF Qwen3ForCausalLM names: export is a straight copy
    for n in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_norm.weight",
              "model.layers.1.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight", "lm_head.weight"]:
        assert n in names


def test_loss_falls_on_tiny_batch(small_cfg):
    m = GPT(small_cfg)
    x = torch.randint(0, small_cfg.vocab_size, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = m(x, y)
        first = first if first is not None else loss.item()
        loss.backward(); opt.step(); opt.zero_grad()
    assert loss.item() < 0.5 * first


def _decode_matches(cfg, chunked):
    m = GPT(cfg).eval()
    for p in m.parameters():  # nonzero everywhere so every path matters
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    full = m(x)
    cache = KVCache(cfg, 2, 32, "cpu", torch.float32)
    if chunked:  # prefix, then a chunk, then single steps
        outs = [m(x[:, :7], cache=cache), m(x[:, 7:12], cache=cache)] + [m(x[:, i:i + 1], cache=cache) for i in range(12, 20)]
    else:
        outs = [m(x[:, i:i + 1], cache=cache) for i in range(20)]
    inc = torch.cat(outs, dim=1)
    assert torch.allclose(full, inc, atol=1e-4), (full - inc).abs().max()


def test_kv_cache_decode_equals_full_forward(small_cfg):
    _decode_matches(small_cfg, chunked=False)
    _decode_matches(small_cfg, chunked=True)


def test_gqa_kv_cache(small_cfg):
    small_cfg.n_kv_heads = 2  # 4 query heads share 2 KV heads
    _decode_matches(small_cfg, chunked=True)


def test_causality(small_cfg):
    m = GPT(small_cfg).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randint(0, small_cfg.vocab_size, (1, 16))
    x2 = x.clone(); x2[0, 10:] = (x2[0, 10:] + 1) % small_cfg.vocab_size
    assert torch.allclose(m(x)[:, :10], m(x2)[:, :10], atol=1e-5)
