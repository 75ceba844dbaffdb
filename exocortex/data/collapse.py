"""Collapse metrics: does a set of texts (a dataset, a model's replies) say the same few things over and over?

"Each sample looks fine, ask ten times and you get the same thing": a single example cannot show collapse, only
the set can. `collapse_metrics` measures a set of texts, `collapse_alarms` compares the numbers with thresholds,
`ask_ten_times` samples the same prompt n times at temperature 1 and counts distinct replies.

Metrics (words: lower-cased runs of letters/digits; each text's n-grams stay inside it):
- distinct_1/2/3: unique / total word n-grams, on the first WINDOW_WORDS words of an evenly strided sample of
  the texts. Distinct-n falls as a set grows (common words repeat), so it is measured on a fixed number of words
  to compare sets of different sizes; `words` says how many it saw (fewer for small sets, which then read high).
- self_bleu: BLEU-4 (uniform weights, brevity penalty, +1 smoothing for n > 1) of each of SELF_BLEU_TEXTS
  strided texts against all the others as references, averaged: 1.0 when every text is the same (Zhu et al.
  2018, "Texygen"). Sensitive to shared phrasing, which is what a template is.
- template_distinct_2, template_self_bleu: the same with every number replaced by one placeholder. A generator
  stuck on one wording with random numbers ("What is 12 plus 7?", "What is 305 plus 88?") reads as varied on
  raw words (distinct-2 0.47) and as the single template it is once the numbers are masked (0.001).
- compression_ratio: zlib (level 9) bytes / UTF-8 bytes of the texts joined by newlines (first 4 MB of a strided
  sample): a set made of a few templates compresses far better than prose.
- exact_duplicate_rate, near_duplicate_rate: fractions of (MAX_DEDUP strided) texts that repeat an earlier one
  exactly (after normalising case and spaces), or nearly but not exactly (word-3-gram Jaccard >= 0.8,
  data/dedup.py).
"""
from __future__ import annotations

import math
import re
import time
import zlib
from collections import Counter

from exocortex.data.dedup import NearDuplicates, exact_key

WORD = re.compile(r"\w+")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
WINDOW_WORDS = 20_000
SELF_BLEU_TEXTS = 200
MAX_DEDUP = 5_000
COMPRESS_BYTES = 4_000_000

# Alarm when a metric is on the wrong side of its threshold: (metric, "min" or "max", threshold, why).
# Measured on the tiny preset (docs/data.md, "Collapse metrics"): healthy sets read distinct-2 0.18-0.56, self-BLEU
# 0.33-0.67, zlib ratio 0.15-0.31, exact duplicates <= 10% (whole conversations; 23% of midtrain's assistant turns
# alone: short replies such as "Any time!" repeat naturally), near duplicates <= 5%. One template with a handful of
# slot values reads distinct-2 < 0.01, self-BLEU 1.0, zlib 0.03-0.07, duplicates > 90%. Each threshold sits between
# the two, nearer the collapsed end: a varied set never trips it, a generator stuck on a template does. With numbers
# masked the whole mixtures read distinct-2 0.19-0.24, self-BLEU 0.63-0.66, but some tasks' own sets are one
# wording: word problems (and so RL's prompts) 0.08 / 0.82-0.89, and arithmetic 0.013 / 0.999 before it had phrasing
# families; those alarms are real.
THRESHOLDS: dict[str, tuple[str, float, str]] = {
    "distinct_2": ("min", 0.10, "fewer than 1 in 10 word pairs new: a handful of templates"),
    "self_bleu": ("max", 0.80, "texts share most of their 4-grams with each other"),
    "template_distinct_2": ("min", 0.10, "numbers masked, fewer than 1 in 10 word pairs new: one wording"),
    "template_self_bleu": ("max", 0.80, "numbers masked, the texts share most of their 4-grams"),
    "compression_ratio": ("min", 0.12, "zlib finds the set 8x redundant"),
    "exact_duplicate_rate": ("max", 0.30, "a third of the set repeats an earlier text word for word"),
    "near_duplicate_rate": ("max", 0.30, "a third of the set is a small edit of an earlier text"),
}
MIN_TEXTS = 20  # fewer texts say too little: no alarm


def _words(text: str, mask_numbers: bool = False) -> list[str]:
    text = text.lower()
    return WORD.findall(NUMBER.sub("0", text) if mask_numbers else text)


def _strided(texts: list[str], limit: int) -> list[str]:
    """At most `limit` texts spread evenly over the set (deterministic)."""
    if len(texts) <= limit:
        return list(texts)
    step = len(texts) / limit
    return [texts[int(i * step)] for i in range(limit)]


def distinct_n(tokenized: list[list[str]], n: int) -> float:
    """Unique / total n-grams, counted inside each text."""
    grams = [tuple(w[i:i + n]) for w in tokenized for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def self_bleu(tokenized: list[list[str]], max_n: int = 4) -> float:
    """Mean BLEU-max_n of each text against all the others as references (multi-reference clipping: an n-gram
    counts at most as often as in the reference that has it most)."""
    texts = [w for w in tokenized if w]
    if len(texts) < 2:
        return 0.0
    counts = [[_ngrams(w, n) for n in range(1, max_n + 1)] for w in texts]
    # per n-gram the two largest counts and the text holding the largest: "the others' max" without the text
    best: list[dict] = [{} for _ in range(max_n)]
    for i, per_n in enumerate(counts):
        for n, c in enumerate(per_n):
            for g, k in c.items():
                top = best[n].get(g)
                if top is None:
                    best[n][g] = (k, i, 0)
                elif k > top[0]:
                    best[n][g] = (k, i, top[0])
                elif k > top[2]:
                    best[n][g] = (top[0], top[1], k)
    lengths = sorted((len(w), i) for i, w in enumerate(texts))
    total = 0.0
    for i, per_n in enumerate(counts):
        log_p = 0.0
        for n, c in enumerate(per_n):
            hits = sum(min(k, (b[0] if b[1] != i else b[2])) for g, k in c.items() for b in (best[n][g],))
            denom = sum(c.values())
            if n == 0:
                if hits == 0:
                    log_p = -math.inf
                    break
                log_p += math.log(hits / denom)
            else:
                log_p += math.log((hits + 1) / (denom + 1))
        if log_p == -math.inf:
            continue
        hyp = len(texts[i])
        ref = min((abs(L - hyp), L) for L, j in lengths if j != i)[1]  # the closest other length
        bp = 1.0 if hyp > ref else math.exp(1 - ref / hyp)
        total += bp * math.exp(log_p / max_n)
    return total / len(texts)


def collapse_metrics(texts: list[str]) -> dict:
    """The metrics of the module docstring, and n (texts), words (in the distinct-n window), seconds."""
    t0 = time.time()
    texts = [t for t in texts if t and t.strip()]
    out: dict = {"n": len(texts)}
    for prefix, mask in (("", False), ("template_", True)):
        window, words = [], 0
        for t in _strided(texts, max(1, WINDOW_WORDS // 4)):
            if words >= WINDOW_WORDS:
                break
            w = _words(t, mask)[:WINDOW_WORDS - words]
            window.append(w)
            words += len(w)
        out["words"] = words
        for n in ((1, 2, 3) if not mask else (2,)):
            out[f"{prefix}distinct_{n}"] = distinct_n(window, n)
        out[f"{prefix}self_bleu"] = self_bleu([_words(t, mask) for t in _strided(texts, SELF_BLEU_TEXTS)])
    raw = "\n".join(_strided(texts, max(1, COMPRESS_BYTES // 200))).encode("utf-8")[:COMPRESS_BYTES]
    out["compression_ratio"] = len(zlib.compress(raw, 9)) / len(raw) if raw else 0.0
    nd = NearDuplicates(threshold=0.8, shingle=3)
    seen: set[int] = set()
    exact = 0
    deduped = _strided(texts, MAX_DEDUP)
    for t in deduped:
        key = exact_key(t)
        exact += key in seen
        seen.add(key)
        nd.check_and_add(t)
    out["exact_duplicate_rate"] = exact / max(1, len(deduped))
    out["near_duplicate_rate"] = nd.stats["near"] / max(1, len(deduped))
    out["seconds"] = round(time.time() - t0, 3)
    return out


def collapse_alarms(metrics: dict, thresholds: dict | None = None) -> list[str]:
    """One line per metric on the wrong side of its threshold (THRESHOLDS unless given); empty when healthy or
    when the set has fewer than MIN_TEXTS texts."""
    if metrics.get("n", 0) < MIN_TEXTS:
        return []
    alarms = []
    for name, (side, limit, why) in (THRESHOLDS if thresholds is None else thresholds).items():
        value = metrics.get(name)
        if value is None:
            continue
        if (side == "min" and value < limit) or (side == "max" and value > limit):
            sign = "<" if side == "min" else ">"
            alarms.append(f"{name} {value:.3f} {sign} {limit} ({why})")
    return alarms


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def ask_ten_times(engine, tok, prompts: list[list[int] | str], n: int = 10, temperature: float = 1.0,
                  max_new_tokens: int = 64, seed: int = 0) -> dict:
    """Each prompt (token ids, e.g. tasks.base.prompt_ids, or a user message) sampled n times at `temperature`:
    how many different replies (case and spacing ignored) does the model give? distinct_mean / distinct_min: over
    the prompts; distinct_fraction: distinct_mean / n (1.0: every sample different; 1/n: the same reply always)."""
    t0 = time.time()
    prompts = [tok.render_for_completion([{"role": "user", "content": p}]) if isinstance(p, str) else p
               for p in prompts]
    outs = engine.complete(prompts, num_samples=n, max_tokens=max_new_tokens, temperature=temperature, seed=seed)
    distinct = [len({_normalised(engine.render(o)) for o in outs[p * n:(p + 1) * n]}) for p in range(len(prompts))]
    mean = sum(distinct) / max(1, len(distinct))
    return {"prompts": len(prompts), "n": n, "distinct_mean": mean, "distinct_min": min(distinct, default=0),
            "distinct_fraction": mean / n, "seconds": round(time.time() - t0, 3)}


def conversation_text(conv: dict, roles: tuple[str, ...] = ("user", "assistant")) -> str:
    """A conversation's turns of `roles` as plain text, one per line: what its writer chose to say (text and
    tool calls; tool outputs and system prompts are not the data's own wording)."""
    lines = []
    for m in conv["messages"]:
        if m["role"] not in roles:
            continue
        content = m["content"]
        if isinstance(content, str):
            lines.append(content)
        else:
            lines += [p["text"] for p in content if p.get("type") in ("text", "tool_call")]
    return "\n".join(lines)
