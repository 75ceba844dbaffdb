"""The one-row CPU step in C (exocortex/infer/native.py, cpu_step.c): the same logits and cache as the torch step.

The portable build (plain C loops) runs on any Linux x86-64 machine with a C compiler, so the step's math is
checked everywhere; the AVX512-BF16 build, which Decoder picks for speed, where the CPU has it."""
import pytest
import torch

from exocortex.config import ModelConfig
from exocortex.infer import native
from exocortex.infer.decode import Decoder
from exocortex.model import GPT

PORTABLE = pytest.mark.skipif(native.unavailable(native_kernel=False) is not None,
                              reason=f"native step: {native.unavailable(native_kernel=False)}")
BF16_CPU = pytest.mark.skipif(native.unavailable() is not None, reason=f"native step: {native.unavailable()}")


def random_gpt(**shape):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(depth=2, width=64, head_dim=16, vocab_size=400, seq_len=64, mlp_ratio=2.0), **shape})
    m = GPT(cfg).eval()
    for p in m.parameters():  # nonzero everywhere so attention, norms and the MLP all matter
        torch.nn.init.normal_(p, std=0.3)
    return m


def _native_decoder(m, max_len, native_kernel, rows=1):
    """A bf16 Decoder whose steps run the C step (the given build)."""
    dec = Decoder(m, rows, max_len, torch.bfloat16)
    dec.gemv = True  # the rows layout (norm gains folded), as the compiled CPU path uses
    step = native.NativeStep(dec.weights, dec.k, dec.v, m.cfg.n_heads, m.cfg.kv_heads, m.cfg.norm_eps,
                             native_kernel=native_kernel)
    dec._native = step  # its steps and prefill
    return dec, step


def _compare(m, native_kernel, steps=40, prompt=(5, 6, 7, 8, 9)):
    """Greedy decode of `steps` tokens with the C step and, fed the same tokens, the eager torch step in bf16
    and in float32. Returns the C step's largest logit error against float32 relative to the bf16 torch step's
    (both relative to the logits' scale; ~1 when the C step rounds as much as torch's bf16 step does), the
    largest difference between its cache and the bf16 step's, the tokens, and the decoder."""
    bf16, fp32 = Decoder(m, 1, 128, torch.bfloat16), Decoder(m, 1, 128)
    dec, _ = _native_decoder(m, 128, native_kernel)
    a, b, c = dec.prefill(list(prompt)), bf16.prefill(list(prompt)), fp32.prefill(list(prompt))
    ours, torchs, tokens = 0.0, 0.0, []
    for _ in range(steps):
        tok = [int(a[0].argmax())]
        tokens.append(tok[0])
        a, b, c = dec.step(tok), bf16.step(tok), fp32.step(tok)
        ours = max(ours, ((a - c).abs().max() / c.abs().max()).item())
        torchs = max(torchs, ((b - c).abs().max() / c.abs().max()).item())
    n = len(prompt) + steps
    cache_diff = max((x[0, :, :n].float() - y[0, :, :n].float()).abs().max().item()
                     for x, y in zip(dec.k + dec.v, bf16.k + bf16.v))
    return ours / torchs, cache_diff, tokens, dec


@PORTABLE
@pytest.mark.parametrize("shape", [
    dict(),  # every head its own keys
    # grouped queries; vocabulary and width no multiple of 64
    dict(n_kv_heads=2, vocab_size=397, width=96, head_dim=16, mlp_ratio=2.7),
])
def test_portable_native_step_matches_the_torch_step(shape):
    m = random_gpt(**shape)
    error, cache_diff, tokens, dec = _compare(m, native_kernel=False)
    assert error < 1.5, error  # as exact as torch's bf16 step (bf16 rounding of activations, in other places)
    assert cache_diff < 0.1  # the keys and values it wrote are the torch step's (bf16, values of size ~1-3)
    assert dec.lengths[0] == 45 and int(dec.pos[0]) == 45
    assert len(set(tokens)) > 3  # a real decode, not one token repeated


@PORTABLE
@pytest.mark.parametrize("native_kernel", [False, pytest.param(True, marks=BF16_CPU)])
def test_native_step_of_several_rows_at_their_own_positions(native_kernel):
    """Rows at different positions, joining mid-way, sitting out steps (advance=False): each row's logits are
    those of the same tokens run alone through the torch step. Six rows: one group of four, then two."""
    m = random_gpt(n_kv_heads=2, vocab_size=397, width=96, head_dim=16, mlp_ratio=2.7)
    x = torch.randint(0, 397, (6, 40))
    with torch.no_grad():
        full = m(x)
    dec, _ = _native_decoder(m, 64, native_kernel, rows=6)
    bf16 = Decoder(m, 6, 64, torch.bfloat16)
    ours, torchs = [], []
    pos = {}
    for s in range(5):  # row 5 joins later
        dec.prefill(x[s, :3 + 2 * s].tolist(), [s]), bf16.prefill(x[s, :3 + 2 * s].tolist(), [s])
        pos[s] = 3 + 2 * s
    for i in range(20):
        if i == 6:
            dec.prefill(x[5, :4].tolist(), [5]), bf16.prefill(x[5, :4].tolist(), [5])
            pos[5] = 4
        advance = [r in pos and not (r == 2 and i % 4 == 1) for r in range(6)]
        if i % 7 == 3:
            advance = [r == 0 for r in range(6)]  # one row alone
        tokens = [x[r, pos[r]].item() if r in pos else 0 for r in range(6)]
        a, b = dec.step(tokens, advance), bf16.step(tokens, advance)
        for r in range(6):
            if advance[r]:
                want = full[r, pos[r]]
                ours.append(((a[r] - want).abs().max() / want.abs().max()).item())
                torchs.append(((b[r] - want).abs().max() / want.abs().max()).item())
                pos[r] += 1
    assert len(ours) > 80 and max(ours) < 1.5 * max(torchs) + 1e-3, (max(ours), max(torchs))
    assert dec.lengths == bf16.lengths and torch.equal(dec.pos, bf16.pos)


@PORTABLE
@pytest.mark.parametrize("native_kernel", [False, pytest.param(True, marks=BF16_CPU)])
def test_native_prefill_in_chunks_matches_the_torch_prefill(native_kernel):
    """A prompt longer than a chunk (native.PREFILL_CHUNK tokens side by side per step) into one row, given to
    two more: its logits and the keys/values of every row as torch's prefill computes them, then the steps."""
    m = random_gpt(n_kv_heads=2, vocab_size=397, width=96, head_dim=16, mlp_ratio=2.7, seq_len=64)
    prompt = torch.randint(0, 397, (2 * native.PREFILL_CHUNK + 11,)).tolist()
    with torch.no_grad():
        full = m(torch.tensor([prompt]))[0, -1]
    dec, _ = _native_decoder(m, 128, native_kernel, rows=3)
    bf16 = Decoder(m, 3, 128, torch.bfloat16)
    a, b = dec.prefill(prompt, [2, 0, 1]), bf16.prefill(prompt, [2, 0, 1])
    ours = ((a[0] - full).abs().max() / full.abs().max()).item()
    torchs = ((b[0] - full).abs().max() / full.abs().max()).item()
    assert ours < 1.5 * torchs + 1e-3, (ours, torchs)
    n = len(prompt)
    for x, y in zip(dec.k + dec.v, bf16.k + bf16.v):
        assert (x[:, :, :n].float() - y[:, :, :n].float()).abs().max() < 0.1
    assert dec.lengths == [n] * 3
    a, b = dec.step([5, 6, 7]), bf16.step([5, 6, 7])
    assert ((a - b).abs().max() / b.abs().max()).item() < 0.05


@PORTABLE
def test_native_step_follows_parameter_updates():
    """RL updates the weights in place between rollouts: the packed copy is rebuilt, not reused."""
    m = random_gpt()
    dec, step = _native_decoder(m, 64, native_kernel=False)
    dec.prefill([5, 6, 7])
    before = dec.step([8])
    packed = step.packed
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(-1.3)
    ref = Decoder(m, 1, 64, torch.bfloat16)
    dec.prefill([5, 6, 7]), ref.prefill([5, 6, 7])
    after, expected = dec.step([8]), ref.step([8])
    assert step.packed is not packed and step.packed is dec.weights.packed
    assert ((after - expected).abs().max() / expected.abs().max()).item() < 0.02
    assert (after - before).abs().max() > 0.5


@PORTABLE
def test_pack_lays_pairs_of_inputs_side_by_side_for_16_outputs():
    w = torch.arange(5 * 20, dtype=torch.float32).view(5, 20).to(torch.bfloat16)  # (in 5, out 20)
    p = native.pack(w)
    assert p.shape == (2, 3, 16, 2)  # out padded to 32 = 2 blocks, in padded to 6 = 3 pairs
    assert p[0, 1, 3, 0] == w[2, 3] and p[0, 1, 3, 1] == w[3, 3] and p[1, 0, 2, 1] == w[1, 18]
    assert p[1, 2, :, 1].abs().sum() == 0 and p[1, 0, 4:].abs().sum() == 0  # the padding is zeros


@BF16_CPU
@pytest.mark.parametrize("head_dim", [16, 24])  # 24: attention outside the 16-wide vector path
def test_avx512_bf16_step_matches_the_torch_step(head_dim):
    m = random_gpt(n_kv_heads=2, vocab_size=397, width=96, head_dim=head_dim, mlp_ratio=2.7)
    error, cache_diff, _, _ = _compare(m, native_kernel=True)
    assert error < 1.5 and cache_diff < 0.1, (error, cache_diff)


@BF16_CPU
def test_compiled_bf16_decoder_runs_its_steps_natively(monkeypatch):
    m = random_gpt(n_kv_heads=2)
    dec, ref = Decoder(m, 2, 64, torch.bfloat16, compile=True), Decoder(m, 2, 64, torch.bfloat16)
    for d in (dec, ref):
        d.prefill([5, 6, 7], [0]), d.prefill([8, 9], [1])
    one = dec.step([10, 0], [True, False])
    several = dec.step([11, 12])
    assert isinstance(dec._one_row, native.NativeStep) and dec._several_rows is dec._one_row
    for got, want in ((one[:1], ref.step([10, 0], [True, False])[:1]), (several, ref.step([11, 12]))):
        assert ((got - want).abs().max() / want.abs().max()).item() < 0.02


def test_native_step_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("EXOCORTEX_NATIVE_STEP", "0")
    monkeypatch.setattr(native, "_why_not", {})
    assert native.unavailable() == "turned off by EXOCORTEX_NATIVE_STEP=0"
    monkeypatch.setattr(native, "_why_not", {})  # and back on: the verdict is not cached across settings


def test_a_server_leaves_a_core_to_its_event_loop_where_the_weights_fit_in_cache(monkeypatch):
    from exocortex.infer import engine

    monkeypatch.setattr(engine, "_last_level_cache_bytes", lambda: 32 << 20)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert engine.one_row_threads_beside_a_server(10 << 20) == 3  # cache-resident: a core for the event loop
    assert engine.one_row_threads_beside_a_server(300 << 20) == 4  # streamed from memory: every core's bandwidth
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert engine.one_row_threads_beside_a_server(10 << 20) == 1
    monkeypatch.undo()
    assert engine._last_level_cache_bytes() > 0


@PORTABLE
def test_one_row_steps_run_on_the_decoders_one_row_threads_and_the_rest_on_all():
    m = random_gpt()
    dec, step = _native_decoder(m, 64, native_kernel=False, rows=2)
    calls = []

    class Spy:  # the library, noting the threads each step asks for
        def __getattr__(self, name):
            return getattr(lib, name)

        def exo_step(self, *args):
            calls.append(args[-1])
            return lib.exo_step(*args)

    lib, step.lib = step.lib, Spy()
    dec.one_row_threads = 1
    dec.prefill([5, 6], [0]), dec.prefill([7], [1])
    dec.step([8, 0], [True, False]), dec.step([9, 10])
    assert calls == [step.threads, step.threads, 1, step.threads]  # prefills, one row, two rows


def test_the_batcher_sets_its_decoders_one_row_threads():
    from exocortex.infer.engine import Batcher, Engine, one_row_threads_beside_a_server

    class Tok:
        special = {k: 390 + i for i, k in enumerate(["<|bos|>", "<|assistant_end|>", "<tool_call>", "</tool_call>",
                                                     "<tool_response>", "</tool_response>"])}

    m = random_gpt()
    b = Batcher(Engine(m, Tok(), torch.device("cpu"), torch.bfloat16), 2)
    try:
        assert b.warm_up(60)
        assert b.decoder.one_row_threads == one_row_threads_beside_a_server(m.num_params() * 2)
    finally:
        b.close()


@PORTABLE
def test_out_of_range_tokens_and_positions_are_errors_not_memory_reads():
    """The C step checks every index before it touches memory (a token id from a client, a full cache)."""
    m = random_gpt()
    dec, step = _native_decoder(m, 16, native_kernel=False, rows=2)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        dec.prefill([5, 400])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        dec.prefill([-1, 5])
    dec.prefill([5, 6], [0])
    w = dec.weights.get(rows=True)
    k, v, _ = dec._rows(1)
    with pytest.raises(IndexError):
        step(w, k, v, torch.tensor([1000]), torch.tensor([2]), 3)
    with pytest.raises(ValueError, match="position outside the cache"):
        step(w, k, v, torch.tensor([5]), torch.tensor([16]), 17)
    assert dec.step([7, 0], [True, False]).shape == (1, 400)  # and it still decodes


def test_the_warm_up_line_says_which_step_is_built(monkeypatch):
    from exocortex.infer.decode import warm_up_note

    cpu = torch.device("cpu")
    monkeypatch.setattr(native, "_why_not", {True: None})
    assert warm_up_note(cpu, "skip", torch.bfloat16).startswith("building the decode step in C (once, ~1 s")
    assert "~70 s" in warm_up_note(cpu, "skip", torch.float32)  # fp32: the torch step, compiled ahead of time
    monkeypatch.setattr(native, "_why_not", {True: "this CPU has no AVX512-BF16"})
    assert "~70 s" in warm_up_note(cpu, "skip", torch.bfloat16)
