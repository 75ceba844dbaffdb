"""Tools the model can call, in the Hermes/Qwen format llama.cpp, vLLM, Ollama and transformers parse:

    <tool_call>\n{"name": "calculator", "arguments": {"expression": "347 * 29"}}\n</tool_call>

The engine parses the JSON between the markers, runs the tool, and inserts <tool_response>\nRESULT\n</tool_response>.
A tool is a function of the call's `arguments` object returning text. Built-in: calculator {"expression"},
python {"code"} (the sandbox), lookup {"query"} (exocortex/infer/lookup.py; an empty query searches the user's
last message). BUILTIN_TOOLS are their OpenAI-format specs, for the tools block a system turn may carry.

The calculator evaluates arithmetic by walking Python's AST over a whitelist of node types: no `eval`,
no names, no attribute access, bounded exponents and sizes, so any model output is safe to run.
"""
from __future__ import annotations

import ast
import json
import math
import operator
import re
import warnings
from typing import Any, Callable

from exocortex.tokenizer import tool_call_json

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_ABS = 1e100


NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a function's name, as OpenAI allows it
MAX_TOOLS = 128  # OpenAI's limit


class ToolSpecError(ValueError):
    """A bad function spec; `param` names where (e.g. tools[1].function.name)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check_tool_specs(tools: Any) -> list[dict]:
    """OpenAI function specs ({"type": "function", "function": {"name", "description", "parameters"}}), each
    checked the way OpenAI checks them (the server's `tools`, a training file's); the list as given, [] for
    None. Raises ToolSpecError."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolSpecError("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects.", "tools")
    if len(tools) > MAX_TOOLS:
        raise ToolSpecError(f"at most {MAX_TOOLS} tools are allowed; got {len(tools)}.", "tools")
    seen = set()
    for i, spec in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(spec, dict) or spec.get("type") != "function":
            raise ToolSpecError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}} (only function "
                                "tools are supported).", f"{where}.type")
        fn = spec.get("function")
        if not isinstance(fn, dict):
            raise ToolSpecError(f"{where}.function must be an object with a name.", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ToolSpecError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'; got {name!r}.",
                                f"{where}.function.name")
        if name in seen:
            raise ToolSpecError(f"tool {name!r} is defined twice.", f"{where}.function.name")
        seen.add(name)
        if "description" in fn and not isinstance(fn["description"], str):
            raise ToolSpecError(f"{where}.function.description must be a string.", f"{where}.function.description")
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type") != "object"):
            raise ToolSpecError(f"{where}.function.parameters must be a JSON schema of type 'object'.",
                                f"{where}.function.parameters")
        if fn.get("strict") not in (None, True, False):
            raise ToolSpecError(f"{where}.function.strict must be a boolean.", f"{where}.function.strict")
    return tools


class ToolError(Exception):
    pass


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(b) > 100 or abs(a) > 1e6):
            raise ToolError("exponent too large")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise ToolError("division by zero")
        r = _BINOPS[type(node.op)](a, b)
        if isinstance(r, complex) or abs(r) > MAX_ABS:
            raise ToolError("result out of range")
        return r
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    raise ToolError("only numbers, + - * / // % ** and parentheses are allowed")


def format_number(x: float | int) -> str:
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            raise ToolError("result is not a finite number")
        if x == int(x) and abs(x) < 1e15:
            return str(int(x))
        return f"{x:.6g}" if abs(x) >= 1e15 or abs(x) < 1e-4 else f"{round(x, 6):.6f}".rstrip("0").rstrip(".")
    return str(x)


def calculator(expression: str) -> str:
    expr = expression.strip().replace("×", "*").replace("÷", "/").replace("^", "**").replace(",", "")
    if not expr or len(expr) > 200:
        raise ToolError("expression is empty or too long")
    try:
        with warnings.catch_warnings():  # odd literals warn while parsing; they are rejected below anyway
            warnings.simplefilter("ignore")
            tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError):
        raise ToolError("not a valid arithmetic expression") from None
    return format_number(_eval(tree))


def _python(code: str) -> str:
    from exocortex.infer.sandbox import python_tool  # subprocess sandbox: rlimits, no network, throwaway dir

    return python_tool(code)


Tool = Callable[[dict], str]  # the call's arguments object -> the text the model reads


def string_arg(arguments: dict, key: str, tool: str, default: str | None = None) -> str:
    """One string argument of a call, with the readable error a small model (or a client) can act on."""
    unknown = sorted(set(arguments) - {key})
    if unknown:
        raise ToolError(f"{tool} takes only {key!r}, not {', '.join(map(repr, unknown))}")
    value = arguments.get(key, default)
    if not isinstance(value, str):
        raise ToolError(f"{tool} needs {key!r}: a string" if value is None else f"{tool}'s {key!r} must be a string")
    return value


def calculator_tool(arguments: dict) -> str:
    return calculator(string_arg(arguments, "expression", "calculator"))


def sandboxed_python(arguments: dict) -> str:
    return _python(string_arg(arguments, "code", "python"))


def search_tool(search: Callable[[str], str]) -> Tool:
    """`lookup` over a search function (query -> passage); run_tool_call fills in an empty query."""
    return lambda arguments: search(string_arg(arguments, "query", "lookup", default=""))


TOOLS: dict[str, Tool] = {"calculator": calculator_tool, "python": sandboxed_python}


def _spec(name: str, description: str, arg: str, arg_description: str, required: bool = True) -> dict:
    params: dict[str, Any] = {"type": "object", "properties": {arg: {"type": "string", "description": arg_description}}}
    if required:
        params["required"] = [arg]
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


# Short on purpose: a tools block goes into the system turn, and the tiny model's whole context is 256 tokens.
BUILTIN_TOOLS: list[dict] = [
    _spec("calculator", "Exact arithmetic.", "expression", "e.g. 347 * 29"),
    _spec("python", "Run Python; returns what it prints.", "code", "a program"),
    _spec("lookup", "Search the documents.", "query", "empty: the question", required=False),
]


def format_tool_call(name: str, arguments: dict) -> str:
    """The text between <tool_call> and </tool_call>, newlines included (what the model writes)."""
    return "\n" + tool_call_json(name, arguments) + "\n"


def parse_tool_call(text: str) -> tuple[str, dict]:
    """The text between the markers -> (name, arguments). `arguments` may also come as a JSON string (as
    OpenAI's API carries it) and may be left out (no arguments). Anything else is a ToolError saying why."""
    try:
        call = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise ToolError(f"the tool call is not valid JSON ({why})") from None
    if not isinstance(call, dict):
        raise ToolError('a tool call must be a JSON object {"name": ..., "arguments": {...}}')
    name, arguments = call.get("name"), call.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise ToolError('the tool call needs "name": the tool\'s name as a string')
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            raise ToolError('"arguments" is a string but not JSON') from None
    if not isinstance(arguments, dict):
        raise ToolError('"arguments" must be a JSON object')
    return name, arguments


# tools whose empty argument means "the user's last message": their one string argument
ASK_BY_CONTEXT = {"lookup": "query", "recall": "query", "forget": "query", "remember": "note"}


def run_tool_call(text: str, tools: dict[str, Tool] | None = None, context: str = "") -> str:
    """Run one tool call (the text between the markers); never raises: errors come back as text the model can read.

    `lookup` (and `recall`, `forget`; `remember` its note) with no (or an empty) query searches for `context`, the user's last message: a small model can
    decide *when* to look something up without having to copy an unfamiliar name into the query (which it does
    badly)."""
    tools = TOOLS if tools is None else tools
    try:
        name, arguments = parse_tool_call(text)
        if name not in tools:
            raise ToolError(f"unknown tool '{name}'")
        key = ASK_BY_CONTEXT.get(name)
        query = arguments.get(key, "") if key else ""
        if key and context and (query is None or (isinstance(query, str) and not query.strip())):
            arguments = {**arguments, key: context}
        return tools[name](arguments)
    except ToolError as e:
        return f"error: {e}"
    except Exception as e:  # a tool bug must not kill generation
        return f"error: {type(e).__name__}"
