import torch

from exocortex.infer.engine import Engine, StreamDecoder, sample_next
from exocortex.infer.tools import format_tool_call, search_tool
from exocortex.model import GPT
from scripted import Scripted


CALL = '{"name": "calculator", "arguments": {"expression": "347 * 29"}}'


def test_tool_call_is_run_and_injected(tok, small_cfg):
    sp = tok.special
    call = tok.encode(format_tool_call("calculator", {"expression": "347 * 29"}))
    answer = tok.encode("It is 10063.")
    script = [sp["<tool_call>"], *call, sp["</tool_call>"], *answer, sp["<|assistant_end|>"]]
    small_cfg.vocab_size, small_cfg.seq_len = tok.vocab_size, 256  # JSON is long in this tiny vocabulary
    eng = Engine(GPT(small_cfg), tok, torch.device("cpu"), decoder=Scripted(script, tok.vocab_size))
    steps = list(eng.generate(tok.render_for_completion([{"role": "user", "content": "347*29?"}]), max_tokens=200,
                              temperature=0))
    tokens = [c[0] for c, _ in steps]
    forced = [f[0] for _, f in steps]
    out_start = tokens.index(sp["<tool_response>"])
    out_end = tokens.index(sp["</tool_response>"])
    assert tok.decode(tokens[out_start + 1:out_end]) == "\n10063\n"  # the Hermes layout: newline-framed
    assert all(forced[out_start:out_end + 1]) and not any(forced[:out_start])
    assert tokens[-1] == sp["<|assistant_end|>"]
    assert eng.answer_text(tokens[:-1]) == "It is 10063."
    parts = eng.to_parts(tokens[:-1])
    assert [p["type"] for p in parts] == ["tool_call", "tool_output", "text"]
    assert parts[0]["text"] == CALL and parts[1]["text"] == "10063"
    assert eng.render(tokens[:-1]) == f"[tool call: {CALL}] [tool output: 10063] It is 10063."
    # the parts, rendered again as history, are exactly the tokens the model wrote and the engine forced
    prompt = tok.render_for_completion([{"role": "user", "content": "347*29?"}])
    ids, mask = tok.render_conversation([{"role": "user", "content": "347*29?"},
                                         {"role": "assistant", "content": parts}])
    assert ids == prompt + tokens
    # forced: never trained on, but for the response's opening marker (other runtimes stop there to run the tool)
    assert [m for m, f in zip(mask[len(prompt):], forced) if f] == [1] + [0] * (sum(forced) - 1)


def test_batched_sampling_is_seeded(small_cfg):
    m = GPT(small_cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)

    class T:  # minimal tokenizer stand-in
        special = {k: i for i, k in enumerate(["<|bos|>", "<|assistant_end|>", "<tool_call>", "</tool_call>",
                                               "<tool_response>", "</tool_response>"])}
    eng = Engine(m, T(), torch.device("cpu"))
    eng.stop_ids = {-1}
    a = list(eng.generate([5, 6, 7], num_samples=4, max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7))
    b = list(eng.generate([5, 6, 7], num_samples=4, max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7))
    assert a == b and len(a) == 10 and len(a[0][0]) == 4
    rows = list(zip(*[c for c, _ in a]))
    assert len(set(rows)) > 1  # samples differ across the batch


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    assert sample_next(logits, temperature=0).item() == 2
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks <= {2, 3}
    picks = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(200)}
    assert picks == {2}


def test_sampling_draws_each_token_at_its_probability():
    """The inverse-CDF draw: frequencies follow the softmax, per row; a token of probability 0 (masked, first or
    last in the vocabulary) is never drawn."""
    p = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0, 0.5]])
    logits = torch.log(p).repeat(50_000, 1)
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits, 1.0, generator=g).view(-1, 2)
    for row in range(2):
        freq = torch.bincount(picks[:, row], minlength=6).float() / picks.shape[0]
        assert (freq[p[row] == 0] == 0).all()
        torch.testing.assert_close(freq, p[row], atol=0.01, rtol=0)
    # temperature sharpens: at T=0.5 the odds of 0.6 against 0.3 are 4:1
    freq = torch.bincount(sample_next(torch.log(p[:1]).repeat(40_000, 1), 0.5, generator=g), minlength=6) / 40_000
    assert abs(freq[3] / freq[4] - 4.0) < 0.3
    # one row given as a vector
    assert sample_next(torch.tensor([-1e9, 0.0, -1e9]), 1.0, generator=g).item() == 1


def test_stream_decoder_keeps_multibyte_chars(tok):
    ids = tok.encode("naïve 🙂 日本")
    d = StreamDecoder(tok)
    assert "".join(d.push(i) for i in ids) == "naïve 🙂 日本"


def test_prompts_of_different_lengths_batch_like_each_alone(tok, small_cfg):
    """Engine.generate with several prompts (each row at its own position in the static cache) gives each
    prompt the tokens it gets alone; entropy stats are collected for sampled tokens."""
    small_cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    eng = Engine(GPT(small_cfg).eval(), tok, torch.device("cpu"))
    prompts = [tok.encode("river town"), tok.encode("Mira lives in Tarsk and sells"), tok.encode("12")]
    alone = [eng.complete(p, max_tokens=10, temperature=0)[0] for p in prompts]
    assert eng.complete(prompts, max_tokens=10, temperature=0) == alone
    assert eng.complete_many(prompts * 3, batch_size=4, max_tokens=10, temperature=0) == alone * 3
    stats: dict = {}
    outs = eng.complete(prompts, num_samples=2, max_tokens=6, temperature=1.0, seed=3, stats=stats)
    assert len(outs) == 6 and stats["sampled"] > 0 and stats["entropy_sum"] > 0


def test_complete_many_refills_a_finished_row_with_the_next_prompt(tok, small_cfg):
    """complete_many keeps its rows busy: a row that finishes takes the next prompt at once, so replies of
    very different lengths cost about their total length in steps, not the longest reply per batch. Each
    reply is the one it gets alone, a tool call inside one is run and its output forced, and a reply past
    max_tokens is cut there."""
    sp = tok.special
    end = sp["<|assistant_end|>"]
    call = [sp["<tool_call>"], *tok.encode(format_tool_call("calculator", {"expression": "6 * 7"})),
            sp["</tool_call>"]]

    def script(prompt):  # a reply whose length the prompt says: "long" 40 tokens, "call" a calculator call
        text = tok.decode(prompt)
        if "call" in text:
            return call + tok.encode(" So 42.") + [end]
        return tok.encode(" x" * (40 if "long" in text else 2)) + [end]

    small_cfg.vocab_size, small_cfg.seq_len = tok.vocab_size, 256
    scripted = Scripted(script, tok.vocab_size)
    eng = Engine(GPT(small_cfg), tok, torch.device("cpu"), decoder=scripted)
    ask = lambda q: tok.render_for_completion([{"role": "user", "content": q}])  # noqa: E731
    prompts = [ask("long one")] + [ask(f"short {i}") for i in range(8)] + [ask("call it")]
    alone = [eng.complete(p, max_tokens=200, temperature=0)[0] for p in prompts]
    scripted.steps = 0
    for i in range(0, len(prompts), 2):  # static batches of two: each waits for its longer reply
        eng.complete(prompts[i:i + 2], max_tokens=200, temperature=0)
    static, scripted.steps = scripted.steps, 0
    many = eng.complete_many(prompts, batch_size=2, max_tokens=200, temperature=0)
    assert many == alone
    assert eng.render(many[-1]).startswith("[tool call: ") and eng.render(many[-1]).endswith("[tool output: 42]  So 42.")
    # two rows always busy: at most half of the other replies' steps beside the longest one's (list scheduling)
    longest, total = max(len(o) + 1 for o in many), sum(len(o) + 1 for o in many)
    assert scripted.steps <= longest + (total - longest) // 2 + 1 < static
    assert eng.complete_many(prompts[:2], batch_size=2, max_tokens=5, temperature=0) == [alone[0][:5], alone[1][:5]]
    assert len(alone[0]) > 5
    assert eng.complete_many([], max_tokens=5) == []


def test_complete_many_decodes_other_rows_while_a_tool_runs(tok, small_cfg):
    """A row whose tool is running sits out; the other rows decode meanwhile (a sandboxed python call takes
    ~90 ms on these machines, and eval's batches used to wait for each). The tool here returns only once the
    other rows have taken more steps than its own reply has tokens."""
    import time

    sp = tok.special
    end = sp["<|assistant_end|>"]
    call = [sp["<tool_call>"], *tok.encode(format_tool_call("calculator", {"expression": "6 * 7"})),
            sp["</tool_call>"]]
    filler = (tok.encode(" x") * 200)[:len(call) + 40]  # the other replies: still going when the call closes
    script = lambda prompt: (call + tok.encode(" So 42.") if "call" in tok.decode(prompt)  # noqa: E731
                             else filler) + [end]
    small_cfg.vocab_size, small_cfg.seq_len = tok.vocab_size, 256
    scripted = Scripted(script, tok.vocab_size)

    def slow_calculator(args: dict) -> str:
        start = scripted.steps
        deadline = time.monotonic() + 5
        while scripted.steps < start + 20 and time.monotonic() < deadline:
            time.sleep(0.001)
        return "42" if scripted.steps >= start + 20 else "the others waited"

    eng = Engine(GPT(small_cfg), tok, torch.device("cpu"), tools={"calculator": slow_calculator}, decoder=scripted)
    ask = lambda q: tok.render_for_completion([{"role": "user", "content": q}])  # noqa: E731
    outs = eng.complete_many([ask("call it"), ask("no tools"), ask("none here")], batch_size=3, max_tokens=200,
                             temperature=0)
    assert eng.render(outs[0]).endswith("[tool output: 42]  So 42.")
    assert outs[1] == outs[2] == filler


def test_empty_lookup_searches_the_users_question(tok, small_cfg):
    sp = tok.special
    script = [sp["<tool_call>"], *tok.encode(format_tool_call("lookup", {})), sp["</tool_call>"],
              sp["<|assistant_end|>"]]
    small_cfg.vocab_size, small_cfg.seq_len = tok.vocab_size, 128
    seen = []
    eng = Engine(GPT(small_cfg), tok, torch.device("cpu"),
                 tools={"lookup": search_tool(lambda q: seen.append(q) or "found")},
                 decoder=Scripted(script, tok.vocab_size))
    prompt = tok.render_for_completion([{"role": "user", "content": "where does Mira live?"},
                                        {"role": "assistant", "content": "in Tarsk"},
                                        {"role": "user", "content": "and who sells glimmerfern?"}])
    out = eng.complete(prompt, max_tokens=60, temperature=0)[0]
    assert seen == ["and who sells glimmerfern?"]
    assert eng.to_parts(out)[1] == {"type": "tool_output", "text": "found"}


def test_calls_closed_on_the_same_step_run_side_by_side(tok, small_cfg):
    """A batch whose rows all call a tool at once runs the calls together (a python call is a ~50 ms process):
    four calls meet at a barrier, which four calls made one after another would never pass. Each row still
    gets its own result."""
    import threading

    sp = tok.special
    barrier = threading.Barrier(4, timeout=5)

    def meet(arguments):
        barrier.wait()  # BrokenBarrierError, i.e. an error as the call's output, unless all four are running
        return "met " + arguments["code"]

    call = tok.encode(format_tool_call("python", {"code": "1"}))
    script = [sp["<tool_call>"], *call, sp["</tool_call>"], *tok.encode("ok"), sp["<|assistant_end|>"]]
    small_cfg.vocab_size, small_cfg.seq_len = tok.vocab_size, 256
    eng = Engine(GPT(small_cfg), tok, torch.device("cpu"), tools={"python": meet},
                 decoder=Scripted(script, tok.vocab_size))
    prompt = tok.render_for_completion([{"role": "user", "content": "go"}])
    outs = eng.complete([prompt] * 4, max_tokens=100, temperature=0)
    assert [eng.to_parts(o)[1]["text"] for o in outs] == ["met 1"] * 4


def test_chat_shows_a_tool_call_and_its_response_on_their_own_line(tok, small_cfg):
    import io

    from exocortex.apps.chat import stream_reply

    sp = tok.special
    script = [*tok.encode("Let me see."), sp["<tool_call>"], *tok.encode(format_tool_call("calculator", {"expression": "6 * 7"})),
              sp["</tool_call>"], *tok.encode("It is 42."), sp["<|assistant_end|>"]]
    small_cfg.vocab_size, small_cfg.seq_len = tok.vocab_size, 256
    eng = Engine(GPT(small_cfg), tok, torch.device("cpu"), decoder=Scripted(script, tok.vocab_size))
    out = io.StringIO()
    tokens = stream_reply(eng, [{"role": "user", "content": "6*7?"}], out=out, max_tokens=200, temperature=0)
    call = '{"name": "calculator", "arguments": {"expression": "6 * 7"}}'
    assert out.getvalue() == f"Let me see.\n  [tool call: {call}] -> 42\nIt is 42.\n"
    assert eng.to_parts(tokens)[1:3] == [{"type": "tool_call", "text": call}, {"type": "tool_output", "text": "42"}]
