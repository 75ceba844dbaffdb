"""The task framework: a Task makes conversations to train on and grades answers to evaluate and reward.

An example is a dict: {"task": name, "messages": [...], "answer": str, ...}; the last message is the reference
assistant turn. Train/test membership is decided by a hash of each example's content (`split_of`), so a test
question can never appear in training whatever seeds or sizes are used.

A generated task may also name its *phrasing families* (`Task.families`, see exocortex/tasks/phrasing.py): the
ways its questions are worded. Some whole families are held out (`Task.heldout_families`): split "heldout" asks
the test split's items in those wordings only, and "train" and "test" never use them. So "test" measures new
items in familiar wordings and "heldout" new items in wordings never trained on; the gap between the two is how
much of a skill is a template (exocortex/evals.py reports both). Examples of such tasks carry "family". Graders read the assistant's own words
(tool calls and outputs excluded) and never raise: any model output gets True or False. An example may carry
"tools", the function specs a client offers (rendered into the system turn); a task that grades the calls
themselves overrides grade_reply, which sees the whole reply.
"""
from __future__ import annotations

import random
import re
import zlib

ITEM_SPLITS = ("train", "test")  # a dataset's rows, a generated task's items (content)
SPLITS = ITEM_SPLITS + ("heldout",)  # + the test items asked in held-out phrasing families
LETTERS = "ABCDEFGHIJ"


def split_of(key: str, test_percent: int = 10) -> str:
    return "test" if zlib.crc32(key.encode()) % 100 < test_percent else "train"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


class Task:
    """A family of examples. Generated tasks draw examples from an rng; dataset tasks (benchmarks) hold rows."""

    name = ""
    chance = 0.0        # accuracy of a random guess (centred accuracy subtracts it)
    uses_tools = False  # does the reference answer call a tool
    families: tuple[str, ...] = ()          # the task's phrasing families (named ways of asking), if it has them
    heldout_families: tuple[str, ...] = ()  # the ones only split "heldout" uses: never in train or test
    client_tools: dict = {}  # name -> tool: the functions its examples offer, as their client runs them (eval, RL)
    needs_python = False  # do its reference replies call the sandboxed python tool (eval says when it is off)

    def example(self, rng: random.Random, split: str) -> dict:
        raise NotImplementedError

    def grade(self, answer_text: str, example: dict) -> bool:
        raise NotImplementedError

    def safe_grade(self, answer_text: str, example: dict) -> bool:
        """grade() for untrusted model output: a grader bug is a wrong answer, never a crash."""
        try:
            return bool(self.grade(answer_text, example))
        except Exception:  # noqa: BLE001
            return False

    def reward(self, answer_text: str, example: dict) -> float:
        return float(self.safe_grade(answer_text, example))

    def grade_reply(self, parts: list[dict], example: dict) -> bool:
        """A whole reply as parts (text / tool_call / tool_output, as Engine.to_parts gives them), never
        raising. Most tasks grade only the assistant's own words; a task about calling tools reads the calls."""
        return self.safe_grade(own_words(parts), example)

    def reward_reply(self, parts: list[dict], example: dict) -> float:
        """RL's reward for a whole reply: reward() on the own words (a task that grades calls overrides it)."""
        return self.reward(own_words(parts), example)

    def examples(self, n: int, seed: int, split: str) -> list[dict]:
        rng = random.Random(f"{seed}-{self.name}-{split}")
        return [self.example(rng, check_split(split)) for _ in range(n)]

    @property
    def seen_families(self) -> tuple[str, ...]:
        return tuple(f for f in self.families if f not in self.heldout_families)

    def family(self, rng: random.Random, split: str) -> str:
        """The phrasing family an example of `split` is asked in: a held-out one for "heldout", else a seen one."""
        return rng.choice(self.heldout_families if check_split(split) == "heldout" else self.seen_families)


def item_split(split: str) -> str:
    """Which items (content) a split asks about: "heldout" asks the test items, in held-out wordings."""
    return "test" if check_split(split) == "heldout" else split


class DatasetTask(Task):
    """A task over fixed rows (a benchmark file): examples are drawn from, or iterated over, its rows."""

    def __init__(self, rows: dict[str, list[dict]]):
        self.rows = {s: list(r) for s, r in rows.items()}

    def example(self, rng: random.Random, split: str) -> dict:
        rows = self.rows.get(split) or []
        if not rows:
            raise ValueError(f"task {self.name} has no {split!r} rows")
        return rng.choice(rows)

    def examples(self, n: int, seed: int, split: str) -> list[dict]:
        rows = self.rows.get(check_split(split)) or []
        if n >= len(rows):
            return list(rows)
        return random.Random(f"{seed}-{self.name}").sample(rows, n)  # a fixed subset, the same for every model


# ----------------------------------------------------------------------------- shared answer parsing

def prompt_ids(tok, example: dict) -> list[int]:
    """The prompt an example asks the model to answer: its conversation before the reference reply, with the
    functions it offers (if any) in the system turn."""
    return tok.render_for_completion(example["messages"][:-1], tools=example.get("tools"))


def own_words(parts: list[dict]) -> str:
    """The assistant's own text in a reply's parts: no tool calls, no tool outputs (Engine.answer_text)."""
    return "".join(p["text"] for p in parts if p.get("type") == "text").strip()


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def numbers_in(text: str) -> list[str]:
    return [n.replace(",", "") for n in _NUMBER.findall(text)]


def same_number(a: str, b: str) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return abs(x - y) <= 1e-6 * max(1.0, abs(y))


def grade_final_number(answer_text: str, expected: str) -> bool:
    """The last number in the reply is the answer."""
    nums = numbers_in(answer_text)
    return bool(nums) and same_number(nums[-1], expected)


def hash_answer(text: str) -> str | None:
    """GSM8K's convention: the final answer follows '####'. None when the reply has no such line."""
    if "####" not in text:
        return None
    nums = numbers_in(text.rsplit("####", 1)[1])
    return nums[0] if nums else None


def grade_hash_answer(answer_text: str, expected: str) -> bool:
    got = hash_answer(answer_text)
    return got is not None and same_number(got, expected)


def grade_contains(answer_text: str, expected: str) -> bool:
    return bool(expected) and expected.lower() in answer_text.lower()


# ----------------------------------------------------------------------------- multiple choice

def render_choices(question: str, choices: list[str]) -> str:
    lines = [question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer with the letter of the correct choice."


_MARKED = re.compile(r"\(([A-J])\)|\b([A-J])[.)](?!\w)|answer is:? \(?([A-J])\b")
_LETTER = re.compile(r"\b([A-J])\b(?! [a-z])")  # "A cat": an article, not a choice


def choice_letter(answer_text: str, n_choices: int) -> str | None:
    """The chosen letter: 'B', 'B.', '(B) ...', 'The answer is B'; an article ('A cat') does not count."""
    valid = LETTERS[:n_choices]
    for pattern in (_MARKED, _LETTER):
        for m in pattern.finditer(answer_text):
            letter = next(g for g in m.groups() if g)
            if letter in valid:
                return letter
    return None


def mc_example(task: str, question: str, choices: list[str], gold: int, **extra) -> dict:
    letter = LETTERS[gold]
    return {"task": task, "answer": letter, "choices": list(choices), "gold": gold, **extra,
            "messages": [{"role": "user", "content": render_choices(question, choices)},
                         {"role": "assistant", "content": letter}]}


class MultipleChoiceTask(Task):
    def grade(self, answer_text: str, example: dict) -> bool:
        return choice_letter(answer_text, len(example["choices"])) == example["answer"]
