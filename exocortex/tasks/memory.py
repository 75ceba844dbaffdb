"""Memory: keeping notes about the user across sessions with the remember / recall / forget tools
(exocortex/infer/notes.py).

Each conversation is one moment of a longer acquaintance:
- remember: the user tells something about themselves and asks that it be kept ("Please remember that my
  dog is called Pip."); the reply calls `remember` with no note (the engine saves the user's message itself:
  the model decides *when* to keep something, it does not have to rewrite it) and confirms.
- recall: a later session asks about it ("What's my dog called?"); the reply calls `recall` with no query (the
  question is the query) and answers from the notes it gets back, which hold the told message among others.
- unknown: recall finds nothing about it: the reply says it does not know yet and asks to be told.
- forget: the user asks that something be forgotten; the reply calls `forget` and confirms.
The tool outputs here are what the store returns (notes.NoteStore.tools), with made-up note ids.

Items: a (relation, value) pair. Train and test split by the value, so a test question asks about a value no
training conversation used. evals.memory_scores measures the real thing: a note written in one session and
read back in another through a real store, and never by another user.
"""
from __future__ import annotations

import random

from exocortex.tasks.base import Task, grade_contains, item_split, split_of
from exocortex.tokenizer import tool_call_json

_SYL = "ka lo ri ma te su ni bo ra fe li do ve mi to ha ze nu pa ro".split()


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))).capitalize()


def _town(rng: random.Random) -> str:
    return _name(rng) + rng.choice(("ford", "ton", "wick", "mere", "by", "stead", "vale"))


_COLOURS = ("green blue red yellow purple orange teal silver black white pink brown grey violet amber crimson "
            "navy olive maroon cyan").split()
_JOBS = ("nurse baker teacher plumber pilot chemist farmer writer carpenter dentist tailor librarian gardener "
         "welder painter cook driver engineer judge sailor potter miner singer").split()
_FOODS = ("pasta curry sushi soup pancakes tacos risotto dumplings porridge salad noodles stew pie omelette "
          "couscous ramen falafel lasagne paella goulash").split()
_MONTHS = "January February March April May June July August September October November December".split()

# (what it is, how it is told, how it is asked, how it is answered, a value drawn at random). Most values are
# made up on the spot (names, towns, numbers): a value is seen once, if ever, so the reply has to copy it from
# the note it recalled; with a few fixed values per relation the model learned the values, not the copying
# (memory_recalled 0% on test values in the first speedrun with this task).
RELATIONS = [
    ("dog", "my dog is called {v}", ("What is my dog called?", "What's my dog's name?", "Do you remember my dog's name?"),
     "Your dog is called {v}.", _name),
    ("sister", "my sister's name is {v}", ("What is my sister's name?", "What's my sister called?", "Who is my sister?"),
     "Your sister's name is {v}.", _name),
    ("colour", "my favourite colour is {v}", ("What is my favourite colour?", "Which colour do I like best?",
                                               "Do you remember my favourite colour?"),
     "Your favourite colour is {v}.", lambda rng: rng.choice(_COLOURS)),
    ("town", "I live in {v}", ("Where do I live?", "Which town do I live in?", "Do you remember where I live?"),
     "You live in {v}.", _town),
    ("job", "I work as a {v}", ("What is my job?", "What do I do for a living?", "What do I work as?"),
     "You work as a {v}.", lambda rng: rng.choice(_JOBS)),
    ("birthday", "my birthday is on {v}", ("When is my birthday?", "What day is my birthday?",
                                          "Do you remember my birthday?"),
     "Your birthday is on {v}.", lambda rng: f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}"),
    ("locker", "my locker number is {v}", ("What is my locker number?", "Which locker is mine?",
                                          "Do you remember my locker number?"),
     "Your locker number is {v}.", lambda rng: str(rng.randint(10, 999))),
    ("food", "my favourite food is {v}", ("What is my favourite food?", "What food do I like best?",
                                         "Do you remember my favourite food?"),
     "Your favourite food is {v}.", lambda rng: rng.choice(_FOODS)),
    ("friend", "my best friend is {v}", ("Who is my best friend?", "What's my best friend's name?",
                                        "Do you remember my best friend?"),
     "Your best friend is {v}.", _name),
]
TELL = ("Please remember that {s}.", "Remember: {s}.", "Can you remember that {s}?", "Note that {s}.",
        "Keep in mind that {s}.", "For future reference, {s}.", "Don't forget: {s}.", "Please make a note: {s}.")
SAVED = ("Noted. I'll remember that.", "Got it, I've saved that.", "I'll remember it.", "Saved. I won't forget.")
UNKNOWN = ("I don't know that yet. Tell me and I'll remember it.", "You haven't told me that yet. If you tell me, "
           "I'll keep a note.", "I have no note about that. Tell me and I'll remember it.")
FORGET = ("Please forget {what}.", "Forget what I told you about {what}.", "Delete your note about {what}.")
FORGOTTEN = ("Done, I've forgotten it.", "Forgotten.", "I've deleted that note.")
FORGET_WHAT = {"dog": "my dog", "sister": "my sister", "colour": "my favourite colour", "town": "where I live",
               "job": "my job", "birthday": "my birthday", "locker": "my locker", "food": "my favourite food",
               "friend": "my best friend"}


def _call(name: str) -> dict:
    return {"type": "tool_call", "text": tool_call_json(name, {})}


class Memory(Task):
    name = "memory"
    uses_tools = True

    def _item(self, rng: random.Random, split: str) -> tuple[tuple, str]:
        while True:
            rel = rng.choice(RELATIONS)
            value = rel[4](rng)
            if split_of(f"memory|{rel[0]}|{value}") == item_split(split):
                return rel, value

    def told(self, rel: tuple, value: str, rng: random.Random) -> str:
        s = rel[1].format(v=value)
        return rng.choice(TELL).format(s=s)

    def _other_notes(self, rng: random.Random, rel: tuple, split: str) -> list[str]:
        others = [r for r in RELATIONS if r is not rel]
        return [self.told(r, r[4](rng), rng) for r in rng.sample(others, rng.randint(0, 2))]

    def example(self, rng: random.Random, split: str) -> dict:
        rel, value = self._item(rng, split)
        kind = rng.choices(["remember", "recall", "unknown", "forget"], weights=[4, 4, 1, 1])[0]
        nid = rng.randint(1, 60)
        if kind == "remember":
            q = self.told(rel, value, rng)
            parts = [_call("remember"), {"type": "tool_output", "text": f"saved as note {nid}"},
                     {"type": "text", "text": rng.choice(SAVED)}]
            return {"task": self.name, "kind": kind, "answer": value,
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": parts}]}
        if kind == "forget":
            q = rng.choice(FORGET).format(what=FORGET_WHAT[rel[0]])
            parts = [_call("forget"), {"type": "tool_output", "text": f"forgot note {nid}: {self.told(rel, value, rng)}"},
                     {"type": "text", "text": rng.choice(FORGOTTEN)}]
            return {"task": self.name, "kind": kind, "answer": "",
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": parts}]}
        q = rng.choice(rel[2])
        notes = self._other_notes(rng, rel, split)
        if kind == "recall":
            notes.insert(rng.randint(0, len(notes)), self.told(rel, value, rng))
        output = "\n".join(f"note {nid + i}: {n}" for i, n in enumerate(notes)) or "no notes"
        answer = rel[3].format(v=value) if kind == "recall" else rng.choice(UNKNOWN)
        parts = [_call("recall"), {"type": "tool_output", "text": output}, {"type": "text", "text": answer}]
        return {"task": self.name, "kind": kind, "answer": value if kind == "recall" else "",
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": parts}]}

    def grade(self, answer_text: str, example: dict) -> bool:
        if example.get("kind") == "recall":
            return grade_contains(answer_text, example["answer"])
        return bool(answer_text.strip())
