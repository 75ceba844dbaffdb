"""Numbers in words and in digits, both ways: "Write thirty-seven in digits." -> "37.", "How do you say 405?" ->
"four hundred and five.", and the number a sentence mentions ("I had eighty-seven eggs": 87).

Questions say their numbers in words a quarter of the time (exocortex/tasks/phrasing.py: say_number), and the tiny
model misread them: "eighty-seven" called as 77, "thirty-seven" as 30. That cost arithmetic about 10 points on
seen and on held-out wordings alike (docs/tiny.md, session 20). The pretraining corpus pairs a number with its
words in a few statements ("78 in words is seventy-eight."); this task asks for the pairing in conversation. The
split key is the number, so a test number is never trained on in this task, in either direction. Held-out phrasing
families ask the same three things in frames of their own.

Not in the default mixtures: at 3% of midtrain and sft the tiny model answered 10% of its test questions and held-out
arithmetic did not move (docs/tiny.md, session 22). In eval (`eval.chat_tasks`) it measures number words alone.
"""
from __future__ import annotations

import random
import re

from exocortex.data.world import number_words
from exocortex.tasks.base import Task, grade_final_number, item_split, split_of
from exocortex.tasks.phrasing import noisy, polite

# (to digits, to words, in a sentence); {w}: the number in words, {d}: in digits, {s}: a sentence with the number
NUMBER_FAMILIES = {
    "write_as": (("Write {w} in digits.", "Write the number {w} using digits.", "{w} in figures, please.",
                  "Write {w} as a number."),
                 ("Write {d} in words.", "Spell out the number {d}.", "Write the number {d} out in full."),
                 ("Which number does this mention: \"{s}\"", "Write the number in \"{s}\" in digits.")),
    "how_say": (("How do you write {w} with digits?", "How is {w} written in digits?", "{w}: what's that in digits?"),
                ("How do you say {d}?", "How is {d} said in words?", "{d}: how do you say it?"),
                ("\"{s}\" How many is that, in digits?", "\"{s}\" What number is that?")),
    "convert": (("Convert {w} to digits.", "Turn {w} into digits.", "Change {w} into a number."),
                ("Convert {d} to words.", "Turn {d} into words.", "Change {d} into words."),
                ("Convert the number in \"{s}\" to digits.", "Pull the number out of \"{s}\"")),
    # held out (never trained on)
    "meaning": (("What does {w} mean as a numeral?", "Give the numeral for {w}."),
                ("Read {d} aloud, in words.", "Say {d} the long way, with words."),
                ("Someone wrote \"{s}\" Give that amount as a numeral.",)),
}
HELDOUT_FAMILIES = ("meaning",)
SENTENCES = ("I had {w} eggs.", "We bought {w} apples.", "The shop sold {w} books today.",
             "There are {w} coins in the jar.",
             "She ran {w} metres.", "The class collected {w} stamps.", "He is {w} years old.", "It costs {w} dollars.")
TO_DIGITS_ANSWERS = ("{d}.", "{w} is {d}.", "In digits: {d}.", "That is {d}.")
TO_WORDS_ANSWERS = ("{w}.", "In words: {w}.", "{d} is {w}.", "It is said {w}.")

# the words number_words writes, so that the grader reads exactly what the task (and the corpus) says
_UNITS = {number_words(i): i for i in range(20)}
_TENS = {number_words(i): i for i in range(20, 100, 10)}


def words_value(words: list[str]) -> int | None:
    """The number that `words` say, from 0 to 999 ("four hundred and five", "a hundred five", "thirty seven"), or
    None when they are not exactly one number."""
    total = 0
    if len(words) >= 2 and words[1] == "hundred":
        if words[0] not in ("a", "one") and not 1 <= _UNITS.get(words[0], 0) <= 9:
            return None
        total, words = 100 * (1 if words[0] == "a" else _UNITS[words[0]]), words[2:]
        if words and words[0] == "and":
            words = words[1:]
            if not words:
                return None
        if not words:
            return total
        if words[0] == "zero":
            return None
    if len(words) == 1 and words[0] in _UNITS:
        return total + _UNITS[words[0]]
    if words and words[0] in _TENS:
        if len(words) == 1:
            return total + _TENS[words[0]]
        if len(words) == 2 and 1 <= _UNITS.get(words[1], 0) <= 9:
            return total + _TENS[words[0]] + _UNITS[words[1]]
    return None


def last_number_in_words(text: str) -> int | None:
    """The value of the last run of number words in `text` that says one number ("Four hundred and five." -> 405);
    punctuation ends a run, so "Seventy. Seven." is 7, not 77."""
    tokens = re.findall(r"[a-z]+|[^a-z\s]", text.lower().replace("-", " "))
    runs, run = [], []
    for i, t in enumerate(tokens + ["."]):
        number_word = t in _UNITS or t in _TENS or t in ("hundred", "and") or (
            t == "a" and i + 1 < len(tokens) and tokens[i + 1] == "hundred")
        if number_word:
            run.append(t)
            continue
        while run and run[-1] == "and":
            run.pop()
        while run and run[0] == "and":
            run.pop(0)
        if run:
            runs.append(run)
        run = []
    values = [v for v in map(words_value, runs) if v is not None]
    return values[-1] if values else None


class NumberWords(Task):
    """A number from 0 to 999 turned from words into digits, from digits into words, or read out of a sentence."""

    name = "numbers"
    families = tuple(NUMBER_FAMILIES)
    heldout_families = HELDOUT_FAMILIES

    def example(self, rng: random.Random, split: str) -> dict:
        family = self.family(rng, split)
        items = item_split(split)
        while split_of(f"number {(n := rng.randint(0, 999))}") != items:
            pass
        w, d = number_words(n), str(n)
        direction = rng.choice(("digits", "words", "sentence"))
        frames = NUMBER_FAMILIES[family][("digits", "words", "sentence").index(direction)]
        frame = rng.choice(frames)
        sentence = rng.choice(SENTENCES).format(w=w)
        q = noisy(polite(frame, rng), rng).format(w=w, d=d, s=sentence)  # a typo never in the number
        q = q[:1].upper() + q[1:]
        reply = rng.choice(TO_WORDS_ANSWERS if direction == "words" else TO_DIGITS_ANSWERS).format(w=w, d=d)
        return {"task": self.name, "answer": d, "direction": direction, "family": family, "messages": [
            {"role": "user", "content": q}, {"role": "assistant", "content": reply[:1].upper() + reply[1:]}]}

    def grade(self, answer_text: str, example: dict) -> bool:
        if example["direction"] == "words":
            return last_number_in_words(answer_text) == int(example["answer"])
        return grade_final_number(answer_text, example["answer"])
