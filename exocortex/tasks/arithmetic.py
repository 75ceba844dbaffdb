"""Arithmetic with the calculator, and GSM8K-like word problems: several calculator calls, then `#### N`.

A call is a tool_call part whose text is the call's JSON, {"name": "calculator", "arguments": {"expression": ...}}
(the chat format frames it with the markers: exocortex/tokenizer.py). Some examples also offer the calculator's
spec in the system turn (offer_calculator), as a client that lists it does."""
from __future__ import annotations

import random
import re
from collections import Counter

from exocortex.data.world import everyday_operands
from exocortex.tasks.base import Task, grade_final_number, grade_hash_answer, item_split, split_of
from exocortex.tasks.phrasing import capitalise, noisy, polite, say_number
from exocortex.infer.tools import BUILTIN_TOOLS, calculator
from exocortex.tokenizer import tool_call_json

ARITH_QUESTIONS = [
    "What is {e}?", "what is {e}", "Calculate {e}.", "Compute {e}", "How much is {e}?", "{e} = ?",
    "Can you work out {e}?", "Please tell me {e}.", "What's {e}?", "Solve {e}.", "I need {e}, please.",
    "Quick: {e}?", "Could you compute {e} for me?", "What do you get for {e}?", "Evaluate {e}.",
]
ARITH_ANSWERS = ["{e} = {r}.", "The answer is {r}.", "{e} is {r}.", "That's {r}.", "It comes to {r}.",
                 "{r}.", "The result is {r}."]

# Phrasing families (exocortex/tasks/phrasing.py): a family is a set of frames per operation, each frame with
# the operands {a} and {b} (filled by the number grammar: digits, words, commas) and, in stories, {x} (things),
# {n} (a name) and {p} (its pronoun). "symbols" asks a written expression (ARITH_QUESTIONS); "halves" are
# one-operand frames (half of, double) that compute with a fixed second operand. The held-out families
# (HELDOUT_FAMILIES) reuse the seen families' words for operations in frames of their own: a conditional
# ("if you add 3 and 4, ..."), the operands before the operation ("3 and 4. Add them."), stories about a
# named person (the seen stories are about "I", "we" and "the shop"), a question with the calculation in a
# clause after it ("What is left when 5 is taken from 62?"), and a number asked by its relation to another
# ("What number is 5 less than 62?"). Nearly all their words are in seen frames too (tests/test_families.py
# lists the eight that are not), so a held-out question tests the frame more than an unseen word ("remove", "cut").
WRAP_SPOKEN = ("What is {q}?", "what's {q}", "How much is {q}?", "{q}?", "Tell me {q}.", "Do you know {q}?",
               "{q} equals what?", "what does {q} make?")
WRAP_COMMAND = ("{q}.", "{q}", "Can you {q}?", "Please {q}.", "I need you to {q}.", "Could you {q} for me?")
WRAP_NOUN = ("What is {q}?", "Find {q}.", "Work out {q}.", "Give me {q}.", "what's {q}?", "{q}?")
ARITH_FAMILIES = {
    "spoken": {"wrap": WRAP_SPOKEN, "+": ("{a} plus {b}", "{a} add {b}"),
               "-": ("{a} minus {b}", "{a} take away {b}", "{a} less {b}"),
               "*": ("{a} times {b}", "{a} multiplied by {b}", "{a} x {b}"),
               "/": ("{a} divided by {b}", "{a} over {b}")},
    "commands": {"wrap": WRAP_COMMAND, "+": ("add {a} and {b}", "add {b} to {a}", "add up {a} and {b}",
                                             "make {a} bigger by {b}"),
                 "-": ("subtract {b} from {a}", "take {b} away from {a}", "take {b} from {a}", "remove {b} from {a}",
                       "make {a} smaller by {b}"),
                 "*": ("multiply {a} by {b}", "multiply {a} and {b}"),
                 "/": ("divide {a} by {b}", "split {a} into {b} equal parts", "cut {a} into {b} equal parts",
                       "put {a} into groups of {b}")},
    "sum_of": {"wrap": WRAP_NOUN, "+": ("the sum of {a} and {b}", "the total of {a} and {b}"),
               "-": ("the difference between {a} and {b}", "{a} reduced by {b}", "{a} with {b} removed"),
               "*": ("the product of {a} and {b}", "{a} lots of {b}"),
               "/": ("the quotient of {a} and {b}", "{a} shared equally by {b}")},
    "halves": {"wrap": WRAP_SPOKEN, "/2": ("half of {a}", "half {a}"), "/3": ("a third of {a}", "one third of {a}"),
               "/4": ("a quarter of {a}", "one quarter of {a}"), "*2": ("double {a}", "twice {a}"),
               "*3": ("triple {a}", "three times {a}")},
    "story": {"wrap": ("{q}",),
              "+": ("I have {a} {x} and buy {b} more. How many do I have?", "I had {a} {x} and found {b} more; how many now?",
                    "We have {a} {x} and get {b} more. How many in total?"),
              "-": ("I had {a} {x} and used {b}, how many now?", "I have {a} {x} and eat {b}. How many are left?",
                    "We had {a} {x} and gave away {b}. How many do we have now?"),
              "*": ("I have {a} bags with {b} {x} in each. How many {x} is that?",
                    "I bought {a} packs of {b} {x}. How many {x} in total?"),
              "/": ("I share {a} {x} equally among {b} friends. How many does each friend get?",
                    "I had {a} {x} and put them into {b} equal piles; how many in each pile?")},
    # quantities with units ({u}: any unit for any operation), and their words for the operations
    "units": {"wrap": WRAP_SPOKEN, "+": ("{a} {u} plus {b} {u}", "{a} {u} and {b} {u} together",
                                         "{a} {u} added to {b} {u}", "{a} {u} increased by {b} {u}"),
              "-": ("{a} {u} minus {b} {u}", "{a} {u} less {b} {u}", "{a} {u} decreased by {b} {u}",
                    "{a} {u} take away {b} {u}"),
              "*": ("{a} boxes of {b} kg each", "{a} hours at {b} dollars per hour", "{b} {u}, {a} times over"),
              "/": ("{a} {u} split {b} ways", "{a} {u} in {b} equal stages", "{a} {u} shared between {b}")},
    # stories about things, a shop, a class: third person, no one named (the held-out stories name a person)
    "story_things": {"wrap": ("{q}",),
                     "+": ("A box holds {a} {x}. Another holds {b}. How many {x} altogether?",
                           "The shop had {a} {x} and got {b} more. How many in total?",
                           "The class collected {a} {x} on Monday and {b} on Tuesday. How many in total?"),
                     "-": ("The shop had {a} {x} and sold {b}. How many does it have left?",
                           "There were {a} {x} in the jar and {b} were taken out. How many remain?",
                           "A crate held {a} {x}; {b} broke. How many are still fine?"),
                     "*": ("Each shelf holds {b} {x} and there are {a} shelves. How many {x} is that?",
                           "The class has {a} tables with {b} {x} on each. How many {x} in all?"),
                     "/": ("The team splits {a} {x} equally into {b} bags. How many go in each bag?",
                           "{a} {x} are packed {b} to a box. How many boxes is that?")},
    # held out (never trained on)
    "what_if": {"wrap": ("{q}",),
                "+": ("If you add {a} and {b}, what do you end up with?", "If I add {b} to {a}, what's the result?"),
                "-": ("If I subtract {b} from {a}, what's left?", "If you take {b} away from {a}, what remains?"),
                "*": ("If you multiply {a} by {b}, what comes out?", "If {a} is multiplied by {b}, what is the result?"),
                "/": ("If I divide {a} by {b}, what do I end up with?", "If {a} is divided by {b}, what comes out?")},
    "numbers_first": {"wrap": ("{q}",),
                      "+": ("{a} and {b}. Add them up.", "Take {a} and {b} and add them.",
                            "Two numbers, {a} and {b}: what is their sum?"),
                      "-": ("{a} and {b}. Subtract the second from the first.", "Start with {a} and take away {b}."),
                      "*": ("{a} and {b}. Multiply them.", "Two numbers, {a} and {b}: what is their product?"),
                      "/": ("{a} and {b}. Divide the first by the second.", "Start with {a} and divide it by {b}.")},
    "story_people": {"wrap": ("{q}",),
                     "+": ("{n} has {a} {x} and gets {b} more. How many does {p} have now?",
                           "{n} had {a} {x}, then found {b} more. How many now?"),
                     "-": ("{n} had {a} {x} and used {b}. How many does {p} have now?",
                           "{n} has {a} {x} and sells {b}. How many are left?"),
                     "*": ("{n} bought {a} boxes with {b} {x} in each. How many {x} did {p} buy?",),
                     "/": ("{n} shares {a} {x} equally between {b} friends. How many does each get?",)},
    # held out, added after the three above had been read for their failures (their accuracy is no longer a
    # blind measurement): a question, then the calculation in a clause after it; no fix was tuned on it
    "question_first": {"wrap": ("{q}",),
                       "+": ("What do you get when {b} is added to {a}?", "How much is {a} once {b} more is added?"),
                       "-": ("What is left when {b} is taken from {a}?",
                             "How much remains once {b} is removed from {a}?"),
                       "*": ("What do you get when {a} is multiplied by {b}?", "How much is {a} repeated {b} times?"),
                       "/": ("What does each of {b} get when {a} is shared out?",
                             "How big is each part when {a} is cut into {b} parts?")},
    # held out, added when question_first had been read for its failures: a number asked by its relation to
    # another one. Its replies were read (session 19, docs/tiny.md) before the change to operand order below, and
    # again before the seen "comparisons" family was written (session 20)
    "relational": {"wrap": ("{q}",),
                   "+": ("What number is {b} more than {a}?", "Which number is {b} bigger than {a}?"),
                   "-": ("What number is {b} less than {a}?", "Which number is {b} smaller than {a}?"),
                   "*": ("What number is {b} times as big as {a}?", "Which number is {b} times as much as {a}?"),
                   "/": ("How many times does {b} go into {a}?", "How many groups of {b} make {a}?")},
}
HELDOUT_FAMILIES = ("what_if", "numbers_first", "story_people", "question_first", "relational")

# Seen stories are also assembled from slots: a subject, an event whose verb says the operation, and a question.
# Most questions fit both a sum and a difference ("How many now?", "How many do we have now?"), so only the verb
# tells which: with a question per operation, the model learns to read the question instead (the held-out "Ada
# had 83 books and used 42. How many does she have now?" was read as a sum, since "have now" only ever asked
# one). Some events put the second number first ("used 5 of its 40 eggs"). A combination is dropped when it
# holds all of a held-out frame's words, in any person, tense or order (`_too_close`): what stays held out is a named
# person's story in the held-out frames' own words, not just the name.
_STORY_SUBJECTS = {  # subject, pronoun, its "do", object, possessive, its "have", a present verb's ending
    "story": (("I", "I", "do", "me", "my", "have", ""), ("We", "we", "do", "us", "our", "have", "")),
    "story_things": tuple((subject, "it", "does", "it", "its", "has", "s")
                          for subject in ("The shop", "The bakery", "The class", "The team")),
}
_STORY_EVENTS = {
    "+": ("{S} had {a} {x} and found {b} more", "{S} had {a} {x} and bought {b} more",
          "{S} had {a} {x} and got {b} more", "{S} had {a} {x}, and a friend gave {o} {b} more",
          "{S} had {a} {x} and then received {b} more", "{S} got {b} {x} in addition to the {a} {s} already had",
          "{S} started with {a} {x} and picked up {b} more", "{S} {have} {a} {x} and get{3s} {b} more",
          "{S} {have} {a} {x} and find{3s} {b} more", "{S} made {a} {x}, then made {b} more",
          "{S} had {a} {x}, but then friends brought {b} more",
          "{S} had {a} {x}, and the children brought {b} more", "{S} put {a} {x} into a box and then {b} more",
          "{S} had {a} {x} and got {b} more from the market"),
    "-": ("{S} had {a} {x} and used {b}", "{S} had {a} {x} and sold {b}", "{S} had {a} {x} and gave away {b}",
          "{S} had {a} {x} but lost {b}", "{S} had {a} {x} and threw away {b}", "{S} used {b} of {poss} {a} {x}",
          "{S} had {a} {x}; {b} broke", "{S} started with {a} {x} and gave out {b}",
          "{S} {have} {a} {x} and sell{3s} {b}", "{S} {have} {a} {x} and use{3s} {b}",
          "{S} {have} {a} {x} and give{3s} away {b}", "{S} made {a} {x}, then sold {b}",
          "{S} had {a} {x}, and {b} went missing",
          "{S} packed {a} {x} and then gave {b} to friends", "{S} had {a} {x} and sold {b} at the market"),
    "*": ("{S} bought {a} packs of {b} {x}", "{S} had {a} bags with {b} {x} in each",
          "{S} filled {a} boxes with {b} {x} each", "{S} made {a} rows of {b} {x}",
          "{S} got {a} crates, each holding {b} {x}", "{S} buy{3s} {a} packs of {b} {x}",
          "{S} {have} {a} boxes with {b} {x} in each", "{S} put {b} {x} into each of {a} bags"),
}
_STORY_QUESTIONS = {
    "+-": ("How many now?", "How many {do} {s} have now?", "How many {x} {do} {s} have now?",
           "How many {x} are there now?", "What is the count now?", "How many is that now?"),
    "+": ("How many in total?", "How many {x} {do} {s} have altogether?"),
    "-": ("How many are left?", "How many {x} remain?", "How many {do} {s} have left?", "What remains?"),
    "*": ("How many {x} is that?", "How many {x} in total?", "How many {x} {do} {s} have?", "How many {x} altogether?"),
    "past": ("How many did {s} end up with?", "How many {x} did {s} end up with?"),  # after a past event only
}
# division: the question names the parts the event made. "between" says a share as often as "among" (when only
# "the difference between" had it, "shares 48 between 6 friends" was read as 48 - 6)
_STORY_SHARES = (
    ("{S} shared {a} {x} equally among {b} friends", ("How many did each friend end up with?", "How many each?")),
    ("{S} share{3s} {a} {x} equally among {b} friends", ("How many does each friend get?", "How many each?")),
    ("{S} put {a} {x} into {b} equal piles", ("How many in each pile?", "How many {x} does each pile have?")),
    ("{S} packed {a} {x} into {b} boxes, the same number in each", ("How many {x} went in each box?",)),
    ("{S} split {a} {x} evenly between {b} bags", ("How many {x} end up in each bag?", "How many in each bag?")),
    ("{S} divided {a} {x} between {b} children, the same for each", ("How many did each one get?",)),
)


# the verbs of the held-out stories in every person and tense: "I had 5 and used 2. How many do I have now?" is
# Ada's story told by someone else
_LEMMAS = {"does": "do", "did": "do", "has": "have", "had": "have", "gets": "get", "got": "get", "sells": "sell",
           "sold": "sell", "uses": "use", "used": "use", "shares": "share", "shared": "share", "finds": "find",
           "found": "find", "buys": "buy", "bought": "buy"}


def _lemmas(frame: str) -> list[str]:
    return [_LEMMAS.get(w, w) for w in re.sub(r"\{[a-z]+\}|[.,;:?!]", " ", frame).lower().split()]


def _within_one_word(a: list[str], b: list[str]) -> bool:
    """Whether one word inserted, deleted or replaced turns a into b (or they are equal), in one pass: thousands
    of composed frames are checked against every held-out frame at import."""
    if len(a) < len(b):
        a, b = b, a
    if len(a) - len(b) > 1:
        return False
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
    return a[i + 1:] == b[i + 1:] if len(a) == len(b) else a[i + 1:] == b[i:]


def _heldout_lemmas() -> list[tuple[list[str], Counter]]:
    """Every held-out frame's lemmas, and their counts."""
    frames = [_lemmas(f) for fam in HELDOUT_FAMILIES for op, fs in ARITH_FAMILIES[fam].items() if op != "wrap"
              for f in fs]
    return [(h, Counter(h)) for h in frames]


def _too_close(frame: str, heldout: list[tuple[list[str], Counter]]) -> bool:
    """Whether `frame` is a held-out frame in other clothes: all of its words (as lemmas, each as often) in any
    order ("What comes out if {a} is divided by {b}?" for "If {a} is divided by {b}, what comes out?"), or its
    words but one, in its order ("What number is {b} greater than {a}?" for "What number is {b} more than
    {a}?", "What do you get if ..." for "What do you get when ...")."""
    lemmas = _lemmas(frame)
    words = Counter(lemmas)
    return any(all(words[w] >= k for w, k in counts.items()) or _within_one_word(lemmas, h) for h, counts in heldout)


def _composed_stories(family: str) -> dict[str, tuple[str, ...]]:
    heldout = _heldout_lemmas()
    out = {}
    for op in "+-*/":
        if op == "/":
            pairs = [(e, q) for e, qs in _STORY_SHARES for q in qs]
        else:
            questions = _STORY_QUESTIONS[op] + (_STORY_QUESTIONS["+-"] if op in "+-" else ())
            pairs = [(e, q) for e in _STORY_EVENTS[op]
                     for q in questions + (() if "{have}" in e or "{3s}" in e else _STORY_QUESTIONS["past"])]
        frames = []
        for S, s, do, o, poss, have, ending in _STORY_SUBJECTS[family]:
            for event, question in pairs:
                slots = {"S": S, "s": s, "do": do, "o": o, "poss": poss, "have": have, "3s": ending, "a": "{a}",
                         "b": "{b}", "x": "{x}"}
                for sep in (". ", ", "):
                    q = question.format(**slots)
                    f = event.format(**slots) + sep + (q if sep == ". " else q[0].lower() + q[1:])
                    if not _too_close(f, heldout):
                        frames.append(f)
        out[op] = ARITH_FAMILIES[family][op] + tuple(frames)
    return out


for family in _STORY_SUBJECTS:  # the literal above has each story family's hand-written frames; these join them
    ARITH_FAMILIES[family].update(_composed_stories(family))
del family

# The seen family "clauses": a question, then the calculation in a clause after it, composed from an opener, a
# connective and a clause (active or passive). The model read the first words of a question for the operation:
# "What do you get when 43 is added to 593?" became 43 * 3. Composed, no opener or connective tells the
# operation; only the clause does. Frames holding all of a held-out frame's words are dropped (_too_close), so
# the held-out question_first frames themselves stay out, though their construction is now trained. Measured with
# the operand order of sums and products (Arithmetic.ask): neither alone lifted the held-out families, both did
# (docs/tiny.md, session 19).
_CLAUSE_OPENERS = ("What do you get", "What is the result", "What number do you get", "What comes out",
                   "How much do you get", "What is the answer", "Tell me what you get", "What will you have")
_CLAUSE_CONNECTIVES = ("when", "if", "once", "after")
_CLAUSES = {
    "+": ("you add {a} and {b}", "you add {b} to {a}", "{b} is added to {a}", "{a} and {b} are added together",
          "{a} is increased by {b}", "you put {a} and {b} together"),
    "-": ("you subtract {b} from {a}", "you take {b} away from {a}", "{b} is subtracted from {a}",
          "{b} is taken away from {a}", "{a} is reduced by {b}", "{a} is decreased by {b}"),
    "*": ("you multiply {a} by {b}", "{a} is multiplied by {b}", "you take {a}, {b} times over",
          "{a} and {b} are multiplied together", "you multiply {b} and {a}"),
    "/": ("you divide {a} by {b}", "{a} is divided by {b}", "{a} is split into {b} equal parts",
          "you share {a} equally among {b}", "{a} is shared equally between {b}", "you split {a} {b} ways"),
}


def _composed_clauses() -> dict[str, tuple[str, ...]]:
    heldout = _heldout_lemmas()
    return {op: tuple(f for o in _CLAUSE_OPENERS for c in _CLAUSE_CONNECTIVES for clause in clauses
                      if not _too_close(f := f"{o} {c} {clause}?", heldout))
            for op, clauses in _CLAUSES.items()}


ARITH_FAMILIES["clauses"] = {"wrap": ("{q}",), **_composed_clauses()}

# Two more composed seen families, for the constructions the held-out numbers_first and relational use, in other
# words. "given": the numbers first, then what to do with them, the operation named only by the instruction.
# "comparisons": a number asked by how it compares with another ("the number 5 fewer than 62" is 62 - 5; the
# comparative reverses the order the numbers are said in). The held-out frames' own words stay out (_too_close)
# and so do their instructions ("add them", "what is their sum"): what a held-out question still tests is
# whether "more than" is read like "greater than", and "add them up" like "find the total".
_GIVEN_OPENERS = ("Here are {a} and {b}", "Given {a} and {b}", "Look at {a} and {b}", "You have {a} and {b}",
                  "Consider {a} and {b}", "My numbers are {a} and {b}", "First {a}, then {b}")
_GIVEN_INSTRUCTIONS = {  # "they" and "the other" go with more than one operation: neither tells it
    "+": ("Find the total.", "What is the total?", "What do they come to together?", "Put them together.",
          "What is one plus the other?"),
    "-": ("What is the first minus the second?", "Find the first less the second.", "Reduce the first by the second."),
    "*": ("Find the first times the second.", "What is one times the other?", "What do they come to multiplied?",
          "Work out the first multiplied by the second."),
    "/": ("Find the first divided by the second.", "What is the first over the second?",
          "Work out the first divided by the second."),
}
_COMPARISON_FRAMES = ("Find the number {r}.", "Name the number that is {r}.", "What is the number {r}?",
                      "Give me the number that is {r}.")
_COMPARISONS = {
    "+": ("{b} greater than {a}", "{b} larger than {a}", "{b} higher than {a}", "{b} above {a}", "{b} past {a}",
          "{b} beyond {a}"),
    "-": ("{b} fewer than {a}", "{b} lower than {a}", "{b} below {a}", "{b} under {a}", "{b} short of {a}"),
    "*": ("{b} times the size of {a}", "{b} times the amount of {a}"),
}
_COMPARISON_DIVISIONS = ("How many lots of {b} are in {a}?", "How many portions of {b} are in {a}?",
                         "How many times the size of {b} is {a}?", "How many times the amount of {b} is {a}?")


def _composed_given_and_comparisons() -> tuple[dict, dict]:
    heldout = _heldout_lemmas()
    given = {op: tuple(f for o in _GIVEN_OPENERS for sep in (". ", ": ", "; ") for i in instructions
                       if not _too_close(f := o + sep + (i if sep == ". " else i[0].lower() + i[1:]), heldout))
             for op, instructions in _GIVEN_INSTRUCTIONS.items()}
    compare = {op: tuple(f for frame in _COMPARISON_FRAMES for r in relations
                         if not _too_close(f := frame.format(r=r), heldout))
               for op, relations in _COMPARISONS.items()}
    compare["/"] = tuple(f for f in _COMPARISON_DIVISIONS if not _too_close(f, heldout))
    return given, compare


_given, _compare = _composed_given_and_comparisons()
ARITH_FAMILIES["given"] = {"wrap": ("{q}",), **_given}
ARITH_FAMILIES["comparisons"] = {"wrap": ("{q}",), **_compare}
del _given, _compare

UNITS = ("km", "dollars", "minutes", "kg", "metres", "litres", "hours")
STORY_THINGS = ("eggs", "apples", "cookies", "marbles", "pencils", "stickers", "coins", "books", "cards",
                "tomatoes", "candles", "balloons", "stamps", "potatoes", "nails")
STORY_PEOPLE = {"Mia": "she", "Tom": "he", "Ada": "she", "Leo": "he", "Ivy": "she", "Sam": "he", "Noor": "she",
                "Ben": "he", "Lena": "she", "Omar": "he"}


# Numbers in a question that are not operands: which question it is, how many there are. A model that takes
# every number for an operand reads "two numbers, 4 and 70: their sum?" as 2 + 70.
NUMBERED_OPENERS = ("Question {k}: ", "Problem {k}. ", "Exercise {k}: ", "Homework, part {k}: ", "Number {k}: ",
                    "I have {k} questions. First: ", "Step {k}: ", "Last of my {k} questions: ")
NUMBERED_OPENER_RATE = 0.1


def numbered_opener(question: str, rng: random.Random) -> str:
    if rng.random() >= NUMBERED_OPENER_RATE:
        return question
    return rng.choice(NUMBERED_OPENERS).format(k=say_number(rng.randint(2, 12), rng, words_rate=0.5)) + question


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


# The calculator's spec, offered in the system turn by OFFER_RATE of the examples (the tools block): a client, or
# an exported model's user, who passes tools=[calculator] must get the same call as one who passes nothing (the
# server offers only a client's tools; the built-in is a trained habit). Both prompt shapes are trained, so
# neither is a surprise. A word problem offers it only when its text is short (OFFER_MAX_CHARS): the spec and
# its block cost ~100 tokens of the tiny model's 256, and a long solution would be cut (tests/test_functions.py).
CALCULATOR_SPEC = next(t for t in BUILTIN_TOOLS if t["function"]["name"] == "calculator")
OFFER_RATE = 0.2
OFFER_MAX_CHARS = 260


def offer_calculator(example: dict, rng: random.Random) -> dict:
    """`example`, offering the calculator's spec at OFFER_RATE when its conversation is short enough."""
    offer = rng.random() < OFFER_RATE  # drawn every time: the examples after it do not depend on the length
    text = sum(len(m["content"]) if isinstance(m["content"], str) else sum(len(p["text"]) for p in m["content"])
               for m in example["messages"])
    if offer and text <= OFFER_MAX_CHARS:
        example["tools"] = [CALCULATOR_SPEC]
    return example


def calculator_call(expression: str) -> dict:
    """The assistant part that calls the calculator on `expression`."""
    return {"type": "tool_call", "text": tool_call_json("calculator", {"expression": expression})}


class Arithmetic(Task):
    """One calculation, asked in one of ARITH_FAMILIES' wordings, answered with one calculator call. The
    split key is the expression (so a test calculation is held out in every wording, and in `functions`)."""

    name = "arithmetic"
    uses_tools = True
    families = ("symbols",) + tuple(ARITH_FAMILIES)
    heldout_families = HELDOUT_FAMILIES

    def example(self, rng: random.Random, split: str) -> dict:
        family = self.family(rng, split)
        items = item_split(split)
        while True:
            q, e = self.ask(family, rng)
            if split_of(e) == items:
                break
        r = calculator(e)
        a = rng.choice(ARITH_ANSWERS).format(e=e, r=r)
        parts = [calculator_call(e), {"type": "tool_output", "text": r},
                 {"type": "text", "text": a}]
        return offer_calculator({"task": self.name, "answer": r, "family": family, "messages": [
            {"role": "user", "content": q}, {"role": "assistant", "content": parts}]}, rng)

    @staticmethod
    def ask(family: str, rng: random.Random) -> tuple[str, str]:
        """(question, the expression it asks for) in a family's wording: a frame, its numbers said in words or
        digits, a polite opener or closer, sometimes lower case or a typo, sometimes a number that is not an
        operand before it."""
        if family == "symbols":
            e = random_expression(rng)
            shown = e.replace("*", rng.choice(["*", "*", "×", "times"])) if rng.random() < 0.3 else e
            return numbered_opener(noisy(polite(rng.choice(ARITH_QUESTIONS), rng), rng).format(e=shown), rng), e
        frames = ARITH_FAMILIES[family]
        op = rng.choice([k for k in frames if k != "wrap"])
        if len(op) == 2:  # one operand: half of, double
            b = int(op[1])
            a = b * rng.randint(1, 60) if op[0] == "/" else rng.randint(1, 500)
            frame = rng.choice(frames[op])
            op = op[0]
        else:
            a, b = everyday_operands(op, rng)
            frame = rng.choice(frames[op])
        e = f"{a} {op} {b}"
        if op in "+*" and "{b}" in frame and frame.index("{b}") < frame.index("{a}"):
            # a sum or a product is written with its numbers in the order the question says them, so a model that
            # copies them from the question need not reorder them ("when 43 is added to 593" was called as
            # 593 + 593; with the clauses family, held-out 61% -> 68%: docs/tiny.md, session 19)
            e = f"{b} {op} {a}"
        name = rng.choice(list(STORY_PEOPLE))
        q = noisy(polite(capitalise(rng.choice(frames["wrap"]).replace("{q}", frame)), rng), rng)
        q = q.format(a=say_number(a, rng), b=say_number(b, rng), x=rng.choice(STORY_THINGS), n=name,
                     p=STORY_PEOPLE[name], u=rng.choice(UNITS))
        return numbered_opener(q, rng), e

    def grade(self, answer_text: str, example: dict) -> bool:
        return grade_final_number(answer_text, example["answer"])


# ----------------------------------------------------------------------------- word problems

NAMES = {"Mia": "she", "Tom": "he", "Ada": "she", "Leo": "he", "Ivy": "she", "Sam": "he", "Noor": "she",
         "Ben": "he", "Lena": "she", "Omar": "he", "Kai": "he", "Rosa": "she", "Finn": "he", "Zoe": "she"}
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "stamps", "shells", "books", "coins", "eggs"]

# (question template, steps) — each step is (explanation, expression template over earlier results r0, r1, ...)
# and numbers a, b, c; `valid` keeps every intermediate a non-negative integer.
PROBLEMS = [
    ("{n} has {a} {it}. {p} buys {b} more and then gives {c} to a friend. How many {it} does {n} have now?",
     [("After buying:", "{a} + {b}"), ("After giving some away:", "{r0} - {c}")]),
    ("{n} buys {a} boxes of {it} with {b} in each box, then uses {c} of them. How many {it} are left?",
     [("In the boxes:", "{a} * {b}"), ("Left:", "{r0} - {c}")]),
    ("A pack of {it} costs {a} coins. {n} buys {b} packs and pays with {c} coins. How much change does {n} get?",
     [("The packs cost:", "{a} * {b}"), ("The change:", "{c} - {r0}")]),
    ("{n} reads {a} pages a day for {b} days and then {c} more pages. How many pages does {n} read in total?",
     [("Pages in {b} days:", "{a} * {b}"), ("In total:", "{r0} + {c}")]),
    ("{n} shares {a} {it} equally among {b} friends and keeps the {c} left over. How many does each friend get?",
     [("Shared out:", "{a} - {c}"), ("Each friend gets:", "{r0} / {b}")]),
    ("{n} earns {a} coins a week. After {b} weeks {p_l} spends {c} coins. How many coins does {n} have left?",
     [("Earned:", "{a} * {b}"), ("Left:", "{r0} - {c}")]),
    ("There are {a} rows of {b} trees in a park. Then {c} trees are planted. How many trees are there now?",
     [("Trees in rows:", "{a} * {b}"), ("Now:", "{r0} + {c}")]),
    ("{n} had {a} {it}, found {b} more, and then lost {c}. How many {it} does {n} have?",
     [("After finding:", "{a} + {b}"), ("After losing:", "{r0} - {c}")]),
    ("{n} buys {a} bags of {it} with {b} in each and gets {c} more as a gift. How many {it} is that?",
     [("In the bags:", "{a} * {b}"), ("With the gift:", "{r0} + {c}")]),
    ("{n} has {a} {it} and packs them into bags of {b}. Then {p_l} sells {c} bags. How many bags are left?",
     [("Bags:", "{a} / {b}"), ("Left:", "{r0} - {c}")]),
    # three steps
    ("{n} has {a} {it}. {p} buys {b} packs with {c} {it} in each and gives away {d}. How many {it} does {n} have now?",
     [("Bought:", "{b} * {c}"), ("Together:", "{a} + {r0}"), ("After giving some away:", "{r1} - {d}")]),
    ("{n} earns {a} coins a day for {b} days, then spends {c} coins on food and {d} coins on books. How many coins "
     "are left?", [("Earned:", "{a} * {b}"), ("After food:", "{r0} - {c}"), ("After books:", "{r1} - {d}")]),
    ("A shop has {a} boxes with {b} {it} in each. It sells {c} {it} on Monday and {d} on Tuesday. How many {it} are "
     "left?", [("In the boxes:", "{a} * {b}"), ("After Monday:", "{r0} - {c}"), ("After Tuesday:", "{r1} - {d}")]),
    ("{n} reads {a} pages on Monday, {b} times as many on Tuesday, and {c} pages on Wednesday. How many pages is "
     "that in total?", [("Tuesday:", "{a} * {b}"), ("Monday and Tuesday:", "{a} + {r0}"), ("In total:", "{r1} + {c}")]),
    ("{n} buys {a} tickets at {b} coins each and {c} drinks at {d} coins each. How much does {n} spend?",
     [("Tickets:", "{a} * {b}"), ("Drinks:", "{c} * {d}"), ("In total:", "{r0} + {r1}")]),
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]


def _say(n: int, rng: random.Random) -> str:
    """A number as the problem states it: small numbers often in words (the solver must turn them into digits)."""
    if n == 12 and rng.random() < 0.3:
        return "a dozen"
    if 0 <= n <= 12 and rng.random() < 0.5:
        return NUMBER_WORDS[n]
    return str(n)


DISTRACTORS = ["{n} is {x} years old.", "It is {x} degrees outside.", "{n}'s house is number {x}.",
               "The bus ride takes {x} minutes."]


def _numbers(rng: random.Random, steps) -> tuple[dict, list[str]] | None:
    v = {"a": rng.randint(2, 60), "b": rng.randint(2, 12), "c": rng.randint(1, 40), "d": rng.randint(1, 30)}
    exprs = " ".join(e for _, e in steps)
    if "{a} / {b}" in exprs:
        v["a"] = v["b"] * rng.randint(2, 15)
    if "{a} - {c}" in exprs and "/ {b}" in exprs:  # shares: (a - c) divisible by b, c < b
        v["c"] = rng.randint(0, v["b"] - 1)
        v["a"] = v["b"] * rng.randint(2, 15) + v["c"]
    if "{c} - {r0}" in exprs:
        v["c"] = v["a"] * v["b"] + rng.randint(0, 50)
    results = []
    for i, (_, e) in enumerate(steps):
        expr = e.format(**v, **{f"r{j}": r for j, r in enumerate(results)})
        r = calculator(expr)
        if "." in r or r.startswith("-"):
            return None
        results.append(r)
        if i == 0 and "/ {b}" in e and "{r0} - {c}" in steps[1][1]:  # bags: can't sell more than exist
            v["c"] = rng.randint(0, int(r))
    return v, results


POSSESSIVE = {"she": "her", "he": "his"}


class _Invalid(Exception):
    """A story whose numbers went negative, fractional or too big: the caller draws another."""


class _Story:
    """The books a story keeps while it is told: who has how many, the sentences, the calculator steps, and a
    key of the story's structure (its train/test split key)."""

    def __init__(self, rng: random.Random, item: str, people: list[str]):
        self.rng, self.it, self.people = rng, item, people
        self.have: dict[str, int] = {}
        self.sents: list[str] = []
        self.steps: list[tuple[str, str]] = []
        self.key: list[str] = []

    def calc(self, label: str, expr: str) -> int:
        r = calculator(expr)
        if "." in r or r.startswith("-") or int(r) > 9999:
            raise _Invalid
        self.steps.append((label, expr))
        return int(r)

    def relate(self, p: str) -> None:
        """`p`'s count, stated relative to someone already known."""
        rng, it, have = self.rng, self.it, self.have
        ref = rng.choice([q for q in self.people if q in have])
        kind = rng.choice(["times", "more", "fewer", "half"])
        if kind == "times":
            k = rng.randint(2, 5)
            self.sents.append(f"{p} has {_say(k, rng) if k > 2 else 'twice'}{' times' if k > 2 else ''} as many "
                              f"{it} as {ref}")
            v = self.calc(f"{p} has", f"{have[ref]} * {k}")
        elif kind == "more":
            k = rng.randint(2, 30)
            self.sents.append(f"{p} has {_say(k, rng)} more {it} than {ref}")
            v = self.calc(f"{p} has", f"{have[ref]} + {k}")
        elif kind == "fewer":
            k = rng.randint(1, max(1, have[ref] - 1))
            self.sents.append(f"{p} has {_say(k, rng)} fewer {it} than {ref}")
            v = self.calc(f"{p} has", f"{have[ref]} - {k}")
        else:
            if have[ref] % 2:
                raise _Invalid
            k = 2
            self.sents.append(f"{p} has half as many {it} as {ref}")
            v = self.calc(f"{p} has", f"{have[ref]} / 2")
        have[p] = v
        self.key.append(f"{kind}{k}{self.people.index(ref)}")

    def event(self) -> str:
        """Someone's count changes (a gift, a purchase of packs, a loss); returns who."""
        rng, it, have = self.rng, self.it, self.have
        a = rng.choice(self.people)
        pos = POSSESSIVE[NAMES[a]]
        kind = rng.choice(["give", "buy", "lose", "give", "buy"])
        if kind == "give":
            b = rng.choice([q for q in self.people if q != a])
            k = rng.randint(1, max(1, have[a]))
            self.sents.append(f"{a} gives {_say(k, rng)} of {pos} {it} to {b}")
            have[a], have[b] = self.calc(f"{a} now has", f"{have[a]} - {k}"), self.calc(f"{b} now has", f"{have[b]} + {k}")
        elif kind == "buy":
            n, per = rng.randint(2, 6), rng.randint(2, 12)
            self.sents.append(f"{a} buys {_say(n, rng)} packs of {it} with {_say(per, rng)} in each pack")
            have[a] = self.calc(f"{a} now has", f"{have[a]} + {n} * {per}")
            k = n * 100 + per
        else:
            k = rng.randint(1, max(1, have[a]))
            self.sents.append(f"{a} loses {_say(k, rng)} of {pos} {it}")
            have[a] = self.calc(f"{a} now has", f"{have[a]} - {k}")
        self.key.append(f"{kind}{k}{self.people.index(a)}")
        return a

    def question(self, last_actor: str) -> tuple[str, int]:
        """About one person, everyone together, or a difference."""
        rng, it, have, people = self.rng, self.it, self.have, self.people
        ask = rng.choice(["one", "together", "more"])
        if ask == "one":
            who = rng.choice(people[1:] + [last_actor])  # someone whose count took a calculation (not just copied)
            question, answer = f"How many {it} does {who} have now?", have[who]
        elif ask == "together":
            names = " and ".join(people) if len(people) == 2 else f"{people[0]}, {people[1]} and {people[2]}"
            question = f"How many {it} do {names} have together?"
            answer = self.calc("Together:", " + ".join(str(have[p]) for p in people))
        else:
            x, y = rng.sample(people, 2)
            if have[x] < have[y]:
                x, y = y, x
            question = f"How many more {it} does {x} have than {y}?"
            answer = self.calc("The difference:", f"{have[x]} - {have[y]}")
        self.key.append(ask)
        return question, answer


def story_problem(rng: random.Random, n_people: int = 0, n_events: int = 0
                  ) -> tuple[str, list[tuple[str, str]], str, str] | None:
    """A multi-entity story: 2-3 people whose counts are defined relative to each other, change through events
    (gifts between them, purchases of packs, losses, halving), then a question about one person, their total, or
    a difference. The solver has to keep books on who has what: 3-5 calculator calls. Returns (question,
    [(label, expression)], answer, split key) or None when a number would go negative or fractional."""
    it = rng.choice(ITEMS)
    story = _Story(rng, it, rng.sample(list(NAMES), n_people or rng.choice([2, 2, 3])))
    first = story.people[0]
    story.have[first] = rng.randint(3, 60)
    story.sents.append(f"{first} has {_say(story.have[first], rng)} {it}")
    story.key.append(f"H{story.have[first]}")
    try:
        for p in story.people[1:]:
            story.relate(p)
        for _ in range(n_events or rng.choice([1, 1, 2])):
            last = story.event()
        question, answer = story.question(last)
    except _Invalid:
        return None
    if not 3 <= len(story.steps) <= 5:
        return None
    return ". ".join(story.sents) + ". " + question, story.steps, str(answer), "|".join(story.key)


class WordProblems(Task):
    """GSM8K-like problems with a worked solution; the final answer follows `####`. Most are two- or three-step
    templates, `story_rate` are multi-entity stories with 3-5 steps (see `story_problem`). Solutions do each
    step with the calculator or, at `mental_rate`, in their head, as human-written solutions mix both: a small
    model imitates the mix and its mental arithmetic is often wrong, so which style pays off is something it
    can only learn from rewards (the RL stage), not from imitation."""

    name = "word_problems"
    uses_tools = True
    story_rate = 0.3
    mental_rate = 0.6

    def example(self, rng: random.Random, split: str) -> dict:
        if rng.random() < self.story_rate:
            return self._story(rng, split)
        while True:
            k = rng.randrange(len(PROBLEMS))
            template, steps = PROBLEMS[k]
            got = _numbers(rng, steps)
            if got is None:
                continue
            v, _ = got
            n = rng.choice(list(NAMES))
            said = {k: _say(x, rng) for k, x in v.items()}
            q = template.format(n=n, it=rng.choice(ITEMS), p=NAMES[n].capitalize(), p_l=NAMES[n], **said)
            q = q[0].upper() + q[1:]
            if rng.random() < 0.5:  # an irrelevant number: the solver has to pick the right ones
                sents = q.split(". ")
                at = rng.randrange(len(sents))
                sents.insert(at, rng.choice(DISTRACTORS).format(n=n, x=rng.randint(2, 90)).rstrip("."))
                q = ". ".join(sents)
            if split_of(f"{k}|{v['a']}|{v['b']}|{v['c']}|{v['d']}") == split:
                break
        results = []
        for e in (e for _, e in steps):
            results.append(calculator(e.format(**v, **{f"r{j}": r for j, r in enumerate(results)})))
        labelled = [(say.format(**v), e.format(**v, **{f"r{j}": r for j, r in enumerate(results)}))
                    for say, e in steps]
        return self._solved(q, labelled, results[-1], rng)

    def _solved(self, question: str, steps: list[tuple[str, str]], answer: str, rng: random.Random) -> dict:
        """The worked solution: each step with the calculator or, at `mental_rate`, as mental arithmetic in the
        text (`a + b = c.`), as human-written solutions mix both; then `#### answer`."""
        parts = []
        for label, expr in steps:
            r = calculator(expr)
            if rng.random() < self.mental_rate:
                parts.append({"type": "text", "text": f"{label} {expr} = {r}. "})
            else:
                parts += [{"type": "text", "text": label + " "}, calculator_call(expr), {"type": "tool_output", "text": r}]
        parts.append({"type": "text", "text": f"#### {answer}"})
        return offer_calculator({"task": self.name, "answer": answer, "messages": [
            {"role": "user", "content": question}, {"role": "assistant", "content": parts}]}, rng)

    def grade(self, answer_text: str, example: dict) -> bool:
        return grade_hash_answer(answer_text, example["answer"])

    def _story(self, rng: random.Random, split: str) -> dict:
        while True:
            got = story_problem(rng)
            if got is not None and split_of("story|" + got[3]) == split:
                break
        q, steps, answer, _ = got
        return self._solved(q, steps, answer, rng)
