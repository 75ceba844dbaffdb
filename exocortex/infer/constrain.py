"""Constrained decoding: a grammar says which tokens may come next; the engine masks every other one.

One `Constraint` follows one row of a generation. Before the row samples, `allowed()` gives the tokens the
grammar accepts next (a bool mask over the vocabulary); after it samples, `advance(token)` moves the grammar
on. It is built from
  - a JSON schema (`json_schema_constraint`: the server's response_format json_schema),
  - "any JSON object" (`json_object_constraint`: response_format json_object),
  - a tool call (`tool_call_constraint`: tool_choice "required" or a named function), i.e. the whole
        <tool_call> "\\n" {"name": NAME, "arguments": <that tool's parameters>} "\\n" </tool_call>
    with the markers as the special tokens they are, then more calls (if parallel) or the end of the reply,
  - a set of banned tokens (`BannedTokens`: tool_choice "none" bans <tool_call>; no grammar needed).
When the grammar is complete, only <|assistant_end|> is allowed, so a constrained reply ends by itself.

JSON is written with json.dumps's separators (", " and ": ") and no other whitespace: the shape every JSON
the model saw in training has (tool calls are json.dumps output), and no way to spend the budget on blanks.

Backed by llguidance (a grammar -> token-mask engine in Rust, no dependencies; bench/constrain.py measured it
against outlines-core and xgrammar on our tokenizer: docs/benchmarks.md). Our special tokens stay special to
it: it gets them from the tiktoken encoding, so text inside a JSON string can never become <|assistant_end|>,
and grammars name the markers by id (`<[id]>`). It is optional: without it, building a constraint raises
ConstraintUnavailable, which the server answers with a 400 naming the package.
"""
from __future__ import annotations

import json
import threading
import weakref

import numpy as np
import torch

from exocortex.tokenizer import CALL_END, CALL_START, Tokenizer

END = "<|assistant_end|>"
PACKAGE = "llguidance"
# json.dumps's default separators and nothing else: see the module docstring
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class ConstraintError(ValueError):
    """A constraint that cannot be built (a schema the grammar compiler refuses) or cannot go on (no token
    allowed, a token it refuses). The message says why, for a client to read."""


class ConstraintUnavailable(ConstraintError):
    """The grammar engine is not installed."""

    def __init__(self):
        super().__init__(f"structured output needs the '{PACKAGE}' package, which is not installed on this "
                         f"server (pip install {PACKAGE}, or pip install 'exocortex[serve]')")


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401 - the bitmask helpers
    except ImportError:
        raise ConstraintUnavailable() from None
    return llguidance


_LL_TOKENIZERS: "weakref.WeakKeyDictionary[Tokenizer, object]" = weakref.WeakKeyDictionary()
_LL_LOCK = threading.Lock()  # the server compiles constraints in worker threads


def _ll_tokenizer(tok: Tokenizer):
    """llguidance's view of our tokenizer (the token trie it walks), made once per Tokenizer."""
    with _LL_LOCK:
        ll = _LL_TOKENIZERS.get(tok)
        if ll is None:
            from llguidance.tiktoken import lltokenizer_from_encoding

            # <|assistant_end|> is the grammar's end of sequence: allowed exactly when the grammar is complete
            ll = _LL_TOKENIZERS[tok] = lltokenizer_from_encoding(tok.enc, n_vocab=tok.vocab_size,
                                                                  eos_token=tok.special[END])
        return ll


class Constraint:
    """One row's grammar state. Not thread-safe: one row, one thread (the batcher's)."""

    def __init__(self, tok: Tokenizer, grammar: str, what: str):
        lib = _llguidance()
        self.tok, self.grammar, self.what = tok, grammar, what
        self.vocab_size = tok.vocab_size
        try:
            self._matcher = lib.LLMatcher(_ll_tokenizer(tok), grammar, log_level=0)
        except (ValueError, RuntimeError) as e:  # most errors are a state (below); some versions raise
            raise ConstraintError(f"cannot compile the {what}: {_short(str(e))}") from None
        if self._matcher.is_error():
            raise ConstraintError(f"cannot compile the {what}: {_short(self._matcher.get_error())}")
        self._bits = lib.numpy.allocate_token_bitmask(1, self.vocab_size)
        self._fill = lib.numpy.fill_next_token_bitmask

    def fork(self) -> "Constraint":
        """A fresh copy in the same state (one per row when several rows share a constraint)."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._matcher = self._matcher.deep_copy()
        other._bits = self._bits.copy()
        return other

    def allowed(self) -> torch.Tensor:
        """The tokens the grammar accepts next: a bool tensor of vocab_size (on the CPU)."""
        self._fill(self._matcher, self._bits, 0)
        # one bit per token -> one byte per token, viewed as bool without a copy: at 32k tokens each extra pass
        # over the vocabulary costs about as much as the grammar's own step (bench/constrain.py)
        bits = np.unpackbits(self._bits[0].view(np.uint8), count=self.vocab_size, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool)

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise ConstraintError(f"the {self.what} refuses token {token} ({self.tok.decode([token])!r}): "
                                  f"{self.error()}")

    def error(self) -> str:
        """Why the grammar cannot go on ('' while it can)."""
        return _short(self._matcher.get_error())

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but the end of the reply may follow."""
        return self._matcher.is_stopped()


class BannedTokens(Constraint):
    """Any reply without some tokens (e.g. tool_choice "none": never open <tool_call>). A fixed mask, no
    grammar: it needs no llguidance and costs one masked copy of the logits per token."""

    def __init__(self, tok: Tokenizer, banned: list[int], what: str = "banned tokens"):
        self.tok, self.what, self.vocab_size = tok, what, tok.vocab_size
        self._allowed = torch.ones(tok.vocab_size, dtype=torch.bool)
        self._allowed[list(banned)] = False

    def fork(self) -> "BannedTokens":
        return self  # it has no state

    def allowed(self) -> torch.Tensor:
        return self._allowed

    def advance(self, token: int) -> None:
        if not self._allowed[token]:
            raise ConstraintError(f"the {self.what} refuses token {token} ({self.tok.decode([token])!r})")

    def error(self) -> str:
        return ""

    @property
    def done(self) -> bool:
        return False


def mask_logits(logits: torch.Tensor, constraint: Constraint) -> torch.Tensor:
    """logits (V,) with every token the constraint refuses set to -inf (a new tensor). Raises ConstraintError
    if it allows none: a row must end then, never sample at random or wait forever."""
    allowed = constraint.allowed()
    if not allowed.numpy().any():
        raise ConstraintError(f"no token can continue the {constraint.what}: "
                              f"{constraint.error() or 'the grammar is at a dead end'}")
    v = logits.shape[-1]
    if len(allowed) != v:  # a model vocabulary padded past the tokenizer's: the padding is never allowed
        allowed = torch.cat([allowed, torch.zeros(max(0, v - len(allowed)), dtype=torch.bool)])[:v]
    return torch.where(allowed.to(logits.device, non_blocking=True), logits, float("-inf"))


# ----------------------------------------------------------------------------- building constraints

def json_schema_constraint(tok: Tokenizer, schema: dict, what: str = "JSON schema") -> Constraint:
    """A reply that is one JSON value valid against `schema`."""
    lib = _llguidance()
    if not isinstance(schema, dict):
        raise ConstraintError(f"the {what} must be a JSON object, not {type(schema).__name__}")
    try:
        grammar = lib.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"cannot compile the {what}: {_short(str(e))}") from None
    return Constraint(tok, grammar, what)


def json_object_constraint(tok: Tokenizer) -> Constraint:
    """A reply that is one JSON object, any keys and values (OpenAI's json_object mode)."""
    return json_schema_constraint(tok, {"type": "object"}, "JSON object format")


def tool_call_constraint(tok: Tokenizer, tools: list[dict], name: str | None = None,
                         parallel: bool = True) -> Constraint:
    """A reply that is tool calls and nothing else: <tool_call> "\\n" JSON "\\n" </tool_call>, the JSON being
    {"name": N, "arguments": A} with N one of `tools` (OpenAI function specs) — or `name` only — and A valid
    against that tool's parameters schema. With `parallel`, more calls may follow; then the reply ends.

    The constraint covers the calls: when the engine runs one itself (a built-in tool) and forces its output
    into the row, the engine drops the constraint and the row goes on unconstrained (see engine.py)."""
    lib = _llguidance()
    specs = {}
    for i, spec in enumerate(tools):
        fn = spec.get("function") if isinstance(spec, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ConstraintError(f"tools[{i}] is not a function spec "
                                  "{'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
        params = fn.get("parameters")
        specs[fn["name"]] = params if params is not None else {"type": "object", "properties": {}}
    if name is not None:
        if name not in specs:
            raise ConstraintError(f"no tool named {name!r} among the tools ({', '.join(specs) or 'none'})")
        specs = {name: specs[name]}
    if not specs:
        raise ConstraintError("a tool call constraint needs at least one tool")
    # "name" first, as format_tool_call writes it: llguidance keeps the properties' order
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": n}, "arguments": p}} for n, p in specs.items()]
    body = json.dumps({"anyOf": calls, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)
    sp = tok.special
    lark = (f"start: call{'+' if parallel else ''}\n"
            f'call: <[{sp[CALL_START]}]> "\\n" body "\\n" <[{sp[CALL_END]}]>\n'
            f"body: %json {body}\n")
    return Constraint(tok, lib.LLMatcher.grammar_from_lark(lark), "tool call format")


def _short(message: str, limit: int = 300) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit] + " ..."
