"""Slot grammars for generated prompts: the ways a question can be worded, drawn independently of each other.

A task's prompt is a *frame* from one of its phrasing families (the sentence shape: "add 3 and 4", "I had 12
eggs and used 5, how many now?") whose slots are filled by grammars shared by every family:

- numbers: digits, digits with thousands separators, or words ("seven", "twenty-one") — `say_number`
- politeness and framing: "please", "hey,", "quick question:", "thanks!" — `polite`
- surface noise: lower case, a dropped or swapped letter (a typo) — `noisy`

Because the slots are independent of the frame, a held-out family differs from the seen ones only in its
frame: its numbers, politeness and typos were all trained in other frames. That is what makes the held-out
families a test of generalisation rather than of unseen vocabulary.
"""
from __future__ import annotations

import random

from exocortex.data.world import number_words


def say_number(n: int, rng: random.Random, words_rate: float = 0.25) -> str:
    """A number as a person might write it: mostly digits, small ones often in words, big ones with commas."""
    if n < 0:
        return "-" + say_number(-n, rng, words_rate)
    if n <= 100 and rng.random() < words_rate:
        return number_words(n)
    if n >= 1000 and rng.random() < 0.3:
        return f"{n:,}"
    return str(n)


OPENERS = ("", "", "", "", "", "Please, ", "Hey, ", "Quick question: ", "Hi! ", "OK so ", "Help me out: ",
           "Sorry to bother you, ", "Hello. ", "One more: ")
CLOSERS = ("", "", "", "", "", " Thanks!", " Thank you.", " Please.", " Cheers.", " Thanks in advance.")


def polite(text: str, rng: random.Random) -> str:
    """An opener and a closer around the question (each often empty)."""
    opener = rng.choice(OPENERS)
    if opener.endswith((", ", ": ", "so ")) and text[:1].isupper() and not text[1:2].isupper() and text[:2] != "I ":
        text = text[0].lower() + text[1:]
    return opener + text + rng.choice(CLOSERS)


def typo(text: str, rng: random.Random) -> str:
    """One typing slip in a word of 4+ letters (never in a number): two letters swapped, or one dropped."""
    words = text.split(" ")
    options = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not options:
        return text
    i = rng.choice(options)
    w = words[i]
    j = rng.randrange(1, len(w) - 1)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:] if rng.random() < 0.5 else w[:j] + w[j + 1:]
    return " ".join(words)


def noisy(text: str, rng: random.Random, typo_rate: float = 0.1, lower_rate: float = 0.2) -> str:
    """Surface noise as people type: sometimes all lower case, sometimes a typo."""
    if rng.random() < lower_rate:
        text = text.lower()
    if rng.random() < typo_rate:
        text = typo(text, rng)
    return text


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]
