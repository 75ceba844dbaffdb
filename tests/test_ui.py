"""The web chat page in a real headless Chromium: type a message, watch the reply stream in, see the tool call.

Needs Debian's `chromium` and the `playwright` Python package (its own browser download is not used);
skipped when either is missing. The screenshot is kept as a test artifact in test-artifacts/ui_chat.png.
"""
import contextlib
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no chromium on this machine (apt-get install chromium)", allow_module_level=True)

from scripted import Paced, Scripted  # noqa: E402
from test_serve import MODEL, Server  # noqa: E402

from exocortex.config import ModelConfig  # noqa: E402
from exocortex.infer.engine import Engine  # noqa: E402
from exocortex.model import GPT  # noqa: E402
from exocortex.apps.serve import Limits, create_app  # noqa: E402

ARTIFACTS = Path(os.environ.get("EXOCORTEX_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


@contextlib.contextmanager
def browser_page():
    """A page in headless Chromium (Debian's), closed with the browser afterwards."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                     "--disable-dev-shm-usage"])
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_chat_page_streams_reply_with_tool_call(tok):
    sp = tok.special
    answer = "The result is 10063, computed with the calculator."
    call = '{"name": "calculator", "arguments": {"expression": "347 * 29"}}'
    script = [sp["<tool_call>"], *tok.encode(f"\n{call}\n"), sp["</tool_call>"],
              *tok.encode(answer), sp["<|assistant_end|>"]]
    cfg = ModelConfig(depth=1, width=16, head_dim=16, vocab_size=tok.vocab_size, seq_len=256, mlp_ratio=1.0)
    paced = Paced(Scripted(script, tok.vocab_size), pause=0.08)  # slowed down: streaming shows step by step
    server = Server(create_app(Engine(GPT(cfg), tok, torch.device("cpu"), decoder=paced), MODEL))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 900, "height": 650})
            page.goto(server.url + "/")
            page.fill("#input", "What is 347 * 29?")
            page.click("#send")
            # the reply grows over time (streamed), not all at once
            reply = page.locator(".msg.assistant .bubble").last
            reply.wait_for(timeout=10_000)
            lengths = []
            deadline = time.time() + 20
            while time.time() < deadline:
                lengths.append(len(reply.inner_text()))
                if answer in reply.inner_text():
                    break
                time.sleep(0.05)
            assert answer in reply.inner_text()
            distinct = sorted(set(lengths))
            assert len(distinct) >= 3, lengths  # several partial states were visible
            assert call in page.locator(".msg.assistant .tool.call").last.inner_text()
            assert "10063" in page.locator(".msg.assistant .tool.output").last.inner_text()
            page.screenshot(path=str(ARTIFACTS / "ui_chat.png"), full_page=True)
            # New chat clears the conversation
            page.click("#new-chat")
            assert page.locator(".msg").count() == 0
            browser.close()
    finally:
        server.stop()
    assert (ARTIFACTS / "ui_chat.png").stat().st_size > 5000


def test_chat_page_asks_for_the_api_key(tok):
    """With --api-key the page gets 401, asks for the key once, and sends it as Bearer from then on; its POSTs
    pass the guard's Origin and Content-Type checks (same origin, JSON)."""
    script = [*tok.encode("Hello there."), tok.special["<|assistant_end|>"]]
    cfg = ModelConfig(depth=1, width=16, head_dim=16, vocab_size=tok.vocab_size, seq_len=64, mlp_ratio=1.0)
    engine = Engine(GPT(cfg), tok, torch.device("cpu"), decoder=Scripted(script, tok.vocab_size))
    server = Server(create_app(engine, MODEL, limits=Limits(api_key="page-key")))
    asked = []
    try:
        with browser_page() as page:
            page.on("dialog", lambda d: (asked.append(d.message), d.accept("page-key")))
            page.goto(server.url + "/")
            page.locator("#model", has_text=MODEL).wait_for(timeout=10_000)
            page.fill("#input", "hi")
            page.click("#send")
            page.locator(".msg.assistant .bubble", has_text="Hello there.").wait_for(timeout=10_000)
    finally:
        server.stop()
    assert len(asked) == 1 and "API key" in asked[0]


def test_chat_page_shows_the_sources_a_reply_read(tok, tmp_path):
    """A reply that looked something up in the document index ends with a "Sources:" line naming file and lines."""
    from exocortex.infer.docstore import DocumentStore
    from exocortex.infer.tools import search_tool
    from exocortex.tokenizer import tool_call_json

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "trip.md").write_text("# Trip\n\nThe market in Tarsk sells blue cheese.\n")
    store = DocumentStore(tmp_path / "index.sqlite")
    store.update([tmp_path / "notes"])
    sp = tok.special
    script = [sp["<tool_call>"], *tok.encode("\n" + tool_call_json("lookup", {"query": "market Tarsk"}) + "\n"),
              sp["</tool_call>"], *tok.encode("»Blue cheese."), sp["<|assistant_end|>"]]
    cfg = ModelConfig(depth=1, width=16, head_dim=16, vocab_size=tok.vocab_size, seq_len=256, mlp_ratio=1.0)
    engine = Engine(GPT(cfg), tok, torch.device("cpu"), tools={"lookup": search_tool(store)},
                    decoder=Scripted(script, tok.vocab_size))
    server = Server(create_app(engine, MODEL))
    try:
        with browser_page() as page:
            page.goto(server.url + "/")
            page.fill("#input", "What does the market in Tarsk sell?")
            page.click("#send")
            sources = page.locator(".msg.assistant .sources").last
            sources.wait_for(timeout=10_000)
            assert sources.inner_text() == "Sources: notes/trip.md, lines 1-3"
    finally:
        server.stop()


def test_chat_page_says_when_a_stronger_model_answered(tok):
    """`serve --escalate-to`: the page shows the other model's streamed reply (plain OpenAI deltas, no parts) and
    says who answered."""
    import json as _json

    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from exocortex.apps.escalate import Escalation
    from exocortex.infer.confidence import Calibration

    stub = FastAPI()

    @stub.post("/v1/chat/completions")
    async def _reply():
        def events():
            for piece in ["Paris is ", "the capital."]:
                yield "data: " + _json.dumps({"id": "x", "object": "chat.completion.chunk", "model": "big-model",
                                              "choices": [{"index": 0, "delta": {"content": piece}}]}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    strong = Server(stub)
    sp = tok.special
    cfg = ModelConfig(depth=1, width=16, head_dim=16, vocab_size=tok.vocab_size, seq_len=256, mlp_ratio=1.0)
    engine = Engine(GPT(cfg), tok, torch.device("cpu"),
                    decoder=Scripted([*tok.encode("Lyon?"), sp["<|assistant_end|>"]], tok.vocab_size))
    server = Server(create_app(engine, MODEL, escalation=Escalation(strong.url + "/v1", Calibration(bias=-50.0))))
    try:
        with browser_page() as page:
            page.goto(server.url + "/")
            page.fill("#input", "What is the capital of France?")
            page.click("#send")
            note = page.locator(".msg.assistant .note").last
            note.wait_for(timeout=10_000)
            assert note.inner_text().startswith("answered by big-model (escalated:")
            assert "Paris is the capital." in page.locator(".msg.assistant .bubble").last.inner_text()
    finally:
        server.stop()
        strong.stop()


def test_chat_page_shows_and_forgets_what_the_model_remembers(tok, tmp_path):
    """The Memory panel lists the page user's notes, shows the one the model saves during a reply, adds one
    typed in, and forgets one: the store changes with it."""
    from exocortex.infer.notes import NoteStore
    from exocortex.tokenizer import tool_call_json

    sp = tok.special
    script = [sp["<tool_call>"], *tok.encode("\n" + tool_call_json("remember", {}) + "\n"), sp["</tool_call>"],
              *tok.encode("»Noted."), sp["<|assistant_end|>"]]
    cfg = ModelConfig(depth=1, width=16, head_dim=16, vocab_size=tok.vocab_size, seq_len=256, mlp_ratio=1.0)
    store = NoteStore(tmp_path / "notes.sqlite")
    store.add("local", "I live in Tarsk.", "chat")
    store.add("someone else", "not for this page", "api")
    engine = Engine(GPT(cfg), tok, torch.device("cpu"), decoder=Scripted(script, tok.vocab_size))
    server = Server(create_app(engine, MODEL, notes=store))
    try:
        with browser_page() as page:
            page.goto(server.url + "/")
            page.click("#memory summary")
            notes = page.locator("#notes li span")
            notes.first.wait_for(timeout=10_000)
            assert notes.all_inner_texts() == ["I live in Tarsk."]
            page.fill("#input", "My cat is called Pip.")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('#notes li span').length === 2", timeout=10_000)
            assert notes.all_inner_texts() == ["I live in Tarsk.", "My cat is called Pip."]
            page.fill("#note-text", "I prefer tea.")
            page.click("#note-form button")
            page.wait_for_function("document.querySelectorAll('#notes li span').length === 3", timeout=10_000)
            page.locator("#notes li", has_text="I live in Tarsk.").locator("button").click()
            page.wait_for_function("document.querySelectorAll('#notes li span').length === 2", timeout=10_000)
            assert notes.all_inner_texts() == ["My cat is called Pip.", "I prefer tea."]
            page.screenshot(path=str(ARTIFACTS / "ui_memory.png"))
        assert [n.text for n in store.list("local")] == ["My cat is called Pip.", "I prefer tea."]
        assert [n.text for n in store.list("someone else")] == ["not for this page"]
    finally:
        server.stop()
