"""Constrained decoding (exocortex/infer/constrain.py): a random tiny model's output always parses and validates,
tool-call constraints give parseable calls, the engine's hooks (generate, Batcher), and response_format on a live
server through the `openai` client (including `.parse` with a pydantic model)."""
import json
import re
import sys
import threading

import pytest
import torch

pytest.importorskip("llguidance")

from exocortex.config import ModelConfig  # noqa: E402
from exocortex.infer.constrain import (BannedTokens, Constraint, ConstraintError,  # noqa: E402
                                       ConstraintUnavailable, json_object_constraint, json_schema_constraint,
                                       tool_call_constraint)
from exocortex.infer.decode import Decoder  # noqa: E402
from exocortex.infer.engine import Batcher, Engine, Request  # noqa: E402
from exocortex.model import GPT  # noqa: E402
from scripted import Scripted  # noqa: E402

from exocortex.infer.constrain import CALL_START as CALL_MARKER  # noqa: E402

try:
    import jsonschema
except ImportError:  # the test extra has it; without it, the hand check below covers these schemas
    jsonschema = None

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["town", "age", "married", "tags", "home"],
          "properties": {"town": {"enum": ["Tarsk", "Hiswick", "Mora"]},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "married": {"type": "boolean"},
                         "nick": {"type": ["string", "null"], "maxLength": 6},
                         "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 4}},
                         "home": {"type": "object", "additionalProperties": False, "required": ["x"],
                                  "properties": {"x": {"type": "number", "minimum": -5, "maximum": 5}}}}}
CALC = {"type": "function", "function": {"name": "calculator", "description": "arithmetic", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string", "maxLength": 8}},
    "required": ["expression"], "additionalProperties": False}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Tarsk", "Mora"]}, "days": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}


def check_schema(value, schema) -> None:
    if jsonschema is not None:
        jsonschema.validate(value, schema)
        return
    # by hand, for SCHEMA's shape only
    assert set(value) <= set(schema["properties"]) and all(k in value for k in schema["required"])
    assert value["town"] in ("Tarsk", "Hiswick", "Mora") and 0 <= value["age"] <= 120
    assert isinstance(value["married"], bool) and len(value["tags"]) <= 2 and -5 <= value["home"]["x"] <= 5


class Biased:
    """A decoder factory around the real Decoder that adds `bias` to every logit row: a model that likes closing
    quotes and brackets, so unbounded JSON (json_object) ends within the test's budget. The constraint alone
    decides what is valid; the bias only shortens the walk."""

    def __init__(self, model, bias: torch.Tensor):
        self.model, self.bias = model, bias

    def __call__(self, batch_size, max_len):
        dec = Decoder(self.model, batch_size, max_len)
        prefill, step = dec.prefill, dec.step
        dec.prefill = lambda prompt, slots=None: prefill(prompt, slots) + self.bias
        dec.step = lambda tokens, advance=None: step(tokens, advance) + self.bias
        return dec


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(1234)
    cfg = ModelConfig(depth=2, width=64, head_dim=16, vocab_size=tok.vocab_size, seq_len=64, mlp_ratio=2.0)
    return GPT(cfg).eval()  # context: 256 tokens


@pytest.fixture(scope="module")
def engine(model, tok):
    return Engine(model, tok, torch.device("cpu"), tools={})


@pytest.fixture(scope="module")
def closing_engine(model, tok):
    bias = torch.zeros(tok.vocab_size)
    for t, r in tok.mergeable_ranks.items():
        if any(c in t for c in b'"}]'):
            bias[r] = 4.0
    return Engine(model, tok, torch.device("cpu"), tools={}, decoder=Biased(model, bias))


def prompt_of(tok, text="Mira lives in Tarsk"):
    return tok.render_for_completion([{"role": "user", "content": text}])


def finished(engine, prompt, **kw) -> list[list[int]]:
    """Completions that must have ended by themselves (<|assistant_end|> before max_tokens)."""
    outs = []
    for column, _ in engine.generate(prompt, **kw):
        if not outs:
            outs = [[] for _ in column]
            ended = [False] * len(column)
        for r, t in enumerate(column):
            if not ended[r]:
                ended[r] = t in engine.stop_ids
                if not ended[r]:
                    outs[r].append(t)
    assert all(ended), "a constrained reply ran out of tokens instead of completing"
    return outs


# ----------------------------------------------------------------------------- the constraints themselves

@pytest.mark.parametrize("temperature,top_p", [(0, None), (0.7, None), (1.0, 0.9), (1.5, None)])
def test_schema_output_always_validates(engine, tok, temperature, top_p):
    c = json_schema_constraint(tok, SCHEMA)
    outs = finished(engine, prompt_of(tok), num_samples=4, max_tokens=120, temperature=temperature, top_p=top_p,
                    seed=11, constraint=c)
    for out in outs:
        text = tok.decode(out)
        check_schema(json.loads(text), SCHEMA)
        # json.dumps's separators, no other blanks. Compared with strings and numbers masked: a sampled number
        # may hold more digits than a float keeps ("4.6354182078428340"), valid JSON that does not round-trip
        assert _layout(text) == _layout(json.dumps(json.loads(text), ensure_ascii=False))
    assert not c.done  # the caller's constraint is a template: every row advanced its own copy


def _layout(text: str) -> str:
    """JSON text with every string and number replaced by a placeholder: what is left is its punctuation and
    blanks."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    return re.sub(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", "0", text)


def test_json_object_output_always_parses(closing_engine, tok):
    c = json_object_constraint(tok)
    for seed in range(4):
        for out in finished(closing_engine, prompt_of(tok), num_samples=3, max_tokens=200, temperature=1.0,
                            seed=seed, constraint=c):
            assert isinstance(json.loads(tok.decode(out)), dict)


def test_unconstrained_rows_beside_a_constrained_one_are_untouched(engine, tok):
    prompt = prompt_of(tok)
    alone = engine.complete(prompt, max_tokens=120, temperature=0)[0]
    both = engine.complete([prompt, prompt], max_tokens=120, temperature=0,
                           constraint=[json_schema_constraint(tok, SCHEMA), None])
    assert both[1] == alone
    assert both[0] != alone
    check_schema(json.loads(tok.decode(both[0])), SCHEMA)


def split_call(engine, tokens: list[int]) -> list[dict]:
    """The calls at the start of a reply: each <tool_call> \\n JSON \\n </tool_call> parsed."""
    calls, i = [], 0
    while i < len(tokens) and tokens[i] == engine.call_start:
        j = tokens.index(engine.call_end, i)
        text = engine.tok.decode(tokens[i + 1:j])
        assert text.startswith("\n") and text.endswith("\n")
        calls.append(json.loads(text))
        i = j + 1
    return calls


@pytest.mark.parametrize("name,parallel", [(None, True), ("get_weather", False), ("calculator", True)])
def test_tool_call_constraint_gives_parseable_calls(engine, tok, name, parallel):
    c = tool_call_constraint(tok, [CALC, WEATHER], name, parallel=parallel)
    specs = {t["function"]["name"]: t["function"]["parameters"] for t in (CALC, WEATHER)}
    for seed in range(3):
        # no tools in the engine: a call is answered by forced output; stop at the first forced token
        tokens = []
        for column, forced in engine.generate(prompt_of(tok, "What is 347 * 29?"), max_tokens=120,
                                              temperature=1.0, seed=seed, constraint=c):
            if forced[0] or column[0] in engine.stop_ids:
                break
            tokens.append(column[0])
        assert tokens[0] == engine.call_start and tokens[-1] == engine.call_end
        calls = split_call(engine, tokens)
        assert calls and (parallel or len(calls) == 1)
        for call in calls:
            assert list(call) == ["name", "arguments"] and call["name"] in specs
            assert name is None or call["name"] == name
            if jsonschema is not None:
                jsonschema.validate(call["arguments"], specs[call["name"]])


def test_generate_frees_the_row_once_the_engine_answers_the_call(engine, tok):
    """The constraint covers the call; the tool's output is forced (never fed to it) and then the model goes on
    unconstrained, where the grammar (one call, then the end) would allow only <|assistant_end|>."""
    eng = Engine(engine.model, tok, torch.device("cpu"), tools={"calculator": lambda *a: "42"})
    c = tool_call_constraint(tok, [CALC], "calculator", parallel=False)
    steps = list(eng.generate(prompt_of(tok), max_tokens=200, temperature=1.0, seed=0, constraint=c))
    forced = [f[0] for _, f in steps]
    first = forced.index(True)
    assert steps[first][0][0] == eng.out_start
    after = [col[0] for col, f in steps[first:] if not f[0]]
    assert after and after[0] not in eng.stop_ids


def test_banned_tokens_never_come_out(tok):
    """tool_choice "none": a model that wants to open a call (a scripted one) cannot; with no constraint it does."""
    call_start = tok.special[CALL_MARKER]
    eng = Engine(GPT(ModelConfig(depth=1, width=32, head_dim=16, vocab_size=tok.vocab_size, seq_len=16)), tok,
                 torch.device("cpu"), tools={}, decoder=Scripted([call_start] * 5, tok.vocab_size))
    free = eng.complete(prompt_of(tok), max_tokens=5, temperature=0)[0]
    assert free[0] == call_start
    for temperature in (0, 1.0):
        out = eng.complete(prompt_of(tok), max_tokens=5, temperature=temperature, seed=0,
                           constraint=BannedTokens(tok, [call_start], "tool_choice none"))[0]
        assert call_start not in out


def test_tool_call_constraint_refuses_unknown_names_and_bad_specs(tok):
    with pytest.raises(ConstraintError, match="no tool named 'nope'"):
        tool_call_constraint(tok, [CALC], "nope")
    with pytest.raises(ConstraintError, match="not a function spec"):
        tool_call_constraint(tok, [{"type": "function"}])
    with pytest.raises(ConstraintError, match="cannot compile"):
        tool_call_constraint(tok, [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}])


def test_markers_are_special_tokens_to_the_grammar(tok):
    """Inside a JSON string, no special token may appear (it would end the reply or open a call), and the
    text "<|assistant_end|>" is only ever plain text."""
    c = json_schema_constraint(tok, {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]})
    for t in tok.encode('{"s": "'):
        assert c.allowed()[t]
        c.advance(t)
    allowed = c.allowed()
    assert not any(allowed[i] for i in tok.special.values())
    assert all(allowed[t] for t in tok.encode("<|assistant_end|>"))


def test_bad_schemas_are_refused_with_the_reason(tok):
    for schema, why in [({"type": "foo"}, "foo"), ({"not": {}}, "not"), ({"$ref": "#/nope"}, "nope"),
                        ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength")]:
        with pytest.raises(ConstraintError, match=why):
            json_schema_constraint(tok, schema)


def test_without_llguidance_a_clear_error_names_the_package(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance -> ImportError
    with pytest.raises(ConstraintUnavailable, match="'llguidance' package"):
        json_object_constraint(tok)


class DeadEnd(Constraint):
    """A constraint that allows nothing (a grammar at a dead end): the row must end with an error."""

    def __init__(self, tok):
        self.vocab_size, self.what, self.advanced = tok.vocab_size, "dead end", 0

    def fork(self):
        return self

    def allowed(self):
        return torch.zeros(self.vocab_size, dtype=torch.bool)

    def error(self):
        return ""


def test_a_constraint_that_allows_nothing_ends_the_row_with_an_error(engine, tok):
    with pytest.raises(ConstraintError, match="no token can continue the dead end"):
        list(engine.generate(prompt_of(tok), max_tokens=10, temperature=0, constraint=DeadEnd(tok)))
    batcher = Batcher(engine, max_rows=2)
    ends, done = {}, threading.Event()

    def on_end(name):
        def f(finish, steps, error):
            ends[name] = (finish, steps, error)
            if len(ends) == 2:
                done.set()
        return f
    try:
        batcher.submit(Request(prompt_of(tok), max_tokens=10, temperature=0, constraint=DeadEnd(tok),
                               on_end=on_end("dead")))
        batcher.submit(Request(prompt_of(tok), max_tokens=10, temperature=0, on_end=on_end("free")))
        assert done.wait(60)
    finally:
        batcher.close()
    finish, steps, error = ends["dead"]
    assert finish is None and steps == 0 and isinstance(error, ConstraintError)
    assert ends["free"][0] in ("stop", "length") and ends["free"][2] is None  # the batch went on


def test_batcher_rows_follow_their_own_constraints(engine, tok):
    """Greedy and sampled constrained rows in one batch with a free one; a tool-call row that the engine
    answers goes on unconstrained after the forced output."""
    eng = Engine(engine.model, tok, torch.device("cpu"), tools={"calculator": lambda *a: "42"})
    batcher = Batcher(eng, max_rows=4)
    got: dict = {}
    done = threading.Event()

    def request(name, **kw):
        tokens = got.setdefault(name, [])

        def on_token(token, forced):
            tokens.append((token, forced))
            return True

        def on_end(finish, steps, error):
            got[name + ":end"] = (finish, error)
            if sum(k.endswith(":end") for k in got) == 4:
                done.set()
        return Request(prompt_of(tok), on_token=on_token, on_end=on_end, **kw)
    try:
        for r in (request("greedy", max_tokens=120, temperature=0, constraint=json_schema_constraint(tok, SCHEMA)),
                  request("sampled", max_tokens=120, temperature=1.2, seed=3,
                          constraint=json_schema_constraint(tok, SCHEMA)),
                  request("free", max_tokens=20, temperature=0),
                  request("tool", max_tokens=200, temperature=1.0, seed=0,
                          constraint=tool_call_constraint(tok, [CALC], "calculator", parallel=False))):
            batcher.submit(r)
        assert done.wait(120)
    finally:
        batcher.close()
    for name in ("greedy", "sampled"):
        assert got[name + ":end"] == ("stop", None)
        check_schema(json.loads(tok.decode([t for t, _ in got[name]])), SCHEMA)
    assert [t for t, _ in got["free"]] == engine.complete(prompt_of(tok), max_tokens=20, temperature=0)[0][:20]
    tool = got["tool"]
    first_forced = next(i for i, (_, f) in enumerate(tool) if f)
    assert tool[first_forced][0] == eng.out_start
    calls = split_call(eng, [t for t, _ in tool[:first_forced]])
    assert len(calls) == 1 and calls[0]["name"] == "calculator"
    after = [t for t, f in tool[first_forced:] if not f]
    # free again: the grammar (one call, then the end) would allow only <|assistant_end|> here
    assert after and after[0] not in eng.stop_ids, (got["tool:end"], eng.tok.decode([t for t, _ in tool]))


# ----------------------------------------------------------------------------- response_format on the server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pydantic = pytest.importorskip("pydantic")


@pytest.fixture(scope="module")
def server(closing_engine):
    from exocortex.apps.serve import create_app
    from test_serve import Server

    s = Server(create_app(closing_engine, "tiny-test"))
    yield s
    s.stop()


MESSAGES = [{"role": "user", "content": "Describe Mira as JSON."}]


def test_openai_client_json_object_and_json_schema(server, tok):
    c = server.client()
    for seed in range(3):
        r = c.chat.completions.create(model="tiny-test", messages=MESSAGES, max_tokens=200, temperature=1.0,
                                      seed=seed, response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
        r = c.chat.completions.create(model="tiny-test", messages=MESSAGES, max_tokens=200, temperature=0.8,
                                      seed=seed, response_format=fmt)
        check_schema(json.loads(r.choices[0].message.content), SCHEMA)
    # streamed: the assembled text is the same valid JSON
    chunks = c.chat.completions.create(model="tiny-test", messages=MESSAGES, max_tokens=200, temperature=0,
                                       response_format=fmt, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    check_schema(json.loads(text), SCHEMA)
    # and on /v1/completions
    r = c.completions.create(model="tiny-test", prompt="Mira:", max_tokens=200, temperature=0,
                             extra_body={"response_format": fmt})
    check_schema(json.loads(r.choices[0].text), SCHEMA)


def test_openai_parse_with_a_pydantic_model(server):
    from typing import Literal

    class Person(pydantic.BaseModel):
        town: Literal["Tarsk", "Hiswick", "Mora"]
        age: int = pydantic.Field(ge=0, le=120)
        married: bool

    parse = getattr(server.client().chat.completions, "parse", None) or server.client().beta.chat.completions.parse
    for seed in range(3):
        r = parse(model="tiny-test", messages=MESSAGES, max_tokens=100, temperature=1.0, seed=seed,
                  response_format=Person)
        p = r.choices[0].message.parsed
        assert isinstance(p, Person) and 0 <= p.age <= 120


@pytest.mark.parametrize("fmt,why", [
    ({"type": "yaml"}, "Unsupported response_format type 'yaml'"),
    ("json", "must be an object"),
    ({"type": "json_schema"}, "needs a 'json_schema' object"),
    ({"type": "json_schema", "json_schema": {"name": "p"}}, "schema must be a JSON schema object"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "name must be"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "foo"}}}, "cannot compile"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"not": {}}}}, "Unimplemented"),
])
def test_unsupported_response_formats_are_400(server, fmt, why):
    for path, body in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "x"})):
        r = httpx.post(server.url + path, json={**body, "max_tokens": 5, "response_format": fmt})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "response_format" and why in err["message"]


def test_text_format_is_plain_and_missing_llguidance_is_a_400(server, monkeypatch):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": MESSAGES, "max_tokens": 5, "response_format": {"type": "text"}})
    assert r.status_code == 200
    monkeypatch.setitem(sys.modules, "llguidance", None)
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": MESSAGES, "max_tokens": 5, "response_format": {"type": "json_object"}})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "response_format" and "llguidance" in r.json()["error"]["message"]
