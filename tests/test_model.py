import torch

from exocortex.model import GPT


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


def test_causality(small_cfg):
    m = GPT(small_cfg).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randint(0, small_cfg.vocab_size, (1, 16))
    x2 = x.clone(); x2[0, 10:] = (x2[0, 10:] + 1) % small_cfg.vocab_size
    assert torch.allclose(m(x)[:, :10], m(x2)[:, :10], atol=1e-5)


def test_batch_without_targets_is_zero_loss_not_nan(small_cfg):
    # an SFT row cut before the reply has no counted position: it must add nothing, not poison the weights
    torch.manual_seed(0)
    model = GPT(small_cfg)
    x = torch.randint(0, small_cfg.vocab_size, (2, 8))
    loss = model(x, torch.full((2, 8), -1))
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    y = torch.randint(0, small_cfg.vocab_size, (2, 8))
    y[0] = -1
    mean = model(x, y)
    torch.testing.assert_close(mean, model(x, y, reduction="none").view(2, 8)[1].mean())
