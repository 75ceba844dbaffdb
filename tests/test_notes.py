"""The model's memory (exocortex/infer/notes.py, tasks/memory.py, `exocortex memory`): notes per user that
persist across sessions and processes, never shown to another user, with limits, provenance and the owner's
commands; the server binds them to each request's `user`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exocortex.infer.notes import NoteStore, default_notes_path
from exocortex.infer.tools import ToolError, run_tool_call
from exocortex.tokenizer import tool_call_json

ROOT = Path(__file__).resolve().parent.parent


def call(name, **arguments):
    return tool_call_json(name, arguments)


def test_notes_are_per_user_and_persist(tmp_path):
    path = tmp_path / "notes.sqlite"
    store = NoteStore(path)
    alice, bob = store.tools("alice", "chat"), store.tools("bob", "api")
    told = "Please remember that my dog is called Pip."
    assert run_tool_call(call("remember"), alice, context=told) == "saved as note 1"  # no note: the message
    assert run_tool_call(call("remember", note="I work as a baker"), alice) == "saved as note 2"
    assert run_tool_call(call("remember"), alice, context=told) == "saved as note 1"  # the same text once
    assert run_tool_call(call("remember", note="my locker is 12"), bob) == "saved as note 3"
    store.close()

    again = NoteStore(path)  # another session (a new process opens the same file)
    alice, bob = again.tools("alice", "chat"), again.tools("bob", "api")
    out = run_tool_call(call("recall"), alice, context="What is my dog called?")
    assert out.splitlines()[0] == "note 1: " + told
    assert "locker" not in run_tool_call(call("recall", query="locker"), alice)  # bob's note: never alice's
    assert run_tool_call(call("recall", query="locker"), bob) == "note 3: my locker is 12"
    # nothing of his about a dog: his latest notes (the model judges), never alice's
    assert run_tool_call(call("recall", query="dog"), bob) == "note 3: my locker is 12"
    assert again.search("bob", "dog", latest=False) == []
    assert "dog" not in run_tool_call(call("recall"), bob, context="What is my dog called?")
    assert [n.source for n in again.list("alice")] == ["chat", "chat"] and again.list("bob")[0].source == "api"
    with pytest.raises(ToolError, match="no note 1"):
        again.forget("bob", 1)  # another user's id
    with pytest.raises(ToolError, match="no note 3"):
        again.edit("alice", 3, "x")
    assert run_tool_call(call("forget"), alice, context="Forget what I told you about my dog.") == \
        "forgot note 1: " + told
    assert "dog" not in run_tool_call(call("recall", query="dog"), alice)
    assert run_tool_call(call("recall", query="zebra"), again.tools("carol", "chat")) == "no notes"


def test_note_limits_and_bad_queries(tmp_path):
    store = NoteStore(tmp_path / "notes.sqlite", max_notes=2, note_chars=40)
    tools = store.tools("u", "chat")
    assert run_tool_call(call("remember", note="x" * 41), tools).startswith("error: a note holds at most 40")
    assert run_tool_call(call("remember", note="   "), tools) == "error: the note is empty"
    assert run_tool_call(call("remember", note=7), tools) == "error: remember's 'note' must be a string"
    run_tool_call(call("remember", note="one"), tools)
    run_tool_call(call("remember", note="two"), tools)
    assert run_tool_call(call("remember", note="three"), tools).startswith("error: memory is full (2 notes)")
    for q in ['"', "NEAR(one two)", "one AND", "text:one", "*", "'); DROP TABLE notes; --"]:
        run_tool_call(call("recall", query=q), tools)  # never raises, never FTS5 syntax
    assert len(store.list("u")) == 2
    assert run_tool_call(call("recall", query="two"), tools).startswith("note 2: two")
    bad = tmp_path / "garbage.sqlite"
    bad.write_bytes(b"not a database" * 200)
    with pytest.raises(Exception, match="not a notes database"):
        NoteStore(bad)


def test_the_memory_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EXOCORTEX_HOME": str(tmp_path)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "exocortex", "memory", *args], env=env, capture_output=True,
                              text=True, timeout=120)

    assert cli("add", "my", "sister", "is", "Ada").stdout.strip() == "saved as note 1"
    assert cli("add", "likes tea", "--user", "bob").returncode == 0
    r = cli("list")
    assert "my sister is Ada" in r.stdout and "tea" not in r.stdout and "(cli)" in r.stdout
    assert "bob" in cli("list", "--all").stdout
    assert cli("edit", "1", "my sister is Ada Lovelace").returncode == 0
    r = cli("forget", "2")  # bob's note, asked as local
    assert r.returncode == 1 and r.stderr.startswith("error: no note 2") and len(r.stderr.splitlines()) == 1
    assert cli("forget", "1").stdout.startswith("forgot note 1: my sister is Ada Lovelace")
    assert cli("edit", "1").returncode == 1
    assert NoteStore(tmp_path / "notes.sqlite").list("bob")[0].text == "likes tea"  # what the model reads
    assert default_notes_path() != tmp_path / "notes.sqlite"  # tests keep their own $EXOCORTEX_HOME


def test_the_server_keeps_each_users_notes_across_restarts(tok, tmp_path):
    """alice tells the model something in one server's lifetime; a new server (a new store on the same file)
    gives her note to the model when she asks, gives bob nothing, and --no-memory (notes=None) gives no
    memory tools at all."""
    from exocortex.apps.serve import create_app
    from exocortex.config import ModelConfig
    from exocortex.infer.engine import Engine
    from exocortex.model import GPT
    from scripted import Scripted
    from test_serve import MODEL, Server

    sp = tok.special

    def script(prompt):
        asks = "called?" in tok.decode(prompt)
        return [sp["<tool_call>"], *tok.encode("\n" + call("recall" if asks else "remember") + "\n"),
                sp["</tool_call>"], *tok.encode("»ok"), sp["<|assistant_end|>"]]

    cfg = ModelConfig(depth=1, width=16, head_dim=16, vocab_size=tok.vocab_size, seq_len=256, mlp_ratio=1.0)
    path = tmp_path / "notes.sqlite"

    def ask(notes, user, text):
        eng = Engine(GPT(cfg), tok, torch.device("cpu"), decoder=Scripted(script, tok.vocab_size))
        server = Server(create_app(eng, MODEL, notes=notes))
        try:
            kw = {"user": user} if user else {}
            msg = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                                          temperature=0, **kw).choices[0].message
            return next(p["text"] for p in msg.model_extra["parts"] if p["type"] == "tool_output")
        finally:
            server.stop()

    assert ask(NoteStore(path), "alice", "Please remember that my dog is called Pip.").startswith("saved as note")
    assert ask(NoteStore(path), "alice", "What is my dog called?") == \
        "note 1: Please remember that my dog is called Pip."
    assert ask(NoteStore(path), "bob", "What is my dog called?") == "no notes"
    assert ask(NoteStore(path), None, "What is my dog called?") == "no notes"  # "local" is another user
    assert ask(None, "alice", "What is my dog called?") == "error: unknown tool 'recall'"
    import httpx
    store = NoteStore(path)
    eng = Engine(GPT(cfg), tok, torch.device("cpu"), decoder=Scripted(script, tok.vocab_size))
    server = Server(create_app(eng, MODEL, notes=store))
    try:
        r = httpx.post(server.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hi"}], "user": "x" * 300})
        assert r.status_code == 400 and r.json()["error"]["param"] == "user"
    finally:
        server.stop()


def test_the_memory_eval_runs_two_sessions_through_a_store(tok):
    """evals.memory_scores: a scripted model that remembers when told and recalls when asked: every told fact
    is saved, and the other user's answers never hold it (this model answers without reading its notes, so
    memory_recalled is 0 here; the tiny speedrun measures it for real)."""
    from exocortex.config import ModelConfig
    from exocortex.evals import memory_scores
    from exocortex.infer.engine import Engine
    from exocortex.model import GPT
    from exocortex.tasks.memory import Memory
    from scripted import Scripted

    sp = tok.special

    def script(prompt):
        asks = "?" in tok.decode(prompt).rsplit("user", 1)[-1] and "remember that" not in tok.decode(prompt)
        return [sp["<tool_call>"], *tok.encode("\n" + call("recall" if asks else "remember") + "\n"),
                sp["</tool_call>"], *tok.encode("»ok"), sp["<|assistant_end|>"]]

    cfg = ModelConfig(depth=1, width=16, head_dim=16, vocab_size=tok.vocab_size, seq_len=512, mlp_ratio=1.0)
    eng = Engine(GPT(cfg), tok, torch.device("cpu"), decoder=Scripted(script, tok.vocab_size))
    scores = memory_scores(eng, tok, Memory(), 5, 0, 600)
    assert scores["memory_saved"] == 1.0 and scores["memory_other_user"] == 0.0 and scores["memory_n"] == 5
    assert set(eng.tools) == {"calculator", "python"}  # the engine's own tools are back


def test_the_owner_sees_and_changes_the_memory_over_http(tok, tmp_path):
    """/v1/memory: list, add, edit and forget one user's notes (what the chat page's memory panel uses), the
    model's own notes among them; another user's notes are never listed, edited or forgotten; every request we
    do not serve is a 4xx that says why; with --no-memory the endpoints say memory is off."""
    import httpx

    from exocortex.apps.serve import create_app
    from exocortex.config import ModelConfig
    from exocortex.infer.engine import Engine
    from exocortex.model import GPT
    from scripted import Scripted
    from test_serve import MODEL, Server

    sp = tok.special
    script = lambda prompt: [sp["<tool_call>"], *tok.encode("\n" + call("remember") + "\n"), sp["</tool_call>"],
                             *tok.encode("»ok"), sp["<|assistant_end|>"]]
    cfg = ModelConfig(depth=1, width=16, head_dim=16, vocab_size=tok.vocab_size, seq_len=256, mlp_ratio=1.0)
    store = NoteStore(tmp_path / "notes.sqlite", max_notes=3, note_chars=40)
    eng = Engine(GPT(cfg), tok, torch.device("cpu"), decoder=Scripted(script, tok.vocab_size))
    server = Server(create_app(eng, MODEL, notes=store))
    url = server.url + "/v1/memory"
    try:
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "I am Ann."}],
                                                user="ann")
        listed = httpx.get(url, params={"user": "ann"}).json()
        assert listed["user"] == "ann" and [(n["text"], n["source"]) for n in listed["data"]] == [("I am Ann.", "api")]
        added = httpx.post(url, params={"user": "ann"}, json={"text": "  likes   tea "}).json()
        assert added["text"] == "likes tea" and added["object"] == "memory.note"
        edited = httpx.patch(f"{url}/{added['id']}", params={"user": "ann"}, json={"text": "likes coffee"}).json()
        assert edited["text"] == "likes coffee" and store.get("ann", added["id"]).text == "likes coffee"
        assert httpx.get(url).json()["data"] == []  # no ?user=: "local", as the chat page and `exocortex chat`
        bob = httpx.post(url, params={"user": "bob"}, json={"text": "secret"}).json()
        for r in (httpx.delete(f"{url}/{bob['id']}", params={"user": "ann"}),
                  httpx.patch(f"{url}/{bob['id']}", params={"user": "ann"}, json={"text": "x"}),
                  httpx.delete(f"{url}/999", params={"user": "ann"})):
            assert r.status_code == 404 and r.json()["error"]["code"] == "note_not_found", r.text
        evil = httpx.delete(f"{url}/{bob['id']}", params={"user": "bob"}, headers={"origin": "http://evil.example"})
        assert evil.status_code == 403 and store.get("bob", bob["id"]) is not None  # another site's page
        for huge in (2**63, 10**30, 0, -1):  # past sqlite's integers: not a note, not a crash
            for r in (httpx.delete(f"{url}/{huge}"), httpx.patch(f"{url}/{huge}", json={"text": "x"})):
                assert r.status_code == 404 and r.json()["error"]["code"] == "note_not_found", r.text
        assert store.get("bob", bob["id"]).text == "secret"
        assert "secret" not in httpx.get(url, params={"user": "ann"}).text
        gone = httpx.delete(f"{url}/{added['id']}", params={"user": "ann"})
        assert gone.json() == {"id": added["id"], "object": "memory.note.deleted", "deleted": True}
        assert [n["text"] for n in httpx.get(url, params={"user": "ann"}).json()["data"]] == ["I am Ann."]
        bad = [(httpx.post(url, json={"text": "x" * 41}), "text", "at most 40 characters"),
               (httpx.post(url, json={"text": "   "}), "text", "empty"),
               (httpx.post(url, json={"note": "x"}), "text", "JSON object"),
               (httpx.post(url, json={"text": "x", "user": "ann"}), "user", "Unknown field"),
               (httpx.post(url, content=b"{oops", headers={"content-type": "application/json"}), None,
                "could not parse"),
               (httpx.get(url, params={"user": "x" * 300}), "user", "printable"),
               (httpx.get(url, params={"owner": "ann"}), "owner", "Unknown query parameter"),
               (httpx.post(url, content=b'{"text": "\\ud800"}', headers={"content-type": "application/json"}),
                "text", "lone surrogate"),
               (httpx.get(url, params=[("user", "ann"), ("user", "local")]), "user", "once"),
               (httpx.request("DELETE", f"{url}/{bob['id']}", params={"user": "bob"}, json={"text": "x"}), None,
                "no body"),
               (httpx.delete(f"{url}/abc"), None, "")]
        for r, param, words in bad:
            assert r.status_code == 400, (r.status_code, r.text)
            assert words in r.json()["error"]["message"] and (param is None or r.json()["error"]["param"] == param)
        for text in ("one", "two"):
            httpx.post(url, params={"user": "cy"}, json={"text": text})
        httpx.post(url, params={"user": "cy"}, json={"text": "three"})
        full = httpx.post(url, params={"user": "cy"}, json={"text": "four"})
        assert full.status_code == 400 and "memory is full" in full.json()["error"]["message"]
    finally:
        server.stop()
    off = Server(create_app(Engine(GPT(cfg), tok, torch.device("cpu"), decoder=Scripted(script, tok.vocab_size)),
                            MODEL, notes=None))
    try:
        r = httpx.get(off.url + "/v1/memory")
        assert r.status_code == 404 and r.json()["error"]["code"] == "memory_off" and "--no-memory" in r.text
    finally:
        off.stop()
