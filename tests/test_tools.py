import random
import string

import pytest

from exocortex.infer.tools import calculator, parse_tool_call, run_tool_call


@pytest.mark.parametrize("expr,want", [("347 * 29", "10063"), ("10 / 4", "2.5"), ("2 ** 10", "1024"),
                                       ("(1 + 2) * -3", "-9"), ("7 // 2", "3"), ("1,000 + 1", "1001"),
                                       ("6 × 7", "42"), ("1 / 3", "0.333333")])
def test_calculator(expr, want):
    assert calculator(expr) == want


@pytest.mark.parametrize("bad", ["__import__('os').system('echo hi')", "open('x')", "1/0", "9**9**9", "a + 1",
                                 "", "(" * 300, "[1,2]", "'a' * 3", "lambda: 1"])
def test_calculator_rejects(bad):
    assert run_tool_call(f"calculator({bad})").startswith("error:")


def test_parse_and_unknown_tool():
    assert parse_tool_call("calculator(1 + 2)") == ("calculator", "1 + 2")
    assert run_tool_call("calculator(1 + 2)") == "3"
    assert run_tool_call("rm(-rf)").startswith("error: unknown tool")
    assert run_tool_call("no parens").startswith("error:")


def test_tool_never_raises_on_random_input():
    rng = random.Random(0)
    alphabet = string.printable + "×÷^"
    for _ in range(2000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert isinstance(run_tool_call(f"calculator({s})"), str)
        assert isinstance(run_tool_call(s), str)
