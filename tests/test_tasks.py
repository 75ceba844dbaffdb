import random
import string

import pytest

from exocortex.data.world import World
from exocortex.tasks import GRADERS, grade_number, make_example, sft_conversations, split_of
from exocortex.tools import calculator


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


def test_train_and_test_never_overlap(world):
    convs = sft_conversations(3000, 1, world, "train")
    train_exprs = {m["content"][0]["text"] for c in convs for m in c["messages"]
                   if m["role"] == "assistant" and isinstance(m["content"], list)}
    train_answers = {m["content"] for c in convs for m in c["messages"]
                     if m["role"] == "assistant" and isinstance(m["content"], str)}
    rng = random.Random(5)
    for _ in range(300):
        ex = make_example("arithmetic", rng, "test", world)
        call = ex["messages"][-1]["content"][0]["text"]
        assert split_of(call[len("calculator("):-1]) == "test" and call not in train_exprs
        fact = make_example("facts", rng, "test", world)
        assert fact["messages"][-1]["content"] not in train_answers  # a held-out fact is never trained on


def test_arithmetic_examples_are_correct_and_use_the_tool(world):
    rng = random.Random(0)
    for _ in range(200):
        ex = make_example("arithmetic", rng, "train", world)
        call, output, text = ex["messages"][-1]["content"]
        assert call["type"] == "tool_call" and output["type"] == "tool_output" and text["type"] == "text"
        expr = call["text"][len("calculator("):-1]
        assert calculator(expr) == output["text"] == ex["answer"]
        assert grade_number(text["text"], ex["answer"])


def test_sft_conversations_render_with_masks(tok, world):
    convs = sft_conversations(200, 3, world)
    assert {c["task"] for c in convs} == {"arithmetic", "facts", "smalltalk", "identity"}
    assert any(c["messages"][0]["role"] == "system" for c in convs)
    for c in convs:
        ids, mask = tok.render_conversation(c)
        assert len(ids) == len(mask) and any(mask)


def test_graders_never_crash_on_random_output():
    rng = random.Random(0)
    alphabet = string.printable + "−×÷½²é日🙂"
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        for name, grade in GRADERS.items():
            for expected in ("10063", "-2.5", "Tarsk", "exocortex", ""):
                assert grade(s, expected) in (True, False)


def test_grade_number_uses_the_final_number():
    assert grade_number("347 * 29 = 10063.", "10063")
    assert not grade_number("10063 is not it, it is 5", "10063")
    assert grade_number("The answer is 1,000.", "1000")
    assert grade_number("It comes to -2.5.", "-2.5")
    assert not grade_number("no numbers here", "3")
