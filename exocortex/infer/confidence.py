"""How likely the model's own reply is to be right, from the scores of the tokens it chose.

Escalation (`exocortex serve --escalate-to`) and the eval's calibration read it. A reply's *answer span* is
every token the model chose: a tool call's arguments (the operands it picked) as much as its final words. A
tool's output is forced in by the engine, not chosen, so it is left out, and so is the stop token.

Features of the span (ConfidenceMeter), each measured from the token's log-probability and the k most likely
tokens at its place (the raw model's, as the batcher reports them for `logprobs`):
  min_call   lowest log-probability inside tool calls (a guessed operand or name); 0 without calls
  min_text   lowest log-probability outside them (a guessed fact, letter, number)
  mean       mean log-probability per token
  entropy    mean entropy of the next-token distribution (over its k most likely tokens)
  length     log(1 + tokens chosen)
One feature alone is a weak signal on a mix of tasks (AUROC ~0.73 on the tiny run: a reply's first word after a
tool's output is often a free choice between two openers, so the minimum over everything sees phrasing, not
doubt); a logistic regression over these five (`Calibration`, fitted by the eval on half of its graded
replies) reaches ~0.82 on the other half. Its output is P(reply is right), so a threshold reads "escalate when
the chance of being right is below T".
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
        self.call: list[float] = []
        self.text: list[float] = []
        self.entropies: list[float] = []

    def push(self, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
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
def sequence_logprobs(model, tokens: list[int], k: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """For positions 1..n-1 of `tokens`: each token's log-probability given the ones before it, and the k most
    likely tokens there [(id, logprob)], best first. One forward pass (the hidden states as GPT.forward computes
    them; the output head SCORE_ROWS positions at a time). Call it under the engine's autocast."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokens], device=device)
    n = len(tokens)
    cos, sin = model.rope_cos[:n], model.rope_sin[:n]
    x = model.model.embed_tokens(ids)
    for block in model.model.layers:
        x = block(x, cos, sin)
    x = model.model.norm(x)[0]
    chosen, tops = [], []
    for i in range(0, n - 1, SCORE_ROWS):
        j = min(i + SCORE_ROWS, n - 1)
        top, lp = token_logprobs(model.lm_head(x[i:j]), tokens[i + 1:j + 1], k)
        chosen += lp
        tops += top
    return chosen, tops


def reply_features(engine, prompt: list[int], reply: list[int]) -> dict[str, float]:
    """The features of a finished reply (token ids after the prompt, as Engine.complete returns them), by
    scoring prompt + reply in one forward pass: the same numbers the batcher's scores give while it streams."""
    meter = ConfidenceMeter(engine)
    if reply:
        with autocast(engine.device, engine.dtype):
            chosen, tops = sequence_logprobs(engine.model, prompt + reply, TOP_K)
        for token, lp, top in zip(reply, chosen[len(prompt) - 1:], tops[len(prompt) - 1:]):
            meter.push(token, lp, top)
    return meter.features()


@dataclass
class Calibration:
    """P(reply is right) = sigmoid(weights . (features - mean) / scale + bias): a logistic regression of graded
    replies' correctness on their features (standardised, so the weights compare)."""
    mean: list[float] = field(default_factory=lambda: [0.0] * len(FEATURES))
    scale: list[float] = field(default_factory=lambda: [1.0] * len(FEATURES))
    weights: list[float] = field(default_factory=lambda: [0.0] * len(FEATURES))
    bias: float = 0.0
    n: int = 0  # replies it was fitted on

    def p_correct(self, features: dict[str, float]) -> float:
        z = self.bias + sum(w * (features[f] - m) / s
                            for f, w, m, s in zip(FEATURES, self.weights, self.mean, self.scale))
        return 1 / (1 + math.exp(-max(-60.0, min(60.0, z))))

    @classmethod
    def fit(cls, features: list[dict[str, float]], correct: list[bool], ridge: float = 1.0) -> "Calibration":
        """Newton's method on the L2-penalised log-likelihood (the penalty keeps weights finite when the replies
        are separable, and steadies them on a few hundred replies)."""
        if not features:
            raise ValueError("no graded replies to calibrate on")
        X = torch.tensor([[f[k] for k in FEATURES] for f in features], dtype=torch.float64)
        mean, scale = X.mean(0), X.std(0, unbiased=False).clamp_min(1e-6)
        X = torch.cat([(X - mean) / scale, torch.ones(len(X), 1, dtype=torch.float64)], 1)
        y = torch.tensor([float(c) for c in correct], dtype=torch.float64)
        penalty = ridge * torch.eye(X.shape[1], dtype=torch.float64)
        penalty[-1, -1] = 0.0  # not the bias: it carries the base rate
        w = torch.zeros(X.shape[1], dtype=torch.float64)
        for _ in range(100):
            p = torch.sigmoid(X @ w)
            grad = X.T @ (p - y) + penalty @ w
            hess = X.T @ (X * (p * (1 - p))[:, None]) + penalty + 1e-9 * torch.eye(X.shape[1], dtype=torch.float64)
            step = torch.linalg.solve(hess, grad)
            w -= step
            if float(step.abs().max()) < 1e-10:
                break
        return cls(mean.tolist(), scale.tolist(), w[:-1].tolist(), float(w[-1]), len(features))


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
