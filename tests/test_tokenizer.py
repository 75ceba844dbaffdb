import pytest

from exocortex.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer


def test_roundtrip_and_specials(tok, texts, tmp_path):
    # a small corpus may learn fewer merges than asked; specials always follow the BPE ranks
    assert 300 < tok.vocab_size <= 400
    assert sorted(tok.special.values()) == list(range(tok.vocab_size - len(SPECIAL_TOKENS), tok.vocab_size))
    for t in texts[:50] + ["", "a", "  spaces  ", "emoji 🙂 and 日本語", "<|bos|> is just text here"]:
        assert tok.decode(tok.encode(t)) == t
    # special-token text typed by a user is never turned into a special token
    assert tok.bos_id not in tok.encode("<|bos|>")
    assert set(tok.special) == set(SPECIAL_TOKENS)
    tok.save(tmp_path / "t")
    tok2 = Tokenizer.load(tmp_path / "t")
    assert tok2.encode(texts[0]) == tok.encode(texts[0]) and tok2.special == tok.special


def test_batch_encode_matches_single(tok, texts):
    assert tok.encode_batch(texts[:20], bos=True) == [[tok.bos_id] + tok.encode(t) for t in texts[:20]]


def test_token_byte_lengths(tok, texts):
    lengths = tok.token_byte_lengths()
    ids = tok.encode(texts[3])
    assert sum(lengths[i] for i in ids) == len(texts[3].encode())
    assert all(lengths[tok.special[s]] == 0 for s in SPECIAL_TOKENS)


def test_split_pattern_is_cl100k():
    # exactly the pattern HF tokenizers / llama.cpp call llama-bpe (GPT-4's cl100k)
    import tiktoken.load  # noqa: F401
    assert SPLIT_PATTERN.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)")
    assert r"\p{N}{1,3}" in SPLIT_PATTERN


def test_chat_mask(tok):
    conv = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is 2+3"},
        {"role": "assistant", "content": [{"type": "tool_call", "text": "calculator(2+3)"},
                                          {"type": "tool_output", "text": "5"},
                                          {"type": "text", "text": "It is 5."}]},
    ]}
    ids, mask = tok.render_conversation(conv)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id
    sp = tok.special
    trained = [i for i, m in zip(ids, mask) if m]
    # the model learns its tool call and answer and the end token, never the user/system/tool output
    assert trained[0] == sp["<|tool_call_start|>"] and trained[-1] == sp["<|assistant_end|>"]
    assert tok.decode([t for t in trained if not tok.is_special(t)]) == "calculator(2+3)It is 5."
    out_start = ids.index(sp["<|tool_output_start|>"])
    out_end = ids.index(sp["<|tool_output_end|>"])
    assert not any(mask[out_start:out_end + 1])
    assert not any(mask[:ids.index(sp["<|assistant_start|>"]) + 1])


def test_render_for_completion(tok):
    msgs = [{"role": "user", "content": "hi"}]
    p = tok.render_for_completion(msgs)
    assert p[-1] == tok.special["<|assistant_start|>"]
    with pytest.raises(ValueError):
        tok.render_conversation([{"role": "wizard", "content": "x"}])
    with pytest.raises(ValueError):
        tok.render_conversation([{"role": "user", "content": "x"}, {"role": "system", "content": "late"}])
