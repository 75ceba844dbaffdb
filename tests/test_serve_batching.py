"""The server with continuous batching: concurrent requests share decode steps, each gets what it would get
alone, limits (429) and client disconnects work on rows of the batch."""
import json
import threading
import time
from functools import partial

import pytest
import torch

httpx = pytest.importorskip("httpx")
from scripted import Paced  # noqa: E402
from test_serve import MODEL, Server, _error  # noqa: E402

from exocortex.config import ModelConfig  # noqa: E402
from exocortex.infer.decode import Decoder  # noqa: E402
from exocortex.infer.engine import Engine  # noqa: E402
from exocortex.model import GPT  # noqa: E402
from exocortex.apps.serve import create_app  # noqa: E402


def paced_engine(tok, pause):
    """An engine whose decode steps sleep a little (so requests overlap) and are recorded (`paced`)."""
    model = random_model(tok)
    paced = Paced(partial(Decoder, model), pause)
    return Engine(model, tok, torch.device("cpu"), decoder=paced), paced


def random_model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, width=64, head_dim=16, vocab_size=tok.vocab_size, seq_len=32, mlp_ratio=2.0)
    m = GPT(cfg)
    for p in m.parameters():  # nonzero everywhere: the whole context matters for each token
        torch.nn.init.normal_(p, std=0.3)
    return m


def alone(engine, prompt, max_tokens):
    tokens, steps = [], 0
    for column, _ in engine.generate(prompt, max_tokens=max_tokens, temperature=0):
        steps += 1
        if column[0] in engine.stop_ids:
            break
        tokens.append(column[0])
    return tokens, steps


def test_concurrent_requests_share_steps_and_match_running_alone(tok):
    eng, paced = paced_engine(tok, pause=0.005)
    server = Server(create_app(eng, MODEL, max_concurrent=4, max_queue=8))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(1, 60, (7,), generator=g)]
    max_tokens = [int(n) for n in torch.randint(5, 60, (7,), generator=g)]
    results = {}

    def client(i):
        time.sleep(0.03 * i)  # requests arrive while others are mid-way
        body = {"prompt": prompts[i], "max_tokens": max_tokens[i], "temperature": 0, "stream": i % 2 == 0}
        with httpx.Client(timeout=60) as h:
            if i % 2:
                results[i] = h.post(server.url + "/v1/completions", json=body).json()
            else:
                with h.stream("POST", server.url + "/v1/completions", json=body) as r:
                    results[i] = [json.loads(line[5:]) for line in r.iter_lines()
                                  if line.startswith("data:") and line != "data: [DONE]"]
    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(7)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        server.stop()
    assert max(paced.rows_per_step) >= 3  # the requests really were decoded together
    for i, prompt in enumerate(prompts):
        tokens, steps = alone(eng, prompt, max_tokens[i])
        if i % 2:
            text = results[i]["choices"][0]["text"]
            assert results[i]["usage"]["completion_tokens"] == steps
        else:
            text = "".join(c["choices"][0]["text"] for c in results[i] if c["choices"])
        assert text.strip() == eng.render(tokens), i


def test_limits_429_and_disconnect_cancel_a_row(tok):
    eng, paced = paced_engine(tok, pause=0.02)
    eng.stop_ids = {-1}  # only max_tokens ends a reply
    app = create_app(eng, MODEL, max_concurrent=2, max_queue=1)
    batcher = app.state.exocortex.batcher
    server = Server(app)
    url = server.url + "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "temperature": 0}

    def busy_rows():
        return sum(row is not None for row in batcher.rows)
    try:
        queued = {}
        with httpx.Client(timeout=30) as h1, httpx.Client(timeout=30) as h2:
            with h1.stream("POST", url, json={**body, "stream": True}) as r1, \
                    h2.stream("POST", url, json={**body, "stream": True}) as r2:
                lines = [r1.iter_lines(), r2.iter_lines()]  # (keep them: a dropped iterator closes its stream)
                for it in lines:
                    next(line for line in it if line.startswith("data:"))
                    next(line for line in it if line.startswith("data:"))  # both are generating
                assert (server.health()["active"], busy_rows()) == (2, 2), batcher.rows

                def wait_in_queue():
                    queued["response"] = httpx.post(url, json={**body, "max_tokens": 3}, timeout=30)
                t = threading.Thread(target=wait_in_queue)
                t.start()
                deadline = time.time() + 5
                while server.health()["queued"] != 1:
                    assert time.time() < deadline
                    time.sleep(0.01)
                _error(httpx.post(url, json=body), 429, code="server_busy")
                r1.close()  # one client goes away: its row leaves, the queued request takes its place
                t.join(10)
                assert queued["response"].status_code == 200
                assert queued["response"].json()["usage"]["completion_tokens"] == 3
                assert busy_rows() == 1 and server.health()["active"] == 1  # r2 still generating
                line = next(line for line in lines[1] if line.startswith("data:"))
                assert json.loads(line[5:])["choices"][0]["delta"]["content"] is not None
        deadline = time.time() + 5
        while busy_rows() or server.health()["active"]:
            assert time.time() < deadline, server.health()
            time.sleep(0.02)
        steps = len(paced.rows_per_step)
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up is cancelled too
            httpx.post(url, json=body, timeout=0.3)
        deadline = time.time() + 5
        while busy_rows() or server.health()["active"]:
            assert time.time() < deadline, server.health()
            time.sleep(0.02)
        assert len(paced.rows_per_step) - steps < 60  # far from the 100 steps it asked for
    finally:
        server.stop()
