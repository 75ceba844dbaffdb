"""Export a run to one GGUF file that llama.cpp runs (llama-cli, llama-server, llama-cpp-python, Ollama).

    from exocortex.apps.export.gguf import export_gguf, verify_gguf
    export_gguf("runs/tiny", "runs/tiny/gguf/tiny.gguf")             # latest sft checkpoint, f16 weights
    export_gguf("runs/tiny", "tiny-f32.gguf", dtype="float32")         # exact weights
    verify_gguf("runs/tiny/gguf/tiny.gguf", "runs/tiny")               # needs llama-cpp-python

Our model is exactly HF Qwen3, which llama.cpp runs as its `qwen3` architecture: the same tensors under
llama.cpp's names, no reordering (llama.cpp permutes Q/K rows only for its `llama` architecture; `qwen3` uses
NEOX-style rotary, which is HF's rotate-half, i.e. ours). The tokenizer is the same byte-level BPE the HF
export writes (vocab + merges from `ranks_to_bpe`), with pre-tokenizer `llama-bpe`: llama.cpp's cl100k split
regex, equal to our SPLIT_PATTERN, and whole-piece lookup first (`ignore_merges`), as tiktoken does.
See docs/export.md; checked against our model and tokenizer in tests/test_gguf.py.
"""
from __future__ import annotations

import os
from pathlib import Path

from exocortex.errors import ExocortexError
from exocortex.fileio import fsync_path, temp_path
from exocortex.apps.export.chat_template import GGUF_CHAT_TEMPLATE, sample_conversations
from exocortex.apps.export.hf import check_export_target, load_for_export, ranks_to_bpe
from exocortex.tokenizer import CALL_END, CALL_START, RESPONSE_START, Tokenizer

GGUF_DTYPES = {"float32": "f32", "fp32": "f32", "f32": "f32", "float16": "f16", "fp16": "f16", "f16": "f16",
               "bfloat16": "bf16", "bf16": "bf16"}

# llama.cpp's tokenizer.ggml.pre value whose split regex is cl100k's (= our SPLIT_PATTERN, digits in runs of
# up to 3; "qwen2" splits every digit). It also turns on ignore_merges, like tiktoken.
PRE_TOKENIZER = "llama-bpe"

# our parameter names (HF Qwen3's) -> llama.cpp's tensor names
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_tensor_name(name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".")  # model.layers.<i>.<module...>.weight
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        module = ".".join(parts[3:-1])
        if module in _LAYER:
            return f"blk.{int(parts[2])}.{_LAYER[module]}.weight"
    raise ExocortexError(f"no GGUF name for parameter {name}; the model has a tensor llama.cpp's qwen3 lacks")


def gguf_vocab(tok: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for `tokenizer.ggml.*`: the HF export's byte-level BPE, by id. Special
    tokens are CONTROL, except the tool-call markers <tool_call> and </tool_call>: USER_DEFINED, which llama.cpp
    prints in its output (it hides CONTROL tokens), so a client or llama-server's own parser sees where a call
    starts and ends. (The response markers stay CONTROL: generation stops at <tool_response>, and printed it would
    trail the call.) Rows past the tokenizer (a padded embedding) are UNUSED placeholders."""
    from gguf import TokenType

    vocab, merges = ranks_to_bpe(tok.mergeable_ranks)
    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.NORMAL)] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
    for name, i in tok.special.items():
        tokens[i], types[i] = name, int(TokenType.USER_DEFINED if name in (CALL_START, CALL_END) else TokenType.CONTROL)
    for i in range(tok.vocab_size, vocab_size):
        tokens[i], types[i] = f"[PAD{i}]", int(TokenType.UNUSED)
    if None in tokens or len(set(tokens)) != vocab_size:
        raise ExocortexError("tokenizer ids are not one string each (gap or duplicate); cannot write a GGUF vocab")
    return tokens, types, [f"{a} {b}" for a, b in merges]


def export_gguf(run_dir: str | os.PathLike, out_path: str | os.PathLike, stage: str = "sft",
                dtype: str = "float16") -> Path:
    """Write the latest `stage` checkpoint of a run as one GGUF file; returns its path.

    dtype: float16 (default: half the size, llama.cpp's usual unquantized type), float32 (exact weights) or
    bfloat16. Norm gains stay float32, as in llama.cpp's own converter."""
    import numpy as np
    import torch
    try:
        import gguf
    except ImportError:
        raise ExocortexError("GGUF export needs the `gguf` package: pip install gguf") from None

    run_dir, out_path = Path(run_dir), Path(out_path)
    if dtype not in GGUF_DTYPES:
        raise ExocortexError(f"GGUF dtype must be float32, float16 or bfloat16, got '{dtype}'")
    ftype = GGUF_DTYPES[dtype]
    tok, model, _, _ = load_for_export(run_dir, stage)
    if out_path.is_dir() or out_path.suffix != ".gguf":
        raise ExocortexError(f"GGUF export writes one file ending in .gguf, not {out_path}")
    check_export_target(run_dir, out_path, f"a file of its own (e.g. {run_dir / 'gguf' / 'model.gguf'})")
    cfg = model.cfg
    tokens, types, merges = gguf_vocab(tok, cfg.vocab_size)  # before writing anything: this is what can fail
    out_path.parent.mkdir(parents=True, exist_ok=True)

    tmp = temp_path(out_path)
    w = gguf.GGUFWriter(str(tmp), arch="qwen3")
    w.add_name(run_dir.resolve().name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16}[ftype])
    w.add_context_length(cfg.seq_len)  # what it was trained on; longer prompts work, but untrained
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_block_count(cfg.depth)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.head_dim)  # head_dim need not be width / heads
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))

    sp = tok.special
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(sp["<|assistant_end|>"])  # end of an assistant turn: where chat generation stops
    # "end of message" (llama.cpp's name for Llama 3.1's tool-call stop), an end of generation: after a call the
    # model predicts <tool_response> (the loss mask trains that one marker), so llama.cpp stops right there; the
    # caller runs the tool and renders its response into the same turn. Not </tool_call> itself: llama-server's
    # tool grammar wants that text written out and never lets an end-of-generation token write it.
    w.add_eom_token_id(sp[RESPONSE_START])
    w.add_pad_token_id(sp["<|assistant_end|>"])
    w.add_add_bos_token(True)  # documents start with <|bos|> (llama.cpp drops the template's own, no doubling)
    w.add_add_eos_token(False)
    w.add_chat_template(GGUF_CHAT_TEMPLATE)

    for name, t in model.state_dict().items():
        t = t.detach().float().contiguous()
        if t.ndim == 1 or ftype == "f32":
            w.add_tensor(gguf_tensor_name(name), t.numpy())
        elif ftype == "f16":
            if t.abs().max() > 65504:  # float16's largest finite value
                raise ExocortexError(f"{name} has weights beyond float16's range; export as bfloat16 or float32")
            w.add_tensor(gguf_tensor_name(name), t.to(torch.float16).numpy())
        else:  # numpy has no bfloat16: hand over the raw bytes
            raw = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
            w.add_tensor(gguf_tensor_name(name), raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
    _write(w, tmp, out_path)
    return out_path


def _write(w, tmp: Path, out_path: Path) -> None:
    """Into a temp file, renamed over the previous export only once it is whole and on the disk."""
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        fsync_path(tmp)
        os.replace(tmp, out_path)
        fsync_path(out_path.parent)
    except OSError as e:  # a full disk, a file size limit
        raise ExocortexError(f"could not write the export ({e.strerror or e}); {out_path} is unchanged") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_llama(path: str | os.PathLike, n_ctx: int = 512, **kw):
    """The GGUF in llama-cpp-python, set up to compare with us: float32 KV cache (llama.cpp's default f16
    cache rounds keys and values), every position's logits kept, quiet."""
    try:
        from llama_cpp import GGML_TYPE_F32, Llama
    except ImportError:
        raise ExocortexError("verifying a GGUF needs llama-cpp-python: pip install llama-cpp-python") from None
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, seed=0,
                 type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, n_threads=kw.pop("n_threads", os.cpu_count() or 1),
                 **kw)


def render_with_llama_cpp(llm, messages: list[dict], tools: list[dict] | None = None,
                          add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids for a chat, as llama-cpp-python makes them: the file's template rendered by its jinja2
    formatter, then tokenized with special-token text parsed."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|assistant_end|>",
                              bos_token="<|bos|>", add_generation_prompt=add_generation_prompt)
    return llm.tokenize(fmt(messages=messages, tools=tools).prompt.encode(), add_bos=False, special=True)


def check_gguf_chat_template(llm, tok: Tokenizer, n: int = 40) -> int:
    """Render `n` sample conversations (tools, calls, tool messages, unicode, typed special-token text) with the
    file's template in llama-cpp-python, with and without a generation prompt, and compare with our ids.
    Returns how many; raises ExocortexError naming the first that differs."""
    cases = sample_conversations(n)
    for i, case in enumerate(cases):
        messages, tools = case["messages"], case["tools"]
        if render_with_llama_cpp(llm, messages, tools) != tok.render_for_completion(messages, tools=tools):
            raise ExocortexError(f"GGUF chat template renders sample conversation {i} differently (prompt)")
        if render_with_llama_cpp(llm, messages, tools, False) != tok.render_conversation(messages, tools=tools)[0]:
            raise ExocortexError(f"GGUF chat template renders sample conversation {i} differently")
    return len(cases)


def verify_gguf(path: str | os.PathLike, run_dir: str | os.PathLike, stage: str = "sft",
                new_tokens: int = 16) -> dict:
    """Load a GGUF with llama-cpp-python and check it against the run: the tokenizer on sample text, the chat
    template, logits on a chat prompt, and `new_tokens` of greedy decoding with llama.cpp's own sampler against
    our Engine's. Returns what it measured; raises ExocortexError on a mismatch. Cheap (a few seconds)."""
    import numpy as np
    import torch

    from exocortex.infer.engine import Engine

    tok, model, _, _ = load_for_export(Path(run_dir), stage)
    llm = load_llama(path, n_ctx=max(256, min(512, model.cfg.seq_len)))  # llama.cpp warns past seq_len
    ftype = int(llm.metadata.get("general.file_type", 0))  # 0 = all f32, 1 = f16, 32 = bf16

    samples = ["Hello, world! It's 12:30.", "  spaces\tand\nnew lines\r\n", "naïve café 日本語 🙂",
               "x = [1, 22, 333, 4444]", "typed <|bos|> and <|user_end|> stay text", "WE'LL SEE'S  \n\n  end"]
    for text in samples:
        if llm.tokenize(text.encode(), add_bos=False, special=False) != tok.encode(text):
            raise ExocortexError(f"GGUF tokenizer encodes {text!r} differently")
    if llm.metadata.get("tokenizer.chat_template") != GGUF_CHAT_TEMPLATE:
        raise ExocortexError("GGUF has no chat template, or a different one")
    conversations = check_gguf_chat_template(llm, tok)
    # llama.cpp prints the tool-call markers in a reply (USER_DEFINED), so a parser can find the call
    if llm.detokenize([tok.special[CALL_START], tok.special["<|assistant_end|>"]]) != CALL_START.encode():
        raise ExocortexError("GGUF hides the tool-call markers in llama.cpp's output")
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]

    # greedy continuation, ours; then both sides' logits over prompt + continuation (teacher forcing)
    prompt = tok.render_for_completion(conv)
    engine = Engine(model, tok, torch.device("cpu"))
    engine.call_start = engine.call_end = -1  # plain decoding, no tool runs
    ours_new: list[int] = []
    for column, _ in engine.generate(prompt, max_tokens=new_tokens, temperature=0.0):
        ours_new.append(column[0])
        if column[0] in engine.stop_ids:
            break
    seq = prompt + ours_new
    with torch.no_grad():
        ours = model(torch.tensor([seq]))[0].numpy()
    llm.reset()
    llm.eval(seq)
    theirs = np.asarray(llm.scores[:len(seq)])
    diff = float(np.abs(ours - theirs).max())
    # f32 weights: only summation order differs; f16/bf16 weights are rounded (2^-11 / 2^-8 relative)
    scale = 1.0 + float(np.abs(ours).max())
    tol = {0: 1e-3, 1: 0.01, 32: 0.02}.get(ftype, 0.02) * scale
    if diff > tol:
        raise ExocortexError(f"GGUF logits differ from the checkpoint's by {diff:.3g} (> {tol:.3g})")

    # llama.cpp's own greedy decoding (KV cache, one token at a time) against ours
    theirs_new: list[int] = []
    llm.reset()
    for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        theirs_new.append(int(t))
        if len(theirs_new) == len(ours_new) or t in engine.stop_ids:
            break
    matched = next((i for i, (a, b) in enumerate(zip(ours_new, theirs_new)) if a != b), len(ours_new))
    if matched < len(ours_new):
        # a near-tie may flip under rounded weights; a clear winner may not
        row = ours[len(prompt) + matched - 1]
        margin = float(row[ours_new[matched]] - row[theirs_new[matched]])
        if margin > 2 * tol:
            raise ExocortexError(f"llama.cpp's greedy token {matched} is {theirs_new[matched]}, ours "
                                 f"{ours_new[matched]} (ahead by {margin:.3g} logits)")
    return {"max_logit_diff": diff, "tolerance": tol, "positions": len(seq), "tokenizer_samples": len(samples),
            "chat_template": "ok", "conversations": conversations,
            "greedy_tokens_matched": f"{matched}/{len(ours_new)}"}

