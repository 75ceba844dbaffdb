"""Scoring for `exocortex serve`: token log-probabilities in OpenAI's two shapes, the prompt's own log-probabilities
(`echo`), and the checks on the fields that ask for them and for several choices (`n`, `best_of`, lists of prompts).

This is what lm-evaluation-harness's loglikelihood (multiple-choice) tasks need from /v1/completions: they send
each context + continuation as token ids with `echo: true, logprobs: 1, max_tokens: 1` and add up the
continuation's token logprobs. serve.py runs the requests; this module holds what does not depend on HTTP.

Log-probabilities are always the raw model's (log-softmax of its logits, before temperature, top-k/top-p or any
mask), as OpenAI and vLLM report them, so a score does not depend on how the reply was sampled.
"""
from __future__ import annotations

from dataclasses import dataclass

from exocortex.apps.guard import APIError
from exocortex.device import autocast
from exocortex.infer.confidence import sequence_logprobs

MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (OpenAI's limit)
MAX_LEGACY_LOGPROBS = 5  # completions' logprobs (OpenAI's limit)
MAX_N = 128  # choices per prompt (OpenAI's limit for n)


@dataclass
class TokenScore:
    """One token of a choice: its log-probability given everything before it (None for a prompt's first token,
    which nothing predicts), the most likely tokens there [(id, logprob)] best first, and where its text begins
    in the choice's text."""
    token: int
    logprob: float | None
    top: list[tuple[int, float]]
    offset: int = 0


# ----------------------------------------------------------------------------- the prompt's scores

def score_prompt(engine, prompt: list[int], k: int) -> list[TokenScore]:
    """Each prompt token's log-probability under the model given the tokens before it, by one forward pass
    (infer/confidence.sequence_logprobs; run it on the batcher's thread: Batcher.call)."""
    with autocast(engine.device, engine.dtype):
        chosen, tops = sequence_logprobs(engine.model, prompt, k)
    return [TokenScore(prompt[0], None, [])] + [TokenScore(t, lp, tp) for t, lp, tp in zip(prompt[1:], chosen, tops)]


# ----------------------------------------------------------------------------- generated tokens' scores

class ScoreTracker:
    """One choice's token scores while it streams. The batcher reports a token's logprobs (scored) just before
    the token itself (push); each score is released with the text its token begins in, attached to that text's
    last delta as "logprobs" (a delta with empty content when there is no text yet). Stop sequences hold text
    back and cut it: a token whose text begins at or past the cut is dropped with its text."""

    def __init__(self, with_stop_token: bool):
        self.with_stop_token = with_stop_token  # completions report the end token too; chat content does not
        self.pending: list[TokenScore] = []
        self.last: tuple[int, float, list] | None = None
        self.raw = 0  # characters rendered so far, before stop sequences
        self.emitted = 0  # characters sent so far

    def scored(self, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        self.last = (token, logprob, top)

    def push(self, token: int, rendered: list[dict], deltas: list[dict]) -> list[dict]:
        """`rendered`: the token's deltas as rendered; `deltas`: what is sent of them after stop sequences."""
        if self.last is not None and self.last[0] == token:
            self.pending.append(TokenScore(token, self.last[1], self.last[2], self.raw))
        self.last = None
        self.raw += sum(len(d["content"]) for d in rendered)
        self.emitted += sum(len(d["content"]) for d in deltas)
        if any("tool_call" in d for d in deltas):
            # a client's call (apps/tool_calls.ClientCalls) has no text: its tokens' scores, held since its
            # <tool_call> (their text offset is where the call stands), go out with its tool_calls delta
            return self._attach(deltas, lambda s: s.offset <= self.emitted)
        return self._attach(deltas, lambda s: s.offset < self.emitted)

    def finish(self, deltas: list[dict], finish: str | None, stopped: bool) -> list[dict]:
        """The last deltas; every score still held goes out, but those past a stop sequence's cut."""
        self.emitted += sum(len(d["content"]) for d in deltas)
        if self.last is not None and finish == "stop" and not stopped and self.with_stop_token:
            self.pending.append(TokenScore(self.last[0], self.last[1], self.last[2], self.emitted))
        self.last = None
        return self._attach(deltas, (lambda s: s.offset < self.emitted) if stopped else (lambda s: True))

    def _attach(self, deltas: list[dict], ready) -> list[dict]:
        out = [s for s in self.pending if ready(s)]
        if not out:
            return deltas
        self.pending = [s for s in self.pending if not ready(s)]
        if not deltas:
            return [{"content": "", "part": None, "logprobs": out}]
        return deltas[:-1] + [{**deltas[-1], "logprobs": out}]


def scores_of(deltas: list[dict]) -> list[TokenScore]:
    return [s for d in deltas for s in d.get("logprobs", ())]


def mean_logprob(scores: list[TokenScore]) -> float:
    """What best_of ranks candidates by: the log-probability per token, as OpenAI's best_of does."""
    lps = [s.logprob for s in scores if s.logprob is not None]
    return sum(lps) / len(lps) if lps else float("-inf")


# ----------------------------------------------------------------------------- OpenAI's shapes

def _token(tok, token: int) -> tuple[str, list[int]]:
    """A token's text and UTF-8 bytes. A token that is part of a character decodes to U+FFFD; its bytes are
    exact (join a run of them to get the character). Special tokens are their names."""
    b = tok.decode_bytes([token])
    return b.decode("utf-8", errors="replace"), list(b)


def chat_logprobs(tok, scores: list[TokenScore]) -> dict:
    """choices[i].logprobs of a chat completion (or of one streamed chunk)."""
    def entry(token: int, logprob: float) -> dict:
        text, b = _token(tok, token)
        return {"token": text, "logprob": logprob, "bytes": b}
    return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
                        for s in scores], "refusal": None}


def legacy_logprobs(tok, scores: list[TokenScore], shift: int = 0, before: list[TokenScore] = ()) -> dict:
    """choices[i].logprobs of a text completion: parallel lists; top_logprobs maps token text to logprob for
    the most likely tokens and (as OpenAI's) the chosen one; a prompt's first token has null for both.
    `before` (the echoed prompt's scores) come first, and `scores`' text offsets move by `shift` (the length of
    the echoed prompt's text)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for s, moved in [(s, 0) for s in before] + [(s, shift) for s in scores]:
        text = _token(tok, s.token)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(s.logprob)
        out["text_offset"].append(s.offset + moved)
        if s.logprob is None:
            out["top_logprobs"].append(None)
            continue
        top: dict[str, float] = {}
        for t, lp in s.top:  # tokens that decode to the same text (pieces of a character) keep the likelier
            top.setdefault(_token(tok, t)[0], lp)
        top.setdefault(text, s.logprob)
        out["top_logprobs"].append(top)
    return out


# ----------------------------------------------------------------------------- request fields

def chat_top_logprobs(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    """How many alternatives per token a chat request wants (None: no logprobs)."""
    if top_logprobs is not None and not logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs", code="invalid_value")
    return (top_logprobs or 0) if logprobs else None


def choice_counts(n: int | None, best_of: int | None, stream: bool, prompts: int, capacity: int) -> tuple[int, int]:
    """(n, best_of) checked: best_of >= n candidates per prompt are generated and the n with the highest
    log-probability per token are returned; every candidate of every prompt needs a place in the server's
    batch or queue at once (`capacity`)."""
    n = 1 if n is None else n
    best = n if best_of is None else best_of
    if best < n:
        raise APIError(400, f"best_of ({best}) must be at least n ({n}).", param="best_of", code="invalid_value")
    if best > n and stream:
        raise APIError(400, "best_of greater than n cannot be streamed (candidates are ranked at the end).",
                       param="best_of", code="invalid_value")
    if best * prompts > capacity:
        what = f"{prompts} prompts x {best} choices" if prompts > 1 else f"{best} choices"
        raise APIError(400, f"{what} is more than this server runs or queues at once ({capacity}); send fewer.",
                       param="best_of" if best > n else "n", code="invalid_value")
    return n, best


def prompt_list(prompt, vocab_size: int, encode) -> list[list[int]]:
    """A completions `prompt` as token lists: a string, a list of strings, a list of token ids, or a list of
    lists of token ids (strings are encoded by `encode`, which puts <|bos|> first; token ids are used as given).
    A token id outside the vocabulary is a 400 that names it."""
    shape = "a string, a list of strings, a list of token ids, or a list of lists of token ids"
    if isinstance(prompt, str):
        return [encode(prompt)]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, f"The prompt must be {shape} (not empty).", param="prompt", code="invalid_value")

    def ids(p: list, where: str) -> list[int]:
        if not p:
            raise APIError(400, f"{where} must not be empty.", param=where, code="invalid_value")
        for i, t in enumerate(p):
            if not isinstance(t, int) or isinstance(t, bool):
                raise APIError(400, f"The prompt must be {shape}; {where}[{i}] is {type(t).__name__}.",
                               param=f"{where}[{i}]", code="invalid_value")
            if not 0 <= t < vocab_size:
                raise APIError(400, f"token id {t} at {where}[{i}] is outside the vocabulary (0..{vocab_size - 1}).",
                               param=f"{where}[{i}]", code="invalid_value")
        return list(p)

    first = prompt[0]
    if isinstance(first, int) and not isinstance(first, bool):
        return [ids(prompt, "prompt")]
    if isinstance(first, str):
        bad = next((i for i, p in enumerate(prompt) if not isinstance(p, str)), None)
        if bad is not None:
            raise APIError(400, f"The prompt must be {shape}; prompt[{bad}] is not a string.",
                           param=f"prompt[{bad}]", code="invalid_value")
        return [encode(p) for p in prompt]
    if isinstance(first, list):
        out = []
        for i, p in enumerate(prompt):
            if not isinstance(p, list):
                raise APIError(400, f"The prompt must be {shape}; prompt[{i}] is not a list of token ids.",
                               param=f"prompt[{i}]", code="invalid_value")
            out.append(ids(p, f"prompt[{i}]"))
        return out
    raise APIError(400, f"The prompt must be {shape}; prompt[0] is {type(first).__name__}.", param="prompt[0]",
                   code="invalid_value")
