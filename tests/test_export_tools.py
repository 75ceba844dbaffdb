"""Exported models call tools in other runtimes: a model that really calls the calculator, trained here by the
library's own training loop, exported to HF and GGUF, then driven by transformers (apply_chat_template with
tools=, generate, parse_response) and by llama.cpp's own llama-server (--jinja, OpenAI tools): the runtime
parses the call, the test runs it, sends the result back as a tool message, and the final answer is right.

The task is narrow on purpose so it trains in about a minute on two busy cores: "What is A + B?" with A and B
two-digit numbers (every number one token), answered by a calculator call {"expression": "A + B"} and then
"A + B = R." Both the call's arguments and the answer depend on the question; the questions asked below were
never trained on, so the model has to copy, not recall. (Products of small numbers it learns to recall
instead of reading the tool's result, and products of large numbers take several tokens each: both train
far slower — measured, see docs/export.md.)
"""
import importlib.util
import json
import random
import re
import socket
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from exocortex.apps.export.chat_template import sample_conversations  # noqa: E402
from exocortex.apps.export.gguf import export_gguf  # noqa: E402
from exocortex.apps.export.hf import export_hf  # noqa: E402
from exocortex.checkpoint import save_checkpoint  # noqa: E402
from exocortex.config import TrainConfig, make_config, save_config  # noqa: E402
from exocortex.data.loader import PackedRows  # noqa: E402
from exocortex.infer.engine import Engine  # noqa: E402
from exocortex.infer.tools import calculator  # noqa: E402
from exocortex.model import GPT  # noqa: E402
from exocortex.stages.finetune import build_sft_rows  # noqa: E402
from exocortex.tokenizer import Tokenizer  # noqa: E402
from exocortex.train.loop import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# the client's tool, as an OpenAI client sends it: short, so a whole conversation fits in half a 256-token row;
# with a description, because llama-server adds an empty one to a spec without (the prompt would then differ
# from the one trained on)
CALC = {"type": "function", "function": {"name": "calculator", "description": "Exact arithmetic.", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}}}}
ASKED = [(47, 38), (63, 29), (18, 75), (90, 11)]  # held out of training: answered by copying
MAX_STEPS = 600  # it learns in ~130 (8 rows of 256 tokens a step); the cap only bounds a broken run


def _conversation(a: int, b: int) -> dict:
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": f"{a} + {b}"}}}
    return {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "call_0", "content": str(a + b)},
                         {"role": "assistant", "content": f"{a} + {b} = {a + b}."}], "tools": [CALC]}


def _question(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a} + {b}?"}]


@pytest.fixture(scope="module")
def calc_run(tmp_path_factory):
    """A run whose sft checkpoint answers ASKED through the calculator, greedy, in our own Engine."""
    torch.manual_seed(0)
    rng = random.Random(0)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if (a, b) not in ASKED]
    # the tokenizer learns every number up to 198 as one token, and the format's text from a few conversations
    numbers = " ".join(str(i) for i in range(200))
    boot = Tokenizer.train([numbers], 300)
    texts = [boot.decode(boot.render_conversation(_conversation(*rng.choice(pairs)))[0]) for _ in range(100)]
    tok = Tokenizer.train([numbers] * 3 + texts, 700)
    assert all(len(tok.encode(str(n))) == 1 for n in range(10, 199))

    tmp = tmp_path_factory.mktemp("calc")
    cfg = make_config("tiny", ["model.depth=2", "model.width=64", "model.head_dim=16", "model.seq_len=256",
                               f"tokenizer.vocab_size={tok.vocab_size}"], name="calc")
    cfg.runs_dir = str(tmp)
    cfg.model.vocab_size = tok.vocab_size
    save_config(cfg)
    tok.save(cfg.run.tokenizer_dir)
    model = GPT(cfg.model)

    x, y = build_sft_rows(tok, [_conversation(*rng.choice(pairs)) for _ in range(3000)], cfg.model.seq_len)
    prompts = [tok.render_for_completion(_question(a, b), tools=[CALC]) for a, b in ASKED]

    def learned(step: int, record: dict) -> str | None:  # the loop's hook: stop once every answer is right
        if step % 10:
            return None
        model.eval()
        outs = Engine(model, tok, torch.device("cpu")).complete(prompts, max_tokens=40, temperature=0)
        model.train()
        right = [tok.decode(out).endswith(f"</tool_response>{a} + {b} = {a + b}.") for (a, b), out in zip(ASKED, outs)]
        return "learned" if all(right) else None

    t = TrainConfig(batch_tokens=8 * 256, device_batch=8, checkpoint_every=0, eval_every=10**6, dtype="float32",
                    warmup_frac=0.0, warmdown_frac=0.0, matrix_lr=0.04, embedding_lr=0.3, unembedding_lr=0.01)
    start = time.time()
    res = train(model, t, "sft", cfg.run_dir, PackedRows(x, y, 8, seed=0), [], torch.device("cpu"), torch.float32,
                total_steps=MAX_STEPS, hooks=(learned,))
    print(f"calculator model: {res.steps} steps, {time.time() - start:.0f}s, {res.stop_reason}")
    if res.stop_reason != "learned":
        pytest.fail(f"the calculator model did not learn the task in {MAX_STEPS} steps")
    save_checkpoint(cfg.run_dir, "sft", res.steps, model.eval(), cfg.model)
    return {"run_dir": cfg.run_dir, "tok": tok, "model": model, "tmp": tmp}


def test_the_trained_model_calls_the_calculator(calc_run):
    # our own engine, for reference: the call, the forced response, the answer
    tok = calc_run["tok"]
    out = Engine(calc_run["model"], tok, torch.device("cpu")).complete(
        tok.render_for_completion(_question(47, 38), tools=[CALC]), max_tokens=40, temperature=0)[0]
    assert tok.decode(out) == ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "47 + 38"}}\n'
                               '</tool_call><tool_response>\n85\n</tool_response>47 + 38 = 85.')


# ----------------------------------------------------------------------------- transformers

def test_hf_export_calls_the_calculator_under_transformers(calc_run):
    out = export_hf(calc_run["run_dir"], calc_run["tmp"] / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)

    def reply(messages: list[dict]) -> tuple[str, str]:
        """(the prompt's text, the reply decoded as a client does): greedy, stopping where generation_config
        says (the end of the turn, or the end of a tool call)."""
        inputs = hf_tok.apply_chat_template(messages, tools=[CALC], add_generation_prompt=True, return_dict=True,
                                            return_tensors="pt")
        new = model.generate(**inputs, max_new_tokens=40, do_sample=False, top_k=None, top_p=None,
                             temperature=None)[0, inputs["input_ids"].shape[1]:]
        prompt = hf_tok.apply_chat_template(messages, tools=[CALC], add_generation_prompt=True, tokenize=False)
        return prompt, hf_tok.decode(new, skip_special_tokens=True)

    for a, b in ASKED:
        messages = _question(a, b)
        prompt, text = reply(messages)
        assert text.endswith("</tool_call>")  # generation stopped after the call: the caller runs it
        message = _parse(hf_tok, text, prompt)
        (call,) = message["tool_calls"]
        assert call["function"]["name"] == "calculator"
        result = calculator(call["function"]["arguments"]["expression"])  # the test runs the tool
        messages += [{"role": "assistant", "content": message.get("content") or None, "tool_calls": [
                         {"id": "call_1", "type": "function", "function": call["function"]}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": result}]
        _, answer = reply(messages)
        assert answer == f"{a} + {b} = {a + b}."


def _parse(hf_tok, text: str, prompt: str) -> dict:
    """The reply as an OpenAI-style message: transformers' parse_response with the exported response_template
    where this transformers has it, else the markers by hand (what a client of an older one does)."""
    if hasattr(hf_tok, "parse_response"):
        return hf_tok.parse_response(text, prefix=prompt)
    calls = [json.loads(body) for body in re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, re.S)]
    return {"role": "assistant", "content": re.sub(r"<tool_call>.*?</tool_call>", "", text, flags=re.S).strip(),
            "tool_calls": [{"type": "function", "function": c} for c in calls]}


# ----------------------------------------------------------------------------- llama.cpp's llama-server

def _llama_server():
    """bench/_llama_server.py (shared with bench/serve.py) and the binary it finds; skips with the reason."""
    path = ROOT / "bench" / "_llama_server.py"
    if not path.exists():
        pytest.skip("bench/_llama_server.py (finds or builds llama-server) is missing")
    spec = importlib.util.spec_from_file_location("_llama_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    binary = module.find()
    if binary is None:
        pytest.skip(f"no llama-server (looked in {module.where_looked()}); scripts/test.sh builds one when cmake and "
                    "a C++ compiler are there (~6 min on 2 cores, then cached)")
    return module, binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(request):
    module, binary = _llama_server()  # before training: no llama-server, no minute spent
    calc_run = request.getfixturevalue("calc_run")
    gguf = export_gguf(calc_run["run_dir"], calc_run["tmp"] / "calc.gguf", dtype="float32")
    with module.running(binary, str(gguf), _free_port(), slots=1, ctx_per_slot=512, threads=2) as base:
        yield base


def test_gguf_calls_the_calculator_under_llama_server(llama_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=llama_server + "/v1", api_key="none")
    for a, b in ASKED:
        messages = _question(a, b)
        first = client.chat.completions.create(model="calc", messages=messages, tools=[CALC], temperature=0,
                                               max_tokens=40)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls  # parsed by llama.cpp from the template it analysed
        assert call.function.name == "calculator"
        result = calculator(json.loads(call.function.arguments)["expression"])  # the test runs the tool
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": result}]
        second = client.chat.completions.create(model="calc", messages=messages, tools=[CALC], temperature=0,
                                                max_tokens=40)
        assert second.choices[0].finish_reason == "stop"
        assert second.choices[0].message.content == f"{a} + {b} = {a + b}."


def test_llama_server_renders_our_ids(llama_server, calc_run):
    # llama.cpp's own Jinja engine (not jinja2) on the sample conversations it accepts: OpenAI shapes only (not
    # our parts form), arguments present and non-empty (it refuses others), no trailing assistant message
    # (llama-server continues that one as a prefill, where an OpenAI server answers after it)
    import httpx

    tok = calc_run["tok"]
    checked = 0
    for case in sample_conversations(250, seed=3):
        messages, tools = case["messages"], case["tools"]
        calls = [c for m in messages for c in m.get("tool_calls") or []]
        if (messages[-1]["role"] == "assistant" or any(isinstance(m["content"], list) for m in messages
                                                       if m["role"] == "assistant")
                or any(not c["function"].get("arguments") for c in calls)):
            continue
        body = {"messages": messages, **({"tools": tools} if tools else {})}
        prompt = httpx.post(llama_server + "/apply-template", json=body, timeout=30).raise_for_status().json()["prompt"]
        ids = httpx.post(llama_server + "/tokenize", json={"content": prompt, "add_special": True,
                                                            "parse_special": True}, timeout=30).json()["tokens"]
        assert ids == tok.render_for_completion(messages, tools=tools), messages
        checked += 1
    assert checked >= 40
