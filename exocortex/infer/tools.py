"""Tools the model can call: a tool call is the text `name(arguments)` between
<|tool_call_start|> and <|tool_call_end|>; the engine runs it and inserts the result as tool output.

The calculator evaluates arithmetic by walking Python's AST over a whitelist of node types: no `eval`,
no names, no attribute access, bounded exponents and sizes, so any model output is safe to run.
"""
from __future__ import annotations

import ast
import math
import operator
import re
import warnings
from typing import Callable

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_ABS = 1e100


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


TOOLS: dict[str, Callable[[str], str]] = {"calculator": calculator, "python": _python}

_CALL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\((.*)\)\s*$", re.S)


def parse_tool_call(text: str) -> tuple[str, str]:
    m = _CALL.match(text)
    if not m:
        raise ToolError("tool call must look like name(arguments)")
    return m.group(1), m.group(2)


def run_tool_call(text: str, tools: dict[str, Callable[[str], str]] | None = None, context: str = "") -> str:
    """Run one tool call; never raises: errors come back as text the model can read.

    `lookup()` with no query searches for `context`, the user's last message: a small model can decide *when*
    to look something up without having to copy an unfamiliar name into the query (which it does badly)."""
    tools = TOOLS if tools is None else tools
    try:
        name, args = parse_tool_call(text)
        if name not in tools:
            raise ToolError(f"unknown tool '{name}'")
        if name == "lookup" and not args.strip() and context:
            args = context
        return tools[name](args)
    except ToolError as e:
        return f"error: {e}"
    except Exception as e:  # a tool bug must not kill generation
        return f"error: {type(e).__name__}"
