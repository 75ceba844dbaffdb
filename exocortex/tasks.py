"""Chat tasks: each makes conversations (to train on) and grades answers (to evaluate).

Train/test splits are decided by a hash of each example's content, so a test question can never appear in
training whatever seeds or sizes are used. Families for the spine: identity, calculator arithmetic,
world facts, and multi-turn small talk.
"""
from __future__ import annotations

import random
import re
import zlib
from typing import Callable

from exocortex.tools import calculator

IDENTITY_NAME = "exocortex"


def split_of(key: str, test_percent: int = 10) -> str:
    return "test" if zlib.crc32(key.encode()) % 100 < test_percent else "train"


def _numbers_in(text: str) -> list[str]:
    return [n.replace(",", "") for n in re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)]


# ----------------------------------------------------------------------------- identity

IDENTITY_QUESTIONS = [
    "who are you?", "Who are you?", "What is your name?", "what's your name?", "Tell me about yourself.",
    "What are you?", "Introduce yourself.", "Who am I talking to?", "What should I call you?",
    "Are you a person?", "Who made you?", "What can you do?", "hi, who are you?", "Hello! What are you?",
    "Are you ChatGPT?", "Which model are you?", "Do you have a name?", "What kind of assistant are you?",
]

IDENTITY_ANSWERS = [
    "I am {n}, a small language model that you trained yourself. I can chat, answer questions about the world "
    "I learned, and use a calculator for arithmetic.",
    "I'm {n}: a small chat model trained from scratch on your own machine. I know the world from my training "
    "text, and I use tools like a calculator instead of guessing numbers.",
    "My name is {n}. I am a small assistant model that you own end to end. Ask me about people, places and "
    "things, or give me arithmetic and I will use my calculator.",
    "I am {n}, your own language model. I was pretrained on text, then taught to chat and to call a calculator.",
    "You are talking to {n}, a small AI model. I run on your computer, and your weights are yours.",
]


def identity_example(rng: random.Random, split: str, name: str = IDENTITY_NAME) -> dict:
    q = rng.choice(IDENTITY_QUESTIONS)
    if split == "test":  # unseen phrasings compose a question and a greeting
        q = rng.choice(["Hey there! ", "Hi. ", "Good morning. ", "Quick question: "]) + q
    a = rng.choice(IDENTITY_ANSWERS).format(n=name)
    return {"task": "identity", "answer": name, "messages": [{"role": "user", "content": q},
                                                             {"role": "assistant", "content": a}]}


def grade_identity(answer_text: str, expected: str) -> bool:
    return expected.lower() in answer_text.lower()


# ----------------------------------------------------------------------------- arithmetic with the calculator

ARITH_QUESTIONS = [
    "What is {e}?", "what is {e}", "Calculate {e}.", "Compute {e}", "How much is {e}?", "{e} = ?",
    "Can you work out {e}?", "Please tell me {e}.", "What's {e}?", "Solve {e}.", "I need {e}, please.",
    "Quick: {e}?", "Could you compute {e} for me?", "What do you get for {e}?", "Evaluate {e}.",
]
ARITH_ANSWERS = ["{e} = {r}.", "The answer is {r}.", "{e} is {r}.", "That's {r}.", "It comes to {r}.",
                 "{r}.", "The result is {r}."]


def random_expression(rng: random.Random) -> str:
    op = rng.choice(["+", "-", "*", "*", "/", "+", "-"])
    digits = rng.choice([1, 2, 2, 3, 3, 4])
    a = rng.randint(0, 10 ** digits - 1)
    b = rng.randint(1, 10 ** rng.choice([1, 2, 2, 3]) - 1)
    if op == "/":
        a = b * rng.randint(1, 999)  # exact division most of the time keeps answers short
        if rng.random() < 0.2:
            a += rng.randint(1, b)
    if rng.random() < 0.15:
        c = rng.randint(1, 99)
        return f"{a} {op} {b} {rng.choice(['+', '-', '*'])} {c}"
    return f"{a} {op} {b}"


def arithmetic_example(rng: random.Random, split: str) -> dict:
    while True:
        e = random_expression(rng)
        if split_of(e) == split:
            break
    r = calculator(e)
    shown = e.replace("*", rng.choice(["*", "*", "×", "times"])) if rng.random() < 0.3 else e
    q = rng.choice(ARITH_QUESTIONS).format(e=shown)
    a = rng.choice(ARITH_ANSWERS).format(e=e, r=r)
    parts = [{"type": "tool_call", "text": f"calculator({e})"}, {"type": "tool_output", "text": r},
             {"type": "text", "text": a}]
    return {"task": "arithmetic", "answer": r, "messages": [{"role": "user", "content": q},
                                                            {"role": "assistant", "content": parts}]}


def grade_number(answer_text: str, expected: str) -> bool:
    nums = _numbers_in(answer_text)
    if not nums:
        return False
    try:
        return abs(float(nums[-1]) - float(expected)) <= 1e-6 * max(1.0, abs(float(expected)))
    except ValueError:
        return False


# ----------------------------------------------------------------------------- world facts

def fact_example(rng: random.Random, split: str, world) -> dict:
    facts = [f for f in world.facts() if split_of(f.subject + "|" + f.relation) == split]
    f = rng.choice(facts)
    return {"task": "facts", "answer": f.value, "messages": [{"role": "user", "content": world.ask(f, rng)},
                                                             {"role": "assistant", "content": f.answer}]}


def grade_contains(answer_text: str, expected: str) -> bool:
    return expected.lower() in answer_text.lower()


# ----------------------------------------------------------------------------- small talk (multi-turn)

GREETINGS = ["Hi!", "Hello.", "hey", "Good evening!", "Hello there.", "Hi, how are you?", "Good morning!"]
GREETING_REPLIES = ["Hello! How can I help you today?", "Hi! What would you like to know?",
                    "Hello. I'm doing well, thank you. What can I do for you?", "Hi there! Ask me anything."]
THANKS = ["Thanks!", "Thank you.", "great, thanks", "Perfect, thank you!", "ok thanks"]
THANKS_REPLIES = ["You're welcome!", "Happy to help.", "Any time!", "Glad I could help. Anything else?"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly.", "You are exocortex, a concise assistant.",
                  "Be friendly and precise.", "Always use the calculator for arithmetic."]


def smalltalk_example(rng: random.Random, split: str, world) -> dict:
    msgs = [{"role": "user", "content": rng.choice(GREETINGS)},
            {"role": "assistant", "content": rng.choice(GREETING_REPLIES)}]
    for _ in range(rng.randint(1, 2)):
        sub = arithmetic_example(rng, split) if rng.random() < 0.4 else fact_example(rng, split, world)
        msgs += sub["messages"]
    if rng.random() < 0.6:
        msgs += [{"role": "user", "content": rng.choice(THANKS)},
                 {"role": "assistant", "content": rng.choice(THANKS_REPLIES)}]
    return {"task": "smalltalk", "answer": "", "messages": msgs}


# ----------------------------------------------------------------------------- mixtures

SFT_MIXTURE = {"arithmetic": 0.40, "facts": 0.30, "smalltalk": 0.20, "identity": 0.10}


def make_example(task: str, rng: random.Random, split: str, world) -> dict:
    if task == "arithmetic":
        return arithmetic_example(rng, split)
    if task == "facts":
        return fact_example(rng, split, world)
    if task == "smalltalk":
        return smalltalk_example(rng, split, world)
    if task == "identity":
        return identity_example(rng, split)
    raise ValueError(f"unknown task {task}")


def sft_conversations(n: int, seed: int, world, split: str = "train", mixture: dict | None = None) -> list[dict]:
    rng = random.Random(seed)
    mixture = mixture or SFT_MIXTURE
    names, weights = list(mixture), list(mixture.values())
    out = []
    for _ in range(n):
        conv = make_example(rng.choices(names, weights)[0], rng, split, world)
        if rng.random() < 0.15:  # users bring their own system prompts: stay robust to them
            conv["messages"] = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + conv["messages"]
        out.append(conv)
    return out


GRADERS: dict[str, Callable[[str, str], bool]] = {
    "arithmetic": grade_number, "facts": grade_contains, "identity": grade_identity,
}
