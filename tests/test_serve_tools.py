"""Function calling in `exocortex serve`: client `tools`, `tool_choice`, `role: "tool"` answers, built-in tools,
through the official `openai` client (and its stream helpers) and LangChain's ChatOpenAI.bind_tools.

Two kinds of model: scripted decoders (tests/scripted.py) write a fixed reply chosen by the prompt, for the paths
where the model decides ("auto"); a tiny random model shows that tool_choice's constraint alone makes a call.
"""
import json

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from exocortex.apps.serve import create_app  # noqa: E402
from exocortex.config import ModelConfig  # noqa: E402
from exocortex.infer.engine import Engine  # noqa: E402
from exocortex.model import GPT  # noqa: E402
from scripted import Scripted  # noqa: E402
from test_serve import MODEL, Server, _error, streamed_parts  # noqa: E402

MULTIPLY = {"type": "function", "function": {
    "name": "multiply", "description": "Multiply two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
USER = [{"role": "user", "content": "What is 3 times 4?"}]


def call_json(name, arguments):
    return json.dumps({"name": name, "arguments": arguments})


def engine_for(tok, script):
    """An engine whose model writes `script` (a list of token ids, or a function of the prompt)."""
    cfg = ModelConfig(depth=1, width=16, head_dim=16, vocab_size=tok.vocab_size, seq_len=256, mlp_ratio=1.0)
    return Engine(GPT(cfg), tok, torch.device("cpu"), decoder=Scripted(script, tok.vocab_size))


def calls(tok, *jsons):
    sp = tok.special
    return [t for j in jsons for t in (sp["<tool_call>"], *tok.encode(f"\n{j}\n"), sp["</tool_call>"])]


class Conversation:
    """A scripted model that calls `multiply` (after a short text) and, once it has read a tool response,
    answers: the reply it writes depends on how the prompt ends, so a wrongly rendered tool answer shows."""

    def __init__(self, tok, call=None, answer="It is 12."):
        sp = tok.special
        self.end, self.response_end = sp["<|assistant_end|>"], sp["</tool_response>"]
        self.ask = tok.encode("Let me check.") + calls(tok, call or call_json("multiply", {"a": 3, "b": 4}))
        self.answer = tok.encode(answer)
        self.prompts = []

    def __call__(self, prompt):
        self.prompts.append(list(prompt))
        return (self.answer if prompt[-1] == self.response_end else self.ask) + [self.end]


@pytest.fixture(scope="module")
def chat(tok):
    script = Conversation(tok)
    server = Server(create_app(engine_for(tok, script), MODEL))
    yield server, script
    server.stop()


def test_auto_call_round_trip_with_the_openai_client(chat, tok):
    server, script = chat
    c = server.client()
    out = c.chat.completions.create(model=MODEL, messages=USER, tools=[MULTIPLY], temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    msg = choice.message
    assert msg.content == "Let me check."  # the text before the call; the call is not in it
    [call] = msg.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "multiply" and json.loads(call.function.arguments) == {"a": 3, "b": 4}
    assert msg.model_extra["parts"] == [{"type": "text", "text": "Let me check."}]  # client calls are not parts
    assert out.usage.completion_tokens == len(script.ask) + 1  # the end token too; no tool output forced
    # the client's tools are offered in the system turn
    assert script.prompts[-1] == tok.render_for_completion(USER, tools=[MULTIPLY])

    history = USER + [msg.model_dump(exclude_none=True, exclude={"parts"}),
                      {"role": "tool", "tool_call_id": call.id, "content": "12"}]
    final = c.chat.completions.create(model=MODEL, messages=history, tools=[MULTIPLY], temperature=0)
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content == "It is 12."
    assert final.choices[0].message.tool_calls is None
    # the tool's answer is read inside the assistant turn that asked for it (no new <|assistant_start|>)
    sent = USER + [{"role": "assistant", "content": "Let me check.",
                    "tool_calls": [{"type": "function",
                                    "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}]},
                   {"role": "tool", "content": "12"}]
    prompt = tok.render_for_completion(sent, tools=[MULTIPLY])
    assert script.prompts[-1] == prompt and final.usage.prompt_tokens == len(prompt)
    assert tok.decode(prompt).endswith("<tool_response>\n12\n</tool_response>")
    assert prompt.count(tok.special["<|assistant_start|>"]) == 1


def test_streamed_tool_call_deltas_assemble_in_the_openai_stream_helper(chat):
    server, _ = chat
    c = server.client()
    full = c.chat.completions.create(model=MODEL, messages=USER, tools=[MULTIPLY], temperature=0)
    with c.chat.completions.stream(model=MODEL, messages=USER, tools=[MULTIPLY], temperature=0) as stream:
        events = list(stream)
        streamed = stream.get_final_completion()
    msg, want = streamed.choices[0].message, full.choices[0].message
    assert streamed.choices[0].finish_reason == "tool_calls"
    assert msg.content == want.content
    assert [(t.function.name, t.function.arguments) for t in msg.tool_calls] == \
           [(t.function.name, t.function.arguments) for t in want.tool_calls]
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.name, e.index) for e in done] == [("multiply", 0)]

    # the raw chunks: OpenAI's delta shape, one call per delta, then finish_reason "tool_calls"
    chunks = list(c.chat.completions.create(model=MODEL, messages=USER, tools=[MULTIPLY], temperature=0, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls]
    [d] = deltas
    tc = d.tool_calls[0]
    assert (tc.index, tc.type, tc.function.name) == (0, "function", "multiply") and tc.id.startswith("call_")
    assert d.content is None
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Let me check."


def test_langchain_bind_tools_loop(chat, tok):
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    server, script = chat
    llm = lc.ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="x", temperature=0, max_retries=0)
    bound = llm.bind_tools([multiply])
    messages = [HumanMessage("What is 3 times 4?")]
    ai = bound.invoke(messages)
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [("multiply", {"a": 3, "b": 4})]
    assert ai.response_metadata["finish_reason"] == "tool_calls"
    messages.append(ai)
    for call in ai.tool_calls:  # the loop an agent runs: each call through the tool, its result back
        messages.append(ToolMessage(str(multiply.invoke(call["args"])), tool_call_id=call["id"]))
    final = bound.invoke(messages)
    assert final.content == "It is 12." and not final.tool_calls
    assert tok.decode(script.prompts[-1]).endswith("<tool_response>\n12\n</tool_response>")

    # streaming: LangChain assembles the tool_call chunks
    chunks = list(bound.stream([HumanMessage("What is 3 times 4?")]))
    merged = chunks[0]
    for ch in chunks[1:]:
        merged = merged + ch
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [("multiply", {"a": 3, "b": 4})]


def test_parallel_calls_and_parallel_tool_calls_false(tok):
    two = calls(tok, call_json("multiply", {"a": 3, "b": 4}), call_json("multiply", {"a": 5, "b": 6}))
    prompts = []
    eng = engine_for(tok, lambda prompt: prompts.append(prompt) or two + [tok.special["<|assistant_end|>"]])
    server = Server(create_app(eng, MODEL))
    try:
        c = server.client()
        out = c.chat.completions.create(model=MODEL, messages=USER, tools=[MULTIPLY], temperature=0)
        msg = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls" and msg.content is None
        assert [json.loads(t.function.arguments) for t in msg.tool_calls] == [{"a": 3, "b": 4}, {"a": 5, "b": 6}]
        assert len({t.id for t in msg.tool_calls}) == 2
        chunks = list(c.chat.completions.create(model=MODEL, messages=USER, tools=[MULTIPLY], temperature=0,
                                                stream=True))
        idx = [tc.index for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
        assert idx == [0, 1]
        # one call only: the reply ends at the first (the model's second call is never written)
        one = c.chat.completions.create(model=MODEL, messages=USER, tools=[MULTIPLY], temperature=0,
                                        parallel_tool_calls=False)
        assert len(one.choices[0].message.tool_calls) == 1 and one.choices[0].finish_reason == "tool_calls"
        assert one.usage.completion_tokens == len(calls(tok, call_json("multiply", {"a": 3, "b": 4})))
        # both answered (in any order: they are put back in the calls' order) continue the turn
        history = USER + [msg.model_dump(exclude_none=True, exclude={"parts"})]
        history += [{"role": "tool", "tool_call_id": msg.tool_calls[1].id, "content": "30"},
                    {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "12"}]
        c.chat.completions.create(model=MODEL, messages=history, tools=[MULTIPLY], temperature=0, max_tokens=1)
        assert prompts[-1] == tok.render_for_completion(history[:2] + [history[3], history[2]], tools=[MULTIPLY])
        assert tok.decode(prompts[-1]).endswith("<tool_response>\n12\n</tool_response><tool_response>\n30\n"
                                                "</tool_response>")
    finally:
        server.stop()


def test_after_a_client_call_only_another_call_or_the_end_may_follow(tok):
    sp = tok.special
    one = calls(tok, call_json("multiply", {"a": 3, "b": 4}))
    # a model that would go on talking after its call (as a random one may): the reply ends at the call
    server = Server(create_app(engine_for(tok, one + tok.encode("and more") + [sp["<|assistant_end|>"]]), MODEL))
    try:
        out = server.client().chat.completions.create(model=MODEL, messages=USER, tools=[MULTIPLY], temperature=0)
        assert out.choices[0].finish_reason == "tool_calls"
        assert out.choices[0].message.content is None and out.choices[0].message.model_extra["parts"] == []
        assert out.usage.completion_tokens == len(one) + 1  # the call, then <|assistant_end|> (the only way on)
    finally:
        server.stop()


def test_builtin_tools_run_unless_turned_off_or_shadowed(tok):
    sp = tok.special
    calc = call_json("calculator", {"expression": "347 * 29"})
    eng = engine_for(tok, calls(tok, calc) + tok.encode("Done.") + [sp["<|assistant_end|>"]])
    server = Server(create_app(eng, MODEL))
    try:
        c = server.client()
        ask = [{"role": "user", "content": "What is 347 * 29?"}]
        # no client tools: the engine runs the calculator, as before
        out = c.chat.completions.create(model=MODEL, messages=ask, temperature=0)
        assert out.choices[0].message.content == f"[tool call: {calc}] [tool output: 10063] Done."
        assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "stop"
        # with client tools that do not include it, the built-in still runs
        out = c.chat.completions.create(model=MODEL, messages=ask, tools=[MULTIPLY], temperature=0)
        assert "[tool output: 10063]" in out.choices[0].message.content and out.choices[0].finish_reason == "stop"
        # turned off: the model reads that there is no such tool
        out = c.chat.completions.create(model=MODEL, messages=ask, temperature=0, extra_body={"builtin_tools": False})
        assert out.choices[0].message.model_extra["parts"][1] == {"type": "tool_output",
                                                                  "text": "error: unknown tool 'calculator'"}
        # a client tool of the same name wins: the call comes back to the client, nothing runs here
        mine = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}
        out = c.chat.completions.create(model=MODEL, messages=ask, tools=[mine], temperature=0)
        assert out.choices[0].finish_reason == "tool_calls"
        assert out.choices[0].message.content is None
        assert out.choices[0].message.tool_calls[0].function.name == "calculator"
        assert out.choices[0].message.model_extra["parts"] == []
    finally:
        server.stop()


def test_builtin_call_then_client_call_and_a_call_after_the_clients(tok):
    sp = tok.special
    calc = call_json("calculator", {"expression": "3 * 4"})
    mult = call_json("multiply", {"a": 3, "b": 4})
    # built-in first (runs), text, the client's call (ends the reply), then a built-in the engine would run
    script = calls(tok, calc) + tok.encode("So:") + calls(tok, mult, calc) + tok.encode("x") + [sp["<|assistant_end|>"]]
    server = Server(create_app(engine_for(tok, script), MODEL))
    try:
        c = server.client()
        out = c.chat.completions.create(model=MODEL, messages=USER, tools=[MULTIPLY], temperature=0)
        msg = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls"
        assert msg.content == f"[tool call: {calc}] [tool output: 12] So:"
        assert [t.function.name for t in msg.tool_calls] == ["multiply"]  # the call after it is dropped, unrun
        assert msg.model_extra["parts"] == [{"type": "tool_call", "text": calc}, {"type": "tool_output", "text": "12"},
                                            {"type": "text", "text": "So:"}]
        chunks = list(c.chat.completions.create(model=MODEL, messages=USER, tools=[MULTIPLY], temperature=0,
                                                stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == msg.content
        assert streamed_parts(chunks) == msg.model_extra["parts"]
    finally:
        server.stop()


def test_tool_choice_none_bans_calls(tok):
    sp = tok.special
    eng = engine_for(tok, calls(tok, call_json("multiply", {"a": 3, "b": 4})) + [sp["<|assistant_end|>"]])
    server = Server(create_app(eng, MODEL))
    try:
        c = server.client()
        free = c.chat.completions.create(model=MODEL, messages=USER, tools=[MULTIPLY], temperature=0)
        assert free.choices[0].finish_reason == "tool_calls"  # the model would call
        for kw in (dict(tools=[MULTIPLY], tool_choice="none"), dict(tool_choice="none")):
            out = c.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=8, **kw)
            msg = out.choices[0].message
            assert msg.tool_calls is None and "[tool call" not in msg.content
            assert all(p["type"] == "text" for p in msg.model_extra["parts"])
            assert out.choices[0].finish_reason == "length"
    finally:
        server.stop()


# ----------------------------------------------------------------------------- a random model, constrained

TOOLS = [MULTIPLY, {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Tarsk", "Mira"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["city", "days"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def random_server(tok):
    pytest.importorskip("llguidance")
    torch.manual_seed(1234)
    cfg = ModelConfig(depth=2, width=64, head_dim=16, vocab_size=tok.vocab_size, seq_len=256, mlp_ratio=2.0)
    eng = Engine(GPT(cfg), tok, torch.device("cpu"))
    server = Server(create_app(eng, MODEL))
    yield server, eng
    server.stop()


def test_forced_calls_from_a_random_model_and_the_round_trip(random_server, tok):
    server, eng = random_server
    c = server.client()
    small = {"type": "function", "function": {"name": "get_weather", "parameters": TOOLS[1]["function"]["parameters"]}}
    for seed in range(3):
        named = c.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, temperature=1.0, seed=seed,
                                          max_tokens=150,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
        [call] = named.choices[0].message.tool_calls
        assert named.choices[0].finish_reason == "tool_calls"
        args = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and args["city"] in ("Tarsk", "Mira") and 1 <= args["days"] <= 9
    required = c.chat.completions.create(model=MODEL, messages=USER, tools=[small], temperature=0,
                                         tool_choice="required", parallel_tool_calls=False, max_tokens=150)
    assert required.choices[0].finish_reason == "tool_calls"
    assert [t.function.name for t in required.choices[0].message.tool_calls] == ["get_weather"]

    # the client answers; the random model goes on in the same turn (free again: the constraint covered the call)
    msg = named.choices[0].message
    history = USER + [msg.model_dump(exclude_none=True, exclude={"parts"}),
                      {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    final = c.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                      temperature=0, max_tokens=10)
    assert final.choices[0].message.tool_calls is None
    assert final.usage.prompt_tokens == len(tok.render_for_completion(
        USER + [{"role": "assistant", "content": msg.content, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": args}}]},
            {"role": "tool", "content": "sunny"}], tools=TOOLS))

    # streamed, assembled by the openai helper
    with c.chat.completions.stream(model=MODEL, messages=USER, tools=TOOLS, temperature=0, max_tokens=150,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}}) as stream:
        done = stream.get_final_completion()
    [call] = done.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city", "days"}


# ----------------------------------------------------------------------------- 400s

def test_bad_tools_tool_choice_and_tool_history_are_400s(chat):
    server, _ = chat
    url = server.url + "/v1/chat/completions"
    fn = MULTIPLY["function"]
    call = {"id": "call_1", "type": "function", "function": {"name": "multiply", "arguments": '{"a": 3, "b": 4}'}}
    asked = USER + [{"role": "assistant", "content": None, "tool_calls": [call]}]
    cases = [
        ({"tools": {"multiply": fn}}, "tools"),
        ({"tools": [fn]}, "tools[0].type"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": "two words"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
        ({"tools": [MULTIPLY, MULTIPLY]}, "tools[1].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
         "tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
         "tools[0].function.parameters"),
        ({"tools": [MULTIPLY], "tool_choice": "always"}, "tool_choice"),
        ({"tools": [MULTIPLY], "tool_choice": {"type": "function", "function": {"name": "divide"}}}, "tool_choice"),
        ({"tools": [MULTIPLY], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [MULTIPLY], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"builtin_tools": 0}, "builtin_tools"),
        ({"functions": [fn]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"tools": [MULTIPLY], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"messages": asked + [{"role": "tool", "content": "12"}]}, "messages[2].tool_call_id"),
        ({"messages": asked + [{"role": "tool", "tool_call_id": "call_9", "content": "12"}]},
         "messages[2].tool_call_id"),
        ({"messages": asked + [{"role": "tool", "tool_call_id": "call_1"}]}, "messages[2].content"),
        ({"messages": asked + [{"role": "user", "content": "and?"}]}, "messages[2]"),
        ({"messages": USER + [{"role": "tool", "tool_call_id": "call_1", "content": "12"}]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": [call]}]}, "messages[0].tool_calls"),
        ({"messages": USER + [{"role": "assistant", "tool_calls": [{**call, "function": {"name": "multiply",
                                                                                       "arguments": "3, 4"}}]},
                              {"role": "tool", "tool_call_id": "call_1", "content": "12"}]},
         "messages[1].tool_calls[0].function.arguments"),
        ({"messages": USER + [{"role": "assistant", "tool_calls": [call, call]},
                              {"role": "tool", "tool_call_id": "call_1", "content": "12"}]}, "messages[1].tool_calls"),
        ({"messages": USER + [{"role": "assistant", "tool_calls": [{**call, "type": "code"}]},
                              {"role": "tool", "tool_call_id": "call_1", "content": "12"}]},
         "messages[1].tool_calls[0].type"),
    ]
    with httpx.Client() as h:
        for body, param in cases:
            _error(h.post(url, json={"messages": USER, **body}), 400, param=param)
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=MODEL, messages=USER, tools=[MULTIPLY], tool_choice="sometimes")
    assert e.value.body["param"] == "tool_choice"


def test_tool_choice_needs_llguidance_or_says_so(chat, monkeypatch):
    import exocortex.infer.constrain as constrain

    def missing():
        raise constrain.ConstraintUnavailable()
    monkeypatch.setattr(constrain, "_llguidance", missing)
    server, _ = chat
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": USER, "tools": [MULTIPLY], "tool_choice": "required"})
    err = _error(r, 400, param="tool_choice", code="unsupported_value")
    assert "llguidance" in err["message"]
    # "none" needs no grammar engine
    ok = httpx.post(server.url + "/v1/chat/completions",
                    json={"messages": USER, "tools": [MULTIPLY], "tool_choice": "none", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


# ----------------------------------------------------------------------------- with scoring: n, logprobs

def test_n_choices_each_make_their_required_call(random_server, tok):
    """tool_choice's constraint reaches every choice (each row advances its own copy of it)."""
    server, _ = random_server
    c = server.client()
    kw = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, n=2,
              temperature=1.0, seed=7, max_tokens=150)
    out = c.chat.completions.create(**kw)
    assert [ch.index for ch in out.choices] == [0, 1]
    for ch in out.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        [call] = ch.message.tool_calls
        assert call.function.name in ("multiply", "get_weather")
        assert isinstance(json.loads(call.function.arguments), dict)
    assert out.choices[0].message.tool_calls[0].id != out.choices[1].message.tool_calls[0].id

    # streamed: each choice's call comes as its own tool_calls delta, then its finish_reason
    chunks = list(c.chat.completions.create(stream=True, **kw))
    calls_by, finish_by = {0: [], 1: []}, {}
    for ch in chunks:
        for choice in ch.choices:
            calls_by[choice.index] += [t.function.name for t in choice.delta.tool_calls or []]
            if choice.finish_reason:
                finish_by[choice.index] = choice.finish_reason
    assert finish_by == {0: "tool_calls", 1: "tool_calls"}
    assert calls_by == {i: [ch.message.tool_calls[0].function.name] for i, ch in enumerate(out.choices)}


def test_logprobs_of_a_client_call_are_the_raw_models(random_server, tok):
    """A client call is listed token by token with the model's own logprobs, not the constrained
    distribution's (the grammar forces <tool_call> here, yet its logprob is what the model gives it); streamed,
    the call's entries ride on its tool_calls delta."""
    from test_serve_scoring import ATOL, forward_logprobs, ids_of
    server, eng = random_server
    c = server.client()
    kw = dict(model=MODEL, messages=USER, tools=TOOLS, temperature=0, max_tokens=150, logprobs=True, top_logprobs=2,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    out = c.chat.completions.create(**kw)
    choice = out.choices[0]
    [call] = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    content = choice.logprobs.content
    ids = ids_of(tok, [e.bytes for e in content])
    sp = tok.special
    assert ids[0] == sp["<tool_call>"] and ids[-1] == sp["</tool_call>"] and len(ids) == out.usage.completion_tokens
    assert json.loads(tok.decode(ids[1:-1])) == {"name": "get_weather",
                                                  "arguments": json.loads(call.function.arguments)}
    prompt = tok.render_for_completion(USER, tools=TOOLS)
    ref = forward_logprobs(eng, prompt + ids)[0][len(prompt) - 1:]
    assert max(abs(e.logprob - r) for e, r in zip(content, ref)) < ATOL
    assert content[0].logprob < -1  # the mask made <tool_call> certain; the model itself did not
    assert all(len(e.top_logprobs) == 2 for e in content)

    chunks = list(c.chat.completions.create(stream=True, **kw))
    [with_call] = [ch for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls]
    assert [e.logprob for e in with_call.choices[0].logprobs.content] == [e.logprob for e in content]
    assert with_call.choices[0].delta.tool_calls[0].function.arguments == call.function.arguments


# ----------------------------------------------------------------------------- with response_format: n

@pytest.fixture(scope="module")
def closing_server(tok):
    """A random model that likes closing quotes and brackets, so JSON objects end within a small budget (the
    constraint alone decides what is valid; the bias only shortens the walk)."""
    pytest.importorskip("llguidance")
    torch.manual_seed(1234)
    cfg = ModelConfig(depth=2, width=64, head_dim=16, vocab_size=tok.vocab_size, seq_len=256, mlp_ratio=2.0)
    eng = Engine(GPT(cfg).eval(), tok, torch.device("cpu"))
    bias = torch.zeros(tok.vocab_size)
    for t, r in tok.mergeable_ranks.items():
        if any(ch in t for ch in b'"}]'):
            bias[r] = 4.0
    make = eng.make_decoder

    def biased(batch_size, max_len):
        dec = make(batch_size, max_len)
        prefill, step = dec.prefill, dec.step
        dec.prefill = lambda prompt, slots=None: prefill(prompt, slots) + bias
        dec.step = lambda tokens, advance=None: step(tokens, advance) + bias
        return dec
    eng.make_decoder = biased
    server = Server(create_app(eng, MODEL))
    yield server
    server.stop()


def test_json_object_reaches_every_choice(closing_server):
    c = closing_server.client()
    kw = dict(model=MODEL, messages=USER, n=2, temperature=1.0, seed=3, max_tokens=200,
              response_format={"type": "json_object"})
    out = c.chat.completions.create(**kw)
    texts = [ch.message.content for ch in out.choices]
    assert [ch.finish_reason for ch in out.choices] == ["stop", "stop"]
    assert all(isinstance(json.loads(t), dict) for t in texts) and texts[0] != texts[1]

    streamed = {0: "", 1: ""}
    for ch in c.chat.completions.create(stream=True, **kw):
        for choice in ch.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [streamed[0], streamed[1]] == texts  # the same seeds, the same choices

    comp = c.completions.create(model=MODEL, prompt=["Mira lives in", "Tarsk is"], n=2, temperature=1.0, seed=3,
                                max_tokens=200, extra_body={"response_format": {"type": "json_object"}})
    assert len(comp.choices) == 4
    for ch in comp.choices:
        assert ch.finish_reason == "stop" and isinstance(json.loads(ch.text), dict)
