"""Export a run to a Hugging Face transformers directory (Qwen3ForCausalLM + a `tokenizers` tokenizer).

    from exocortex.apps.export.hf import export_hf
    export_hf("runs/tiny", "exports/tiny-hf")              # latest sft checkpoint, fp32
    export_hf("runs/tiny", "exports/tiny-base", stage="pretrain", dtype="bfloat16")

The result loads offline with `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`:

- `model.safetensors`: our state dict as is (the parameter names are already Qwen3's, see docs/architecture.md);
- `config.json`: a Qwen3 config with the same shape, rope theta and norm eps; `generation_config.json`;
- `tokenizer.json`: our tiktoken ranks converted to a byte-level BPE (vocab + merges) with the same split regex,
  and the chat special tokens at the same ids; `tokenizer_config.json` with a chat template that renders
  conversations exactly as `Tokenizer.render_conversation` / `render_for_completion` do.

Everything above is checked against our own model and tokenizer in tests/test_export.py (docs/export.md).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from exocortex.apps.export.chat_template import CHAT_TEMPLATE, sample_conversations
from exocortex.checkpoint import load_model
from exocortex.config import ModelConfig
from exocortex.errors import ExocortexError, first_line
from exocortex.fileio import commit_files, staging_dir
from exocortex.run import RunDir
from exocortex.tokenizer import (CALL_END, CALL_START, RESPONSE_END, RESPONSE_START, SPECIAL_TOKENS, SPLIT_PATTERN,
                                 Tokenizer)

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}

# ----------------------------------------------------------------------------- tokenizer

# The tool-call markers are ordinary added tokens in HF (special=False), as in Qwen's tokenizers: decode(...,
# skip_special_tokens=True) keeps them, so the text a client parses still shows where a call starts and ends.
TOOL_MARKERS = (CALL_START, CALL_END, RESPONSE_START, RESPONSE_END)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte gets a printable character. Printable Latin-1 bytes stand for
    themselves; the other 68 (controls, space, soft hyphen...) map, in byte order, to chr(256), chr(257), ..."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def ranks_to_bpe(mergeable_ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> (vocab, merges) for a byte-level HF BPE that encodes the same ids.

    tiktoken merges, in any piece, the adjacent pair whose concatenation has the lowest rank, for *any* pair
    that concatenates to a token. So every split of a token into two tokens becomes a merge, ordered by the
    rank of the token it makes (ties: the split whose halves are older first). Keeping only one split per
    token would lose merges tiktoken can make when a piece is reached by a different path.
    """
    ranks = sorted(mergeable_ranks.values())
    if ranks != list(range(len(ranks))):
        raise ExocortexError("tokenizer ranks are not contiguous from 0; cannot convert to an HF vocabulary")
    b2u = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab, merges = {}, []
    for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]):
        vocab[s(token)] = rank
        if len(token) < 2:
            continue
        splits = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            rl, rr = mergeable_ranks.get(left), mergeable_ranks.get(right)
            if rl is not None and rr is not None and rl < rank and rr < rank:
                splits.append((max(rl, rr), rl, rr, left, right))
        if not splits:
            raise ExocortexError(f"token {token!r} (rank {rank}) cannot be built from two earlier tokens")
        for *_, left, right in sorted(splits):
            merges.append((s(left), s(right)))
    if len(vocab) != len(mergeable_ranks):
        raise ExocortexError("tokenizer has duplicate tokens; cannot convert to an HF vocabulary")
    return vocab, merges


def build_hf_tokenizer(tok: Tokenizer):
    """Our Tokenizer as a `tokenizers.Tokenizer`: same split regex, same BPE ids, same special-token ids.
    Encoding adds <|bos|> in front (as our pretraining documents have); pass add_special_tokens=False for
    exactly `Tokenizer.encode(text)`."""
    try:
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise ExocortexError("export needs the `tokenizers` package: pip install tokenizers") from None

    vocab, merges = ranks_to_bpe(tok.mergeable_ranks)
    # ignore_merges: a whole regex piece that is itself a token maps straight to it, as tiktoken does
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    # one call, in id order: the tool markers are added tokens too, but not special (see TOOL_MARKERS)
    added = hf.add_tokens([AddedToken(t, special=t not in TOOL_MARKERS, normalized=False, lstrip=False, rstrip=False,
                                      single_word=False) for t in SPECIAL_TOKENS])
    if added != len(SPECIAL_TOKENS):
        raise ExocortexError("special tokens collide with BPE tokens; cannot convert the tokenizer")
    for name, i in tok.special.items():
        if hf.token_to_id(name) != i:
            raise ExocortexError(f"special token {name} would get id {hf.token_to_id(name)} instead of {i}")
    bos = "<|bos|>"
    hf.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.bos_id)]),
    ])
    return hf


# transformers' parse_response (where it exists) turns a reply into {"role", "content", "tool_calls"} with this:
# text outside the markers is the content; each <tool_call> body is JSON {"name", "arguments"}. The last anchor in
# the prompt starts the reply: <|assistant_start|>, or after a tool's response the turn going on.
RESPONSE_TEMPLATE = {
    "version": 1,
    "start_anchor": ["<|assistant_start|>", RESPONSE_END],
    "defaults": {"role": "assistant"},
    "fields": {
        "content": {"content": "text", "close": "<|assistant_end|>"},
        "tool_calls": {"open": CALL_START, "close": CALL_END, "content": "json", "repeats": True,
                       "transform": {"type": "function",
                                     "function": {"name": "{content.name}", "arguments": "{content.arguments}"}}},
    },
}


def tokenizer_config(tok: Tokenizer, model_max_length: int) -> dict:
    decoder = {str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": name not in TOOL_MARKERS} for name, i in tok.special.items()}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|assistant_end|>",
        "add_bos_token": True,
        "add_eos_token": False,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS
                                      if t not in ("<|bos|>", "<|assistant_end|>") and t not in TOOL_MARKERS],
        # apply_chat_template(..., sanitize_control_tokens=True) encodes these as text wherever the caller's
        # strings carry them (the template already escapes them; this covers other templates a user may pass)
        "chat_control_tokens": list(SPECIAL_TOKENS),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
        "response_template": RESPONSE_TEMPLATE,
    }


# ----------------------------------------------------------------------------- model

def qwen3_config(cfg: ModelConfig, tok: Tokenizer, dtype: str) -> dict:
    eos = tok.special["<|assistant_end|>"]
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.seq_len,
        "rope_theta": float(cfg.rope_theta),  # transformers < 5 and llama.cpp's converter read this
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},  # transformers >= 5
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.depth,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": tok.bos_id,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def generation_config(tok: Tokenizer) -> dict:
    eos = tok.special["<|assistant_end|>"]
    return {
        "bos_token_id": tok.bos_id,
        # our Engine stops at the end of an assistant turn, or (base model) at the start of a new document; and
        # at the end of a tool call, where the caller runs the tool and renders its response into the same turn
        # (generate() cannot run it: without this stop the model would go on to guess the result)
        "eos_token_id": [eos, tok.bos_id, tok.special[CALL_END]],
        "pad_token_id": eos,
        "do_sample": True,
        "temperature": 0.6,
        "top_k": 50,
        "top_p": 0.95,  # the defaults of `exocortex chat`
    }


def check_export_target(run_dir: Path, target: Path, advice: str) -> None:
    """An export may not overwrite the run directory itself, nor go into its tokenizer or checkpoints."""
    resolved, run = Path(target).resolve(), Path(run_dir).resolve()
    for reserved in (run, run / "tokenizer", run / "checkpoints"):
        if resolved == reserved or (reserved != run and reserved in resolved.parents):
            raise ExocortexError(f"export into {advice}, not {target}")


def load_for_export(run_dir: Path, stage: str):
    """The run's tokenizer and latest `stage` model on the CPU: (tok, model, meta, checkpoint dir)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExocortexError(f"no run at {run_dir}; train one with `exocortex speedrun` first")
    ckpt = RunDir(run_dir).require_checkpoint(stage)
    tok = Tokenizer.load(RunDir(run_dir).tokenizer_dir)
    model, meta = load_model(ckpt, "cpu")
    if model.cfg.vocab_size < tok.vocab_size:
        raise ExocortexError(f"checkpoint {ckpt} has vocab {model.cfg.vocab_size} but the run's tokenizer has "
                             f"{tok.vocab_size} tokens; they do not belong together")
    return tok, model.eval(), meta, ckpt


def export_hf(run_dir: str | os.PathLike, out_dir: str | os.PathLike, stage: str = "sft",
              dtype: str = "float32") -> Path:
    """Write the latest `stage` checkpoint of a run as a transformers model directory; returns out_dir.

    dtype: float32 (default, bit-exact weights) or bfloat16 (half the size; weights rounded)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ExocortexError(f"export dtype must be float32 or bfloat16, got '{dtype}'")
    dtype = DTYPES[dtype]
    tok, model, meta, ckpt = load_for_export(run_dir, stage)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExocortexError(f"export target {out_dir} exists and is not a directory")
    check_export_target(run_dir, out_dir, f"a directory of its own (e.g. {run_dir / 'hf'})")
    hf_tok = build_hf_tokenizer(tok)  # before writing anything: this is what can fail
    staged = staging_dir(out_dir)
    try:  # every file is written before any replaces the previous export's
        _write_export(staged, tok, hf_tok, model, dtype)
    except BaseException as e:
        shutil.rmtree(staged, ignore_errors=True)
        if isinstance(e, Exception):  # a full disk, a file size limit (safetensors has its own error type)
            why = getattr(e, "strerror", None) or first_line(e, 160)
            raise ExocortexError(f"could not write the export ({why}); {out_dir} is unchanged") from None
        raise
    info = {"source_run": str(run_dir), "checkpoint": str(ckpt), "stage": stage, "step": meta.get("step"),
            "dtype": dtype, "params": model.num_params()}
    (staged / "exocortex_export.json").write_text(json.dumps(info, indent=2) + "\n")
    commit_files(staged, out_dir, last="exocortex_export.json")
    return out_dir


def _write_export(staged: Path, tok: Tokenizer, hf_tok, model, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    cfg = model.cfg
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    weights = {k: v.detach().to(torch_dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(staged / "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staged / "model.safetensors", 0o666 & ~umask)  # safetensors makes it owner-only; exports are shared
    (staged / "config.json").write_text(json.dumps(qwen3_config(cfg, tok, dtype), indent=2) + "\n")
    (staged / "generation_config.json").write_text(json.dumps(generation_config(tok), indent=2) + "\n")
    (staged / "tokenizer.json").write_text(hf_tok.to_str(pretty=True))
    special = tokenizer_config(tok, cfg.seq_len)
    (staged / "tokenizer_config.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    special_map = {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|assistant_end|>",
                   "additional_special_tokens": special["additional_special_tokens"]}
    (staged / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def verify_hf(out_dir: str | os.PathLike, run_dir: str | os.PathLike, stage: str = "sft", seed: int = 0) -> dict:
    """Load an export with transformers and check it against the run: logits on random tokens, the
    tokenizer on sample text, the chat template on a sample conversation. Returns what it measured;
    raises ExocortexError on any mismatch. Cheap (one forward pass of at most 64 tokens)."""
    import torch

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ExocortexError("verifying an export needs transformers: pip install transformers") from None
    tok, model, _, _ = load_for_export(Path(run_dir), stage)
    hf_model = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.cfg.vocab_size, (1, min(64, model.cfg.seq_len)), generator=g)
    with torch.no_grad():
        ours = model.eval()(x)
        diff = (ours - hf_model(input_ids=x).logits).abs().max().item()
    exported_dtype = json.loads((Path(out_dir) / "config.json").read_text()).get("torch_dtype", "float32")
    # fp32 weights are a copy (only summation order may differ); bf16 weights are rounded (2^-8 relative)
    tol = 1e-3 if exported_dtype == "float32" else 0.02 * (1 + ours.abs().max().item())
    if diff > tol:
        raise ExocortexError(f"exported model's logits differ from the checkpoint's by {diff:.3g} (> {tol:.3g})")
    samples = ["Hello, world! It's 12:30.", "  spaces\tand\nnew lines\r\n", "naïve café 日本語 🙂", "x = [1, 22, 333]"]
    for text in samples:
        if hf_tok(text, add_special_tokens=False)["input_ids"] != tok.encode(text):
            raise ExocortexError(f"exported tokenizer encodes {text!r} differently")
    conversations = check_hf_chat_template(hf_tok, tok)
    # a reply's tool call stays readable after the usual decode (the markers are not special in HF)
    call = [tok.special[CALL_START]] + tok.encode('\n{"name": "f", "arguments": {}}\n') + [tok.special[CALL_END]]
    if hf_tok.decode(call + [tok.special["<|assistant_end|>"]], skip_special_tokens=True) != tok.decode(call):
        raise ExocortexError("exported tokenizer drops the tool-call markers when decoding without special tokens")
    return {"max_logit_diff": diff, "tolerance": tol, "tokenizer_samples": len(samples), "chat_template": "ok",
            "conversations": conversations}


def check_hf_chat_template(hf_tok, tok: Tokenizer, n: int = 40) -> int:
    """Render `n` sample conversations (tools, calls, tool messages, unicode, typed special-token text) with
    transformers' apply_chat_template, with and without a generation prompt, and compare with our ids (and our
    loss mask). Returns how many; raises ExocortexError naming the first that differs."""
    def ids(x):  # a list (transformers 4) or a BatchEncoding (5)
        return list(x) if isinstance(x, list) else list(x["input_ids"])

    cases = sample_conversations(n)
    for i, case in enumerate(cases):
        messages, tools = case["messages"], case["tools"]
        prompt = ids(hf_tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True))
        full = hf_tok.apply_chat_template(messages, tools=tools, return_dict=True, return_assistant_tokens_mask=True)
        if prompt != tok.render_for_completion(messages, tools=tools):
            raise ExocortexError(f"exported chat template renders sample conversation {i} differently (prompt)")
        ours_ids, ours_mask = tok.render_conversation(messages, tools=tools)
        if [list(full["input_ids"]), list(full["assistant_masks"])] != [ours_ids, ours_mask]:
            raise ExocortexError(f"exported chat template renders sample conversation {i} differently (ids or mask)")
    return len(cases)
