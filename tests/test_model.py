import dataclasses

import pytest
import torch

from exocortex.config import ModelConfig
from exocortex.errors import ExocortexError
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


def _second_pass_accuracy(model, n: int = 30):
    """Next-token accuracy over the second reading of random lists read twice (first reading too, for contrast)."""
    lists = torch.randint(8, model.cfg.vocab_size, (8, n))
    ids = torch.cat([lists, lists], 1)
    with torch.no_grad():
        hit = (model(ids).argmax(-1)[:, :-1] == ids[:, 1:]).float()
    return hit[:, :n - 1].mean().item(), hit[:, n:].mean().item()


# narrower models get fingerprints too short to tell tokens apart; (256, 64, 2): grouped-query attention
@pytest.mark.parametrize("width,head_dim,kv_heads", [(256, 64, 0), (128, 32, 0), (256, 64, 2)])
def test_the_wired_copying_circuit_copies_before_any_training(width, head_dim, kv_heads):
    cfg = ModelConfig(depth=2, width=width, head_dim=head_dim, n_kv_heads=kv_heads, vocab_size=2048, seq_len=128,
                      induction_init=True)
    first, second = _second_pass_accuracy(GPT(cfg))
    assert second > 0.9 and first < 0.05  # it copies what it read; it does not know what comes first
    plain = GPT(dataclasses.replace(cfg, induction_init=False))
    assert _second_pass_accuracy(plain)[1] < 0.05


@pytest.mark.parametrize("change", [dict(depth=1), dict(n_kv_heads=1), dict(head_dim=8, width=64), dict(width=64)])
def test_induction_init_on_a_shape_it_cannot_wire_is_an_error(change):
    cfg = ModelConfig(**{**dict(depth=2, width=256, head_dim=64, induction_init=True), **change})
    with pytest.raises(ExocortexError, match="induction_init=false"):
        cfg.validate()
