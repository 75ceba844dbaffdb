"""Byte-level BPE: trained with rustbpe, encoded with tiktoken (both measured fastest: bench/tokenizer.py).

The split pattern is exactly cl100k's (GPT-4), which HF `tokenizers` and llama.cpp (`llama-bpe`) also
implement, so exported weights tokenize identically elsewhere. This module also renders conversations in
the chat format, with the loss mask that says which tokens the model is trained to produce.
"""
from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from exocortex.errors import ExocortexError
from exocortex.fileio import atomic_write_text, read_json_object

SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The chat format's special tokens (shared/DESIGN.md). Order fixes their ids: right after the BPE ranks.
# The tool markers are Hermes/Qwen's: llama.cpp, vLLM, Ollama and transformers find tool calls by them.
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
RESPONSE_START, RESPONSE_END = "<tool_response>", "</tool_response>"
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|system_start|>", "<|system_end|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    CALL_START, CALL_END,
    RESPONSE_START, RESPONSE_END,
]


# Text that could be read as one of our special tokens gets a zero-width space (U+200B) after its "<". Our own
# encoder never makes special tokens out of text, but every other runtime that renders the exported chat
# templates does (transformers matches added tokens anywhere in the rendered text; llama-server tokenizes the
# prompt with special tokens parsed). So the templates escape message text this way, and so do we: both give the
# same ids, and typed "<|assistant_end|>" stays text everywhere. U+200B because it is invisible, survives every
# tokenizer and JSON, is no whitespace to the split regex, and can be removed to get the text back.
ZWSP = "\u200b"
_ESCAPES = (("<|", "<" + ZWSP + "|"), ("<tool_", "<" + ZWSP + "tool_"), ("</tool_", "</" + ZWSP + "tool_"))


def plain_text(text: str) -> str:
    """`text` with every special-token look-alike broken by U+200B (the exports' templates do exactly this)."""
    for old, new in _ESCAPES:
        text = text.replace(old, new)
    return text


# One copy of the chat format's fixed text per this many bytes of training text (1.3%; its tool calls 0.3%): a
# prose corpus never writes `{"name": "calculator", "arguments": {"expression": "`, so without it the BPE spells
# a call out in ~43 tokens; with it, ~20 — which the tiny preset's 256-token context needs (docs/tokenizer.md).
FORMAT_EVERY_BYTES = 64_000


# The document also offers functions as a system turn does (render_tools_block): a spec's JSON Schema words
# (type, function, description, parameters, object, properties, string, integer, required, ...) are as rare in
# prose, and spelled out they made a one-parameter spec ~100 tokens on the tiny preset; learned, ~55, which is
# what lets a client's one or two functions and a reply fit its 256-token context (tests/test_functions.py).
# Generic specs, not the training tasks' functions: the words any client's specs are built of.
FORMAT_TOOLS = [
    {"type": "function", "function": {"name": "calculator", "description": "Exact arithmetic.", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 347 * 29"}},
        "required": ["expression"]}}},
    {"type": "function", "function": {"name": "search", "description": "Search the web.", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"},
                                         "exact": {"type": "boolean"}, "min_score": {"type": "number"}},
        "required": ["query"]}}},
]


def with_format_text(texts: Iterable[str], every: int = FORMAT_EVERY_BYTES) -> Iterator[str]:
    """`texts`, and after every `every` bytes of them a document in the chat format's own text: tool calls, and
    a tools block offering functions (escaped as a system turn renders it)."""
    fmt = "".join("\n" + tool_call_json(name, args) + "\n" for name, args in [
        ("calculator", {"expression": "1 + 2"}), ("lookup", {}), ("lookup", {"query": "x"}),
        ("python", {"code": "print(1)"})]) + plain_text(render_tools_block(FORMAT_TOOLS))
    seen = 0
    for text in texts:
        yield text
        seen += len(text)
        if seen >= every:
            yield fmt
            seen = 0


def train_bpe(texts: Iterable[str], vocab_size: int) -> list[tuple[bytes, int]]:
    """Learn BPE merges; returns mergeable ranks (token bytes, rank) for vocab_size - len(SPECIAL_TOKENS) tokens.
    The tool-call format's text is mixed in (with_format_text): every tokenizer is a chat model's."""
    import rustbpe

    n_bpe = vocab_size - len(SPECIAL_TOKENS)
    if n_bpe < 256:
        raise ExocortexError(f"tokenizer.vocab_size={vocab_size} is too small: needs at least {256 + len(SPECIAL_TOKENS)}")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(with_format_text(texts), n_bpe, pattern=SPLIT_PATTERN)
    return [(bytes(b), int(r)) for b, r in bpe.get_mergeable_ranks()]


class Tokenizer:
    """tiktoken encoder over our ranks + special tokens, with chat rendering."""

    def __init__(self, mergeable_ranks: dict[bytes, int]):
        import tiktoken

        self.mergeable_ranks = mergeable_ranks
        n = len(mergeable_ranks)
        self.special = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="exocortex", pat_str=SPLIT_PATTERN, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special)
        self.vocab_size = n + len(SPECIAL_TOKENS)
        self.bos_id = self.special["<|bos|>"]

    # ------------------------------------------------------------------ persistence
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        return cls(dict(train_bpe(texts, vocab_size)))

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        # tiktoken's own file format: one "base64(token) rank" line per token
        lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda x: x[1])]
        atomic_write_text(d / "tokenizer.tiktoken", "\n".join(lines) + "\n")
        meta = {"pattern": SPLIT_PATTERN, "special_tokens": self.special, "vocab_size": self.vocab_size}
        atomic_write_text(d / "tokenizer.json", json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """The saved tokenizer, every line checked: a damaged file is a one-line error naming it, never a
        tokenizer that silently encodes differently (or a panic inside tiktoken)."""
        d = Path(directory)
        f = d / "tokenizer.tiktoken"
        if not f.exists():
            raise ExocortexError(f"no tokenizer in {d}; run `exocortex tokenizer` first")
        tok = cls(_read_ranks(f))
        meta = d / "tokenizer.json"
        if meta.exists():  # written beside the ranks: both must describe the same vocabulary
            saved = read_json_object(meta, "re-run `exocortex tokenizer`")
            names = saved.get("special_tokens")
            if isinstance(names, dict) and list(names) != SPECIAL_TOKENS:
                # same ids, other names: a run from before a chat-format change; its models write the old format
                old = " ".join(n for n in names if n not in tok.special) or "in another order"
                raise ExocortexError(f"{d} is from an older chat format (special tokens {old}); its models write tool "
                                     "calls nothing reads now: re-run `exocortex speedrun --force` for this run (or "
                                     "`exocortex tokenizer --force` and every stage after it)")
            if saved.get("vocab_size") != tok.vocab_size or names != tok.special:
                raise ExocortexError(f"{meta} says vocab_size {saved.get('vocab_size')!r} but {f} has "
                                     f"{tok.vocab_size} tokens: the tokenizer is damaged; re-run `exocortex tokenizer`")
        return tok

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.enc.encode_ordinary(text)
        return [self.bos_id] + ids if bos else ids

    def encode_batch(self, texts: list[str], bos: bool = False, num_threads: int = 0) -> list[list[int]]:
        """Multi-threaded encode: one plain loop per thread over a contiguous slice (tiktoken releases the
        GIL). Faster than tiktoken's own encode_batch on short documents, whose per-document task overhead
        costs more than the encoding (bench/tokenizer.py measures both; docs/tokenizer.md)."""
        n = max(1, min(num_threads or os.cpu_count() or 1, len(texts) // 64 or 1))
        if n == 1:
            out = [self.enc.encode_ordinary(t) for t in texts]
        else:
            from concurrent.futures import ThreadPoolExecutor

            step = (len(texts) + n - 1) // n
            slices = [texts[i:i + step] for i in range(0, len(texts), step)]
            with ThreadPoolExecutor(n) as pool:
                out = [ids for part in pool.map(lambda s: [self.enc.encode_ordinary(t) for t in s], slices)
                       for ids in part]
        if bos:
            out = [[self.bos_id] + ids for ids in out]
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def token_id(self, special: str) -> int:
        return self.special[special]

    def is_special(self, token_id: int) -> bool:
        return token_id >= len(self.mergeable_ranks)

    def token_byte_lengths(self) -> list[int]:
        """Bytes each token stands for (0 for special tokens): what bits-per-byte divides by."""
        lengths = [0] * self.vocab_size
        for tok, rank in self.mergeable_ranks.items():
            lengths[rank] = len(tok)
        return lengths

    # ------------------------------------------------------------------ chat format
    def render_conversation(self, conversation: dict | list, max_tokens: int | None = None,
                            tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
        """Conversation -> (ids, mask). mask=1 on the tokens the model must learn to produce: assistant text,
        its tool calls, the <tool_response> marker right after a call, and <|assistant_end|>. System/user text and
        tool responses (inserted by the engine) get 0.

        A conversation is {"messages": [...], "tools": optional} or a list of messages; each message has a role
        (system | user | assistant | tool) and content: a string, or for the assistant a list of parts
        {"type": "text", "text"} | {"type": "tool_call", "text": JSON} | {"type": "tool_output", "text"}.
        OpenAI-shaped history works too (see chat_turns): it renders the same ids as the parts it stands for.
        `tools` (else the conversation's "tools"), OpenAI function specs, go into the system turn
        (render_tools_block), which is added when the conversation has none."""
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        if tools is None and isinstance(conversation, dict):
            tools = conversation.get("tools")
        ids, mask = self._render(chat_turns(messages), tools, leave_open=False)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, messages: dict | list, tools: list[dict] | None = None) -> list[int]:
        """Prompt ids for generation: the conversation so far, then <|assistant_start|> — or, when it ends with
        a tool's response, the open assistant turn that asked for it, which the model goes on writing.
        A trailing assistant message is dropped (it is the reply being asked for)."""
        if isinstance(messages, dict):
            tools = messages.get("tools") if tools is None else tools
            messages = messages["messages"]
        msgs = list(messages)
        if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        turns = chat_turns(msgs)
        leave_open = bool(turns) and turns[-1].get("open", False)
        ids, _ = self._render(turns, tools, leave_open)
        return ids if leave_open else ids + [self.special["<|assistant_start|>"]]

    def _render(self, turns: list[dict], tools: list[dict] | None, leave_open: bool) -> tuple[list[int], list[int]]:
        ids, mask = [self.bos_id], [0]

        def add(tokens: list[int], m: int) -> None:
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self.special
        if tools is not None and not isinstance(tools, list):
            raise ValueError("tools must be a list of function specs")
        if tools and (not turns or turns[0]["role"] != "system"):
            turns = [{"role": "system", "content": ""}] + turns
        for i, turn in enumerate(turns):
            role = turn["role"]
            if role == "system":
                if i != 0:
                    raise ValueError("a system message may only come first")
                text = render_tools_block(tools, _text(turn["content"])) if tools else _text(turn["content"])
                add([sp["<|system_start|>"]] + self.encode(plain_text(text)) + [sp["<|system_end|>"]], 0)
            elif role == "user":
                add([sp["<|user_start|>"]] + self.encode(plain_text(_text(turn["content"]))) + [sp["<|user_end|>"]], 0)
            else:  # assistant (chat_turns checked the roles)
                add([sp["<|assistant_start|>"]], 0)
                previous = None
                for part in turn["parts"]:
                    kind, text = part.get("type"), part.get("text", "")
                    if not isinstance(text, str):
                        raise ValueError(f"a {kind} part's text must be a string")
                    text = plain_text(text)  # what the model reads back is what an export's template gives it
                    if kind == "text":
                        add(self.encode(text), 1)
                    elif kind == "tool_call":
                        # the text between the markers is encoded as one piece, as any other runtime's template
                        # renders it: "\n" JSON "\n" (the Hermes/Qwen layout)
                        add([sp[CALL_START]] + self.encode("\n" + text + "\n") + [sp[CALL_END]], 1)
                    elif kind == "tool_output":
                        # the engine inserts these; the model never learns to write them itself. Except the opening
                        # marker right after its own call: predicting "now the response" there gives runtimes that
                        # cannot run the tool a place to stop (the GGUF export makes it llama.cpp's end of message)
                        add([sp[RESPONSE_START]], int(previous == "tool_call"))
                        add(self.encode("\n" + text + "\n") + [sp[RESPONSE_END]], 0)
                    else:
                        raise ValueError(f"unknown assistant part type {kind!r}")
                    previous = kind
                if not (leave_open and i == len(turns) - 1):
                    add([sp["<|assistant_end|>"]], 1)
        return ids, mask


def tool_call_json(name: str, arguments: dict) -> str:
    """A call as the model writes it between <tool_call> and </tool_call> (without the newlines around it)."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def render_tools_block(tools: list[dict], system: str = "") -> str:
    """The system turn's text offering `tools` (OpenAI function specs, one JSON line each, as given), after the
    `system` text if there is one. The exports' chat templates write exactly this; <tool_call> in it is text,
    which rendering passes through plain_text like all message text."""
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools must be a list of function specs (objects)")
    block = ("# Tools\n\nYou can call these functions:\n<tools>\n"
             + "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools)
             + '</tools>\n\nTo call one, write <tool_call>\n{"name": "...", "arguments": {...}}\n</tool_call>')
    return f"{system}\n\n{block}" if system else block


def chat_turns(messages: list[dict]) -> list[dict]:
    """Messages -> turns of our format: {"role": "system" | "user", "content"} or {"role": "assistant",
    "parts": [...], "open": bool}.

    OpenAI-shaped history is mapped onto parts: an assistant message's "tool_calls" ([{"type": "function",
    "function": {"name", "arguments": JSON string or object}}]) become tool_call parts after its content, and
    the `role: "tool"` messages answering them become tool_output parts of that same turn (the model wrote the
    call and reads the result without the turn ending), as does the assistant message that follows them.
    "open" marks a turn that ends with a tool's response: the model's next words continue it."""
    if not isinstance(messages, list):
        raise ValueError("messages must be a list")
    turns: list[dict] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i} must be an object with a role")
        role = msg.get("role")
        last = turns[-1] if turns else None
        if role == "tool":
            if last is None or not last.get("parts") or last["parts"][-1]["type"] not in ("tool_call", "tool_output"):
                raise ValueError(f"message {i}: a tool message must answer an assistant message's tool call")
            last["parts"].append({"type": "tool_output", "text": _text(msg.get("content"))})
            last["open"] = True
        elif role == "assistant":
            parts = _assistant_parts(msg, i)
            if last is not None and last.get("open"):  # the reply after a tool's response: the same turn
                last["parts"].extend(parts)
                last["open"] = False
            else:
                turns.append({"role": "assistant", "parts": parts, "open": False})
        elif role in ("system", "user"):
            if last is not None and last.get("open"):
                last["open"] = False  # the turn ended at the tool's response (the history says so)
            turns.append({"role": role, "content": msg.get("content")})
        else:
            raise ValueError(f"unknown role {role!r}")
    return turns


def _assistant_parts(msg: dict, i: int) -> list[dict]:
    content = msg.get("content")
    if content is None:
        parts = []
    elif isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = list(content)
    else:
        raise ValueError(f"message {i}: assistant content must be a string or a list of parts")
    calls = msg.get("tool_calls")
    if calls is None:
        return parts
    if not isinstance(calls, list):
        raise ValueError(f"message {i}: tool_calls must be a list")
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f'message {i}: a tool call must be {{"type": "function", "function": {{"name", "arguments"}}}}')
        args = fn.get("arguments")
        if args is None or (isinstance(args, str) and not args.strip()):
            args = {}
        elif isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise ValueError(f"message {i}: the arguments of tool call {fn['name']!r} are not JSON") from None
        if not isinstance(args, dict):
            raise ValueError(f"message {i}: the arguments of tool call {fn['name']!r} must be a JSON object")
        parts.append({"type": "tool_call", "text": tool_call_json(fn["name"], args)})
    return parts


def _read_ranks(path: Path) -> dict[bytes, int]:
    """tokenizer.tiktoken: "base64(token) rank" per line, ranks 0..n-1 each once, every single byte ranked."""
    def bad(why: str) -> ExocortexError:
        return ExocortexError(f"{path} is damaged ({why}); re-run `exocortex tokenizer`")

    try:
        lines = path.read_bytes().decode("ascii").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise bad(type(e).__name__ if isinstance(e, UnicodeDecodeError) else e.strerror or str(e)) from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except ValueError:  # binascii.Error is a ValueError
            raise bad(f"line {n} is not 'base64 rank'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise bad(f"its {len(ranks)} ranks are not 0..{len(ranks) - 1}, each once")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise bad("a single byte has no rank")
    return ranks


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise ValueError(f"message content must be a string, got {type(content).__name__}")


def iter_texts_for_training(texts: Iterable[str], max_bytes: int, max_doc_chars: int = 10000) -> Iterator[str]:
    """Cap the tokenizer's training text; long documents are cut so no single one dominates."""
    total = 0
    for t in texts:
        t = t[:max_doc_chars]
        total += len(t.encode("utf-8", errors="ignore"))
        yield t
        if total >= max_bytes:
            return


_WS = re.compile(r"\s+")
