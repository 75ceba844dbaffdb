"""Escalation: P(reply is right) from the chosen tokens' scores (infer/confidence.py), its calibration in the eval,
the report's curve, and `serve --escalate-to` against a second live server (apps/escalate.py)."""
import json
import math
import socket
import threading

import pytest
import torch

from exocortex.evals import calibration_scores
from exocortex.infer.confidence import (FEATURES, TOP_K, Calibration, ConfidenceMeter, auroc, best_point,
                                        calibration_error, escalation_curve, replies_features, reply_features,
                                        reply_hidden)
from exocortex.infer.engine import Batcher, Engine, Request

# ----------------------------------------------------------------------------- the signal


def test_auroc_ranks_and_ties():
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5
    assert auroc([0.3, 0.6, 0.4], [True, True, False]) == 0.5  # pairs: (0.3>0.4 no), (0.6>0.4 yes)
    assert auroc([0.1, 0.2], [True, True]) is None


def test_calibration_learns_which_way_confidence_points_and_is_calibrated():
    g = torch.Generator().manual_seed(0)
    feats, right = [], []
    for _ in range(600):  # a reply is right more often the surer its least likely token
        m = -float(torch.rand(1, generator=g)) * 6
        p = 1 / (1 + math.exp(-(2 * m + 5)))
        feats.append({"min_call": 0.0, "min_text": m, "mean": m / 4, "entropy": -m / 3, "length": 2.0})
        right.append(bool(torch.rand(1, generator=g) < p))
    cal = Calibration.fit(feats, right)
    sure = {"min_call": 0.0, "min_text": -0.1, "mean": -0.02, "entropy": 0.03, "length": 2.0}
    unsure = {"min_call": 0.0, "min_text": -5.5, "mean": -1.4, "entropy": 1.8, "length": 2.0}
    assert cal.p_correct(sure) > 0.9 > 0.1 > cal.p_correct(unsure)
    p = [cal.p_correct(f) for f in feats]
    assert auroc(p, right) > 0.8
    assert calibration_error(p, right) < 0.08
    assert calibration_error([1.0] * len(right), right) > 0.3  # always sure is badly calibrated here
    # what the eval saves is what the server loads
    assert Calibration(**json.loads(json.dumps(vars(cal)))).p_correct(sure) == cal.p_correct(sure)


def test_calibration_reads_the_hidden_state_when_fitted_with_it():
    """Token scores that say nothing, a hidden state whose direction says right or wrong: the probe finds it on
    replies it was not fitted on; without the hidden state the fit has nothing to go on."""
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(32, generator=g)

    def replies(n):
        out, right = [], []
        for _ in range(n):
            h = torch.randn(32, generator=g)
            out.append({"min_call": 0.0, "min_text": -1.0, "mean": -0.3, "entropy": 0.5, "length": 2.0,
                        "hidden": (h * 3 + 1).tolist()})  # any offset and scale: the fit standardises
            right.append(bool(float(h @ direction) + 0.3 * float(torch.randn(1, generator=g)) > 0))
        return out, right
    fit_on, fit_ok = replies(400)
    held, held_ok = replies(400)
    cal = Calibration.fit(fit_on, fit_ok)
    assert cal.reads_hidden and len(cal.hidden_weights) == 32
    assert auroc([cal.p_correct(f) for f in held], held_ok) > 0.9
    blind = Calibration.fit(fit_on, fit_ok, hidden=False)
    assert not blind.reads_hidden and abs(auroc([blind.p_correct(f) for f in held], held_ok) - 0.5) < 0.1
    again = Calibration(**json.loads(json.dumps(vars(cal))))  # what the eval saves is what the server loads
    assert again.p_correct(held[0]) == cal.p_correct(held[0])
    no_hidden = {k: v for k, v in held[0].items() if k != "hidden"}
    with pytest.raises(ValueError, match="hidden state"):
        cal.p_correct(no_hidden)
    with pytest.raises(ValueError, match="hidden state"):
        cal.p_correct({**no_hidden, "hidden": [0.0] * 8})
    assert blind.p_correct(no_hidden) == blind.p_correct(held[0])  # a fit without it never asks for it


def test_fit_survives_one_class_only():
    feats = [{k: float(i) for k in FEATURES} for i in range(10)]
    cal = Calibration.fit(feats, [False] * 10)
    assert all(math.isfinite(w) for w in cal.weights) and cal.p_correct(feats[3]) < 0.1


class _Eng:  # the token ids the meter needs
    stop_ids = {1, 2}
    call_start, call_end, out_start, out_end = 10, 11, 12, 13


def test_meter_skips_tool_output_and_stop_token():
    m = ConfidenceMeter(_Eng())
    for tok, lp in [(10, -0.1), (50, -2.0), (11, -0.1), (12, -9.0), (60, -20.0), (13, -9.0), (70, -0.5), (1, -7.0)]:
        m.push(tok, lp, [(tok, lp), (99, -3.0)])
    f = m.features()
    assert f["min_call"] == -2.0  # inside the call
    assert f["min_text"] == -0.5  # the tool's output (-20) and the stop token (-7) are not the model's choices
    assert f["mean"] == pytest.approx((-0.1 - 2.0 - 0.1 - 0.5) / 4)
    assert f["length"] == pytest.approx(math.log1p(4))
    assert m.tokens == [10, 50, 11, 12, 60, 13, 70]  # the reply the probe reads: the output in, the stop out


def test_curve_runs_from_always_local_to_always_escalate():
    p = [0.9, 0.2, 0.6, 0.1]
    local_ok, remote_ok = [True, False, True, False], [True, True, False, True]
    curve = escalation_curve(p, local_ok, remote_ok)
    assert curve[0] == {"threshold": 0.0, "local_share": 1.0, "accuracy": 0.5}
    assert curve[-1]["local_share"] == 0.0 and curve[-1]["accuracy"] == 0.75
    at_half = next(r for r in curve if r["threshold"] == 0.5)
    assert at_half == {"threshold": 0.5, "local_share": 0.5, "accuracy": 1.0}  # each answered by whoever is right
    assert best_point(curve)["local_share"] == 0.75  # 0.1 sent on: as right as always escalating


def test_eval_measures_on_the_half_it_did_not_fit():
    replies = []
    for task in ("a", "b"):
        for i in range(40):
            ok = i % 4 < 2
            replies.append({"task": task, "split": "test", "index": i, "ok": ok, "min_call": 0.0,
                            "min_text": -0.1 if ok else -3.0, "mean": -0.05 if ok else -0.8,
                            "entropy": 0.1 if ok else 1.0, "length": 2.0, "hidden": [float(i % 3), 1.0]})
    metrics, kept = calibration_scores(replies)
    assert metrics["escalation_auroc"] == 1.0 and metrics["escalation_n"] == 40
    assert metrics["escalation_auroc_unseen_task"] == 1.0  # each task measured by a fit on the other alone
    assert {"escalation_auroc_a", "escalation_auroc_b", "escalation_ece"} <= set(metrics)
    assert all(r[2] % 2 == 1 for r in kept["replies"])  # the measured half: odd indices
    assert Calibration(**kept["calibration"]).n == 80  # the server's fit: every reply


def test_streamed_scores_give_the_same_features_as_rescoring(tok):
    """The server measures a reply from the batcher's per-token scores; the eval by one forward pass afterwards.
    They must agree, or the eval's calibration would not fit what the server sees."""
    from test_serve import tiny_model

    engine = Engine(tiny_model(tok), tok, torch.device("cpu"))
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "what is 2 + 3?"}]})
    meter, got, done = ConfidenceMeter(engine), [], threading.Event()
    req = Request(prompt, max_tokens=24, temperature=1.0, seed=3, logprobs=TOP_K,
                  on_logprobs=lambda t, lp, top: meter.push(t, lp, top),
                  on_token=lambda t, forced: got.append(t) or True, on_end=lambda *a: done.set())
    batcher = Batcher(engine, 2)
    batcher.submit(req)
    assert done.wait(60)
    batcher.close()
    streamed, rescored = meter.features(), reply_features(engine, prompt, got)
    for k in FEATURES:
        assert streamed[k] == pytest.approx(rescored[k], abs=2e-3), k
    assert meter.tokens == got  # what the server's probe reads: the same reply, the same hidden state
    assert reply_hidden(engine, prompt, meter.tokens) == pytest.approx(rescored["hidden"], abs=1e-4)
    assert len(rescored["hidden"]) == engine.model.cfg.width


def test_features_of_replies_scored_together_are_each_ones_own(tok):
    """The eval scores replies in padded batches; a reply's features must not depend on its neighbours (the
    padding after a short row, a longer row beside it)."""
    from test_serve import tiny_model

    engine = Engine(tiny_model(tok), tok, torch.device("cpu"))
    questions = ["what is 2 + 3?", "spell cat", "Who wrote the letter to the mayor of the town by the river?"]
    prompts = [tok.render_for_completion({"messages": [{"role": "user", "content": q}]}) for q in questions]
    replies = engine.complete_many(prompts, max_tokens=20, temperature=1.0, seed=5)
    replies[1] = replies[1][:3]  # lengths differ within the batch
    together = replies_features(engine, prompts, replies, rows=3)
    for prompt, reply, got in zip(prompts, replies, together):
        alone = reply_features(engine, prompt, reply)
        for k in FEATURES:
            assert got[k] == pytest.approx(alone[k], abs=1e-4), k
        assert got["hidden"] == pytest.approx(alone["hidden"], abs=1e-4)


# ----------------------------------------------------------------------------- the report


def test_unseen_task_auroc_fits_on_the_other_tasks_only():
    """Two tasks whose scores point opposite ways, told apart by the hidden state: a fit that sees both ranks
    well; a fit on one task alone ranks the other backwards, and the unseen-task AUROC says so."""
    replies = []
    for task, sign in (("a", 1.0), ("b", -1.0)):
        for i in range(60):
            ok = i % 4 < 2
            x = (1.0 if ok else -1.0) * sign + 0.1 * (i % 5)
            replies.append({"task": task, "split": "test", "index": i, "ok": ok, "min_call": 0.0, "min_text": x,
                            "mean": x, "entropy": 0.5, "length": 2.0, "hidden": [sign, x * sign]})
    metrics, _ = calibration_scores(replies)
    assert metrics["escalation_auroc"] > 0.9
    assert metrics["escalation_auroc_unseen_task"] < 0.2


def test_report_shows_auroc_and_the_curve(tmp_path):
    from exocortex.run import EvalSummary
    from exocortex.stages.report import escalation_section

    replies_sft = [["t", "test", 2 * i + 1, i % 2 == 0, 0.9 if i % 2 == 0 else 0.2] for i in range(20)]
    replies_rl = [["t", "test", 2 * i + 1, True, 0.8] for i in range(20)]
    ev = EvalSummary(stages={"sft": {"escalation_auroc": 0.91, "escalation_ece": 0.04, "escalation_n": 20,
                                     "escalation_auroc_t": 0.91, "escalation_auroc_unseen_task": 0.7},
                             "rl": {"escalation_auroc": 0.85, "escalation_ece": 0.05, "escalation_n": 20}},
                     calibration={"sft": {"replies": replies_sft}, "rl": {"replies": replies_rl}})
    text = "\n".join(escalation_section(ev, tmp_path))
    assert "| SFT | 0.910 (20) | 0.700 | 0.040 | t 0.91 |" in text
    assert "| RL | 0.850 (20) | — | 0.050 | — |" in text
    assert "always SFT 50.0%, always RL 100.0%" in text
    assert "Answering 50% locally" in text and (tmp_path / "plots" / "escalation.png").exists()


# ----------------------------------------------------------------------------- the server

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def servers(tok):
    from test_serve import Server, tiny_model

    from exocortex.apps.serve import create_app

    strong = Server(create_app(Engine(tiny_model(tok), tok, torch.device("cpu")), "strong"))
    yield strong, lambda escalation: Server(create_app(Engine(tiny_model(tok), tok, torch.device("cpu")), "tiny",
                                                       escalation=escalation))
    strong.stop()


def _escalation(url, sure: bool, threshold=0.5):
    from exocortex.apps.escalate import Escalation

    return Escalation(url, Calibration(bias=50.0 if sure else -50.0), threshold)


ASK = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0}


def test_the_server_reads_the_reply_hidden_state_when_the_calibration_does(servers, tok):
    """A calibration fitted with the hidden state: the server scores the held-back reply once more for it, and
    its P(right) is the one the eval's rescoring gives the same reply."""
    from test_serve import tiny_model

    from exocortex.apps.escalate import Escalation

    strong, make = servers
    engine = Engine(tiny_model(tok), tok, torch.device("cpu"))  # the local server's weights (seeded)
    prompt = tok.render_for_completion(ASK["messages"])
    reply = engine.complete(prompt, max_tokens=ASK["max_tokens"], temperature=0)[0]
    feats = reply_features(engine, prompt, reply)
    h = torch.tensor(feats["hidden"])
    width = len(h)
    cal = Calibration(bias=0.3, hidden_mean=[0.0] * width, hidden_scale=[1.0] * width,
                      hidden_weights=(1.5 * h / h.dot(h)).tolist())  # this reply's hidden state adds 1.5 to z
    expected = cal.p_correct(feats)
    assert expected == pytest.approx(1 / (1 + math.exp(-1.8)), abs=1e-6)
    local = make(Escalation(strong.url + "/v1", cal, threshold=0.0))
    try:
        body = httpx.post(local.url + "/v1/chat/completions", json=ASK, timeout=60).json()
        assert body["model"] == "tiny" and body["exocortex"]["escalated"] is False
        assert body["exocortex"]["p_correct"] == pytest.approx(expected, abs=2e-3)
    finally:
        local.stop()


def test_a_sure_reply_is_answered_here(servers):
    strong, make = servers
    local = make(_escalation(strong.url + "/v1", sure=True))
    try:
        r = httpx.post(local.url + "/v1/chat/completions", json=ASK, timeout=60)
        body = r.json()
        assert r.status_code == 200 and body["model"] == "tiny"
        assert body["exocortex"]["escalated"] is False and body["exocortex"]["p_correct"] > 0.99
        assert r.headers["x-exocortex-answered-by"] == "tiny"
        assert local.health()["escalation"]["answered_locally"] == 1
    finally:
        local.stop()


def test_an_unsure_reply_goes_to_the_stronger_model_streaming_too(servers):
    strong, make = servers
    local = make(_escalation(strong.url + "/v1", sure=False))
    try:
        client = local.client()
        r = client.chat.completions.with_raw_response.create(model="tiny", **ASK)
        reply = r.parse()
        assert reply.model == "strong" and r.headers["x-exocortex-answered-by"] == "strong"
        assert reply.model_extra["exocortex"]["escalated"] is True
        direct = strong.client().chat.completions.create(model="strong", **ASK)
        assert reply.choices[0].message.content == direct.choices[0].message.content
        s = client.chat.completions.with_raw_response.create(model="tiny", stream=True, **ASK)
        chunks = list(s.parse())
        assert s.headers["x-exocortex-answered-by"] == "strong"
        assert {c.model for c in chunks} == {"strong"}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            direct.choices[0].message.content
        # "never" keeps it here whatever the confidence; the counts say who answered what
        kept = httpx.post(local.url + "/v1/chat/completions", json={**ASK, "escalation": "never"}, timeout=60).json()
        assert kept["model"] == "tiny"
        h = local.health()["escalation"]
        assert h["escalated"] == 2 and h["answered_locally"] == 0
    finally:
        local.stop()


def test_a_sure_reply_streams_from_here_and_always_sends_it_on(servers):
    strong, make = servers
    local = make(_escalation(strong.url + "/v1", sure=True))
    try:
        with httpx.stream("POST", local.url + "/v1/chat/completions", json={**ASK, "stream": True}, timeout=60) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert r.headers["x-exocortex-answered-by"] == "tiny" and events[-1] == "[DONE]"
        assert {json.loads(e)["model"] for e in events[:-1]} == {"tiny"}
        sent = httpx.post(local.url + "/v1/chat/completions", json={**ASK, "escalation": "always"}, timeout=60)
        assert sent.json()["model"] == "strong" and sent.json()["exocortex"]["p_correct"] is None  # not asked here
        assert "x-exocortex-p-correct" not in sent.headers
    finally:
        local.stop()


def test_an_endpoint_that_fails_leaves_the_local_answer(servers):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    _, make = servers
    local = make(_escalation(dead, sure=False))
    try:
        r = httpx.post(local.url + "/v1/chat/completions", json=ASK, timeout=60)
        body = r.json()
        assert r.status_code == 200 and body["model"] == "tiny" and body["choices"][0]["message"]["content"] is not None
        assert dead in body["exocortex"]["escalation_error"]
        s = httpx.post(local.url + "/v1/chat/completions", json={**ASK, "stream": True}, timeout=60)
        assert s.status_code == 200 and s.text.rstrip().endswith("data: [DONE]")
        always = httpx.post(local.url + "/v1/chat/completions", json={**ASK, "escalation": "always"}, timeout=60)
        assert always.status_code == 200 and always.json()["model"] == "tiny"  # answered here after all
        assert dead in always.json()["exocortex"]["escalation_error"]
        assert local.health()["escalation"]["escalation_failed"] == 3
    finally:
        local.stop()


def test_what_cannot_escalate_is_a_400(servers):
    strong, make = servers
    r = httpx.post(strong.url + "/v1/chat/completions", json={**ASK, "escalation": "always"}, timeout=60)
    assert r.status_code == 400 and "--escalate-to" in r.json()["error"]["message"]
    r = httpx.post(strong.url + "/v1/chat/completions", json={**ASK, "escalation": "sometimes"}, timeout=60)
    assert r.status_code == 400
    local = make(_escalation(strong.url + "/v1", sure=False))
    try:
        r = httpx.post(local.url + "/v1/chat/completions", json={**ASK, "n": 2, "escalation": "always"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    finally:
        local.stop()


def test_the_request_sent_on_is_plain_openai():
    from exocortex.apps.escalate import Escalation

    esc = Escalation("http://x/v1/", Calibration(), 0.5, model="big")
    body = esc.body({"model": "tiny", "builtin_tools": False, "escalation": "always", "top_k": 5, "user": "ann",
                     "messages": [{"role": "user", "content": "2+2?"},
                                  {"role": "assistant", "content": [{"type": "tool_call", "text": "{}"},
                                                                    {"type": "text", "text": "4"}]}]})
    assert body["model"] == "big" and body["user"] == "ann" and esc.url == "http://x/v1"
    assert not {"builtin_tools", "escalation", "top_k"} & set(body)
    assert body["messages"][1]["content"] == "[tool_call: {}] 4"
    with pytest.raises(Exception, match="base URL"):
        Escalation("localhost:8000", Calibration())
    with pytest.raises(Exception, match="probability"):
        Escalation("http://x", Calibration(), threshold=2.0)
