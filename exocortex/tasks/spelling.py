"""Spelling and letter counting: the classic tokenization weakness (a token hides its letters), answered with
the python tool, as a person would reach for a pencil.

The reply calls the sandboxed python (exocortex/infer/sandbox.py) on the word copied from the question,
`print(' strawberry'.count('r'))` or `print('-'.join(' strawberry'.strip()))`, and copies what it prints:
`The letter 'r' appears 3 times. #### 3`, `It is spelled s-t-r-a-w-b-e-r-r-y. #### s-t-r-a-w-b-e-r-r-y`. The
tiny model could not learn the letters of its tokens: with replies that spelled the word out themselves
(`s-t-r(1)-a-w-b-e-r(2)-r(3)-y`), about 5 in 100 of its spellings were right, train words and held-out words
alike, and its counts were right mostly when it guessed 0 or 1 (docs/tiny.md). Copying a word into a call is
what it can do. The word goes into the code as the question's tokens have it: BPE reads " strawberry" after a
space and "strawberry" after a quote as different tokens, so the code keeps the space (and strips it) where
the question has one, and the copy is token for token. The spelled answer also ends the reply, letter by
letter: a word after `####` would be a third tokenization of it.

Which words: common English words, the world's names and every word of the world's facts (its lexicon),
~1,700 words (exocortex/data/world.py: spelling_words); a test word is held out as a word here (no
spelling conversation of train asks it). The pretraining corpus still spells every word of the list (its
"wordplay" documents), as real text spells words now and then.

Questions are asked in phrasing families (SPELL_FAMILIES; exocortex/tasks/phrasing.py), some held out.
"""
from __future__ import annotations

import random
import re

from exocortex.data.world import spelling_words
from exocortex.tasks.base import Task, grade_hash_answer, item_split, split_of
from exocortex.tasks.phrasing import noisy, polite
from exocortex.tokenizer import tool_call_json

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


def python_call(code: str) -> dict:
    """The assistant part that runs `code` with the python tool."""
    return {"type": "tool_call", "text": tool_call_json("python", {"code": code})}


def word_in_code(frame: str, word: str) -> str:
    """`word` as a Python string literal whose tokens are those of the question `frame` asks with it: ' word'
    where its {w} slot follows a space (the code strips it), 'word' after a quote or at the start. (A quote
    that opens the message, as in the held-out "'{w}': spell it.", is read with the word as one piece, which
    no literal in the code reproduces: there the model has to re-spell the tokens.)"""
    i = frame.index("{w}")
    return f"' {word}'" if i > 0 and frame[i - 1] == " " else f"'{word}'"


class Spelling(Task):
    name = "spelling"
    uses_tools = True
    needs_python = True
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
        frame = noisy(polite(rng.choice(count_frames if count else spell_frames), rng), rng, lower_rate=0.1)
        q = frame.format(w=w, l=letter)
        literal = word_in_code(frame, w)
        if count:
            n = w.count(letter)
            call, output = f"print({literal}.count('{letter}'))", str(n)
            text = f"The letter '{letter}' appears {n} time{'s' if n != 1 else ''}. #### {n}"
        else:
            call, output = f"print('-'.join({literal}.strip()))", "-".join(w)
            text = f"It is spelled {output}. #### {output}"
        parts = [python_call(call), {"type": "tool_output", "text": output}, {"type": "text", "text": text}]
        return {"task": self.name, "answer": str(n) if count else w, "kind": "count" if count else "spell",
                "word": w, "family": family,
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": parts}]}

    def grade(self, answer_text: str, example: dict) -> bool:
        if example.get("kind") == "spell":
            tail = answer_text.rsplit("####", 1)[-1] if "####" in answer_text else answer_text
            return re.sub(r"[^a-z]", "", tail.lower()) == example["answer"]
        return grade_hash_answer(answer_text, example["answer"])
