import random
import re
import string

import pytest

from exocortex.errors import ExocortexError
from exocortex.data.world import World, generate_documents
from exocortex.infer.lookup import DocumentIndex, world_index
from exocortex.config import parse_mixture
from exocortex.tasks import GENERATED, TaskSet, mixture_conversations
from exocortex.tasks.base import choice_letter, grade_final_number, grade_hash_answer, hash_answer
from exocortex.infer.tools import calculator, parse_tool_call, run_tool_call, search_tool


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


@pytest.fixture(scope="module")
def tasks(world):
    return TaskSet(world)


def _user(ex):
    return next(m["content"] for m in ex["messages"] if m["role"] == "user")


def test_train_and_test_never_overlap(tasks):
    for name in ("arithmetic", "word_problems", "spelling", "facts", "facts_mc", "lookup"):
        t = tasks[name]
        train = {_user(e) + "|" + str(e["answer"]) for e in t.examples(1500, 1, "train")}
        test = {_user(e) + "|" + str(e["answer"]) for e in t.examples(300, 2, "test")}
        assert not train & test, name


def test_arithmetic_examples_are_correct_and_use_the_tool(tasks):
    rng = random.Random(0)
    for _ in range(200):
        ex = tasks["arithmetic"].example(rng, "train")
        call, output, text = ex["messages"][-1]["content"]
        assert call["type"] == "tool_call" and output["type"] == "tool_output" and text["type"] == "text"
        name, args = parse_tool_call(call["text"])
        assert name == "calculator" and calculator(args["expression"]) == output["text"] == ex["answer"]
        assert run_tool_call(call["text"]) == output["text"]  # what the engine inserts is what it learns from
        assert grade_final_number(text["text"], ex["answer"])


def test_word_problems_chain_calculator_calls_and_end_with_hash_answer(tasks):
    for ex in tasks["word_problems"].examples(300, 0, "train"):
        parts = ex["messages"][-1]["content"]
        calls = [p["text"] for p in parts if p["type"] == "tool_call"]
        outs = [p["text"] for p in parts if p["type"] == "tool_output"]
        assert [run_tool_call(c) for c in calls] == outs
        assert all(parse_tool_call(c)[0] == "calculator" for c in calls)
        # steps done in the head are written out, and right
        mental = re.findall(r"([\d+\-*/ ]+) = (\d+)\.", "".join(p["text"] for p in parts if p["type"] == "text"))
        assert all(calculator(e) == r for e, r in mental)
        assert 2 <= len(calls) + len(mental) <= 5
        assert ex["answer"] in outs + [r for _, r in mental] and int(ex["answer"]) >= 0
        assert parts[-1]["text"] == f"#### {ex['answer']}"
        assert tasks["word_problems"].grade(parts[-1]["text"], ex)
        assert not tasks["word_problems"].grade(f"#### {int(ex['answer']) + 1}", ex)


def test_story_problems_keep_books_right():
    """Re-derive every story's answer by reading the question independently of the generator's bookkeeping."""
    import re
    from exocortex.tasks.arithmetic import NUMBER_WORDS, story_problem

    def num(w):
        return 2 if w == "twice" else int(w) if w.isdigit() else NUMBER_WORDS.index(w)

    rng, seen = random.Random(3), 0
    while seen < 300:
        got = story_problem(rng)
        if got is None:
            continue
        seen += 1
        q, steps, answer, _ = got
        have = {}
        *facts, question = [s.strip() for s in q.replace("?", ".").split(".") if s.strip()]
        for f in facts:
            f = f.replace("a dozen", "12")
            if m := re.fullmatch(r"(\w+) has (\w+) \w+", f):
                have[m[1]] = num(m[2])
            elif m := re.fullmatch(r"(\w+) has half as many \w+ as (\w+)", f):
                have[m[1]] = have[m[2]] // 2
            elif m := re.fullmatch(r"(\w+) has (\w+)(?: times)? as many \w+ as (\w+)", f):
                have[m[1]] = have[m[3]] * num(m[2])
            elif m := re.fullmatch(r"(\w+) has (\w+) (more|fewer) \w+ than (\w+)", f):
                have[m[1]] = have[m[4]] + (num(m[2]) if m[3] == "more" else -num(m[2]))
            elif m := re.fullmatch(r"(\w+) gives (\w+) of \w+ \w+ to (\w+)", f):
                have[m[1]] -= num(m[2])
                have[m[3]] += num(m[2])
            elif m := re.fullmatch(r"(\w+) buys (\w+) packs of \w+ with (\w+) in each pack", f):
                have[m[1]] += num(m[2]) * num(m[3])
            elif m := re.fullmatch(r"(\w+) loses (\w+) of \w+ \w+", f):
                have[m[1]] -= num(m[2])
            else:
                raise AssertionError(f"unparsed: {f}")
        assert all(v >= 0 for v in have.values()), q
        if m := re.fullmatch(r"How many \w+ does (\w+) have now", question):
            want = have[m[1]]
        elif m := re.fullmatch(r"How many more \w+ does (\w+) have than (\w+)", question):
            want = have[m[1]] - have[m[2]]
        else:
            want = sum(have.values())
        assert str(want) == answer, q
        assert 3 <= len(steps) <= 5


def test_spelling_copies_the_word_into_python_token_for_token(tasks, world):
    """The reply's code holds the word as the question's tokens have it (after a space: ' word'), so writing the
    call is a copy; what the sandbox prints is the tool output the reply was trained on, and the reply grades."""
    from exocortex.tokenizer import Tokenizer

    tok = Tokenizer.train(generate_documents(0, n_docs=400, world=world), 1500)
    t = tasks["spelling"]
    examples = t.examples(300, 0, "train")
    assert {e["kind"] for e in examples} == {"spell", "count"}
    spaced = 0
    for ex in examples:
        call, output, text = ex["messages"][-1]["content"]
        name, args = parse_tool_call(call["text"])
        assert name == "python" and output["type"] == "tool_output"
        literal = re.search(r"'( ?[a-z]+)'\.(count|strip)", args["code"]).group(1)
        assert literal.strip() == ex["word"]
        spaced += literal.startswith(" ")
        q, w = tok.encode(_user(ex)), tok.encode(literal)
        assert any(q[i:i + len(w)] == w for i in range(len(q))), (_user(ex), args["code"])
        letter = re.search(r"count\('([a-z])'\)", args["code"])
        want = "-".join(ex["word"]) if ex["kind"] == "spell" else str(ex["word"].count(letter.group(1)))
        assert output["text"] == want and t.grade(text["text"], ex)
        assert text["text"].endswith("#### " + want)
    assert 50 < spaced < 250  # both ways of asking occur


def test_spelling_tool_outputs_are_what_the_sandbox_prints(tasks):
    from exocortex.infer.sandbox import python_tool_status
    from exocortex.infer.tools import sandboxed_python

    enabled, note = python_tool_status()
    if not enabled:
        pytest.skip(note)
    for ex in tasks["spelling"].examples(4, 1, "train"):
        call, output, _ = ex["messages"][-1]["content"]
        assert sandboxed_python(parse_tool_call(call["text"])[1]) == output["text"]


def test_eval_says_when_the_python_tool_is_off(tasks, monkeypatch):
    from exocortex import evals
    from exocortex.infer import sandbox

    class Engine:
        tools = {"calculator": None, "python": None}

    monkeypatch.setattr(sandbox, "python_tool_status", lambda: (False, "the python tool is off: no sandbox here"))
    notes = evals.tool_notes(Engine, [tasks["spelling"], tasks["arithmetic"]])
    assert len(notes) == 1 and "no sandbox here" in notes[0] and "spelling" in notes[0]
    assert evals.tool_notes(Engine, [tasks["arithmetic"]]) == []
    monkeypatch.setattr(sandbox, "python_tool_status", lambda: (True, None))
    assert evals.tool_notes(Engine, [tasks["spelling"]]) == []


def test_multiple_choice_letters(tasks):
    t = tasks["facts_mc"]
    ex = t.examples(1, 0, "test")[0]
    wrong = "ABCD".replace(ex["answer"], "")[0]
    assert t.grade(ex["answer"], ex) and t.grade(f"The answer is {ex['answer']}.", ex)
    assert not t.grade(wrong, ex) and not t.grade("I am not sure", ex)
    assert choice_letter("A cat (B) is", 4) == "B"  # the article "A" is not a standalone choice... unless it is
    assert ex["choices"][ex["gold"]].lower() in _user(ex).lower()


def test_lookup_people_were_never_in_pretraining(world, tasks):
    docs = "\n".join(generate_documents(0, target_bytes=1_500_000, world=world, hold_out=True))
    t = tasks["lookup"]
    test_names = {f.subject for f in t.by_split["test"]}
    train_names = {f.subject for f in t.by_split["train"]}
    assert test_names and train_names and not test_names & train_names
    assert test_names < world.held_out_names and world.held_out_names & train_names  # half trains the skill
    assert not any(n in docs for n in world.held_out_names)
    tools = {"lookup": search_tool(t.index)}
    for ex in t.examples(50, 0, "test"):
        call, out, answer = ex["messages"][-1]["content"]
        assert parse_tool_call(call["text"]) == ("lookup", {}) and ex["answer"].lower() in out["text"].lower()
        assert run_tool_call(call["text"], tools, context=_user(ex)) == out["text"]  # the engine's search
        assert t.grade(answer["text"], ex)
    people = {p.name for p in world.people}
    assert not any(f.subject in people for f in tasks["facts"].by_split["train"])  # person questions: lookup
    assert not any(f.subject in world.held_out_names for f in tasks["facts_mc"].by_split["train"])


def test_document_index_finds_the_entity_passage(world):
    idx = world_index(world)
    for e in world.entities[::7]:
        assert idx(e.name).startswith(e.name) or idx(e.name).startswith("The " + e.name)
    user = DocumentIndex(["The vault code is 4417.", "Lunch is at noon on Fridays.", "Our office is in Lyon."])
    assert "4417" in user("what is the vault code?") and "noon" in user("when is lunch")
    assert user("   ") == "error: empty query" and user("zebra") == "no results"


def test_a_runs_lookup_tool_takes_the_calls_arguments(tmp_path):
    from exocortex.config import make_config
    from exocortex.infer.lookup import tools_for_run

    (tmp_path / "notes.txt").write_text("The vault code is 4417.\n\nLunch is at noon on Fridays.\n")
    tools = tools_for_run(make_config("tiny"), docs=[str(tmp_path / "notes.txt")])
    assert set(tools) == {"calculator", "python", "lookup"}
    call = '{"name": "lookup", "arguments": {"query": "vault code"}}'
    assert "4417" in run_tool_call(call, tools)
    assert "4417" in run_tool_call('{"name": "lookup", "arguments": {}}', tools, context="the vault's code?")
    assert run_tool_call('{"name": "lookup", "arguments": {"q": "x"}}', tools) == "error: lookup takes only 'query', not 'q'"


def test_mixture_is_deterministic_and_weighted(tasks):
    m = parse_mixture("arithmetic=3,identity=1")
    a = mixture_conversations(tasks, m, 400, 5)
    assert a == mixture_conversations(tasks, m, 400, 5)
    share = sum(c["task"] == "arithmetic" for c in a) / len(a)
    assert 0.65 < share < 0.85
    with pytest.raises(ExocortexError, match="weight must be a number"):
        parse_mixture("arithmetic=lots")
    with pytest.raises(ExocortexError, match="unknown task"):
        mixture_conversations(tasks, {"nope": 1.0}, 2, 0)


def test_mixture_conversations_render_with_masks(tok, world):
    mixture = {"arithmetic": 0.4, "facts": 0.3, "smalltalk": 0.2, "identity": 0.1}
    convs = mixture_conversations(TaskSet(world), mixture, 200, 3)
    assert {c["task"] for c in convs} == {"arithmetic", "facts", "smalltalk", "identity"}
    assert any(c["messages"][0]["role"] == "system" for c in convs)
    for c in convs:
        ids, mask = tok.render_conversation(c)
        assert len(ids) == len(mask) and any(mask)


def test_graders_never_crash_on_random_output(tasks):
    """Task.grade itself (not safe_grade) on random strings: a grader must handle any model output."""
    rng = random.Random(0)
    alphabet = string.printable + "−×÷½²é日🙂####ABCD"
    examples = {n: tasks[n].examples(5, 0, "test") for n in GENERATED}
    for _ in range(2000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        for name, exs in examples.items():
            assert tasks[name].grade(s, exs[_ % 5]) in (True, False)


def test_grade_number_and_hash_answer():
    assert grade_final_number("347 * 29 = 10063.", "10063")
    assert not grade_final_number("10063 is not it, it is 5", "10063")
    assert grade_final_number("The answer is 1,000.", "1000")
    assert not grade_final_number("no numbers here", "3")
    assert grade_hash_answer("so 3 + 4 = 7 #### 7", "7") and not grade_hash_answer("7", "7")
    assert grade_hash_answer("#### 1,234", "1234") and not grade_hash_answer("#### ", "0")


def test_numbers_pair_words_with_digits_and_hold_test_numbers_out(tasks):
    from exocortex.data.world import number_words
    from exocortex.tasks.numbers import last_number_in_words
    t = tasks["numbers"]
    train = t.examples(2000, 1, "train")
    assert {e["direction"] for e in train} == {"digits", "words", "sentence"}
    for e in train[:300]:
        n, reply = int(e["answer"]), e["messages"][-1]["content"]
        if e["direction"] == "words":  # the question says the number in digits, the reply in words
            assert re.search(rf"\b{n}\b", _user(e)) and last_number_in_words(reply) == n, (_user(e), reply)
        else:
            assert number_words(n) in _user(e).lower() and re.search(rf"\b{n}\b", reply), (_user(e), reply)
        assert t.grade(reply, e)
    train_numbers = {int(e["answer"]) for e in train}
    test_numbers = {int(e["answer"]) for e in t.examples(300, 2, "test")}
    assert len(train_numbers) > 700 and test_numbers and not train_numbers & test_numbers


def test_numbers_grader_reads_the_whole_number():
    from exocortex.data.world import number_words
    from exocortex.tasks.numbers import NumberWords, last_number_in_words
    t = NumberWords()
    words = {"direction": "words", "answer": "405"}
    for right in ("Four hundred and five.", "405 is four hundred and five", "It is said four hundred and five.",
                  "four hundred five", "In words: four-hundred and five!"):
        assert t.grade(right, words), right
    for wrong in ("four hundred", "four hundred and fifty-five.", "four hundred and five, no, four hundred and six",
                  "405.", "five"):
        assert not t.grade(wrong, words), wrong
    seventy_seven = {"direction": "words", "answer": "77"}
    assert t.grade("Seventy-seven.", seventy_seven) and not t.grade("Seventy. Seven.", seventy_seven)
    assert not t.grade("seventy-seven hundred", seventy_seven)
    assert t.grade("A hundred.", {"direction": "words", "answer": "100"})
    digits = {"direction": "digits", "answer": "87"}
    assert t.grade("eighty-seven is 87.", digits) and not t.grade("77.", digits)
    assert last_number_in_words("and so, seven and") == 7 and last_number_in_words("none here, a dog") is None
    assert all(last_number_in_words(f"It is {number_words(n)}.") == n for n in range(1000))
