"""`exocortex synth`: rows with provenance from the generators (near-duplicates rejected, resumable), from a teacher
behind an OpenAI-compatible server (an exocortex server started here: wrong answers rejected by verification),
from a run's own samples (rejection sampling), and a synth file training through midtrain as a jsonl: task."""
import json
import os
import socket

import pytest
import torch

pytest.importorskip("datasketch")
pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from exocortex import cli  # noqa: E402
from exocortex.apps.serve import create_app  # noqa: E402
from exocortex.checkpoint import save_checkpoint  # noqa: E402
from exocortex.config import load_config, make_config, save_config  # noqa: E402
from exocortex.errors import ExocortexError  # noqa: E402
from exocortex.infer.engine import Engine  # noqa: E402
from exocortex.infer.sandbox import python_tool_status  # noqa: E402
from exocortex.infer.tools import calculator  # noqa: E402
from exocortex.model import GPT  # noqa: E402
from exocortex.synth import item_rng, pick_task  # noqa: E402
from exocortex.synth.job import SynthJob, run_synth  # noqa: E402
from exocortex.synth.teacher import TeacherConfig  # noqa: E402
from exocortex.tasks import TaskSet, task_set  # noqa: E402
from exocortex.tasks.benchmarks import load_benchmark  # noqa: E402
from scripted import Scripted  # noqa: E402
import test_serve  # noqa: E402

MODEL_ARGS = ["model.depth=2", "model.width=64", "model.head_dim=16", "model.mlp_ratio=2.0", "model.seq_len=64",
              "device=cpu", "sft.dtype=float32"]


def rows_of(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def make_run(tmp_path, tok, stages=("pretrain",), seq_len=64):
    """A run with the test tokenizer and tiny random checkpoints of `stages` (context: 4 x seq_len tokens)."""
    cfg = make_config("tiny", MODEL_ARGS + [f"tokenizer.vocab_size={tok.vocab_size}", f"model.seq_len={seq_len}"],
                      name="r")
    cfg.runs_dir = str(tmp_path)
    cfg.model.vocab_size = tok.vocab_size
    save_config(cfg)
    tok.save(cfg.run_dir / "tokenizer")
    for stage in stages:
        save_checkpoint(cfg.run_dir, stage, 1, GPT(cfg.model), cfg.model)
    return load_config(cfg.run_dir)


# ----------------------------------------------------------------------------- generators

def test_generators_rows_have_provenance_dedup_and_resume(tmp_path):
    cfg = make_config("tiny", [])
    out = tmp_path / "gen.jsonl"
    job = SynthJob("generators", out, n=300, seed=3, tasks={"arithmetic": 1, "identity": 1, "spelling": 1})
    ds = run_synth(cfg, job)
    rows = rows_of(out)
    rejected = rows_of(tmp_path / "gen.rejected.jsonl")
    assert len(rows) == ds.counts["kept"] and len(rows) + len(rejected) == 300
    # identity has a handful of questions and answers: most of its items are duplicates of earlier rows
    assert ds.counts["duplicates"] > 20 and all(r["reason"].endswith("duplicate") for r in rejected)
    assert {r["provenance"]["task"] for r in rejected} >= {"identity"}
    texts = [json.dumps(r["messages"]) for r in rows]
    assert len(set(texts)) == len(texts)
    tasks = task_set(cfg)
    for r in rows:
        p = r["provenance"]
        assert p["source"] == "generator" and p["seed"] == 3 and p["split"] == "train"
        assert p["verification"] == {"method": "grader", "passed": True}
        # the item's seed redraws its example
        rng = item_rng(3, p["item"])
        name = pick_task(rng, {"arithmetic": 1, "identity": 1, "spelling": 1})
        assert name == p["task"] and tasks[name].example(rng, "train")["messages"] == r["messages"]
    # resuming: the items done (kept or rejected) are skipped; only the new ones are tried
    again = run_synth(cfg, SynthJob("generators", out, n=350, seed=3,
                                    tasks={"arithmetic": 1, "identity": 1, "spelling": 1}))
    assert again.resumed == 300 and again.counts["kept"] + again.counts["duplicates"] + again.counts["rejected"] == 50
    assert sorted(r["provenance"]["item"] for r in rows_of(out) + rows_of(tmp_path / "gen.rejected.jsonl")) \
        == list(range(350))


def test_a_kill_mid_line_is_repaired_on_resume(tmp_path, capsys):
    cfg = make_config("tiny", [])
    out = tmp_path / "g.jsonl"
    run_synth(cfg, SynthJob("generators", out, n=20, seed=0, tasks={"arithmetic": 1}))
    with open(out, "a") as fh:
        fh.write('{"messages": [{"role": "us')  # what a kill during a write leaves
    run_synth(cfg, SynthJob("generators", out, n=20, seed=0, tasks={"arithmetic": 1}))
    assert "cut short" in capsys.readouterr().err
    rows = rows_of(out)
    assert [r["provenance"]["item"] for r in rows] == list(range(20))


# ----------------------------------------------------------------------------- teacher

class Server(test_serve.Server):
    """tests/test_serve.py's server; `url` is the /v1 base a teacher is given."""

    def __init__(self, app):
        super().__init__(app)
        self.url += "/v1"


def answer_key(seed, n, tasks, calls=False):
    """question -> the reference answer (with `calls`: and the reference's calculator call), for the arithmetic
    items a job seeded `seed` draws."""
    key = {}
    for item in range(n):
        rng = item_rng(seed, item)
        pick_task(rng, {"arithmetic": 1})
        ex = tasks["arithmetic"].example(rng, "train")
        call = next(p["text"] for p in ex["messages"][-1]["content"] if p["type"] == "tool_call")
        key[ex["messages"][-2]["content"]] = (ex["answer"], call) if calls else ex["answer"]
    return key


def scripted_teacher(tok, reply_for):
    """An exocortex server whose model writes reply_for(prompt text): a text, or token ids (a scripted decoder over
    a tiny GPT with a context of 512 tokens)."""
    cfg = make_config("tiny", MODEL_ARGS + [f"tokenizer.vocab_size={tok.vocab_size}", "model.seq_len=128"]).model
    cfg.vocab_size = tok.vocab_size
    end = tok.special["<|assistant_end|>"]
    engine = Engine(GPT(cfg), tok, torch.device("cpu"),
                    decoder=Scripted(lambda p: script_of(tok, reply_for(tok.decode(p))) + [end], tok.vocab_size))
    return Server(create_app(engine, "teacher"))


def script_of(tok, reply):
    return reply if isinstance(reply, list) else tok.encode(reply)


def test_teacher_answers_are_kept_only_when_the_grader_passes(tmp_path, tok):
    """Against an exocortex server whose scripted model gets about every third question wrong and calls the
    calculator for the others."""
    tasks = TaskSet(None)
    key = answer_key(7, 30, tasks, calls=True)
    sp = tok.special

    def reply_for(prompt: str):
        question = next((q for q in key if q in prompt), None)
        if question is None:  # the check before the job
            return "OK"
        answer, call = key[question]
        if int(float(answer) * 1000) % 3 == 0:  # wrong, without the calculator
            return f"The answer is {float(answer) + 1}."
        return [sp["<tool_call>"], *tok.encode(f"\n{call}\n"), sp["</tool_call>"], *tok.encode(f"So it is {answer}.")]

    server = scripted_teacher(tok, reply_for)
    try:
        out = tmp_path / "t.jsonl"
        job = SynthJob("teacher", out, n=30, seed=7, tasks={"arithmetic": 1},
                       teacher=TeacherConfig(server.url, "teacher", max_tokens=120, concurrency=3, retries=0))
        ds = run_synth(make_config("tiny", []), job)
    finally:
        server.stop()
    rows, rejected = rows_of(out), rows_of(tmp_path / "t.rejected.jsonl")
    assert ds.counts["rejected"] >= 5 and ds.counts["kept"] >= 10
    assert all(r["reason"] == "wrong answer" and r["provenance"]["verification"]["passed"] is False for r in rejected)
    for r in rows:  # the teacher's calculator calls are kept as calls (the server's parts), not as text
        reply = r["messages"][-1]["content"]
        assert [p["type"] for p in reply] == ["tool_call", "tool_output", "text"]
        assert reply[1]["text"] == calculator(json.loads(reply[0]["text"])["arguments"]["expression"])
        assert tasks["arithmetic"].grade(reply[-1]["text"], {"answer": r["answer"]}), r
        p = r["provenance"]
        assert p["source"] == "teacher" and p["mode"] == "answer" and p["teacher"] == {"url": server.url, "model": "teacher"}
        assert p["verification"] == {"method": "grader", "passed": True}
    assert len(rows) + len(rejected) == 30
    # the file trains as a jsonl: task: its rows load with their messages and answers
    loaded = load_benchmark("jsonl", str(out)).rows["train"]
    assert [x["messages"] for x in loaded] == [r["messages"] for r in rows]


def test_teacher_from_a_random_model_keeps_nothing(tmp_path, tok):
    cfg = make_config("tiny", MODEL_ARGS + [f"tokenizer.vocab_size={tok.vocab_size}"]).model
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    server = Server(create_app(Engine(GPT(cfg), tok, torch.device("cpu")), "random"))
    try:
        ds = run_synth(make_config("tiny", []), SynthJob(
            "teacher", tmp_path / "r.jsonl", n=8, seed=1, tasks={"arithmetic": 1},
            teacher=TeacherConfig(server.url, "random", max_tokens=16, concurrency=2, retries=0)))
    finally:
        server.stop()
    assert ds.counts == {"kept": 0, "rejected": 8, "duplicates": 0}
    assert "teacher" in ds.reasons and set(ds.reasons) <= {"teacher", "wrong answer"}  # cut at 16 tokens, or wrong
    cut = [r for r in rows_of(tmp_path / "r.rejected.jsonl") if r["reason"].startswith("teacher")]
    assert all(r["reason"] == "teacher: reply cut at 16 tokens (--teacher-max-tokens)" for r in cut)


def test_teacher_writes_questions_verified_by_the_calculator_the_sandbox_and_agreement(tmp_path, tok):
    def reply_for(prompt: str) -> str:
        seed = sum(map(ord, prompt)) % 997
        if "JSON object" in prompt:  # write a question: the persona and topic make each one different
            if "Python function" in prompt:
                return json.dumps({"question": f"Write add_{seed}(x).", "function": f"add_{seed}",
                                   "tests": f"assert add_{seed}(1) == {seed + 1}"})
            if "arithmetic" in prompt:
                return json.dumps({"question": f"How much is {seed} plus {seed + 11}?", "expression": f"{seed}+{seed + 11}"})
            return json.dumps({"question": f"What is the name of item {seed}?"})
        if "Write add_" in prompt:  # wrong when the number is odd
            n = int(prompt.split("Write add_")[1].split("(")[0])
            return f"```python\ndef add_{n}(x):\n    return x + {n + n % 2}\n```"
        if "How much is" in prompt:  # answer it: wrong when the first number is odd
            a = int(prompt.split("How much is ")[1].split()[0])
            return f"It is {2 * a + 11 + a % 2}"
        return "Item " + prompt.split("item ")[1].split("?")[0] if "item " in prompt else "Something."

    server = scripted_teacher(tok, reply_for)
    try:
        out = tmp_path / "w.jsonl"
        job = SynthJob("teacher", out, n=32, seed=2, mode="write", kinds={"math": 1, "code": 1, "short": 1, "open": 1},
                       teacher=TeacherConfig(server.url, "teacher", max_tokens=120, concurrency=4, retries=0))
        ds = run_synth(make_config("tiny", []), job)
        # --drop-unverified: the open questions go to the rejected file instead
        job.out, job.drop_unverified = tmp_path / "d.jsonl", True
        run_synth(make_config("tiny", []), job)
    finally:
        server.stop()
    rows, rejected = rows_of(out), rows_of(tmp_path / "w.rejected.jsonl")
    methods = {r["provenance"]["kind"]: r["provenance"]["verification"]["method"] for r in rows + rejected}
    python = "python" if python_tool_status()[0] else "python (sandbox unavailable)"
    assert methods == {"math": "calculator", "code": python, "short": "agreement of 2 samples", "open": "none"}
    for r in rows:
        p = r["provenance"]
        assert {"persona", "topic", "style", "kind"} <= set(p)
        if p["kind"] == "math":
            q = r["messages"][0]["content"]
            a, b = q.removeprefix("How much is ").removesuffix("?").split(" plus ")
            assert r["answer"] == calculator(f"{a}+{b}") and r["messages"][-1]["content"].endswith(r["answer"])
        if p["kind"] == "code" and python == "python":  # the kept code passed the asserts in the sandbox
            n = int(r["messages"][0]["content"].removeprefix("Write add_").removesuffix("(x)."))
            assert n % 2 == 0 and f"return x + {n}\n" in r["messages"][-1]["content"]
        assert p["verification"]["passed"] is (None if p["kind"] == "open" or python != "python" == p["kind"] else True)
    assert any(r["reason"] == "failed verification: calculator" for r in rejected)
    assert python != "python" or any(r["reason"] == "failed verification: python" for r in rejected)
    assert ds.counts["kept"] >= 8 and any(r["provenance"]["kind"] == "open" for r in rows)
    dropped = rows_of(tmp_path / "d.rejected.jsonl")
    assert all(r["provenance"]["kind"] != "open" for r in rows_of(tmp_path / "d.jsonl"))
    assert any(r["reason"] == "unverifiable (--drop-unverified)" for r in dropped)


def test_teacher_errors_are_one_line(tmp_path, tok, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit):
        cli.main(["synth", "--source", "teacher", "--out", str(tmp_path / "x.jsonl"), "--n", "2", "--retries", "0",
                  "--teacher-url", f"http://127.0.0.1:{port}/v1", "--teacher-model", "m"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the teacher at") and "failed after 1 attempt" in err[0]
    server = Server(fussy_endpoint())
    try:
        def job(model, key_env="SYNTH_TEST_KEY", retries=0):
            return SynthJob("teacher", tmp_path / f"{model}.jsonl", n=2, tasks={"arithmetic": 1},
                            teacher=TeacherConfig(server.url, model, key_env, retries=retries, backoff_s=0.01))

        with pytest.raises(ExocortexError, match="refused the API key .*SYNTH_TEST_KEY"):
            run_synth(make_config("tiny", []), job("m"))
        os.environ["SYNTH_TEST_KEY"] = "secret"
        with pytest.raises(ExocortexError, match="has no model 'nope'"):
            run_synth(make_config("tiny", []), job("nope"))
        with pytest.raises(ExocortexError, match="failed after 2 attempts: HTTP 503"):
            run_synth(make_config("tiny", []), job("flaky", retries=1))  # fails the first three requests
        ds = run_synth(make_config("tiny", []), job("flaky", retries=3))  # then works: retried with backoff
        assert ds.counts["kept"] + ds.counts["rejected"] == 2
    finally:
        os.environ.pop("SYNTH_TEST_KEY", None)
        server.stop()


def fussy_endpoint():
    """An OpenAI-shaped endpoint that wants the key 'secret', knows the models 'm' and 'flaky', and answers
    'flaky' with 503 three times before it works."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app, failures = FastAPI(), [0]
    app.state.limits = None

    def error(status, message):
        return JSONResponse({"error": {"message": message, "type": "error", "code": None}}, status_code=status)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if request.headers.get("authorization") != "Bearer secret":
            return error(401, "bad key")
        if body["model"] not in ("m", "flaky"):
            return error(404, f"no model {body['model']}")
        if body["model"] == "flaky" and failures[0] < 3:
            failures[0] += 1
            return error(503, "busy")
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "42"}}]}

    return app


# ----------------------------------------------------------------------------- self

def test_self_keeps_the_correct_samples_of_a_run(tmp_path, tok, monkeypatch):
    """Rejection sampling on a run's sft model, whose decoding is scripted: correct on half the questions.
    The k samples of a question are alike, so one is kept and the others are rejected as duplicates."""
    cfg = make_run(tmp_path, tok, stages=("sft",), seq_len=128)  # room for the calculator's spec some offer
    tasks = task_set(cfg)
    key = answer_key(5, 12, tasks)
    end = tok.special["<|assistant_end|>"]

    def reply_for(prompt: str) -> str:
        question = next((q for q in key if q in prompt), "")
        return f"It is {key[question] if len(question) % 2 else 'unknown'}."

    from exocortex.infer import engine as engine_module
    real = engine_module.load_engine

    def scripted(cfg, stage=None, **kw):
        eng = real(cfg, stage, **kw)  # the run's own checkpoint and tokenizer
        eng.make_decoder = Scripted(lambda p: tok.encode(reply_for(tok.decode(p))) + [end], tok.vocab_size)
        return eng

    monkeypatch.setattr(engine_module, "load_engine", scripted)
    out = tmp_path / "self.jsonl"
    cli.main(["synth", "--source", "self", "--run", str(cfg.run_dir), "--out", str(out), "--n", "12", "--seed", "5",
              "--tasks", "arithmetic=1", "--k", "3", "--max-tokens", "12"])
    rows, rejected = rows_of(out), rows_of(tmp_path / "self.rejected.jsonl")
    right = sum(len(q) % 2 for q in key)
    assert len(rows) == right and 0 < right < 12
    assert sum(r["reason"] == "none of 3 samples correct" for r in rejected) == 12 - right
    assert sum(r["reason"].endswith("duplicate") for r in rejected) == 2 * right
    for r in rows:
        p = r["provenance"]
        assert p["source"] == "self" and p["run"] == "r" and p["stage"] == "sft" and p["k"] == 3
        assert tasks["arithmetic"].grade(r["messages"][-1]["content"][-1]["text"], {"answer": r["answer"]})


def test_self_on_a_random_run_keeps_nothing(tmp_path, tok):
    cfg = make_run(tmp_path, tok, stages=("sft",))  # a context of 256 tokens: some prompts do not fit
    # 24 draws: enough that both kinds of prompt come up (the calculator's spec makes some too long)
    ds = run_synth(cfg, SynthJob("self", tmp_path / "s.jsonl", n=24, tasks={"arithmetic": 1}, k=2, max_tokens=8))
    assert ds.counts["kept"] == 0 and ds.counts["rejected"] == 24
    reasons = [r["reason"] for r in rows_of(tmp_path / "s.rejected.jsonl")]
    assert set(reasons) == {"none of 2 samples correct", "prompt longer than the model's context"}


# ----------------------------------------------------------------------------- training on it

def test_a_synth_file_trains_through_midtrain(tmp_path, tok):
    cfg = make_run(tmp_path, tok)
    data = tmp_path / "synth.jsonl"  # no split word in the name: its rows serve train and val
    run_synth(cfg, SynthJob("generators", data, n=80, seed=0, tasks={"arithmetic": 1, "spelling": 1}))
    cli.main(["midtrain", "--run", str(cfg.run_dir), "--set", f"midtrain_data.mixture=jsonl:{data}=1",
              "--set", "midtrain_data.n_conversations=64", "--set", "midtrain.max_steps=2",
              "--set", "midtrain.time_minutes=0", "--set", "midtrain.device_batch=4", "--set", "midtrain_data.text_fraction=0",
              "--set", "midtrain.batch_tokens=256", "--set", "midtrain.compile=false"])
    summary = json.loads((cfg.run.logs_dir / "midtrain_summary.json").read_text())
    assert summary["steps"] == 2 and summary["conversations"] == 64 and summary["rows"] > 0
    assert load_config(cfg.run_dir).run.latest_checkpoint("midtrain") is not None
    assert load_config(cfg.run_dir).midtrain_data.mixture == {f"jsonl:{data}": 1.0}


def test_the_job_ends_with_the_files_collapse_metrics_and_alarms(tmp_path, capsys):
    """A task of a few fixed replies (identity alone: its answers repeat) trips the alarms; the midtrain mixture
    does not."""
    cfg = make_config("tiny", [])
    narrow = run_synth(cfg, SynthJob("generators", tmp_path / "a.jsonl", n=300, tasks={"identity": 1}))
    out = capsys.readouterr().out
    assert narrow.collapse["n"] == narrow.counts["kept"] and "synth: collapse alarm: self_bleu" in out
    broad = run_synth(cfg, SynthJob("generators", tmp_path / "m.jsonl", n=300))
    out = capsys.readouterr().out
    assert broad.collapse["n"] == broad.counts["kept"] and "no alarm" in out and "collapse alarm" not in out
