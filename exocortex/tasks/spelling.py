"""Spelling and letter counting: the classic tokenization weakness (a token hides its letters).

The reference answer spells the word letter by letter and numbers each occurrence of the target letter as
it goes (`s-t-r(1)-a-w-b-e-r(2)-r(3)-y`), so counting becomes copying plus incrementing, which a small model
can learn; the final answer follows `####`.

Which words: common English words, the world's names, and every word of the world's facts (its lexicon),
~1,700 words (exocortex/data/world.py: spelling_words); a test word is held out as a word here (no
spelling conversation of train asks it), though the pretraining corpus spells every word of the list (its
"wordplay" documents), as real text spells words now and then. Measured on the tiny tokenizer: a word is often one token
(" zanthorn"), and the model can only spell a token whose letters it was shown, so the more words train
spells, the more of the held-out words' tokens it knows (with only the common words and names, 44 of the
97 test words had every token spelled somewhere in train; with the lexicon 95 of 182).

Questions are asked in phrasing families (SPELL_FAMILIES; exocortex/tasks/phrasing.py), some held out.
"""
from __future__ import annotations

import random
import re

from exocortex.data.world import counted_letters, spelling_words
from exocortex.tasks.base import Task, grade_hash_answer, item_split, split_of
from exocortex.tasks.phrasing import noisy, polite

# phrasing families: (spell frames, count frames); {w} the word, {l} the letter. The held-out ones ask the
# same two things in frames of their own ("what letters make up ...", the word first).
SPELL_FAMILIES = {
    "plain": (("Spell the word '{w}'.", "How do you spell {w}?", "Can you spell '{w}' letter by letter?",
               "Spell {w} for me, please."),
              ("How many times does the letter '{l}' appear in '{w}'?", "How many {l}'s are in the word {w}?",
               "Count the letter {l} in '{w}'.", "In the word '{w}', how many times do you see '{l}'?")),
    "casual": (("how do u spell {w}", "spell {w} pls", "{w} - how's that spelled?", "spelling of {w}?"),
               ("how many {l}s in {w}?", "number of {l}'s in {w}?", "count the {l}s in {w} pls",
                "{l}'s in '{w}': how many?")),
    "formal": (("Could you please spell out the word '{w}' for me?", "I would like the spelling of '{w}', please.",
                "Kindly spell '{w}'."),
               ("Please tell me how many times the letter '{l}' occurs in the word '{w}'.",
                "Could you count how often '{l}' occurs in '{w}'?")),
    # held out (never trained on)
    "letters_of": (("What letters make up '{w}'?", "Write '{w}' one letter at a time.",
                    "Which letters, in order, form the word {w}?"),
                   ("What is the number of '{l}' letters in {w}?", "Tally the letter '{l}' in the word '{w}'.")),
    "word_first": (("'{w}': spell it.", "The word {w}. How is it spelled?"),
                   ("'{w}': how many times is '{l}' in it?", "The word {w}. Count its {l}'s.")),
}
HELDOUT_FAMILIES = ("letters_of", "word_first")


class Spelling(Task):
    name = "spelling"
    families = tuple(SPELL_FAMILIES)
    heldout_families = HELDOUT_FAMILIES

    def __init__(self, world=None):
        self.words = spelling_words(world)

    def example(self, rng: random.Random, split: str) -> dict:
        family, items = self.family(rng, split), item_split(split)
        spell_frames, count_frames = SPELL_FAMILIES[family]
        while True:
            w = rng.choice(self.words)
            count = rng.random() < 0.6
            letter = rng.choice(w) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
            key = f"{w}|{letter}" if count else w
            if split_of("spell|" + key) == items:
                break
        if not count:
            q = noisy(polite(rng.choice(spell_frames), rng), rng, lower_rate=0.1).format(w=w)
            return {"task": self.name, "answer": w, "kind": "spell", "family": family,
                    "messages": [{"role": "user", "content": q},
                                 {"role": "assistant", "content": f"{'-'.join(w)} #### {w}"}]}
        shown, n = counted_letters(w, letter)
        q = noisy(polite(rng.choice(count_frames), rng), rng, lower_rate=0.1).format(w=w, l=letter)
        a = f"{shown}. The letter '{letter}' appears {n} time{'s' if n != 1 else ''}. #### {n}"
        return {"task": self.name, "answer": str(n), "kind": "count", "family": family,
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    def grade(self, answer_text: str, example: dict) -> bool:
        if example.get("kind") == "spell":
            tail = answer_text.rsplit("####", 1)[-1] if "####" in answer_text else answer_text
            letters = re.sub(r"[^a-z]", "", tail.lower()) if "####" in answer_text else \
                re.sub(r"[^a-z]", "", answer_text.lower())
            return letters == example["answer"]
        return grade_hash_answer(answer_text, example["answer"])
