"""HF export: transformers loads the directory offline and computes exactly what our model and tokenizer do."""
import copy
import json
import random
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from exocortex.checkpoint import load_model, save_checkpoint  # noqa: E402
from exocortex.config import make_config, save_config  # noqa: E402
from exocortex.errors import ExocortexError  # noqa: E402
from exocortex.infer.engine import Engine  # noqa: E402
from exocortex.apps.export.hf import export_hf, ranks_to_bpe, verify_hf  # noqa: E402
from exocortex.model import GPT  # noqa: E402
from exocortex.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402

WORDS = ["the", "The", "river", "town", "Mira", "lives", "in", "Tarsk", "and", "sells", "glimmerfern", "at",
         "market", "it's", "IT'S", "we'll", "They'Re", "I'm", "you'd", "don't", "héllo", "naïve", "Straße",
         "日本語", "Привет", "🙂", "👍🏽", "+", "=", "(", ")", "...", "!", "?", "--", "$", "%", "3.14", "2024",
         "12345678", "x_1", "foo.bar()", "\n", "\n\n", "\t", "\r\n", "  ", "    ", "<|bos|>"]

STRINGS = ["", "a", " ", "   ", "\n", "hello world", "Hello World!", "  leading and trailing  ", "tabs\tand\t\ttabs",
           "lines\n\n\nmore\r\nwindows\r\n", "numbers 1 12 123 1234 12345 3.14159 -42 1e10 0x1F",
           "contractions: it's we'll they're I'M YOU'VE she'd can't o'clock", "café naïve Ünïcödé Straße",
           "日本語のテキスト", "emoji 🙂👍🏽🇫🇷 family 👨‍👩‍👧", "mixed: Привет, мир! שלום עולם مرحبا",
           "x" * 80,
           "   \n  \t  \n", "code: def f(x):\n    return x**2  # comment\n", "punct!!!???...;;;---___",
           "zero\u200bwidth and nbsp\u00a0here"]


def _texts(n=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def etok():
    return Tokenizer.train(_texts(), 600)


def _random_gpt(cfg, seed=0):
    """A GPT whose every weight is random (the default init zeroes some and sets norm gains to 1)."""
    model = GPT(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def exported(etok, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = make_config("tiny", ["model.depth=2", "model.width=64", "model.head_dim=16", "model.n_kv_heads=2",
                               "model.mlp_ratio=2.0", "model.seq_len=64", "model.rope_theta=5000",
                               "model.norm_eps=1e-5", f"tokenizer.vocab_size={etok.vocab_size}"], name="exp")
    cfg.runs_dir = str(tmp)
    cfg.model.vocab_size = etok.vocab_size
    assert cfg.model.n_heads == 4 and cfg.model.kv_heads == 2  # grouped-query attention
    save_config(cfg)
    etok.save(cfg.run_dir / "tokenizer")
    model = _random_gpt(cfg.model)
    save_checkpoint(cfg.run_dir, "sft", 7, model, cfg.model)
    out = export_hf(cfg.run_dir, tmp / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    return {"run_dir": cfg.run_dir, "out": out, "model": model, "hf_model": hf_model, "hf_tok": hf_tok}


def _ids(x):
    """apply_chat_template returns a list (transformers 4) or a BatchEncoding (5)."""
    return list(x) if isinstance(x, list) else list(x["input_ids"])


def test_files_and_config(exported, etok):
    out = exported["out"]
    for f in ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert (out / f).exists(), f
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["Qwen3ForCausalLM"] and c["model_type"] == "qwen3"
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
            c["head_dim"], c["vocab_size"]) == (64, 2, 4, 2, 16, etok.vocab_size)
    assert c["eos_token_id"] == etok.special["<|assistant_end|>"] and c["bos_token_id"] == etok.bos_id
    hc = exported["hf_model"].config
    assert hc.rms_norm_eps == 1e-5 and hc.tie_word_embeddings is False
    theta = (getattr(hc, "rope_parameters", None) or {}).get("rope_theta", getattr(hc, "rope_theta", None))
    assert theta == 5000.0


def test_logits_match(exported):
    model, hf_model = exported["model"], exported["hf_model"]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.cfg.vocab_size, (3, 48), generator=g)  # specials included
    with torch.no_grad():
        ours = model(x)
        theirs = hf_model(input_ids=x).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_engine(exported, etok):
    model, hf_model = copy.deepcopy(exported["model"]), copy.deepcopy(exported["hf_model"])
    # keep special tokens out of the argmax so both run the full 20 steps (their lm_head rows -> logit 0,
    # far below the top logit of a random model); the stop tokens are still configured on both sides
    with torch.no_grad():
        model.lm_head.weight[len(etok.mergeable_ranks):] = 0
        hf_model.lm_head.weight[len(etok.mergeable_ranks):] = 0
    prompt = etok.render_for_completion([{"role": "user", "content": "Where does Mira live?"}])
    eng = Engine(model, etok, torch.device("cpu"))
    eng.call_start = eng.call_end = -1  # no tool handling: plain greedy decoding
    ours = eng.complete(prompt, max_tokens=20, temperature=0)[0]
    assert len(ours) == 20
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False,
                                top_k=None, top_p=None, temperature=None)
    assert out[0, len(prompt):].tolist() == ours


@pytest.mark.parametrize("text", STRINGS)
def test_tokenizer_matches(exported, etok, text):
    hf_tok = exported["hf_tok"]
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == etok.encode(text)
    assert hf_tok(text)["input_ids"] == etok.encode(text, bos=True)  # documents start with <|bos|>, as in pretraining
    assert hf_tok.decode(ids) == text


def test_special_token_text(exported, etok):
    # our encode() never makes special tokens from text; HF does unless told split_special_tokens=True
    hf_tok = exported["hf_tok"]
    text = "special text <|bos|> and <|user_start|> typed by a user?"
    assert hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == etok.encode(text)
    assert etok.special["<|user_start|>"] in hf_tok(text, add_special_tokens=False)["input_ids"]


def test_tokenizer_matches_on_corpus(exported, etok):
    hf_tok = exported["hf_tok"]
    docs = _texts(200, seed=5)  # contains "<|bos|>" typed as text: ours never turns it into the special token
    assert hf_tok(docs, add_special_tokens=False, split_special_tokens=True)["input_ids"] == etok.encode_batch(docs)
    # random character soup: whitespace runs, digits, apostrophes, mixed scripts, in unusual combinations
    rng = random.Random(3)
    alphabet = list("abcXYZ '\n\t\r0123456789.,!?-_") + ["é", "ß", "日", "🙂", "\u200b", "\u00a0", "'s", "'LL", "the"]
    soup = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(500)]
    assert hf_tok(soup, add_special_tokens=False)["input_ids"] == etok.encode_batch(soup)


def test_special_tokens(exported, etok):
    hf_tok = exported["hf_tok"]
    for name in SPECIAL_TOKENS:
        assert hf_tok.convert_tokens_to_ids(name) == etok.special[name]
    assert hf_tok.bos_token_id == etok.bos_id and hf_tok.eos_token_id == etok.special["<|assistant_end|>"]
    assert len(hf_tok) == etok.vocab_size
    ids = [etok.bos_id] + etok.encode("hi") + [etok.special["<|assistant_end|>"]]
    assert hf_tok.decode(ids) == "<|bos|>hi<|assistant_end|>"
    assert hf_tok.decode(ids, skip_special_tokens=True) == "hi"


def test_merges_cover_every_split():
    # "abc" can be reached as ab+c or a+bc: tiktoken merges either, so the HF BPE must have both merges
    ranks = {bytes([i]): i for i in range(256)}
    for t in [b"ab", b"bc", b"abc"]:
        ranks[t] = len(ranks)
    vocab, merges = ranks_to_bpe(ranks)
    assert merges == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]
    assert vocab["Ġ"] == 32 and vocab["abc"] == 258  # byte-level alphabet: space is Ġ


def test_whole_piece_token_like_tiktoken():
    # tiktoken maps a regex piece that is itself a token straight to it, even where merging its bytes would
    # get stuck ("bc" first leaves a+bc+d, and no merge makes "abcd" from those): HF must too (ignore_merges)
    from exocortex.apps.export.hf import build_hf_tokenizer

    ranks = {bytes([i]): i for i in range(256)}
    for t in [b"bc", b"ab", b"cd", b"abcd"]:
        ranks[t] = len(ranks)
    tok = Tokenizer(ranks)
    hf = build_hf_tokenizer(tok)
    for text in ["abcd", "abcd abcdx", "xabcd"]:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert tok.encode("abcd") == [ranks[b"abcd"]]


def test_chat_template_matches_render(exported, etok):
    hf_tok = exported["hf_tok"]
    conv = [
        {"role": "system", "content": "You are exocortex. Be brief."},
        {"role": "user", "content": "What is 347 * 29?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "tool_call", "text": '{"name": "calculator", "arguments": {"expression": "347 * 29"}}'},
            {"type": "tool_output", "text": "10063"},
            {"type": "text", "text": " It is 10063."}]},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "in words?  "}]},
        {"role": "assistant", "content": "Ten thousand and sixty-three.\n"},
        {"role": "user", "content": "Thanks! 🙂"},
    ]
    # the prompt for the next assistant turn
    assert _ids(hf_tok.apply_chat_template(conv, add_generation_prompt=True)) == etok.render_for_completion(conv)
    text = hf_tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|bos|><|system_start|>You are exocortex.") and text.endswith("<|assistant_start|>")
    # a whole conversation, and its loss mask ({% generation %} spans = the tokens we train on)
    full = conv[:5]
    ids, mask = etok.render_conversation(full)
    assert _ids(hf_tok.apply_chat_template(full)) == ids
    enc = hf_tok.apply_chat_template(full, return_dict=True, return_assistant_tokens_mask=True)
    assert list(enc["assistant_masks"]) == mask
    # like render_for_completion, a trailing assistant message is dropped before the generation prompt
    assert _ids(hf_tok.apply_chat_template(full, add_generation_prompt=True)) == etok.render_for_completion(full)
    with pytest.raises(Exception, match="system message may only come first"):
        hf_tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}])


def test_bfloat16_export(exported, tmp_path):
    out = export_hf(exported["run_dir"], tmp_path / "bf16", dtype="bfloat16")
    from safetensors.torch import load_file

    w = load_file(str(out / "model.safetensors"))
    ours = exported["model"].state_dict()
    assert set(w) == set(ours)
    assert all(v.dtype == torch.bfloat16 for v in w.values())
    assert torch.equal(w["lm_head.weight"], ours["lm_head.weight"].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert verify_hf(out, exported["run_dir"])["max_logit_diff"] > 0  # rounded weights, within tolerance


def test_verify_hf(exported, tmp_path):
    res = verify_hf(exported["out"], exported["run_dir"])
    assert res["max_logit_diff"] < 1e-4 and res["chat_template"] == "ok"
    # a broken export is caught: wrong rope theta
    bad = tmp_path / "bad"
    shutil.copytree(exported["out"], bad)
    c = json.loads((bad / "config.json").read_text())
    c["rope_theta"] = c["rope_parameters"]["rope_theta"] = 10000.0
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(ExocortexError, match="logits differ"):
        verify_hf(bad, exported["run_dir"])


def test_export_errors(exported, tmp_path):
    with pytest.raises(ExocortexError, match="no run at"):
        export_hf(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(ExocortexError, match="no 'pretrain' checkpoint"):
        export_hf(exported["run_dir"], tmp_path / "out", stage="pretrain")
    with pytest.raises(ExocortexError, match="float32 or bfloat16"):
        export_hf(exported["run_dir"], tmp_path / "out", dtype="int8")
    with pytest.raises(ExocortexError, match="directory of its own"):
        export_hf(exported["run_dir"], exported["run_dir"] / "tokenizer")
    # a run without its tokenizer
    model, _ = load_model(next((exported["run_dir"] / "checkpoints" / "sft").glob("step_*")))
    bare = tmp_path / "bare"
    save_checkpoint(bare, "sft", 1, model, model.cfg)
    with pytest.raises(ExocortexError, match="no tokenizer"):
        export_hf(bare, tmp_path / "out")
