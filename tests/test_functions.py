"""The `functions` task: calling the functions a client offers in the system turn (exocortex/tasks/functions.py)."""
import json
import random
from collections import Counter

import pytest
import torch

from exocortex.evals import task_accuracy
from exocortex.infer.engine import Engine
from exocortex.infer.tools import BUILTIN_TOOLS, TOOLS, parse_tool_call
from exocortex.model import GPT
from exocortex.tasks import TaskSet, mixture_conversations
from exocortex.tasks.base import prompt_ids, split_of
from exocortex.tasks.arithmetic import CALCULATOR_SPEC
from exocortex.tasks.functions import CALCULATOR, FUNCTIONS, KINDS, Functions, carries, same_json
from exocortex.tokenizer import CALL_START, RESPONSE_START, Tokenizer, plain_text, render_tools_block, tool_call_json
from scripted import Scripted


@pytest.fixture(scope="module")
def task():
    return Functions()


def _parts(ex):
    reply = ex["messages"][-1]["content"]
    return reply if isinstance(reply, list) else [{"type": "text", "text": reply}]


def _user(ex):
    return next(m["content"] for m in ex["messages"] if m["role"] == "user")


def _with(ex, call: str | None = None, answer: str | None = None, extra_call: bool = False) -> list[dict]:
    """The reference reply with its call's JSON and/or its final words replaced."""
    parts = [dict(p) for p in _parts(ex)]
    for p in parts:
        if p["type"] == "tool_call" and call is not None:
            p["text"] = call
    if answer is not None:
        parts[-1]["text"] = answer
    if extra_call:
        parts = parts[:2] + parts
    return parts


def test_reference_replies_are_right_and_copy_the_request(task):
    """Every reference: graded right, its call names an offered function with exactly that function's parameters,
    every argument is a value the user wrote, and the response is what the client's function returns."""
    seen = Counter()
    for ex in task.examples(2000, 0, "train"):
        parts = _parts(ex)
        assert task.grade_reply(parts, ex) and task.reward_reply(parts, ex) == 1.0
        offered = {s["function"]["name"]: s["function"]["parameters"] for s in ex["tools"]}
        assert 1 <= len(offered) <= 2 and len(offered) == len(ex["tools"])
        seen[ex["kind"], len(offered)] += 1
        if ex["call"] is None:
            assert not any(p["type"] == "tool_call" for p in parts)
            continue
        call, response, answer = parts
        name, arguments = parse_tool_call(call["text"])
        assert {"name": name, "arguments": arguments} == ex["call"] and name in offered
        assert set(arguments) == set(offered[name]["properties"]) == set(offered[name]["required"])
        for v in arguments.values():
            assert str(v) in _user(ex)
        assert task.client_tools[name](arguments) == response["text"]
        assert carries(response["text"], ex["answer"]) and carries(answer["text"], ex["answer"])
    # every kind, and two functions offered where only one fits
    assert {k for k, _ in seen} == set(KINDS) and seen["choose", 2] > 250 and seen["none", 2] > 50
    assert seen["choose", 2] > seen["choose", 1]  # (a three-parameter spec leaves no room for a second)


def test_signatures_vary_and_the_builtin_calculator_spec_is_offered(task):
    exs = task.examples(3000, 1, "train")
    names = Counter(ex["call"]["name"] for ex in exs if ex["call"])
    for fn in FUNCTIONS + [CALCULATOR]:
        assert all(names[n] > 0 for n, _ in fn.signatures), fn.family
    builtin = CALCULATOR_SPEC
    assert builtin["function"]["name"] == "calculator"
    assert sum(builtin in ex["tools"] for ex in exs if ex["kind"] == "calculator") > 100
    # a calculator call is the real calculator's result, whatever the client named it
    for ex in exs:
        if ex["kind"] == "calculator":
            expr = next(iter(ex["call"]["arguments"].values()))
            assert _parts(ex)[1]["text"] == TOOLS["calculator"]({"expression": expr})


def test_grading_accepts_the_right_call_and_rejects_wrong_ones(task):
    rng = random.Random(0)
    calls = [ex for ex in task.examples(400, 3, "test") if ex["call"]]
    convert = next(ex for ex in calls if "amount" in ex["call"]["arguments"])
    for ex in calls[:50] + [convert]:
        name, args = ex["call"]["name"], ex["call"]["arguments"]
        key = rng.choice(sorted(args))
        grade = lambda parts: task.grade_reply(parts, ex)  # noqa: E731
        assert grade(_parts(ex))
        # the same call written differently is the same call: spacing, key order, arguments as a JSON string
        assert grade(_with(ex, call=json.dumps({"arguments": dict(reversed(args.items())), "name": name})))
        assert grade(_with(ex, call=json.dumps({"name": name, "arguments": json.dumps(args)}, indent=1)))
        wrong = [
            tool_call_json(name + "s", args),                                   # another function
            tool_call_json(name, {**args, key: "x" + str(args[key])}),          # a value not copied right
            tool_call_json(name, {**args, key: str(args[key])}) if not isinstance(args[key], str) else "{",
            tool_call_json(name, {**args, "units": "metric"}),                  # an argument the spec lacks
            tool_call_json(name, {k: v for k, v in args.items() if k != key}),  # one left out
            tool_call_json(name, {key.upper(): args[key], **{k: v for k, v in args.items() if k != key}}),
            '{"name": "%s", "arguments": ' % name,                              # cut short: not JSON
            "[]", "",
        ]
        for bad in wrong:
            assert not grade(_with(ex, call=bad)), bad
        assert not grade(_with(ex, extra_call=True))                            # called twice
        assert not grade([p for p in _parts(ex) if p["type"] == "text"])        # answered without calling
        assert not grade(_with(ex, answer="I don't know."))                     # the response unused
        assert not task.grade(_parts(ex)[-1]["text"].replace(ex["answer"], "1" + ex["answer"]), ex)
    # amounts are numbers: 25.0 is 25, "25" is not
    args = convert["call"]["arguments"]
    assert task.grade_reply(_with(convert, call=tool_call_json(convert["call"]["name"],
                                                               {**args, "amount": float(args["amount"])})), convert)
    assert same_json(25, 25.0) and not same_json(1, True) and not same_json("25", 25) and not same_json([1], [1, 2])


def test_a_request_nothing_fits_must_not_call(task):
    nones = [ex for ex in task.examples(600, 4, "test") if ex["call"] is None]
    assert {tuple(ex["must"]) == () for ex in nones} == {True, False}
    for ex in nones:
        assert task.grade_reply(_parts(ex), ex)
        some = ex["tools"][0]["function"]
        call = tool_call_json(some["name"], {p: "x" for p in some["parameters"]["properties"]})
        called = [{"type": "tool_call", "text": call}, {"type": "tool_output", "text": "ok"}] + _parts(ex)
        assert not task.grade_reply(called, ex)
        if ex["must"]:  # "which tools do you have?" names them all; "repeat after me" repeats
            assert not task.grade_reply([{"type": "text", "text": "Hello!"}], ex)
        assert not task.grade_reply([{"type": "text", "text": "  "}], ex)


def test_held_out_split_differs_from_train_and_is_deterministic(task):
    def key(ex):
        return _user(ex) + "|" + json.dumps(ex["call"]) + "|" + json.dumps(ex["tools"])

    train = task.examples(3000, 1, "train")
    test = task.examples(500, 2, "test")
    assert not {key(e) for e in train} & {key(e) for e in test}
    train_args = {json.dumps(e["call"]["arguments"], sort_keys=True) for e in train if e["call"]}
    assert not train_args & {json.dumps(e["call"]["arguments"], sort_keys=True) for e in test if e["call"]}
    # a held-out town is asked about in no training question, whichever function asks
    towns = {}
    for split, exs in (("train", train), ("test", test)):
        towns[split] = {_user(e).split(" in ")[-1].rstrip("?.") for e in exs
                        if e["call"] and e["call"]["name"] in ("get_weather", "weather", "get_time", "local_time")
                        and " in " in _user(e)}
    assert towns["test"] and not towns["train"] & towns["test"]
    # a calculator question is held out exactly when the arithmetic task holds out its expression
    for e in test:
        if e["kind"] == "calculator":
            assert split_of(next(iter(e["call"]["arguments"].values()))) == "test"
    assert task.examples(300, 7, "train") == task.examples(300, 7, "train")
    assert task.examples(300, 7, "train") != task.examples(300, 8, "train")
    assert Functions().examples(50, 7, "test") == task.examples(50, 7, "test")
    mixture = {"functions": 1.0, "arithmetic": 1.0}
    assert mixture_conversations(TaskSet(), mixture, 200, 3) == mixture_conversations(TaskSet(), mixture, 200, 3)


def test_the_client_functions_check_their_arguments(task):
    ex = next(e for e in task.examples(100, 5, "train") if e["call"] and e["kind"] != "calculator")
    name, args = ex["call"]["name"], ex["call"]["arguments"]
    run = task.client_tools[name]
    assert run(args) == run(dict(args)) == _parts(ex)[1]["text"]  # a function of the call alone
    from exocortex.infer.tools import run_tool_call
    tools = {**TOOLS, **task.client_tools}
    assert run_tool_call(tool_call_json(name, args), tools) == run(args)
    assert run_tool_call(tool_call_json(name, {**args, "nope": 1}), tools).startswith("error: ")
    assert run_tool_call(tool_call_json(name, {}), tools).startswith("error: ")
    assert run_tool_call(tool_call_json(name, {k: [v] for k, v in args.items()}), tools).startswith("error: ")


def test_conversations_render_the_tools_block_and_train_the_call(tok, task):
    sp = tok.special
    for ex in task.examples(40, 6, "train"):
        ids, mask = tok.render_conversation(ex)
        system = tok.decode(ids[ids.index(sp["<|system_start|>"]) + 1:ids.index(sp["<|system_end|>"])])
        assert plain_text(render_tools_block(ex["tools"])) in system  # rendered text is escaped
        assert system.endswith(plain_text(render_tools_block(ex["tools"], ex["messages"][0]["content"])))
        trained = tok.decode([t for t, m in zip(ids, mask) if m])
        if ex["call"]:
            assert tool_call_json(ex["call"]["name"], ex["call"]["arguments"]) in trained
            # the response's text is not trained on; its opening marker is, right after the call (a place to stop)
            start = ids.index(sp[RESPONSE_START])
            assert mask[ids.index(sp[CALL_START])] == 1 and mask[start] == 1 and mask[start + 1] == 0
        assert _parts(ex)[-1]["text"] in trained
        assert prompt_ids(tok, ex) == tok.render_for_completion(ex["messages"][:-1], tools=ex["tools"])


def test_the_longest_conversation_fits_the_tiny_context(monkeypatch):
    """With a tokenizer as the tiny preset trains it (4096 tokens on the generated world, which has learned the
    tools block's text: tokenizer.FORMAT_TOOLS), every conversation fits its 256-token rows with room to spare,
    and every prompt leaves a reply 64 tokens at least (the reference replies take at most 80, a three-argument
    call and its answer); so do the arithmetic tasks' conversations that offer the calculator's spec."""
    import exocortex.tokenizer as tokenizer
    from exocortex.config import make_config
    from exocortex.data.world import World, generate_documents

    cfg = make_config("tiny")
    world = World(seed=0)
    docs = list(generate_documents(0, target_bytes=3_000_000, world=world))
    tok = Tokenizer.train(docs, cfg.tokenizer.vocab_size)
    convs = mixture_conversations(TaskSet(world), {"functions": 1.0}, 3000, 0)
    lengths = [len(tok.render_conversation(c)[0]) for c in convs]
    prompts = [len(prompt_ids(tok, c)) for c in convs]
    replies = [n - p for n, p in zip(lengths, prompts)]
    # 12 tokens to spare: the wordplay documents' spelled words (x-y-z) took some of the BPE's merges, and the
    # longest conversation grew from ~238 to 242 tokens
    assert max(lengths) <= cfg.model.seq_len - 12, max(lengths)
    assert max(prompts) <= cfg.model.seq_len - 64 and max(replies) <= 80, (max(prompts), max(replies))
    for name in ("arithmetic", "word_problems"):
        offered = [c for c in mixture_conversations(TaskSet(world), {name: 1.0}, 2000, 0) if c.get("tools")]
        assert 0.08 < len(offered) / 2000 < 0.3
        assert max(len(tok.render_conversation(c)[0]) for c in offered) <= cfg.model.seq_len - 12, name
    # without the specs' words in the BPE's training text, they would not fit
    monkeypatch.setattr(tokenizer, "FORMAT_TOOLS", [])
    spelled = Tokenizer.train(docs, cfg.tokenizer.vocab_size)
    assert max(len(spelled.render_conversation(c)[0]) for c in convs) > cfg.model.seq_len + 32


def _script(tok, parts: list[dict]) -> list[int]:
    """What a model writes for a reply: its text and calls (the engine forces the responses in between)."""
    sp, out = tok.special, []
    for p in parts:
        if p["type"] == "tool_call":
            out += [sp["<tool_call>"]] + tok.encode("\n" + p["text"] + "\n") + [sp["</tool_call>"]]
        elif p["type"] == "text":
            out += tok.encode(p["text"])
    return out + [sp["<|assistant_end|>"]]


def test_eval_offers_the_functions_and_runs_them_as_the_client(tok, small_cfg, task):
    """task_accuracy renders each example's tools into its prompt, runs the client's functions when the model
    calls them, and grades the calls: a model that writes the reference replies scores 100%; one that calls
    another function, or calls where nothing fits, is wrong there."""
    n, seed = 24, 0
    examples = task.examples(n, seed, "test")
    assert {e["kind"] for e in examples} == set(KINDS)
    by_prompt = {tuple(prompt_ids(tok, e)): e for e in examples}
    small_cfg.vocab_size, small_cfg.seq_len = tok.vocab_size, 2048  # specs are long in the test's tiny vocabulary

    def accuracy(reply) -> float:
        scripted = Scripted(lambda prompt: _script(tok, reply(by_prompt[tuple(prompt)])), tok.vocab_size)
        eng = Engine(GPT(small_cfg), tok, torch.device("cpu"), decoder=scripted)
        samples = []
        acc = task_accuracy(eng, tok, task, n, seed, max_new_tokens=200, samples=samples)
        assert eng.tools is TOOLS and sorted(scripted.prompt_lengths) == sorted(map(len, by_prompt))
        if examples[0]["call"] and acc == 1.0:  # the client's response, inserted by the engine, in the reply
            assert f"[tool output: {_parts(examples[0])[1]['text']}]" in samples[0]["reply"]
        return acc

    def right(e):  # the reference reply; its answer not starting as the response does (the script would skip it)
        return _parts(e)[:2] + [{"type": "text", "text": "So: " + _parts(e)[2]["text"]}] if e["call"] else _parts(e)

    assert accuracy(right) == 1.0
    wrong_name = [{"type": "tool_call", "text": tool_call_json("nope", {})}, {"type": "text", "text": "ok"}]
    assert accuracy(lambda e: _parts(e) if e["call"] is None else wrong_name + _parts(e)[2:]) == \
        sum(e["call"] is None for e in examples) / n
    hello = [{"type": "tool_call", "text": tool_call_json(examples[0]["tools"][0]["function"]["name"], {})}]
    assert accuracy(lambda e: right(e) if e["call"] else hello + _parts(e)) == sum(e["call"] is not None
                                                                                   for e in examples) / n


def test_arithmetic_tasks_sometimes_offer_the_calculator_spec(tok):
    """20% of arithmetic (and of the short word problems) offer the calculator's spec in the system turn, as a
    client with tools=[calculator] does; the reference call is the same either way."""
    from exocortex.tasks.arithmetic import Arithmetic, WordProblems

    for task, low, high in ((Arithmetic(), 0.15, 0.25), (WordProblems(), 0.07, 0.16)):
        exs = task.examples(1500, 0, "train")
        offered = [e for e in exs if "tools" in e]
        assert low < len(offered) / len(exs) < high, task.name
        assert all(e["tools"] == [CALCULATOR_SPEC] for e in offered)
        calls = {p["text"] for e in offered for p in e["messages"][-1]["content"] if p["type"] == "tool_call"}
        assert calls and all(parse_tool_call(c)[0] == "calculator" for c in calls)
        plain = next(e for e in exs if "tools" not in e)
        assert plain_text(render_tools_block([CALCULATOR_SPEC])) in tok.decode(prompt_ids(tok, offered[0]))
        assert "# Tools" not in tok.decode(prompt_ids(tok, plain))
