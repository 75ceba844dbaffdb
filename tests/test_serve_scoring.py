"""Scoring through the server: logprobs / top_logprobs (chat), legacy logprobs, echo and max_tokens=0
(completions), n and best_of, lists of prompts and token-id prompts, and the 400s for what does not fit.

The model is a small random one in float32, so every reported logprob can be checked against a direct forward
pass of the model over the same tokens."""
import json

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
from test_serve import MODEL, Server, _error  # noqa: E402

from exocortex.apps.serve import create_app  # noqa: E402
from exocortex.config import ModelConfig  # noqa: E402
from exocortex.infer.engine import Batcher, Engine, Request  # noqa: E402
from exocortex.model import GPT  # noqa: E402
from scripted import Scripted  # noqa: E402

USER = [{"role": "user", "content": "Mira lives in Tarsk"}]
ATOL = 2e-4  # the decode path (fused weights) against the model's own forward, float32


def scoring_model(tok):
    """Random weights everywhere (the whole context matters), special tokens never likely: no tool calls or
    early stops, so replies run to max_tokens and every token is the model's own."""
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, width=64, head_dim=16, vocab_size=tok.vocab_size, seq_len=32, mlp_ratio=2.0)
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3)
        m.lm_head.weight[len(tok.mergeable_ranks):] = 0
    return m.eval()


@pytest.fixture(scope="module")
def engine(tok):
    return Engine(scoring_model(tok), tok, torch.device("cpu"))


@pytest.fixture(scope="module")
def server(engine):
    s = Server(create_app(engine, MODEL, max_concurrent=4, max_queue=8))
    yield s
    s.stop()


def forward_logprobs(engine, ids):
    """log p(ids[i] | ids[:i]) for i >= 1 by the model's own forward (the reference), and the log-softmax rows."""
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([ids]))[0].float(), dim=-1)
    return [float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0], logp


def ids_of(tok, byte_lists):
    """Token ids back from each token's bytes (exact, unlike its text): a BPE token or a special's name."""
    names = {name.encode(): i for name, i in tok.special.items()}
    return [tok.mergeable_ranks.get(bytes(b), names.get(bytes(b))) for b in byte_lists]


def test_chat_logprobs_are_the_models_and_top_logprobs_are_sorted(server, engine, tok):
    c = server.client()
    out = c.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=16, logprobs=True,
                                    top_logprobs=5)
    content = out.choices[0].logprobs.content
    assert len(content) == 16 == out.usage.completion_tokens
    ids = ids_of(tok, [e.bytes for e in content])
    prompt = tok.render_for_completion(USER)
    ref, logp = forward_logprobs(engine, prompt + ids)
    ref = ref[len(prompt) - 1:]
    got = [e.logprob for e in content]
    assert max(abs(a - b) for a, b in zip(got, ref)) < ATOL
    assert abs(sum(got) - sum(ref)) < ATOL * len(ref)
    assert "".join(e.token for e in content) == out.choices[0].message.content
    for i, e in enumerate(content):
        assert e.bytes == list(tok.decode_bytes([ids[i]]))
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob  # greedy: the best
        best = logp[len(prompt) - 1 + i].topk(5)
        assert ids_of(tok, [t.bytes for t in e.top_logprobs]) == best.indices.tolist()
        assert max(abs(a - b) for a, b in zip(tops, best.values.tolist())) < ATOL

    plain = c.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=16)
    assert plain.choices[0].logprobs is None  # not asked: not computed
    assert plain.choices[0].message.content == out.choices[0].message.content


def test_sampled_logprobs_are_the_raw_models_not_the_sampling_distributions(server, engine, tok):
    """With temperature and top-p, the logprobs are still the model's own distribution (as OpenAI/vLLM)."""
    out = server.client().chat.completions.create(model=MODEL, messages=USER, temperature=1.7, top_p=0.8, seed=3,
                                                  max_tokens=12, logprobs=True, top_logprobs=0)
    content = out.choices[0].logprobs.content
    prompt = tok.render_for_completion(USER)
    ids = ids_of(tok, [e.bytes for e in content])
    ref = forward_logprobs(engine, prompt + ids)[0][len(prompt) - 1:]
    assert max(abs(e.logprob - r) for e, r in zip(content, ref)) < ATOL
    assert all(e.top_logprobs == [] for e in content)


def test_streamed_chat_logprobs_match(server):
    c = server.client()
    for kw in (dict(temperature=0), dict(temperature=0.9, seed=11)):
        full = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, logprobs=True, top_logprobs=2,
                                         **kw)
        chunks = list(c.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, logprobs=True,
                                                top_logprobs=2, stream=True, **kw))
        streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
                    for e in ch.choices[0].logprobs.content]
        assert [e.model_dump() for e in streamed] == [e.model_dump() for e in full.choices[0].logprobs.content]
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
            full.choices[0].message.content


def test_echo_scores_the_prompt_like_a_forward(server, engine, tok):
    c = server.client()
    text = "the river town of Tarsk"
    prompt = tok.encode(text, bos=True)
    out = c.completions.create(model=MODEL, prompt=text, echo=True, logprobs=3, max_tokens=0)
    ch = out.choices[0]
    assert ch.finish_reason == "length" and ch.text == text
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), 0)
    lp = ch.logprobs
    assert len(lp.tokens) == len(prompt) and lp.tokens[0] == "<|bos|>"
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref, logp = forward_logprobs(engine, prompt)
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], ref)) < 1e-5  # the same forward
    for i in range(1, len(prompt)):
        best = logp[i - 1].topk(3)
        top, want = lp.top_logprobs[i], {}
        for t, v in zip(best.indices.tolist(), best.values.tolist()):  # pieces of one character share a text
            want.setdefault(tok.decode_bytes([t]).decode("utf-8", errors="replace"), v)
        assert list(top)[:len(want)] == list(want)
        assert list(top.values())[:len(want)] == pytest.approx(list(want.values()), abs=1e-5)
        assert top[lp.tokens[i]] == pytest.approx(lp.token_logprobs[i])  # the chosen token is always there
    # offsets index the echoed text
    assert lp.text_offset[0] == lp.text_offset[1] == 0
    for i in range(1, len(prompt)):
        assert text[lp.text_offset[i]:].startswith(lp.tokens[i])

    # with max_tokens the generated tokens follow, their offsets after the prompt text
    more = c.completions.create(model=MODEL, prompt=text, echo=True, logprobs=1, max_tokens=5, temperature=0)
    m = more.choices[0]
    alone = c.completions.create(model=MODEL, prompt=text, logprobs=1, max_tokens=5, temperature=0).choices[0]
    assert m.text == text + alone.text
    assert m.logprobs.tokens == lp.tokens + alone.logprobs.tokens
    assert m.logprobs.text_offset[len(prompt):] == [o + len(text) for o in alone.logprobs.text_offset]
    assert m.logprobs.token_logprobs[1:len(prompt)] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)
    assert more.usage.completion_tokens == 5
    gen = engine.complete(prompt, max_tokens=5, temperature=0)[0]  # the same greedy tokens
    assert [tok.decode_bytes([t]).decode("utf-8", errors="replace") for t in gen] == alone.logprobs.tokens
    ref = forward_logprobs(engine, prompt + gen)[0][len(prompt) - 1:]
    assert max(abs(a - b) for a, b in zip(alone.logprobs.token_logprobs, ref)) < ATOL


def test_lm_eval_request_shape(server, engine, tok):
    """What lm-evaluation-harness's local-completions sends for loglikelihood: a batch of token-id prompts,
    echo, logprobs 1, max_tokens 1. Each continuation's logprob is sum(token_logprobs[ctxlen:-1])."""
    a, b = tok.encode("Mira lives in Tarsk"), tok.encode("the river town")
    body = {"model": MODEL, "prompt": [a, b], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [ch["index"] for ch in choices] == [0, 1]
    for ids, ch in zip([a, b], choices):
        lp = ch["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then the one generated token
        ref, logp = forward_logprobs(engine, ids)
        assert max(abs(x - y) for x, y in zip(lp["token_logprobs"][1:-1], ref)) < 1e-5
        for tok_lp, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
            assert max(top.values()) >= tok_lp  # lm-eval's is_greedy reads this
        assert lp["token_logprobs"][-1] == pytest.approx(float(logp[-1].max()), abs=ATOL)  # greedy


def test_token_id_prompt_equals_string_prompt(server, tok):
    c = server.client()
    kw = dict(model=MODEL, echo=True, logprobs=2, max_tokens=6, temperature=0)
    s = c.completions.create(prompt="the river", **kw).choices[0]
    t = c.completions.create(prompt=tok.encode("the river", bos=True), **kw).choices[0]
    ll = c.completions.create(prompt=[tok.encode("the river", bos=True)], **kw).choices[0]
    assert s.model_dump() == t.model_dump() == ll.model_dump()


def test_prompt_lists_and_n_are_prompt_major(server):
    c = server.client()
    prompts = ["the river", "Mira lives"]
    out = c.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [ch.index for ch in out.choices] == [0, 1, 2, 3]
    for p, text in enumerate(prompts):
        alone = c.completions.create(model=MODEL, prompt=text, max_tokens=6, temperature=0).choices[0].text
        assert [ch.text for ch in out.choices[2 * p:2 * p + 2]] == [alone, alone]
    assert out.usage.completion_tokens == 4 * 6

    # streamed: every choice's chunks carry its index and assemble to the same texts
    texts: dict = {}
    for ch in c.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, temperature=0, stream=True):
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert [texts[i] for i in range(4)] == [ch.text for ch in out.choices]


def test_n_with_a_seed_is_distinct_and_repeatable(server):
    c = server.client()
    kw = dict(model=MODEL, max_tokens=12, temperature=1.0, seed=5)
    out = c.completions.create(prompt="the river", n=3, **kw)
    texts = [ch.text for ch in out.choices]
    assert len(set(texts)) == 3
    assert [ch.text for ch in c.completions.create(prompt="the river", n=3, **kw).choices] == texts
    # choice j samples with seed + j (docs/serve.md)
    assert c.completions.create(prompt="the river", **{**kw, "seed": 6}).choices[0].text == texts[1]

    chat = c.chat.completions.create(messages=USER, n=3, logprobs=True, **kw)
    assert [ch.index for ch in chat.choices] == [0, 1, 2]
    assert len({ch.message.content for ch in chat.choices}) == 3
    assert all(len(ch.logprobs.content) == 12 for ch in chat.choices)
    streamed: dict = {}
    for ch in c.chat.completions.create(messages=USER, n=3, stream=True, **kw):
        for choice in ch.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == [ch.message.content for ch in chat.choices]


def test_best_of_returns_the_likeliest_candidates(server):
    c = server.client()
    kw = dict(model=MODEL, prompt="the river", max_tokens=8, temperature=1.0)
    cands = [c.completions.create(seed=20 + j, logprobs=0, **kw).choices[0] for j in range(4)]
    mean = [sum(ch.logprobs.token_logprobs) / len(ch.logprobs.token_logprobs) for ch in cands]
    order = sorted(range(4), key=lambda j: -mean[j])
    out = c.completions.create(seed=20, n=2, best_of=4, **kw)
    assert [ch.text for ch in out.choices] == [cands[j].text for j in order[:2]]
    assert [ch.index for ch in out.choices] == [0, 1] and out.choices[0].logprobs is None
    assert out.usage.completion_tokens == 4 * 8  # every candidate was generated


def test_stop_sequences_cut_the_logprobs_with_the_text(server):
    c = server.client()
    kw = dict(model=MODEL, prompt="the river", max_tokens=16, temperature=0, logprobs=0)
    full = c.completions.create(**kw).choices[0]
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    cut = c.completions.create(stop=stop, **kw).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    keep = sum(o < len(cut.text) for o in full.logprobs.text_offset)
    assert cut.logprobs.tokens == full.logprobs.tokens[:keep]
    assert cut.logprobs.token_logprobs == pytest.approx(full.logprobs.token_logprobs[:keep], abs=1e-6)
    streamed = [t for ch in c.completions.create(stream=True, stop=stop, **kw) if ch.choices
                and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert streamed == cut.logprobs.tokens


def test_the_end_token_is_scored_in_completions_not_in_chat_content(tok):
    end = tok.special["<|assistant_end|>"]
    script = tok.encode(" it is here.") + [end]
    cfg = ModelConfig(depth=1, width=16, head_dim=16, vocab_size=tok.vocab_size, seq_len=32, mlp_ratio=1.0)
    eng = Engine(GPT(cfg), tok, torch.device("cpu"), decoder=Scripted(script, tok.vocab_size))
    server = Server(create_app(eng, MODEL))
    try:
        c = server.client()
        ch = c.completions.create(model=MODEL, prompt="x", logprobs=1, temperature=0).choices[0]
        assert ch.finish_reason == "stop" and ch.text == " it is here."
        assert ch.logprobs.tokens[-1] == "<|assistant_end|>" and ch.logprobs.text_offset[-1] == len(ch.text)
        assert len(ch.logprobs.tokens) == len(script)
        assert ch.logprobs.token_logprobs == pytest.approx([0.0] * len(script))  # the script is certain
        msg = c.chat.completions.create(model=MODEL, messages=USER, logprobs=True, temperature=0).choices[0]
        assert [e.token for e in msg.logprobs.content][-1] != "<|assistant_end|>"
        assert "".join(e.token for e in msg.logprobs.content) == msg.message.content
    finally:
        server.stop()


def test_max_tokens_zero_without_echo_is_an_empty_completion(server):
    out = server.client().completions.create(model=MODEL, prompt="the river", max_tokens=0)
    assert out.choices[0].text == "" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 0
    chunks = list(server.client().completions.create(model=MODEL, prompt="the river", max_tokens=0, echo=True,
                                                     logprobs=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == "the river"
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == "length"
    assert chunks[0].choices[0].logprobs.token_logprobs[0] is None


def test_scoring_errors(server, tok):
    comp, chat = server.url + "/v1/completions", server.url + "/v1/chat/completions"
    v = tok.vocab_size
    with httpx.Client(timeout=30) as h:
        err = _error(h.post(comp, json={"prompt": [[1, 2], [3, v + 5]]}), 400, param="prompt[1][1]")
        assert str(v + 5) in err["message"]
        _error(h.post(comp, json={"prompt": [1, -1]}), 400, param="prompt[1]")
        _error(h.post(comp, json={"prompt": [1, 2.5]}), 400, param="prompt[1]")
        _error(h.post(comp, json={"prompt": [1, True]}), 400, param="prompt[1]")
        _error(h.post(comp, json={"prompt": ["a", 3]}), 400, param="prompt[1]")
        _error(h.post(comp, json={"prompt": [[1], []]}), 400, param="prompt[1]")
        _error(h.post(comp, json={"prompt": []}), 400, param="prompt")
        _error(h.post(comp, json={"prompt": {"a": 1}}), 400, param="prompt")
        _error(h.post(comp, json={"prompt": "x", "logprobs": 6}), 400, param="logprobs")
        _error(h.post(comp, json={"prompt": "x", "logprobs": True}), 400, param="logprobs")
        _error(h.post(comp, json={"prompt": "x", "n": 0}), 400, param="n")
        _error(h.post(comp, json={"prompt": "x", "n": 3, "best_of": 2}), 400, param="best_of")
        _error(h.post(comp, json={"prompt": "x", "best_of": 2, "stream": True}), 400, param="best_of")
        _error(h.post(comp, json={"prompt": ["x"] * 7, "n": 2}), 400, param="n")  # 14 > 4 running + 8 queued
        _error(h.post(comp, json={"prompt": "x", "max_tokens": -1}), 400, param="max_tokens")
        _error(h.post(comp, json={"prompt": "x", "suffix": "y"}), 400, param="suffix")
        _error(h.post(chat, json={"messages": USER, "top_logprobs": 21, "logprobs": True}), 400,
               param="top_logprobs")
        _error(h.post(chat, json={"messages": USER, "top_logprobs": 2}), 400, param="top_logprobs")
        _error(h.post(chat, json={"messages": USER, "logprobs": "yes"}), 400, param="logprobs")
        _error(h.post(chat, json={"messages": USER, "n": 129}), 400, param="n")
        _error(h.post(chat, json={"messages": USER, "max_tokens": 0}), 400, param="max_tokens")
        # a long prompt in a list is named by its index
        err = _error(h.post(comp, json={"prompt": ["x", "x " * 300]}), 400, code="context_length_exceeded")
        assert err["param"] == "prompt[1]"
    assert server.health()["active"] == 0 and server.health()["queued"] == 0


def test_batcher_logprobs_hook_is_off_by_default_and_call_runs_on_its_thread(engine, monkeypatch):
    import threading

    import exocortex.infer.engine as engine_module

    def boom(*a, **k):
        raise AssertionError("logprobs computed although nobody asked")
    monkeypatch.setattr(engine_module, "token_logprobs", boom)
    b = Batcher(engine, 2)
    try:
        done = threading.Event()
        got = []
        b.submit(Request([1, 2, 3], max_tokens=4, temperature=0, on_token=lambda t, f: got.append(t) or True,
                         on_end=lambda finish, steps, error: done.set() if error is None else got.append(error)))
        assert done.wait(30) and len(got) == 4 and all(isinstance(t, int) for t in got)
        assert b.call(lambda: threading.current_thread().name).result(30) == "exocortex-batcher"
        with pytest.raises(ZeroDivisionError):
            b.call(lambda: 1 / 0).result(30)
    finally:
        b.close()


def test_sse_chunks_are_openai_shaped(server):
    """Raw SSE: a chat chunk's logprobs object is {"content": [...], "refusal": null} or null."""
    body = {"model": MODEL, "messages": USER, "max_tokens": 3, "temperature": 0, "logprobs": True, "stream": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")
                  and line != "data: [DONE]"]
    shapes = [ev["choices"][0]["logprobs"] for ev in events if ev["choices"]]
    assert shapes[0] is None and shapes[-1] is None  # the role chunk and the finish chunk
    assert sum(len(s["content"]) for s in shapes if s) == 3
    assert all(set(s) == {"content", "refusal"} for s in shapes if s)


def test_prompts_are_scored_on_the_batchers_thread(server, monkeypatch):
    """The batcher's thread owns the model: echo's forward pass runs there, between decode steps, never
    alongside them from a request's thread."""
    import threading

    import exocortex.apps.scoring as scoring_module

    threads = []
    real = scoring_module.score_prompt

    def recording(*a, **k):
        threads.append(threading.current_thread().name)
        return real(*a, **k)
    monkeypatch.setattr(scoring_module, "score_prompt", recording)
    out = server.client().completions.create(model=MODEL, prompt=["the river", "Mira"], echo=True, logprobs=0,
                                             max_tokens=0)
    assert len(out.choices) == 2 and threads == ["exocortex-batcher"] * 2
