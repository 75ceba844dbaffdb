"""Spelling and letter counting: the classic tokenization weakness (a token hides its letters).

The reference answer spells the word letter by letter and numbers each occurrence of the target letter as
it goes (`s-t-r(1)-a-w-b-e-r(2)-r(3)-y`), so counting becomes copying plus incrementing, which a small model
can learn; the final answer follows `####`.
"""
from __future__ import annotations

import random
import re

from exocortex.tasks.base import Task, grade_hash_answer, split_of

COMMON = """apple banana strawberry mississippi committee balloon bookkeeper coffee letter little pepper
success address bottle cherry dinner engineer grammar happiness illness jelly kettle ladder mirror needle
occurrence parallel question raccoon scissors tomorrow umbrella village window yellow zipper tennis puzzle
giraffe hippopotamus assessment accommodate broccoli cinnamon dilemma embarrass fulfill guarantee harass
independent jewellery knowledge liaison millennium necessary occasion possession receive separate threshold
vacuum weird acquaintance beginning calendar definitely existence foreign government humorous immediately""".split()

SPELL_Q = ["Spell the word '{w}'.", "How do you spell {w}?", "Can you spell '{w}' letter by letter?",
           "Spell {w} for me, please."]
COUNT_Q = ["How many times does the letter '{l}' appear in '{w}'?", "How many {l}'s are in the word {w}?",
           "Count the letter {l} in '{w}'.", "In the word '{w}', how many times do you see '{l}'?"]


def word_list(world=None) -> list[str]:
    words = set(COMMON)
    if world is not None:  # the world's invented words are rare tokens: good spelling practice
        for e in world.entities:
            for w in e.name.lower().split():
                if w != "the":
                    words.add(w)
    return sorted(w for w in words if re.fullmatch(r"[a-z]{3,12}", w))


class Spelling(Task):
    name = "spelling"

    def __init__(self, world=None):
        self.words = word_list(world)

    def example(self, rng: random.Random, split: str) -> dict:
        while True:
            w = rng.choice(self.words)
            count = rng.random() < 0.6
            letter = rng.choice(w) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
            key = f"{w}|{letter}" if count else w
            if split_of("spell|" + key) == split:
                break
        if not count:
            q = rng.choice(SPELL_Q).format(w=w)
            return {"task": self.name, "answer": w, "kind": "spell",
                    "messages": [{"role": "user", "content": q},
                                 {"role": "assistant", "content": f"{'-'.join(w)} #### {w}"}]}
        n, shown = 0, []
        for ch in w:
            if ch == letter:
                n += 1
                shown.append(f"{ch}({n})")
            else:
                shown.append(ch)
        q = rng.choice(COUNT_Q).format(w=w, l=letter)
        a = f"{'-'.join(shown)}. The letter '{letter}' appears {n} time{'s' if n != 1 else ''}. #### {n}"
        return {"task": self.name, "answer": str(n), "kind": "count",
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    def grade(self, answer_text: str, example: dict) -> bool:
        if example.get("kind") == "spell":
            tail = answer_text.rsplit("####", 1)[-1] if "####" in answer_text else answer_text
            letters = re.sub(r"[^a-z]", "", tail.lower()) if "####" in answer_text else \
                re.sub(r"[^a-z]", "", answer_text.lower())
            return letters == example["answer"]
        return grade_hash_answer(answer_text, example["answer"])
