"""The fast decoder (static per-row KV cache) and continuous batching: same tokens as Engine.generate run alone."""
import threading

import pytest
import torch

from exocortex.config import ModelConfig
from exocortex.infer.decode import AheadOfTimeStep, Decoder
from exocortex.infer.engine import Batcher, Engine, Request
from exocortex.model import GPT


def random_gpt(vocab, n_kv_heads=0, std=0.3):
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, width=64, head_dim=16, vocab_size=vocab, seq_len=32, mlp_ratio=2.0,
                      n_kv_heads=n_kv_heads)
    m = GPT(cfg).eval()
    for p in m.parameters():  # nonzero everywhere so attention, norms and the MLP all matter
        torch.nn.init.normal_(p, std=std)
    return m


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("n_kv_heads,compile,device", [
    (0, False, "cpu"), (2, False, "cpu"),
    pytest.param(2, True, "cpu", marks=pytest.mark.slow),  # ~20 s to compile on a small CPU
    pytest.param(2, False, "cuda", marks=CUDA), pytest.param(2, True, "cuda", marks=CUDA)])  # CUDA graphs
def test_decoder_rows_at_different_positions_match_full_forward(n_kv_heads, compile, device):
    m = random_gpt(400, n_kv_heads).to(device)
    x = torch.randint(0, 400, (3, 60)).to(device)
    with torch.no_grad():
        full = m(x)
    dec = Decoder(m, batch_size=4, max_len=100, compile=compile)
    seq_of = {0: 0, 2: 1}  # slot -> sequence; slot 1 joins later, slot 3 stays free
    pos = {0: 10, 2: 3}
    errs = [(dec.prefill(x[0, :10].tolist(), [0])[0] - full[0, 9]).abs().max(),
            (dec.prefill(x[1, :3].tolist(), [2])[0] - full[1, 2]).abs().max()]
    for i in range(30):
        if i == 7:  # a row joins mid-way
            errs.append((dec.prefill(x[2, :20].tolist(), [1])[0] - full[2, 19]).abs().max())
            seq_of[1], pos[1] = 2, 20
            continue
        advance = [s in pos and not (s == 2 and i % 5 == 1) for s in range(4)]  # slot 2 sits out some steps
        if i < 3:  # only the first row moves: a one-row step (compiled on CPU: the multiply-and-sum path)
            advance = [s == 0 for s in range(4)]
        logits = dec.step([x[seq_of[s], pos[s]].item() if s in pos else 0 for s in range(4)], advance)
        for s in pos:
            if advance[s]:
                errs.append((logits[s] - full[seq_of[s], pos[s]]).abs().max())
                pos[s] += 1
    assert len(errs) > 60 and max(errs) < (1e-4 if device == "cpu" else 2e-3), max(errs)
    if compile and device == "cpu":  # the steps ran in the ahead-of-time compiled steps, not a fallback
        assert isinstance(dec._one_row, AheadOfTimeStep) and isinstance(dec._several_rows, AheadOfTimeStep)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fused_weights_follow_parameter_updates(compile, monkeypatch):
    """RL samples with the engine after every update: eager, and in the compiled steps (weights are inputs)."""
    ran, call = [], AheadOfTimeStep.__call__
    monkeypatch.setattr(AheadOfTimeStep, "__call__", lambda self, *a: ran.append(1) or call(self, *a))
    m = random_gpt(400)
    eng = Engine(m, _Tok(), torch.device("cpu"), compile=compile)
    eng.warm_up()  # what RL does before its clock starts: the steps are built, and no parameter changed
    eng.stop_ids = {-1}
    before = eng.complete([5, 6, 7], max_tokens=8, temperature=0)[0]
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(-1.3)  # in place, as an optimizer step does
    after = eng.complete([5, 6, 7], max_tokens=8, temperature=0)[0]
    m2 = GPT(m.cfg).eval()
    m2.load_state_dict(m.state_dict())
    assert after == Engine(m2, _Tok(), torch.device("cpu")).complete([5, 6, 7], max_tokens=8, temperature=0)[0]
    assert after != before
    if compile:  # and the rows of a batch, as RL's rollouts run them
        rows = eng.complete([[5, 6, 7], [8, 9]], max_tokens=8, temperature=0)
        assert rows[0] == after and rows[1] == Engine(m2, _Tok(), torch.device("cpu")).complete(
            [8, 9], max_tokens=8, temperature=0)[0]
    assert bool(ran) == compile  # the compiled steps ran, not a fallback


def test_decode_compile_decides_by_setting_device_and_size(monkeypatch):
    import exocortex.infer.engine as engine

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(engine, "compile_status", lambda device: (True, None))
    big, small = engine.COMPILE_PAYS_TOKENS, engine.COMPILE_PAYS_TOKENS - 1
    assert engine.decode_compile("auto", cpu, big) == (True, None)
    assert engine.decode_compile("auto", cpu, small) == (False, None)
    assert engine.decode_compile("auto", cuda, big) == (False, None)  # eager batches are fast there
    assert engine.decode_compile("on", cpu, 1) == (True, None) and engine.decode_compile("on", cuda, 1)[0]
    assert engine.decode_compile("off", cpu, big) == (False, None)
    monkeypatch.setattr(engine, "compile_status", lambda device: (False, "no C++ compiler"))
    assert engine.decode_compile("auto", cpu, big) == (False, None)
    assert engine.decode_compile("on", cpu, big) == (False, "decoding eagerly: no C++ compiler")  # never silent


def test_warm_up_falls_back_to_eager_when_the_step_cannot_be_built(capsys):
    eng = Engine(random_gpt(400), _Tok(), torch.device("cpu"), compile=True)

    def broken(batch_size, max_len):
        raise RuntimeError("no C++ compiler")

    eng.make_decoder = broken
    eng.warm_up()
    assert eng.compile is False and "decoding eagerly" in capsys.readouterr().out


class _Tok:  # the special tokens an Engine needs; ids below those the tests use for text
    special = {k: 390 + i for i, k in enumerate(["<|bos|>", "<|assistant_end|>", "<tool_call>", "</tool_call>",
                                                 "<tool_response>", "</tool_response>"])}


def run_batched(eng, jobs, max_rows, join_after=None):
    """Run jobs [(prompt, sampling)] through a Batcher; job i > 0 is submitted when job 0 has produced
    join_after[i] tokens (so requests arrive at different steps). Returns per-job (tokens, finish, steps)."""
    b = Batcher(eng, max_rows)
    join_after = join_after or [0] * len(jobs)
    out = [{"tokens": []} for _ in jobs]
    done = threading.Semaphore(0)
    reqs, submitted = [], set()

    def submit_due(produced):  # runs on the batcher's thread (in job 0's callbacks): joins at a step boundary
        for j, after in enumerate(join_after):
            if j not in submitted and after <= produced:
                submitted.add(j)
                b.submit(reqs[j])

    for i, (prompt, kw) in enumerate(jobs):
        def on_token(t, forced, i=i):
            out[i]["tokens"].append(t)
            if i == 0:
                submit_due(len(out[0]["tokens"]))
            return True

        def on_end(finish, steps, error, i=i):
            out[i].update(finish=finish, steps=steps, error=error)
            if i == 0:
                submit_due(len(jobs) + 10 ** 9)
            done.release()
        reqs.append(Request(prompt, on_token=on_token, on_end=on_end, **kw))
    submit_due(0)
    for _ in jobs:
        assert done.acquire(timeout=60)
    b.close()
    return out


def alone(eng, prompt, **kw):
    """What Engine.generate gives for this request alone: (tokens without the stop token, finish, steps)."""
    tokens, steps, finish = [], 0, "length"
    for column, _ in eng.generate(prompt, **kw):
        steps += 1
        if column[0] in eng.stop_ids:
            finish = "stop"
            break
        tokens.append(column[0])
    return tokens, finish, steps


@pytest.mark.parametrize("device,compile", [
    ("cpu", False), pytest.param("cpu", True, marks=pytest.mark.slow),  # compiled: one-row steps are multiply-and-sum
    pytest.param("cuda", True, marks=CUDA)])
def test_continuous_batching_equals_each_request_alone(device, compile):
    eng = Engine(random_gpt(400).to(device), _Tok(), torch.device(device), compile=compile)
    eng.stop_ids = {141}  # a token this model likes: some rows stop early, others run to max_tokens
    g = torch.Generator().manual_seed(1)
    jobs = []
    for i in range(9):
        prompt = torch.randint(10, 380, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        kw = dict(max_tokens=int(torch.randint(3, 70, (1,), generator=g)), temperature=0)
        if i in (2, 5):  # sampled rows with their own seeds and filters ride along
            kw = dict(max_tokens=40, temperature=0.9, top_k=50, top_p=0.9, seed=100 + i)
        jobs.append((prompt, kw))
    join_after = [0, 0, 1, 2, 2, 5, 9, 14, 20]
    out = run_batched(eng, jobs, max_rows=4, join_after=join_after)  # 9 requests through 4 rows: some queue
    for (prompt, kw), got in zip(jobs, out):
        tokens, finish, steps = alone(eng, prompt, **kw)
        assert got["error"] is None
        assert (got["tokens"], got["finish"], got["steps"]) == (tokens, finish, steps), (prompt, kw)
    assert {o["finish"] for o in out} == {"stop", "length"}


def bigram_gpt(vocab, pairs, width=64):
    """A GPT whose blocks do nothing (zero output projections) and whose head maps token a to b for each
    (a, b) in pairs: it writes a fixed script, whatever the attention computes."""
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, width=width, head_dim=16, vocab_size=vocab, seq_len=32, mlp_ratio=2.0)
    m = GPT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3)
        for blk in m.model.layers:
            blk.self_attn.o_proj.weight.zero_()
            blk.mlp.down_proj.weight.zero_()
        m.model.norm.weight.fill_(1.0)
        e = m.model.embed_tokens.weight
        unit = e / e.pow(2).mean(-1, keepdim=True).sqrt()  # what the final norm makes of each embedding
        m.lm_head.weight.zero_()
        for a, b in pairs:
            m.lm_head.weight[b] += 100 * unit[a] / width
    return m


def test_tool_calls_in_a_batch():
    tok_sp = _Tok.special
    call, out_s, out_e = tok_sp["<tool_call>"], tok_sp["<tool_response>"], tok_sp["</tool_response>"]

    class Tok(_Tok):  # tool text <-> token ids: "2+3" is written as 3 tokens, the result "\n5\n" comes back as 3
        chars = {"2": 50, "+": 51, "3": 52, "5": 53, '\n{"name": "calculator", "arguments": {"expression": "': 54,
                 '"}}\n': 55, "\n": 56}

        def decode(self, ids):
            inv = {v: k for k, v in self.chars.items()}
            return "".join(inv[i] for i in ids)

        def encode(self, s):
            return [self.chars[c] for c in s]

    script = [call, 54, 50, 51, 52, 55, tok_sp["</tool_call>"]]
    answer = [60, 61, 62, tok_sp["<|assistant_end|>"]]
    pairs = list(zip([20] + script, script)) + [(out_e, answer[0])] + list(zip(answer, answer[1:]))
    eng = Engine(bigram_gpt(400, pairs), Tok(), torch.device("cpu"))
    tokens, finish, steps = alone(eng, [1, 2, 20], max_tokens=30, temperature=0)
    assert tokens == script + [out_s, 56, 53, 56, out_e] + answer[:-1] and finish == "stop"
    jobs = [([1, 2, 20], dict(max_tokens=30, temperature=0)), ([20], dict(max_tokens=30, temperature=0)),
            ([5, 5, 5, 5, 20], dict(max_tokens=9, temperature=0)),  # cut off in the tool output: "length"
            ([3, 20], dict(max_tokens=30, temperature=0))]
    out = run_batched(eng, jobs, max_rows=3, join_after=[0, 2, 3, 6])
    for (prompt, kw), got in zip(jobs, out):
        assert (got["tokens"], got["finish"], got["steps"]) == alone(eng, prompt, **kw)
    assert out[2]["finish"] == "length"


def test_cancel_and_bad_requests_leave_the_batch_running():
    eng = Engine(random_gpt(400), _Tok(), torch.device("cpu"))
    eng.stop_ids = {-1}
    b = Batcher(eng, 2)
    events = {}
    ended = {k: threading.Event() for k in ("cancel", "long", "bad", "ok")}

    def on_end(name):
        def f(finish, steps, error):
            events[name] = (finish, steps, error)
            ended[name].set()
        return f
    cancel_me = Request([5, 6], max_tokens=100, temperature=0, on_end=on_end("cancel"))
    b.submit(cancel_me)
    b.submit(Request(list(range(10, 200)), max_tokens=5, temperature=0, on_end=on_end("long")))  # > context 128
    b.submit(Request([5, 6], max_tokens=10, temperature=0, on_end=on_end("ok")))
    b.submit(Request([5, 6], max_tokens=3, temperature=0, on_end=on_end("bad"),
                     on_token=lambda t, f: 1 / 0))  # a failing callback fails its own request only
    b.cancel(cancel_me)
    for e in ended.values():
        assert e.wait(30)
    b.close()
    assert events["cancel"][0] is None and events["cancel"][1] < 100
    assert isinstance(events["long"][2], ValueError)
    assert isinstance(events["bad"][2], ZeroDivisionError)
    assert events["ok"][:2] == ("length", 10) and events["ok"][2] is None


@pytest.mark.slow  # compiles the decode step (~20 s on a small CPU)
def test_compiled_one_row_step_falls_back_when_ahead_of_time_build_fails(monkeypatch, tmp_path):
    """Without AOTInductor (no compiler, an unsupported torch) the one-row step runs under torch.compile
    instead, with a warning that says so, and gives the same logits as the eager step."""
    import exocortex.infer.decode as decode

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setenv("EXOCORTEX_CACHE", str(tmp_path))  # nothing cached: the build is attempted
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    monkeypatch.setattr(decode, "_ahead_of_time", {})
    m = random_gpt(300)
    prompt = [5, 6, 7, 8]
    eager, compiled = Decoder(m, 1, 40), Decoder(m, 1, 40, compile=True)
    eager.prefill(prompt), compiled.prefill(prompt)
    with pytest.warns(UserWarning, match="ahead-of-time decode step unavailable.*no C\\+\\+ compiler"):
        first = compiled.step([9])
    assert compiled._one_row is False
    assert (first - eager.step([9])).abs().max() < 1e-4
    for token in [10, 11, 12]:
        assert (compiled.step([token]) - eager.step([token])).abs().max() < 1e-4


@pytest.mark.slow  # loads the ahead-of-time steps the test above builds (built here if run alone)
def test_ahead_of_time_steps_leave_nothing_in_tmpdir(monkeypatch, tmp_path):
    """AOTInductor unpacks each package into a folder under $TMPDIR that only its loader's destructor removes;
    a server killed by a signal used to leave one per start. Ours is gone once the step is loaded."""
    import tempfile

    import exocortex.infer.decode as decode

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(decode, "_ahead_of_time", {})  # loaded here, not reused from an earlier test
    made, mkdtemp = [], tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(mkdtemp(*a, **k)) or made[-1])
    m = random_gpt(400, 2)
    eager, compiled = Decoder(m, 4, 40), Decoder(m, 4, 40, compile=True)
    for dec in (eager, compiled):
        dec.prefill([5, 6, 7], [0]), dec.prefill([8, 9], [1])
    one = compiled.step([10, 0, 0, 0], [True, False, False, False])  # the one-row step, then several rows
    several = compiled.step([11, 12, 0, 0], [True, True, False, False])
    assert isinstance(compiled._one_row, AheadOfTimeStep) and isinstance(compiled._several_rows, AheadOfTimeStep)
    assert list(tmp.iterdir()) == []
    ours = [d for d in made if "exocortex-aoti-" in d]
    assert len(ours) == 2 and not any(__import__("os").path.exists(d) for d in ours)  # one per step, gone
    assert (one[0] - eager.step([10, 0, 0, 0], [True, False, False, False])[0]).abs().max() < 1e-4
    assert (several[:2] - eager.step([11, 12, 0, 0], [True, True, False, False])[:2]).abs().max() < 1e-4
    assert __import__("os").environ["TMPDIR"] == str(tmp)
