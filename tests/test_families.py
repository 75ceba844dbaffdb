"""Phrasing families: held-out families never reach training, split "heldout" asks only in them and only about
test items, and the eval and report keep seen and held-out accuracy apart."""
import random
from collections import Counter
import re

import pytest

from exocortex.data.world import World, _arith_said, arithmetic_doc, number_words
from exocortex.run import EvalSummary
from exocortex.stages.report import family_table, generalisation_table
from exocortex.config import MIDTRAIN_MIXTURE
from exocortex.data.world import QUESTIONS
from exocortex.tasks import TaskSet, mixture_conversations
from exocortex.tasks.arithmetic import ARITH_FAMILIES, Arithmetic
from exocortex.tasks.base import split_of
from exocortex.tasks.numbers import NUMBER_FAMILIES
from exocortex.tasks.phrasing import say_number, typo
from exocortex.tasks.spelling import SPELL_FAMILIES
from exocortex.tasks.world import MC_FAMILIES

FAMILY_TASKS = ("arithmetic", "spelling", "facts_mc", "facts", "lookup", "numbers")


@pytest.fixture(scope="module")
def tasks():
    return TaskSet(World(seed=0))


def _user(ex) -> str:
    return next(m["content"] for m in ex["messages"] if m["role"] == "user")


def _pattern(frame: str) -> re.Pattern:
    """A frame as a regex over prompts: its literal text, each slot any words (case-insensitive)."""
    return re.compile(".+?".join(re.escape(p) for p in re.split(r"\{[a-z_]+\}", frame)), re.IGNORECASE)


def _frames_of(task, family) -> list[str]:
    if task.name == "arithmetic":
        return [f for k, fs in ARITH_FAMILIES[family].items() if k != "wrap" for f in fs]
    if task.name == "spelling":
        return [f for fs in SPELL_FAMILIES[family] for f in fs]
    if task.name == "numbers":
        return [f for fs in NUMBER_FAMILIES[family] for f in fs]
    if task.name in ("facts", "lookup"):  # the last wording of each relation the task asks about
        assert family == "last_wording"
        rels = {f.relation for f in task.by_split["train"]}
        return [QUESTIONS[k][-1] for k in QUESTIONS if k.split(":")[0] in rels]
    return []


@pytest.mark.parametrize("name", FAMILY_TASKS)
def test_families_are_split_by_split(tasks, name):
    t = tasks[name]
    assert t.heldout_families and set(t.heldout_families) < set(t.families) and t.seen_families
    for split, allowed in (("train", t.seen_families), ("test", t.seen_families), ("heldout", t.heldout_families)):
        exs = t.examples(400, 3, split)
        got = {e["family"] for e in exs}
        assert got <= set(allowed), (split, got - set(allowed))
        assert got == set(allowed), f"{split}: 400 draws should use every family, missing {set(allowed) - got}"
    assert t.examples(20, 5, "heldout") == t.examples(20, 5, "heldout")  # deterministic


@pytest.mark.parametrize("name", ("arithmetic", "spelling", "facts", "lookup", "numbers"))
def test_no_heldout_family_text_in_training(tasks, name):
    t = tasks[name]
    frames = [_pattern(f) for fam in t.heldout_families for f in _frames_of(t, fam)]
    assert len(frames) >= 4
    train = [_user(e) for e in t.examples(3000, 11, "train")]
    for f in frames:
        assert not any(f.search(q) for q in train), f"held-out wording {f.pattern!r} appears in a training prompt"
    held = [_user(e) for e in t.examples(600, 11, "heldout")]
    assert sum(any(f.search(q) for f in frames) for q in held) > len(held) * 0.7  # the frames do find the family


def test_no_heldout_family_text_in_any_training_conversation(tasks):
    """Across the whole midtrain mixture (other tasks reuse these tasks' questions: smalltalk, facts_mc)."""
    frames = [_pattern(f) for name in ("arithmetic", "spelling", "facts", "lookup")
              for fam in tasks[name].heldout_families
              for f in _frames_of(tasks[name], fam)]
    convs = mixture_conversations(tasks, MIDTRAIN_MIXTURE, 4000, 0, "train")
    users = [m["content"] for c in convs for m in c["messages"] if m["role"] == "user"]
    for f in frames:
        assert not any(f.search(u) for u in users), f"held-out wording {f.pattern!r} in a training conversation"


def test_no_heldout_arithmetic_wording_in_the_pretraining_corpus(tasks):
    """The corpus says calculations in words (data/world.py `_arith_said`) but never in a held-out frame."""
    t = tasks["arithmetic"]
    frames = [_pattern(f) for fam in t.heldout_families for f in _frames_of(t, fam)]
    rng = random.Random(4)
    docs = [arithmetic_doc(tasks.world, rng) for _ in range(1000)] + [_arith_said(tasks.world, rng) for _ in range(500)]
    lines = [ln for doc in docs for ln in doc.split("\n")]
    assert len(lines) > 3000
    for f in frames:
        assert not any(f.search(ln) for ln in lines), f"held-out wording {f.pattern!r} in the pretraining corpus"


def test_no_heldout_layout_in_facts_mc_training(tasks):
    t = tasks["facts_mc"]
    for e in t.examples(2000, 11, "train"):
        q = _user(e)
        assert " Is it A) " not in q and not q.startswith("A. "), q
    for e in t.examples(200, 11, "heldout"):
        q = _user(e)
        assert (" Is it A) " in q) != q.startswith("A. "), q


def test_heldout_asks_test_items(tasks):
    for e in tasks["arithmetic"].examples(300, 2, "heldout"):
        expr = e["messages"][-1]["content"][0]["text"]
        assert split_of(re.search(r'"expression": "([^"]+)"', expr).group(1)) == "test"
    for e in tasks["spelling"].examples(300, 2, "heldout"):
        if e["kind"] == "spell":
            assert split_of("spell|" + e["word"]) == "test"
    mc = tasks["facts_mc"]
    test_values = {(f.relation, f.value) for f in mc.by_split["test"]}
    for e in mc.examples(100, 2, "heldout"):
        assert any(v == e["choices"][e["gold"]] for _, v in test_values)


@pytest.mark.parametrize("name", FAMILY_TASKS)
def test_reference_replies_grade_right_in_every_split(tasks, name):
    t = tasks[name]
    for split in ("train", "heldout"):
        for e in t.examples(100, 4, split):
            parts = e["messages"][-1]["content"]
            text = parts if isinstance(parts, str) else "".join(p["text"] for p in parts if p["type"] == "text")
            assert t.grade(text, e), (split, _user(e), text)


def test_everyday_arithmetic_phrasings_compute_the_right_thing():
    rng = random.Random(0)
    seen = {}
    for family in Arithmetic.families:
        for _ in range(200):
            q, e = Arithmetic.ask(family, rng)
            seen.setdefault(family, []).append((q, e))
    for q, e in seen["commands"]:
        m = re.search(r"subtract (\d+) from (\d+)", q)
        if m:
            assert e == f"{m.group(2)} - {m.group(1)}"  # "subtract 9 from 20" is 20 - 9
    halves = [(q, e) for q, e in seen["halves"] if re.search(r"half( of)? (\d+)", q)]
    assert halves and all(e.endswith(" / 2") and e.split()[0] == re.search(r"half(?: of)? (\d+)", q).group(1)
                          for q, e in halves)


def test_seen_story_questions_do_not_give_away_the_operation():
    """Only the verb tells a sum from a difference: a question that could ask either ("How many now?", "How many
    do we have now?") is asked of both. (When "have now" asked only sums, "Ada had 83 books and used 42. How many
    does she have now?" was read as 83 + 42.)"""
    rng = random.Random(0)
    ops = {}
    for family in ("story", "story_things"):
        for _ in range(4000):
            q, e = Arithmetic.ask(family, rng)
            for ask in ("how many now", "have now", "are there now"):
                if ask in q.lower():
                    ops.setdefault((family, ask), []).append(e.split()[1])
    for ask, got in ops.items():
        assert got.count("+") > 0.3 * len(got) and got.count("-") > 0.3 * len(got), (ask, len(got))
    assert len(ops) == 6 and sum(map(len, ops.values())) > 1000


# words that mean an operation (or the parts a division makes, or a rate): only these may tell it in a prompt
OPERATION_WORDS = {
    "+": "add added addition plus sum total together increased received found picked already brought altogether more "
         "bigger greater larger higher above past beyond",
    "-": "minus subtract subtracted take away from less reduced decreased difference left remain remains remove removed "
         "smaller used sold spent lost broke threw missing fewer reduce lower below under short taken",
    "*": "times multiply multiplied product lots double twice triple x packs rows crates holding filled per at hour",
    "/": "divide divided quotient half third quarter share shares shared split equal equally evenly among parts "
         "stages ways same pile piles bag portions groups cut",
}


def test_only_words_that_mean_an_operation_tell_it():
    """Across the seen families, a word that (nearly) always comes with one operation must mean it. A word that
    comes with one operation by accident of the templates is a cue the model learns instead of the meaning: when
    "between" came only in "the difference between", the held-out "Noor shares 48 cookies between 6 friends" was
    read as 48 - 6; units ("metres" only in differences) and questions ("How many does it have now?" only in
    sums) were such cues too."""
    rng = random.Random(0)
    ops_of = {}
    worded = [f for f in Arithmetic.families if f not in Arithmetic.heldout_families and f != "symbols"]
    for _ in range(20000):
        q, e = Arithmetic.ask(rng.choice(worded), rng)
        for w in set(re.findall(r"[a-z]+", q.lower())):
            ops_of.setdefault(w, []).append(e.split()[1])
    cues = []
    for w, ops in ops_of.items():
        top = max(set(ops), key=ops.count)
        if len(ops) >= 100 and ops.count(top) > 0.9 * len(ops) and w not in OPERATION_WORDS[top].split():
            cues.append(f"{w!r} comes with {top} in {ops.count(top)} of {len(ops)} prompts")
    assert not cues, cues


# the only words of the held-out arithmetic frames that no seen frame has: a new held-out frame says its operation
# in words the seen frames have taught ("remove {b} from {a}" is seen, so "what remains when 5 is removed" tests the
# frame, not the word)
HELDOUT_ONLY_WORDS = {"as", "big", "part", "repeated", "start", "their", "two", "which"}


def test_heldout_arithmetic_frames_use_the_seen_frames_words():
    def words(frame):
        return set(re.sub(r"\{[a-z]+\}|[^a-z' ]", " ", frame.lower()).split())
    held, seen = set(), set()
    for fam, ops in ARITH_FAMILIES.items():
        for f in (f for fs in ops.values() for f in fs):  # the wrappers too: they are trained as well
            (held if fam in Arithmetic.heldout_families else seen).update(words(f))
    assert held - seen <= HELDOUT_ONLY_WORDS, sorted(held - seen - HELDOUT_ONLY_WORDS)


# a verb in any person or tense, so that "I had 5 and used 2. How many do I have now?" counts as Ada's story
SAME_VERB = {"does": "do", "did": "do", "has": "have", "had": "have", "gets": "get", "got": "get", "sells": "sell",
             "sold": "sell", "uses": "use", "used": "use", "shares": "share", "shared": "share", "finds": "find",
             "found": "find", "buys": "buy", "bought": "buy"}


def _holds_all_words(text: str, words: list[str]) -> bool:
    """All of `words` (each as often) are in `text`, as lemmas, in any order."""
    return not Counter(words) - Counter(SAME_VERB.get(w, w) for w in re.sub(r"\{[a-z]+\}|[.,;:?!]", " ", text).lower().split())


def test_no_seen_arithmetic_frame_holds_a_heldout_frames_words():
    """Stronger than a regex over prompts: no seen frame, hand-written or composed, has all of a held-out frame's
    words, in any person, tense or order, with anything between ("The shop had {a} {x} and used {b}. How many
    {x} does it have now?" is the held-out story with "Ada" swapped for a shop and one word added; "What comes
    out if {a} is divided by {b}?" is a held-out conditional with its clauses swapped)."""
    held = [[SAME_VERB.get(w, w) for w in re.sub(r"\{[a-z]+\}|[.,;:?!]", " ", f).lower().split()]
            for fam in Arithmetic.heldout_families for op, fs in ARITH_FAMILIES[fam].items() if op != "wrap" for f in fs]
    seen = [f for fam in ARITH_FAMILIES if fam not in Arithmetic.heldout_families
            for op, fs in ARITH_FAMILIES[fam].items() if op != "wrap" for f in fs]
    assert len(seen) > 1000
    for f in seen:
        assert not any(_holds_all_words(f, h) for h in held), f
        words = [SAME_VERB.get(w, w) for w in re.sub(r"\{[a-z]+\}|[.,;:?!]", " ", f).lower().split()]
        # one word swapped, added or dropped is the same frame: "What number is {b} greater than {a}?" is the
        # held-out "What number is {b} more than {a}?", "What do you get if ..." is "What do you get when ..."
        near = [h for h in held if len(h) > 2 and _one_word_apart(words, h)]
        assert not near, (f, near)


def _one_word_apart(a: list[str], b: list[str]) -> bool:
    if a == b or abs(len(a) - len(b)) > 1:
        return a == b
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) <= 1
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def test_story_operands_in_either_order():
    """Events that name the second number first ("used 5 of its 40 eggs", "got 3 in addition to the 12 we had")
    still compute first minus second."""
    rng = random.Random(3)
    checked = 0
    for _ in range(6000):
        q, e = Arithmetic.ask(rng.choice(("story", "story_things")), rng)
        m = (re.search(r"used (\d+) of (?:my|our|its) (\d+)", q)
             or re.search(r"got (\d+) \w+ in addition to the (\d+)", q))
        if m:  # a difference reads the second number first; a sum is written in the question's order
            a, op, b = e.split()
            if "used" in m.group(0):
                assert (a, op, b) == (m.group(2), "-", m.group(1)), (q, e)
            else:
                assert (a, op, b) == (m.group(1), "+", m.group(2)), (q, e)
            checked += 1
    assert checked > 30


def test_sums_and_products_are_written_in_the_order_the_question_says_their_numbers(monkeypatch):
    """"What do you get when 43 is added to 593?" is called as 43 + 593: a model that copies the question's numbers
    in order need not reorder them (differences and quotients keep the order their meaning needs)."""
    import exocortex.tasks.arithmetic as arithmetic
    monkeypatch.setattr(arithmetic, "NUMBERED_OPENER_RATE", 0.0)
    rng = random.Random(11)
    reordered = checked = 0
    for _ in range(20000):
        family = rng.choice([f for f in Arithmetic.families if f not in ("symbols", "halves")])
        q, e = Arithmetic.ask(family, rng)
        a, op, b = e.split()
        said = re.findall(r"\d+", q.replace(",", ""))
        if op in "+*" and a != b and sorted(said) == sorted([a, b]):
            assert said == [a, b], (family, q, e)
            checked += 1
            reordered += bool(re.search(r"add \d+ to \d+", q))  # "add {b} to {a}": written b + a
    assert checked > 3000 and reordered > 50, (checked, reordered)


def test_comparisons_and_given_numbers_compute_what_they_say(monkeypatch):
    """"the number 5 fewer than 62" is 62 - 5 (a comparative says its numbers the other way round from the
    difference); "5 greater than 62" is 5 + 62, in the question's order; "How many lots of 4 are in 36?" is 36 / 4;
    "Given 9 and 3: take the second from the first." is 9 - 3."""
    import exocortex.tasks.arithmetic as arithmetic
    monkeypatch.setattr(arithmetic, "NUMBERED_OPENER_RATE", 0.0)
    rng = random.Random(5)
    checked = {"-": 0, "+": 0, "*": 0, "/": 0, "given": 0}
    for _ in range(4000):
        q, e = Arithmetic.ask("comparisons", rng)
        said = re.findall(r"\d+", q.replace(",", ""))
        if len(said) != 2:  # a number said in words
            continue
        first, second = said
        op = e.split()[1]
        # the words say the operation (a typo may hide them: then the question is skipped)
        told = [o for o, cue in (("-", r"fewer|lower|below|under|short"), ("+", r"greater|larger|higher|above|past|beyond"),
                                 ("/", r"are in \d+|\d+ is \d+"), ("*", r"number (that is )?\d+ times"))
                if re.search(cue, q)]
        if not told:
            continue
        assert [op] == told, (q, e)
        expected = {"-": f"{second} - {first}", "+": f"{first} + {second}", "*": f"{first} * {second}",
                    "/": f"{second} / {first}"}[op]
        assert e == expected, (q, e)
        checked[op] += 1
    for _ in range(2000):
        q, e = Arithmetic.ask("given", rng)
        said = re.findall(r"\d+", q.replace(",", ""))
        if len(said) == 2:  # the numbers come in order, whatever the operation, and the instruction says which
            assert e.split()[::2] == said, (q, e)
            told = [o for o, cue in (("-", r"minus|less|reduce"), ("*", r"times|multipl"), ("/", r"divided|over"),
                                     ("+", r"total|together|plus")) if re.search(cue, q.lower())]
            if told:  # (a typo may hide the instruction's words)
                assert [e.split()[1]] == told, (q, e)
            checked["given"] += 1
    assert min(checked.values()) > 50, checked


def test_numbers_before_the_question_are_not_operands(monkeypatch):
    """A numbered opener ("Question 3: ", "I have two questions. First: ") asks the same calculation."""
    import exocortex.tasks.arithmetic as arithmetic
    for seed in range(300):
        family = random.Random(seed).choice(Arithmetic.families)
        monkeypatch.setattr(arithmetic, "NUMBERED_OPENER_RATE", 0.0)
        plain = Arithmetic.ask(family, random.Random(seed))
        monkeypatch.setattr(arithmetic, "NUMBERED_OPENER_RATE", 1.0)
        opened = Arithmetic.ask(family, random.Random(seed))
        assert opened[1] == plain[1] and opened[0].endswith(plain[0]) and len(opened[0]) > len(plain[0])
    monkeypatch.undo()
    rng = random.Random(1)
    asked = [Arithmetic.ask(rng.choice(Arithmetic.families), rng)[0] for _ in range(2000)]
    opener = re.compile("|".join(re.escape(o).replace(re.escape("{k}"), r"[a-z0-9]+")
                                 for o in arithmetic.NUMBERED_OPENERS))
    assert 150 < sum(bool(opener.match(q)) for q in asked) < 250  # NUMBERED_OPENER_RATE of 2000


def test_facts_mc_recalls_checks_the_choices_then_gives_the_letter(tasks):
    t = tasks["facts_mc"]
    for e in t.examples(20, 0, "test"):
        reply = e["messages"][-1]["content"]
        checks, letter = reply.split(" #### ")
        gold = e["choices"][e["gold"]]
        # the recalled value first, then each check: "value - yes" is the same text as the recall (a copy)
        assert checks.startswith(f"It is {gold} - yes. ")
        assert letter == e["answer"] and checks.endswith(f"{e['answer']}. {gold} - yes.")
        assert checks.count(" - no.") == e["gold"]  # the choices before the right one, each judged wrong
        wrong = "ABCD".replace(e["answer"], "")[0]
        assert t.grade(reply, e) and not t.grade(f"{checks} #### {wrong}", e)
        assert t.grade(e["answer"], e) and t.grade(f"The answer is {e['answer']}.", e)  # a bare letter still counts
    assert set(MC_FAMILIES) == set(t.families)


def test_number_grammar():
    assert [number_words(n) for n in (0, 7, 21, 40, 100, 305, 1000, 1234)] == [
        "zero", "seven", "twenty-one", "forty", "one hundred", "three hundred and five", "one thousand",
        "one thousand two hundred and thirty-four"]
    rng = random.Random(1)
    said = {say_number(4321, rng) for _ in range(50)}
    assert said == {"4321", "4,321"}
    assert typo("12 plus 30", rng) == "12 plus 30" or "12" in typo("12 plus 30", rng)


def test_generalisation_table():
    ev = EvalSummary(stages={"sft": {"arithmetic_accuracy": 0.9, "arithmetic_n": 100, "arithmetic_heldout_accuracy": 0.6,
                                     "arithmetic_heldout_n": 100, "facts_accuracy": 0.7, "facts_n": 100},
                             "rl": {"arithmetic_accuracy": 0.92, "arithmetic_n": 100}})
    table = "\n".join(generalisation_table(ev))
    assert "| arithmetic | SFT | 90.0% (n=100) | 60.0% (n=100) | +30.0 |" in table
    assert "facts" not in table.split("|---|")[-1] and "| RL |" not in table
    assert generalisation_table(EvalSummary(stages={"sft": {"facts_accuracy": 0.5}})) == []


def test_family_table():
    ev = EvalSummary(families={"sft": {"arithmetic": {"seen": {"spoken": [9, 10], "clauses": [3, 4]},
                                                      "heldout": {"relational": [1, 4]}}},
                               "rl": {"arithmetic": {"seen": {"spoken": [10, 10]}, "heldout": {}}}})
    table = family_table(ev)
    assert table[4] == "| task | family | SFT | RL |"
    rows = table[6:-1]  # seen families first (sorted), then the held-out ones, marked
    assert rows == ["| arithmetic | clauses | 75% (4) | — |", "| arithmetic | spoken | 90% (10) | 100% (10) |",
                    "| arithmetic | relational (held out) | 25% (4) | — |"]
    assert family_table(EvalSummary(stages={"sft": {"facts_accuracy": 0.5}})) == []


def test_eval_keeps_seen_and_heldout_families_apart(tok, small_cfg, tasks):
    """chat_scores asks a task with held-out families twice: a model that answers right only in the wordings
    it was trained on scores 100% seen and 0% held-out."""
    import torch

    from exocortex.config import EvalConfig
    from exocortex.evals import chat_scores
    from exocortex.infer.engine import Engine
    from exocortex.model import GPT
    from exocortex.tasks.base import prompt_ids
    from scripted import Scripted

    t = tasks["facts_mc"]
    e = EvalConfig(chat_tasks={"facts_mc": 12}, heldout_n=8, pass_k=1, max_new_tokens=200)
    examples = t.examples(12, e.seed, "test") + t.examples(8, e.seed, "heldout")
    by_prompt = {tuple(prompt_ids(tok, x)): x for x in examples}

    def reply(prompt):
        x = by_prompt[tuple(prompt)]
        text = x["messages"][-1]["content"] if x["family"] in t.seen_families else "No idea."
        return tok.encode(text) + [tok.special["<|assistant_end|>"]]

    small_cfg.vocab_size, small_cfg.seq_len = tok.vocab_size, 512
    eng = Engine(GPT(small_cfg), tok, torch.device("cpu"), decoder=Scripted(reply, tok.vocab_size))
    samples, families, transcript = [], {}, []
    out = chat_scores(eng, tok, {"facts_mc": t}, e, samples, "sft", families=families, transcript=transcript)
    calibration = {k: out.pop(k) for k in list(out) if k.startswith("escalation_")}  # see test_escalation.py
    assert out == {"facts_mc_accuracy": 1.0, "facts_mc_n": 12, "facts_mc_heldout_accuracy": 0.0,
                   "facts_mc_heldout_n": 8}
    assert calibration["escalation_n"] == 10  # the half not fitted on: both families
    assert {s["task"] for s in samples} == {"facts_mc", "facts_mc (held-out family)"}
    # every question counted once under its own family: right in each seen one, wrong in each held-out one
    seen, held = families["facts_mc"]["seen"], families["facts_mc"]["heldout"]
    assert set(seen) <= set(t.seen_families) and set(held) <= set(t.heldout_families)
    assert sum(n for _, n in seen.values()) == 12 and all(r == n for r, n in seen.values())
    assert sum(n for _, n in held.values()) == 8 and all(r == 0 for r, _ in held.values())
    # and every reply is in the transcript, as graded
    assert [(r["split"], r["right"]) for r in transcript] == [("test", True)] * 12 + [("heldout", False)] * 8
    assert all(r["reply"] == "No idea." and r["family"] in t.heldout_families for r in transcript[12:])
    assert transcript[0]["expected"] == examples[0]["answer"] and transcript[0]["stage"] == "sft"
    e.heldout_n = 0
    assert "facts_mc_heldout_accuracy" not in chat_scores(eng, tok, {"facts_mc": t}, e, [], "sft")


def test_a_question_longer_than_the_context_is_scored_wrong_and_said(tok, small_cfg, tasks, capsys):
    """A model with few positions cannot read a long question (an offered tools block is ~100 tokens): eval
    scores it wrong, says how many, and answers the rest, where generate would raise."""
    import torch

    from exocortex.evals import task_accuracy
    from exocortex.infer.engine import Engine
    from exocortex.model import GPT
    from exocortex.tasks.base import prompt_ids
    from scripted import Scripted

    t = tasks["arithmetic"]
    examples = t.examples(40, 3, "test")
    small_cfg.vocab_size, small_cfg.seq_len = tok.vocab_size, 32
    eng = Engine(GPT(small_cfg), tok, torch.device("cpu"),
                 decoder=Scripted(lambda p: [tok.special["<|assistant_end|>"]], tok.vocab_size))
    limit = eng.model.rope_cos.shape[0]
    too_long = sum(len(prompt_ids(tok, x)) >= limit for x in examples)
    assert 0 < too_long < len(examples)
    assert task_accuracy(eng, tok, t, 40, 3, 8) == 0.0
    assert f"{too_long} of 40 arithmetic questions are longer than the model's {limit} positions" in capsys.readouterr().err
