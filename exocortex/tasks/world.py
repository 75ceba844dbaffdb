"""Questions about the generated world.

- facts: about places and things the model read during pretraining; answered from memory.
- facts_mc: the facts task's questions (places and things, answered from memory) as multiple choice. The
  reference reply recalls the answer, then checks the choices in order until the right one and gives its
  letter ("It is Broford - yes. A. Vavgard - no. B. Broford - yes. #### B"). Each check is then a copy, not
  a judgement: the model's induction head (model.induction_init) sees "Broford -" once already, followed by
  "yes", and predicts "yes" again; a choice it has not seen before gets "no". The letter is the one just
  written. Measured (tiny, fixed steps from one pretrain, n=100): the letter alone and "Broford - B." left
  the model at chance (25-29%), checks without the recall at 25-31% (a yes/no judgement of each choice is
  beyond it); with the recall 58% after sft (66% after midtrain), 75-87% of the replies that recalled the
  right value. The grader reads the letter after `####` (or the reply's letter). The choices are laid out
  in phrasing families (MC_FAMILIES), two of them held out. Questions about people are not asked: 71% of
  the items were about them, and a person's facts are what the model is taught to look up (lookup), never
  to recall, so those items measured a recall it was trained out of (27% with them in, seen families).
- lookup: every question about a person is answered by calling `lookup` with no query — which searches the question
  itself — and reading the passage it returns. Its test split is half of the people held out of the pretraining corpus (World.held_out_names):
  neither the person nor their facts were ever seen, so accuracy there measures looking up, not remembering.
  (A small model cannot tell a name it knows from one it does not, so the rule is by kind of question,
  not by familiarity; measured: with "lookup only for unknown people" it almost never called the tool.)
"""
from __future__ import annotations

import random

from exocortex.infer.lookup import world_index
from exocortex.tasks.base import (LETTERS, MultipleChoiceTask, Task, choice_letter, grade_contains, item_split,
                                  split_of)
from exocortex.tasks.phrasing import polite
from exocortex.tokenizer import tool_call_json


class Facts(Task):
    """Recall. Phrasing families: "wordings" asks in all but the last of a relation's question wordings
    (exocortex/data/world.py QUESTIONS), with a polite opener or closer; "last_wording" (held out) asks in the
    last one ("In which town does X live?" when trained on "Where does X live?", ...)."""

    name = "facts"
    families = ("wordings", "last_wording")
    heldout_families = ("last_wording",)

    def __init__(self, world):
        self.world = world
        self.by_split = {"train": [], "test": []}
        people = {p.name for p in world.people}
        for f in world.facts():
            if f.subject not in people:
                self.by_split[split_of(f.subject + "|" + f.relation)].append(f)

    def example(self, rng: random.Random, split: str) -> dict:
        family = self.family(rng, split)
        f = rng.choice(self.by_split[item_split(split)])
        # no typos and no lower case: they would change the names, which the question is about (with lower
        # case 10% of the time, facts read 51.7% (n=60) in one fixed-step run against 63-66% before: unproven)
        q = polite(self.world.ask(f, rng, last_wording=family == "last_wording"), rng)
        return {"task": self.name, "answer": f.value, "family": family,
                "messages": [{"role": "user", "content": q},
                             {"role": "assistant", "content": f.answer}]}

    def grade(self, answer_text: str, example: dict) -> bool:
        return grade_contains(answer_text, example["answer"])


MC_INSTRUCTIONS = ("Answer with the letter of the correct choice.", "Pick the right letter.", "Which one is it?",
                   "", "Reply with A, B, C or D.", "Choose one.")


def _lines(choices: list[str], mark: str) -> str:
    return "\n".join(mark.format(l=LETTERS[i], c=c) for i, c in enumerate(choices))


# how the question and its choices are laid out: (question, choices, instruction) -> prompt
MC_FAMILIES = {
    "dot": lambda q, ch, ins: f"{q}\n{_lines(ch, '{l}. {c}')}\n{ins}".strip(),
    "paren": lambda q, ch, ins: f"{q}\n{_lines(ch, '({l}) {c}')}\n{ins}".strip(),
    "options": lambda q, ch, ins: f"{q}\nOptions:\n{_lines(ch, '{l}) {c}')}\n{ins}".strip(),
    # held out (never trained on)
    "inline": lambda q, ch, ins: f"{q} Is it " + ", ".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(ch[:-1]))
                                  + f" or {LETTERS[len(ch) - 1]}) {ch[-1]}? {ins}".rstrip(),
    "choices_first": lambda q, ch, ins: f"{_lines(ch, '{l}. {c}')}\n{q} {ins}".strip(),
}
MC_HELDOUT = ("inline", "choices_first")


class FactsMC(MultipleChoiceTask):
    name = "facts_mc"
    chance = 0.25
    families = tuple(MC_FAMILIES)
    heldout_families = MC_HELDOUT

    def __init__(self, world):
        self.world = world
        self.by_split = {"train": [], "test": []}
        people = {p.name for p in world.people}
        for f in world.facts():
            if f.subject not in people:  # the facts task's items: the same train/test split
                self.by_split[split_of(f.subject + "|" + f.relation)].append(f)
        self.values: dict[str, list[str]] = {}
        for f in world.facts():
            self.values.setdefault(f.relation, [])
            if f.value not in self.values[f.relation]:
                self.values[f.relation].append(f.value)

    def example(self, rng: random.Random, split: str) -> dict:
        family = self.family(rng, split)
        while True:
            f = rng.choice(self.by_split[item_split(split)])
            others = [v for v in self.values[f.relation] if v.lower() != f.value.lower()]
            if len(others) >= 3:
                break
        choices = rng.sample(others, 3)
        gold = rng.randrange(4)
        choices.insert(gold, f.value)
        # never the facts task's held-out wordings: those are asked in no training prompt of any task
        q = polite(self.world.ask(f, rng, last_wording=False), rng)  # no noise: it would change the names
        prompt = MC_FAMILIES[family](q, choices, rng.choice(MC_INSTRUCTIONS))
        letter = LETTERS[gold]
        checks = " ".join(f"{LETTERS[i]}. {c} - {'yes' if i == gold else 'no'}." for i, c in enumerate(choices[:gold + 1]))
        return {"task": self.name, "answer": letter, "choices": choices, "gold": gold, "family": family,
                "messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": f"It is {f.value} - yes. {checks} #### {letter}"}]}

    def grade(self, answer_text: str, example: dict) -> bool:
        """The letter after `####` when the reply has one (after its checks), else the reply's letter."""
        tail = answer_text.rsplit("####", 1)[1] if "####" in answer_text else answer_text
        return choice_letter(tail, len(example["choices"])) == example["answer"]


class Lookup(Task):
    """Phrasing families as in Facts: the last wording of each question about a person is held out."""

    name = "lookup"
    uses_tools = True
    families = ("wordings", "last_wording")
    heldout_families = ("last_wording",)

    def __init__(self, world, index=None):
        self.world = world
        self.index = index or world_index(world)
        self.by_split = {"train": [], "test": []}
        people = {p.name for p in world.people}
        for f in world.facts():
            if f.subject in people:
                test = world.is_held_out(f.subject) and split_of("lookup|" + f.subject, 50) == "test"
                self.by_split["test" if test else "train"].append(f)

    def example(self, rng: random.Random, split: str) -> dict:
        family = self.family(rng, split)
        f = rng.choice(self.by_split[item_split(split)])
        q = self.world.ask(f, rng, last_wording=family == "last_wording")
        # `lookup` without a query searches the question itself (the engine passes the user's message): no
        # name to copy, and the shortest call to write
        parts = [{"type": "tool_call", "text": tool_call_json("lookup", {})}, {"type": "tool_output", "text": self.index(q)},
                 {"type": "text", "text": f.answer}]
        return {"task": self.name, "answer": f.value, "family": family,
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": parts}]}

    def grade(self, answer_text: str, example: dict) -> bool:
        return grade_contains(answer_text, example["answer"])
