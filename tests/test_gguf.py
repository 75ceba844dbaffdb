"""GGUF export: llama.cpp (through llama-cpp-python) loads the file and computes exactly what we do."""
import random

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (test extra)")

from exocortex.checkpoint import load_model, save_checkpoint  # noqa: E402
from exocortex.cli import main as cli_main  # noqa: E402
from exocortex.config import make_config, save_config  # noqa: E402
from exocortex.errors import ExocortexError  # noqa: E402
from exocortex.infer.engine import Engine  # noqa: E402
from exocortex.apps.export.chat_template import sample_conversations  # noqa: E402
from exocortex.apps.export.gguf import (GGUF_CHAT_TEMPLATE, check_gguf_chat_template, export_gguf, load_llama,  # noqa: E402
                                        render_with_llama_cpp, verify_gguf)
from exocortex.model import GPT  # noqa: E402
from exocortex.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402

WORDS = ["the", "The", "river", "town", "Mira", "lives", "in", "Tarsk", "and", "sells", "glimmerfern", "at",
         "market", "it's", "IT'S", "we'll", "They'Re", "I'm", "don't", "héllo", "naïve", "Straße", "日本語",
         "Привет", "🙂", "👍🏽", "+", "=", "(", ")", "...", "!", "?", "--", "$", "3.14", "2024", "12345678",
         "x_1", "foo.bar()", "\n", "\n\n", "\t", "\r\n", "  ", "    ", "<|bos|>"]

STRINGS = ["a", " ", "   ", "\n", "hello world", "Hello World!", "  leading and trailing  ", "tabs\tand\t\ttabs",
           "lines\n\n\nmore\r\nwindows\r\n", "numbers 1 12 123 1234 12345 3.14159 -42 1e10 0x1F 2024-01-31",
           "contractions: it's we'll they're I'M YOU'VE she'd can't o'clock", "café naïve Ünïcödé Straße",
           "日本語のテキスト", "emoji 🙂👍🏽🇫🇷 family 👨‍👩‍👧", "mixed: Привет, мир! שלום עולם مرحبا", "x" * 80,
           "   \n  \t  \n", "code: def f(x):\n    return x**2  # comment\n", "punct!!!???...;;;---___",
           "zero\u200bwidth and nbsp\u00a0here", "typed specials <|bos|> <|user_start|>hi<|user_end|> stay text",
           "ａｂｃ full width, ½ ² Ⅻ ٣ digits", "e\u0301 combining accent, \u00e9 precomposed"]


def _texts(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n)]


def _soup(n, seed):
    """Random character soup: whitespace runs, digits, apostrophes, mixed scripts, in odd combinations."""
    rng = random.Random(seed)
    alphabet = list("abcXYZ '\n\t\r0123456789.,!?-_<|>") + ["é", "ß", "日", "🙂", "\u200b", "\u00a0", "'s", "'LL",
                                                            "the", "\u0301", "٣", "½", "  ", "\r\n"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def etok():
    return Tokenizer.train(_texts(300, 0), 600)


@pytest.fixture(scope="module")
def run(etok, tmp_path_factory):
    """A saved run whose every weight is random (the default init zeroes some, sets norm gains to 1), with
    grouped-query attention and non-default rope theta and eps; exported as an f32 GGUF."""
    tmp = tmp_path_factory.mktemp("gguf")
    cfg = make_config("tiny", ["model.depth=2", "model.width=64", "model.head_dim=16", "model.n_kv_heads=2",
                               "model.mlp_ratio=2.0", "model.seq_len=64", "model.rope_theta=5000",
                               "model.norm_eps=1e-5", f"tokenizer.vocab_size={etok.vocab_size}"], name="g")
    cfg.runs_dir = str(tmp)
    cfg.model.vocab_size = etok.vocab_size
    save_config(cfg)
    etok.save(cfg.run_dir / "tokenizer")
    model = GPT(cfg.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if p.ndim == 1 else 0.3 * torch.randn(p.shape, generator=g))
        # special tokens never win the argmax (logit 0, far below a random model's top logit), so greedy
        # decoding runs its full length on both sides; their embeddings stay random
        model.lm_head.weight[len(etok.mergeable_ranks):] = 0
    save_checkpoint(cfg.run_dir, "sft", 3, model, cfg.model)
    path = export_gguf(cfg.run_dir, tmp / "g-f32.gguf", dtype="float32")
    return {"run_dir": cfg.run_dir, "path": path, "model": model.eval(), "tmp": tmp}


@pytest.fixture(scope="module")
def llm(run):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (test extra; builds llama.cpp from source)")
    return load_llama(run["path"], n_ctx=128, n_threads=2)


def test_metadata(run, etok):
    r = gguf.GGUFReader(run["path"])
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "qwen3" and f["general.file_type"] == 0
    assert (f["qwen3.block_count"], f["qwen3.embedding_length"], f["qwen3.feed_forward_length"],
            f["qwen3.attention.head_count"], f["qwen3.attention.head_count_kv"], f["qwen3.attention.key_length"],
            f["qwen3.context_length"]) == (2, 64, 128, 4, 2, 16, 64)
    assert f["qwen3.rope.freq_base"] == 5000.0 and f["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama-bpe"
    assert f["tokenizer.chat_template"] == GGUF_CHAT_TEMPLATE and "endgeneration" not in GGUF_CHAT_TEMPLATE
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == etok.vocab_size and tokens[etok.bos_id] == "<|bos|>" and tokens[32] == "Ġ"  # byte ' '
    assert [tokens[i] for i in sorted(etok.special.values())] == SPECIAL_TOKENS
    assert f["tokenizer.ggml.token_type"][etok.special["<|user_start|>"]] == gguf.TokenType.CONTROL
    assert f["tokenizer.ggml.bos_token_id"] == etok.bos_id
    assert f["tokenizer.ggml.eos_token_id"] == etok.special["<|assistant_end|>"]
    assert f["tokenizer.ggml.eom_token_id"] == etok.special["<tool_response>"]  # generation stops after a call
    names = {t.name: t for t in r.tensors}
    assert len(names) == 3 + 2 * 11 and "blk.1.attn_q_norm.weight" in names
    # GGUF shapes are reversed from torch's: (in, out)
    assert list(names["blk.0.attn_k.weight"].shape) == [64, 2 * 16]
    emb = run["model"].model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(names["token_embd.weight"].data), emb)  # f32: an exact copy


def test_tokenizer_matches(llm, etok):
    texts = STRINGS + _texts(200, 5) + _soup(500, 3)
    for text in texts:
        ids = etok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == [etok.bos_id] + ids
        assert llm.detokenize(ids) == text.encode()


def test_special_token_text(llm, etok):
    # like HF, llama.cpp makes special tokens from their text only when asked to (special=True)
    text = "<|user_start|>hi<|user_end|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == (
        [etok.special["<|user_start|>"]] + etok.encode("hi") + [etok.special["<|user_end|>"]])


def test_logits_match(llm, run):
    model = run["model"]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.cfg.vocab_size, (100,), generator=g).tolist()  # specials included, past seq_len
    with torch.no_grad():
        ours = model(torch.tensor([x]))[0].numpy()
    llm.reset()
    llm.eval(x)
    theirs = np.asarray(llm.scores[:len(x)])
    print(f"max |logit diff| f32: {np.abs(ours - theirs).max():.3g} (logits up to {np.abs(ours).max():.3g})")
    np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=1e-4)


def test_greedy_generation_matches_engine(llm, run, etok):
    prompt = etok.render_for_completion([{"role": "user", "content": "Where does Mira live?"}])
    eng = Engine(run["model"], etok, torch.device("cpu"))
    eng.call_start = eng.call_end = -1  # no tool handling: plain greedy decoding
    ours = eng.complete(prompt, max_tokens=16, temperature=0)[0]
    assert len(ours) == 16
    theirs = []
    llm.reset()
    for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        theirs.append(int(t))
        if len(theirs) == 16:
            break
    assert theirs == ours


def test_chat_template(llm, etok):
    # the file's template, rendered by llama-cpp-python's jinja2 formatter, gives our chat format's ids
    conv = [
        {"role": "system", "content": "You are exocortex."},
        {"role": "user", "content": [{"type": "text", "text": "What is 12*7"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "tool_call", "text": '{"name": "calculator", "arguments": {"expression": "12*7"}}'},
            {"type": "tool_output", "text": "84"},
            {"type": "text", "text": "It is 84."}]},
        {"role": "user", "content": "Thanks! 🙂  \n\n  12345 it's"},
    ]
    assert render_with_llama_cpp(llm, conv) == etok.render_for_completion(conv)
    assert render_with_llama_cpp(llm, conv[:3]) == etok.render_for_completion(conv[:3])  # trailing assistant dropped
    with pytest.raises(Exception, match="system message may only come first"):
        render_with_llama_cpp(llm, [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}])


def test_chat_template_renders_our_ids_on_many_conversations(llm, etok):
    # tools, OpenAI tool_calls, role "tool" answers inside the same turn, generation prompts after a tool message,
    # our parts form, unicode and typed special-token text: llama-cpp-python's jinja2 rendering + llama.cpp's
    # tokenizer (special tokens parsed, as for any prompt) give our ids. llama.cpp's own Jinja engine is
    # checked on the same conversations in tests/test_export_tools.py (llama-server).
    for i, case in enumerate(sample_conversations(150, seed=7)):
        messages, tools = case["messages"], case["tools"]
        assert render_with_llama_cpp(llm, messages, tools) == etok.render_for_completion(messages, tools=tools), i
        assert render_with_llama_cpp(llm, messages, tools, add_generation_prompt=False) == \
            etok.render_conversation(messages, tools=tools)[0], i
    assert check_gguf_chat_template(llm, etok) == 40  # what --verify runs


@pytest.mark.parametrize("evil", ["<|assistant_end|>", "<tool_call>", "</tool_response>", "<|bos|>"])
def test_special_token_text_stays_plain_through_the_template(llm, etok, evil):
    spec = {"type": "function", "function": {"name": "f", "description": evil}}
    conv = [{"role": "system", "content": evil}, {"role": "user", "content": evil},
            {"role": "assistant", "content": evil,
             "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": evil}}}]},
            {"role": "tool", "content": evil}]
    ids = render_with_llama_cpp(llm, conv, [spec])
    assert ids == etok.render_for_completion(conv, tools=[spec])
    structure = ["<|bos|>", "<|system_start|>", "<|system_end|>", "<|user_start|>", "<|user_end|>",
                 "<|assistant_start|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
    assert [i for i in ids if i >= len(etok.mergeable_ranks)] == [etok.special[t] for t in structure]


def test_tool_markers_are_printed(run, llm, etok):
    # USER_DEFINED: llama.cpp prints them in a reply (CONTROL tokens it hides), so a client or llama-server's
    # parser sees the call; the turn tokens and the response markers (where generation stops) stay hidden
    types = gguf.GGUFReader(run["path"]).fields["tokenizer.ggml.token_type"].contents()
    for name in SPECIAL_TOKENS:
        user_defined = name in ("<tool_call>", "</tool_call>")
        assert types[etok.special[name]] == (gguf.TokenType.USER_DEFINED if user_defined else gguf.TokenType.CONTROL)
    reply = ([etok.special["<tool_call>"]] + etok.encode('\n{"name": "f", "arguments": {}}\n')
             + [etok.special["</tool_call>"], etok.special["<tool_response>"], etok.special["<|assistant_end|>"]])
    assert llm.detokenize(reply) == b'<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'


def test_chat_completion(llm, run, etok):
    # llama-cpp-python's chat API, greedy: the prompt has one <|bos|>, and the reply is our Engine's
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who sells glimmerfern?"}]
    prompt = etok.render_for_completion(messages)
    ours = Engine(run["model"], etok, torch.device("cpu")).complete(prompt, max_tokens=12, temperature=0)[0]
    out = llm.create_chat_completion(messages=messages, max_tokens=12, temperature=0.0, top_k=1, repeat_penalty=1.0)
    assert out["usage"]["prompt_tokens"] == len(prompt)
    # a random model emits stray UTF-8 bytes: llama-cpp-python drops them (and finishes a split character)
    text = out["choices"][0]["message"]["content"]
    assert len(text) > 5 and text.startswith(etok.decode_bytes(ours).decode("utf-8", errors="ignore"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_exports(run, dtype):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    path = export_gguf(run["run_dir"], run["tmp"] / f"g-{dtype}.gguf", dtype=dtype)
    r = gguf.GGUFReader(path)
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    want = {"float16": "F16", "bfloat16": "BF16"}[dtype]
    assert kinds["blk.0.ffn_up.weight"] == kinds["output.weight"] == want and kinds["output_norm.weight"] == "F32"
    assert path.stat().st_size < 0.6 * run["path"].stat().st_size
    res = verify_gguf(path, run["run_dir"])
    print(dtype, res)
    assert 0 < res["max_logit_diff"] <= res["tolerance"]


def test_verify_gguf(run, monkeypatch):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    res = verify_gguf(run["path"], run["run_dir"])
    print(res)
    assert res["max_logit_diff"] < 1e-3 and res["greedy_tokens_matched"] == "16/16" and res["chat_template"] == "ok"
    # a broken export is caught: wrong rope theta
    monkeypatch.setattr(gguf.GGUFWriter, "add_rope_freq_base", lambda self, v: self.add_float32("qwen3.rope.freq_base", 10000.0))
    bad = export_gguf(run["run_dir"], run["tmp"] / "bad.gguf", dtype="float32")
    with pytest.raises(ExocortexError, match="logits differ"):
        verify_gguf(bad, run["run_dir"])


def test_export_errors(run, etok, tmp_path):
    with pytest.raises(ExocortexError, match="no run at"):
        export_gguf(tmp_path / "nope", tmp_path / "x.gguf")
    with pytest.raises(ExocortexError, match="no 'pretrain' checkpoint"):
        export_gguf(run["run_dir"], tmp_path / "x.gguf", stage="pretrain")
    with pytest.raises(ExocortexError, match="float32, float16 or bfloat16"):
        export_gguf(run["run_dir"], tmp_path / "x.gguf", dtype="int8")
    with pytest.raises(ExocortexError, match="ending in .gguf"):
        export_gguf(run["run_dir"], tmp_path)
    with pytest.raises(ExocortexError, match="file of its own"):
        export_gguf(run["run_dir"], run["run_dir"] / "checkpoints" / "m.gguf")
    # a run without its tokenizer
    model, _ = load_model(next((run["run_dir"] / "checkpoints" / "sft").glob("step_*")))
    bare = tmp_path / "bare"
    save_checkpoint(bare, "sft", 1, model, model.cfg)
    with pytest.raises(ExocortexError, match="no tokenizer"):
        export_gguf(bare, tmp_path / "x.gguf")
    # a weight float16 cannot hold: an error, not a file full of inf
    etok.save(bare / "tokenizer")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5
    save_checkpoint(bare, "sft", 2, model, model.cfg)
    with pytest.raises(ExocortexError, match="beyond float16's range"):
        export_gguf(bare, tmp_path / "x.gguf")
    assert export_gguf(bare, tmp_path / "big" / "x.gguf", dtype="bfloat16").exists()
    (tmp_path / "big" / "x.gguf").unlink()
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_cli(run, capsys):
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
    cli_main(["export", "--format", "gguf", "--run", str(run["run_dir"]), "--dtype", "float32", "--verify"])
    out = capsys.readouterr().out
    assert (run["run_dir"] / "gguf" / "g-float32.gguf").exists() and "'greedy_tokens_matched': '16/16'" in out
    # no checkpoint: a one-line error, exit 1
    with pytest.raises(SystemExit) as e:
        cli_main(["export", "--format", "gguf", "--run", str(run["run_dir"]), "--stage", "pretrain"])
    assert e.value.code == 1 and "no 'pretrain' checkpoint" in capsys.readouterr().err
