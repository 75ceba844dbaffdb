"""How likely the model's own reply is to be right, from the scores of the tokens it chose and its hidden state.

Escalation (`exocortex serve --escalate-to`) and the eval's calibration read it. A reply's *answer span* is
every token the model chose: a tool call's arguments (the operands it picked) as much as its final words. A
tool's output is forced in by the engine, not chosen, so the token features leave it out, and the stop token
too; the hidden state is averaged over every position after the prompt (reading a tool's output is part of
answering).

Features of the span (ConfidenceMeter), each measured from the token's log-probability and the k most likely
tokens at its place (the raw model's, as the batcher reports them for `logprobs`):
  min_call   lowest log-probability inside tool calls (a guessed operand or name); 0 without calls
  min_text   lowest log-probability outside them (a guessed fact, letter, number)
  mean       mean log-probability per token
  entropy    mean entropy of the next-token distribution (over its k most likely tokens)
  length     log(1 + tokens chosen)
One feature alone is a weak signal on a mix of tasks (AUROC ~0.73 on the tiny run: a reply's first word after a
tool's output is often a free choice between two openers, so the minimum over everything sees phrasing, not
doubt); a logistic regression over these five reaches ~0.74-0.77 on the graded replies it was not fitted on.
With the model's own hidden state beside them (the final norm's output averaged over the positions from the
prompt's last on, each of which chose the next token of the reply: a linear probe, as in "language models
mostly know what they know") it reaches ~0.84-0.86. The probe also learns which kinds of question the model
gets wrong, which helps less on a kind the fit never saw; the eval measures that too
(`escalation_auroc_unseen_task`: each task scored by a fit on the others), and the penalty on the probe is set
so that it beats the token scores alone there as well (~0.67-0.77 against ~0.64-0.68). `Calibration`'s output
is P(reply is right), so a threshold reads "escalate when the chance of being right is below T".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from exocortex.device import autocast
from exocortex.infer.engine import token_logprobs

FEATURES = ("min_call", "min_text", "mean", "entropy", "length")
TOP_K = 5           # alternatives per token the entropy is taken over (the batcher computes them for us)
SCORE_ROWS = 256    # positions whose logits exist at once: a long sequence never holds T x vocab floats


class ConfidenceMeter:
    """Fed every token of a reply with its score (push), in order, as the batcher reports them (Request.logprobs
    = TOP_K); `features()` describes the reply so far."""

    def __init__(self, engine):
        self.stop_ids = engine.stop_ids
        self.call_start, self.call_end = engine.call_start, engine.call_end
        self.out_start, self.out_end = engine.out_start, engine.out_end
        self.in_call = self.in_output = False
        self.tokens: list[int] = []  # the reply as generated (tool outputs too, not the stop token): reply_hidden's
        self.call: list[float] = []
        self.text: list[float] = []
        self.entropies: list[float] = []

    def push(self, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        if token not in self.stop_ids or self.in_output:
            self.tokens.append(token)
        if self.in_output:  # a tool's output, forced in
            self.in_output = token != self.out_end
            return
        if token == self.out_start:
            self.in_output = True
            return
        if token in self.stop_ids:
            return
        if token == self.call_start:
            self.in_call = True
        elif token == self.call_end:
            self.in_call = False
        (self.call if self.in_call else self.text).append(logprob)
        probs = [math.exp(lp) for _, lp in top]
        self.entropies.append(-sum(p * math.log(p) for p in probs if p > 0))

    def features(self) -> dict[str, float]:
        chosen = self.call + self.text
        return {"min_call": min(self.call, default=0.0), "min_text": min(self.text, default=0.0),
                "mean": sum(chosen) / max(1, len(chosen)),
                "entropy": sum(self.entropies) / max(1, len(self.entropies)),
                "length": math.log1p(len(chosen))}


@torch.inference_mode()
def sequence_scores(model, tokens: list[int], k: int, scores: bool = True):
    """For positions 1..n-1 of `tokens`: each token's log-probability given the ones before it, the k most
    likely tokens there [(id, logprob)], best first, and the hidden states the output head reads (n, width). One
    forward pass (the hidden states as GPT.forward computes them; the output head SCORE_ROWS positions at a
    time; with scores=False the head is skipped: empty lists). Call it under the engine's autocast."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokens], device=device)
    n = len(tokens)
    cos, sin = model.rope_cos[:n], model.rope_sin[:n]
    x = model.model.embed_tokens(ids)
    for block in model.model.layers:
        x = block(x, cos, sin)
    x = model.model.norm(x)[0]
    chosen, tops = [], []
    for i in range(0, n - 1 if scores else 0, SCORE_ROWS):
        j = min(i + SCORE_ROWS, n - 1)
        top, lp = token_logprobs(model.lm_head(x[i:j]), tokens[i + 1:j + 1], k)
        chosen += lp
        tops += top
    return chosen, tops, x


def sequence_logprobs(model, tokens: list[int], k: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """sequence_scores without the hidden states."""
    chosen, tops, _ = sequence_scores(model, tokens, k)
    return chosen, tops


def _mean_hidden(x: torch.Tensor, n_prompt: int, n_reply: int) -> list[float]:
    """The mean hidden state over the positions whose next token is the reply's (the prompt's last position
    onwards, a tool's forced output included; for an empty reply, the one that chose to stop)."""
    return x[n_prompt - 1:n_prompt - 1 + max(1, n_reply)].float().mean(0).tolist()


def reply_features(engine, prompt: list[int], reply: list[int]) -> dict:
    """The features of a finished reply (token ids after the prompt, as Engine.complete returns them), by
    scoring prompt + reply in one forward pass: the same numbers the batcher's scores give while it streams;
    and under "hidden" the reply's mean hidden state (reply_hidden)."""
    return replies_features(engine, [prompt], [reply])[0]


@torch.inference_mode()
def replies_features(engine, prompts: list[list[int]], replies: list[list[int]], rows: int = 32) -> list[dict]:
    """reply_features of many replies, `rows` sequences per forward pass (sorted by length, padded on the right:
    attention is causal, so a position never sees the padding after it). The eval scores thousands of replies;
    one pass each cost a third of its time."""
    model = engine.model
    device = next(model.parameters()).device
    seqs = [p + r for p, r in zip(prompts, replies)]
    out: list[dict] = [{} for _ in seqs]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for j in range(0, len(order), rows):
        chunk = order[j:j + rows]
        n = max(len(seqs[i]) for i in chunk)
        ids = torch.tensor([seqs[i] + [0] * (n - len(seqs[i])) for i in chunk], device=device)
        with autocast(engine.device, engine.dtype):
            x = model.model.embed_tokens(ids)
            for block in model.model.layers:
                x = block(x, model.rope_cos[:n], model.rope_sin[:n])
            x = model.model.norm(x)
            for row, i in enumerate(chunk):
                prompt, reply = prompts[i], replies[i]
                start = len(prompt) - 1  # the position that chose the reply's first token
                meter = ConfidenceMeter(engine)
                for a in range(0, len(reply), SCORE_ROWS):
                    b = min(a + SCORE_ROWS, len(reply))
                    tops, chosen = token_logprobs(model.lm_head(x[row, start + a:start + b]), reply[a:b], TOP_K)
                    for token, lp, top in zip(reply[a:b], chosen, tops):
                        meter.push(token, lp, top)
                out[i] = {**meter.features(), "hidden": _mean_hidden(x[row], len(prompt), len(reply))}
    return out


def reply_hidden(engine, prompt: list[int], reply: list[int]) -> list[float]:
    """The reply's mean hidden state (what the calibration's probe reads), by one forward pass over prompt +
    reply; the server runs it on the batcher's thread (Batcher.call) once a held-back reply has ended."""
    with torch.inference_mode(), autocast(engine.device, engine.dtype):
        *_, x = sequence_scores(engine.model, prompt + reply, 0, scores=False)
    return _mean_hidden(x, len(prompt), len(reply))


# L2 penalties on the standardised inputs: light on the five token features, heavy on the hidden state's many
# numbers. Chosen on the tiny run's SFT and RL replies: a hidden-state penalty of 10 fits the task mix best but
# does worse than the token scores alone on a task the fit never saw; 300 does better on both.
RIDGE, HIDDEN_RIDGE = 1.0, 300.0


@dataclass
class Calibration:
    """P(reply is right) = sigmoid(weights . (features - mean) / scale + hidden_weights . (hidden - hidden_mean) /
    hidden_scale + bias): a logistic regression of graded replies' correctness on their features and, when it
    was fitted with them, their mean hidden state (standardised, so the weights compare)."""
    mean: list[float] = field(default_factory=lambda: [0.0] * len(FEATURES))
    scale: list[float] = field(default_factory=lambda: [1.0] * len(FEATURES))
    weights: list[float] = field(default_factory=lambda: [0.0] * len(FEATURES))
    bias: float = 0.0
    n: int = 0  # replies it was fitted on
    hidden_mean: list[float] = field(default_factory=list)  # empty: the token scores alone
    hidden_scale: list[float] = field(default_factory=list)
    hidden_weights: list[float] = field(default_factory=list)

    @property
    def reads_hidden(self) -> bool:
        return bool(self.hidden_weights)

    def p_correct(self, features: dict) -> float:
        z = self.bias + sum(w * (features[f] - m) / s
                            for f, w, m, s in zip(FEATURES, self.weights, self.mean, self.scale))
        if self.reads_hidden:
            hidden = features.get("hidden")
            if hidden is None or len(hidden) != len(self.hidden_weights):
                raise ValueError(f"this calibration reads the reply's hidden state ({len(self.hidden_weights)} "
                                 f"numbers: reply_hidden), got {None if hidden is None else len(hidden)}")
            z += sum(w * (h - m) / s for h, w, m, s in zip(hidden, self.hidden_weights, self.hidden_mean,
                                                           self.hidden_scale))
        return 1 / (1 + math.exp(-max(-60.0, min(60.0, z))))

    @classmethod
    def fit(cls, features: list[dict], correct: list[bool], ridge: float = RIDGE, hidden_ridge: float = HIDDEN_RIDGE,
            hidden: bool = True) -> "Calibration":
        """Newton's method on the L2-penalised log-likelihood (the penalty keeps weights finite when the replies
        are separable, and steadies them when there are fewer replies than inputs). The hidden state is used
        when `hidden` and every reply has one."""
        if not features:
            raise ValueError("no graded replies to calibrate on")
        X = torch.tensor([[f[k] for k in FEATURES] for f in features], dtype=torch.float64)
        n_tokens = X.shape[1]
        if hidden and all(f.get("hidden") is not None for f in features):
            X = torch.cat([X, torch.tensor([f["hidden"] for f in features], dtype=torch.float64)], 1)
        mean, scale = X.mean(0), X.std(0, unbiased=False).clamp_min(1e-6)
        X = torch.cat([(X - mean) / scale, torch.ones(len(X), 1, dtype=torch.float64)], 1)
        y = torch.tensor([float(c) for c in correct], dtype=torch.float64)
        penalty = torch.diag(torch.tensor([ridge] * n_tokens + [hidden_ridge] * (X.shape[1] - n_tokens - 1) + [0.0],
                                          dtype=torch.float64))  # not the bias: it carries the base rate
        w = torch.zeros(X.shape[1], dtype=torch.float64)
        for _ in range(100):
            p = torch.sigmoid(X @ w)
            grad = X.T @ (p - y) + penalty @ w
            hess = X.T @ (X * (p * (1 - p))[:, None]) + penalty + 1e-9 * torch.eye(X.shape[1], dtype=torch.float64)
            step = torch.linalg.solve(hess, grad)
            w -= step
            if float(step.abs().max()) < 1e-10:
                break
        t = n_tokens
        return cls(mean[:t].tolist(), scale[:t].tolist(), w[:t].tolist(), float(w[-1]), len(features),
                   mean[t:].tolist(), scale[t:].tolist(), w[t:-1].tolist())


def auroc(scores: list[float], positives: list[bool]) -> float | None:
    """Area under the ROC curve: the chance that a random positive scores above a random negative (ties count
    half); None when either class is empty."""
    n_pos = sum(1 for p in positives if p)
    n_neg = len(positives) - n_pos
    if not n_pos or not n_neg:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average ranks over ties (the Mann-Whitney U statistic)
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, p in zip(ranks, positives) if p)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def calibration_error(p: list[float], correct: list[bool], bins: int = 10) -> float:
    """Expected calibration error: |accuracy - mean predicted| per equal-width bin, weighted by its replies."""
    err = 0.0
    for b in range(bins):
        idx = [i for i, q in enumerate(p) if b <= q * bins < b + 1 or (b == bins - 1 and q >= 1.0)]
        if idx:
            err += len(idx) / len(p) * abs(sum(correct[i] for i in idx) / len(idx) - sum(p[i] for i in idx) / len(idx))
    return err


THRESHOLDS = tuple(i / 100 for i in range(101)) + (1.01,)  # 1.01: always escalate


def escalation_curve(p_local: list[float], local_ok: list[bool], remote_ok: list[bool],
                     thresholds: tuple[float, ...] = THRESHOLDS) -> list[dict]:
    """The replies whose P(right) is below each threshold go to the stronger model: the share answered locally
    and the accuracy of the mix, from threshold 0 (always local) to 1.01 (always escalate)."""
    n, rows = max(1, len(p_local)), []
    for t in thresholds:
        local = [q >= t for q in p_local]
        right = sum(lo if keep else re for keep, lo, re in zip(local, local_ok, remote_ok))
        rows.append({"threshold": t, "local_share": sum(local) / n, "accuracy": right / n})
    return rows


def best_point(curve: list[dict], fraction: float = 0.95) -> dict | None:
    """The threshold that answers the most locally while keeping `fraction` of always-escalate's accuracy."""
    target = fraction * curve[-1]["accuracy"]
    ok = [row for row in curve if row["accuracy"] >= target - 1e-12]
    return max(ok, key=lambda r: (r["local_share"], r["accuracy"])) if ok else None
