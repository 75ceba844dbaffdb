import json
import random
import string

import pytest

from exocortex.infer.tools import (BUILTIN_TOOLS, TOOLS, ToolError, calculator, format_tool_call, parse_tool_call,
                                   run_tool_call, search_tool)


def call(name, **arguments):
    return format_tool_call(name, arguments)


@pytest.mark.parametrize("expr,want", [("347 * 29", "10063"), ("10 / 4", "2.5"), ("2 ** 10", "1024"),
                                       ("(1 + 2) * -3", "-9"), ("7 // 2", "3"), ("1,000 + 1", "1001"),
                                       ("6 × 7", "42"), ("1 / 3", "0.333333")])
def test_calculator(expr, want):
    assert calculator(expr) == want
    assert run_tool_call(call("calculator", expression=expr)) == want


@pytest.mark.parametrize("bad", ["__import__('os').system('echo hi')", "open('x')", "1/0", "9**9**9", "a + 1",
                                 "", "(" * 300, "[1,2]", "'a' * 3", "lambda: 1"])
def test_calculator_rejects(bad):
    assert run_tool_call(call("calculator", expression=bad)).startswith("error:")


def test_the_call_is_hermes_json_between_newlines():
    text = format_tool_call("calculator", {"expression": "347 * 29"})
    assert text == '\n{"name": "calculator", "arguments": {"expression": "347 * 29"}}\n'
    assert format_tool_call("lookup", {"query": "Mira é"}) == '\n{"name": "lookup", "arguments": {"query": "Mira é"}}\n'
    assert parse_tool_call(text) == ("calculator", {"expression": "347 * 29"})


def test_parse_accepts_string_arguments_and_no_arguments():
    # OpenAI's API carries arguments as a JSON string; a call without arguments has none
    assert parse_tool_call('{"name": "calculator", "arguments": "{\\"expression\\": \\"1 + 2\\"}"}') == \
        ("calculator", {"expression": "1 + 2"})
    assert parse_tool_call('{"name": "lookup"}') == ("lookup", {})
    assert parse_tool_call('{"name": "lookup", "arguments": ""}') == ("lookup", {})


@pytest.mark.parametrize("text,why", [
    ("calculator(1 + 2)", "not valid JSON"), ('{"name": "calculator"', "not valid JSON"),
    ('["calculator", "1 + 2"]', "must be a JSON object"), ('{"arguments": {}}', 'needs "name"'),
    ('{"name": 3, "arguments": {}}', 'needs "name"'), ('{"name": "", "arguments": {}}', 'needs "name"'),
    ('{"name": "calculator", "arguments": ["1 + 2"]}', '"arguments" must be a JSON object'),
    ('{"name": "calculator", "arguments": "1 + 2"}', "not JSON"),
    ('{"name": "calculator", "arguments": "[1]"}', '"arguments" must be a JSON object'),
    ("[" * 100000, "not valid JSON"),
])
def test_parse_errors_say_why(text, why):
    with pytest.raises(ToolError, match=None) as e:
        parse_tool_call(text)
    assert why in str(e.value) and "\n" not in str(e.value)
    assert run_tool_call(text) == f"error: {e.value}"


def test_unknown_tools_and_wrong_arguments_are_readable():
    assert run_tool_call(call("rm", path="/")) == "error: unknown tool 'rm'"
    assert run_tool_call(call("calculator", expr="1 + 2")) == "error: calculator takes only 'expression', not 'expr'"
    assert run_tool_call(call("calculator")) == "error: calculator needs 'expression': a string"
    assert run_tool_call(call("calculator", expression=3)) == "error: calculator's 'expression' must be a string"


def test_lookup_without_a_query_searches_the_context():
    seen = []
    tools = {"lookup": search_tool(lambda q: seen.append(q) or "found")}
    for args in ({}, {"query": ""}, {"query": "  "}, {"query": None}):
        assert run_tool_call(format_tool_call("lookup", args), tools, context="who is Mira?") == "found"
    assert run_tool_call(call("lookup", query="Tarsk"), tools, context="who is Mira?") == "found"
    assert seen == ["who is Mira?"] * 4 + ["Tarsk"]


def test_builtin_specs_describe_the_builtin_tools():
    specs = {s["function"]["name"]: s for s in BUILTIN_TOOLS}
    assert set(specs) == set(TOOLS) | {"lookup"}
    for name, spec in specs.items():
        assert spec["type"] == "function" and spec["function"]["parameters"]["type"] == "object"
        (arg,) = spec["function"]["parameters"]["properties"]  # one string argument each
        assert len(spec["function"]["description"]) < 60  # the tiny model's context is 256 tokens
        if name in TOOLS:  # the implementation takes the argument the spec names
            assert spec["function"]["parameters"]["required"] == [arg]
            assert "takes only" not in run_tool_call(format_tool_call(name, {arg: "1"}))
    json.dumps(BUILTIN_TOOLS)


def test_tool_never_raises_on_random_input():
    rng = random.Random(0)
    alphabet = string.printable + "×÷^"
    pieces = ['{"name": ', '"calculator"', '"lookup"', '"arguments": ', '{"expression": ', '"1+2"', "}", "{", "[",
              "]", ", ", '"', "null", "3", "\\", '"query"']
    for _ in range(2000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert isinstance(run_tool_call(call("calculator", expression=s)), str)
        assert isinstance(run_tool_call(s), str)
        j = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert isinstance(run_tool_call(j, context="q"), str)
