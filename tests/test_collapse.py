"""Collapse metrics and alarms (data/collapse.py): known values on hand-made sets, collapsed sets trip the alarm,
the project's own varied data does not; ask_ten_times on a scripted engine."""
import math
import random

import pytest

from exocortex.config import make_config
from exocortex.data.collapse import (ask_ten_times, collapse_alarms, collapse_metrics, conversation_text, distinct_n,
                                     self_bleu)
from exocortex.data.world import generate_documents
from exocortex.tasks import mixture_conversations, task_set


def test_distinct_n_known_values():
    texts = [["a", "b", "a", "b"], ["a", "b"]]
    assert distinct_n(texts, 1) == pytest.approx(2 / 6)
    assert distinct_n(texts, 2) == pytest.approx(2 / 4)      # ab, ba, ab | ab: n-grams stay inside a text
    assert distinct_n([["x"]], 2) == 0.0


def test_self_bleu_known_values():
    same = [["the", "cat", "sat", "on", "the", "mat"]] * 5
    assert self_bleu(same) == pytest.approx(1.0)
    disjoint = [[f"w{i}_{j}" for j in range(6)] for i in range(5)]
    assert self_bleu(disjoint) == 0.0
    # one text against the other: unigrams 3/4, bigrams (2+1)/(3+1), trigrams (1+1)/(2+1), 4-grams (0+1)/(1+1)
    # (+1 smoothing above n=1); equal lengths, no brevity penalty
    pair = [["a", "b", "c", "d"], ["a", "b", "c", "e"]]
    want = math.exp((math.log(3 / 4) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert self_bleu(pair) == pytest.approx(want)


def test_metrics_known_values():
    texts = ["Alpha beta gamma delta epsilon", "alpha  BETA gamma delta epsilon", "zeta eta theta iota kappa",
             "zeta eta theta iota lambda"]
    m = collapse_metrics(texts)
    assert m["n"] == 4 and m["words"] == 20
    assert m["exact_duplicate_rate"] == pytest.approx(1 / 4)   # the second repeats the first (case, spaces)
    assert m["distinct_1"] == pytest.approx(11 / 20)
    m2 = collapse_metrics([f"what is {i} plus {i + 1}" for i in range(100)])
    assert m2["template_distinct_2"] == pytest.approx(4 / 400)  # one wording: what is, is 0, 0 plus, plus 0
    assert m2["distinct_2"] > 0.5 and m2["exact_duplicate_rate"] == 0.0


def _collapsed(rng):
    return [f"What is {rng.randint(1, 5)} plus {rng.randint(1, 5)}?" for _ in range(500)]


def _template_many_numbers(rng):
    return [f"Please compute {rng.randint(0, 9999)} times {rng.randint(0, 9999)} for me." for _ in range(500)]


def _near_copies(rng):
    base = " ".join(rng.choice("river town market lantern harbour copper meadow".split()) for _ in range(40))
    out = []
    for _ in range(300):
        w = base.split()
        w[rng.randrange(len(w))] = "stone"
        out.append(" ".join(w))
    return out


@pytest.mark.parametrize("make, metric", [(_collapsed, "exact_duplicate_rate"), (_collapsed, "distinct_2"),
                                          (_template_many_numbers, "template_self_bleu"),
                                          (_template_many_numbers, "template_distinct_2"),
                                          (_near_copies, "near_duplicate_rate")])
def test_collapsed_sets_trip_the_alarm(make, metric):
    alarms = collapse_alarms(collapse_metrics(make(random.Random(0))))
    assert any(a.startswith(metric + " ") for a in alarms), alarms


def test_varied_sets_do_not():
    cfg = make_config("tiny", [], name="t")
    convs = mixture_conversations(task_set(cfg), cfg.sft_data.mixture, 1500, cfg.sft_data.seed, "train")
    for texts in ([conversation_text(c) for c in convs], generate_documents(seed=0, n_docs=400)):
        m = collapse_metrics(texts)
        assert collapse_alarms(m) == [], m
    # too few texts to judge
    assert collapse_alarms(collapse_metrics(["same"] * 5)) == []


def test_alarm_lines_name_metric_value_and_threshold():
    assert collapse_alarms({"n": 100, "distinct_2": 0.05}, {"distinct_2": ("min", 0.1, "why")}) == \
        ["distinct_2 0.050 < 0.1 (why)"]
    assert collapse_alarms({"n": 100, "distinct_2": 0.5}, {"distinct_2": ("min", 0.1, "why")}) == []


class _Engine:
    """complete(prompts, num_samples): prompt p's samples cycle through p + 1 different replies."""

    def complete(self, prompts, num_samples, **kw):
        return [[p, s % (p + 1)] for p in range(len(prompts)) for s in range(num_samples)]

    def render(self, out):
        return f"Reply  {out[1]}" if out[1] % 2 else f"reply {out[1]}"


def test_ask_ten_times_counts_distinct_replies():
    r = ask_ten_times(_Engine(), None, [[1], [2], [3]], n=10)
    assert r["distinct_mean"] == pytest.approx(2.0) and r["distinct_min"] == 1 and r["prompts"] == 3
    assert r["distinct_fraction"] == pytest.approx(0.2)


def test_ask_ten_times_takes_user_messages(tok):
    seen = []

    class Recording(_Engine):
        def complete(self, prompts, num_samples, **kw):
            seen.extend(prompts)
            return super().complete(prompts, num_samples, **kw)

    ask_ten_times(Recording(), tok, ["hello there", [5, 6]], n=3)
    assert seen == [tok.render_for_completion([{"role": "user", "content": "hello there"}]), [5, 6]]


def test_report_collapse_table_has_a_row_per_set_and_the_alarms(tmp_path):
    from exocortex.config import save_config
    from exocortex.run import EvalSummary, RunDir
    from exocortex.stages.report import run_report

    cfg = make_config("tiny", name="c")
    cfg.runs_dir = str(tmp_path)
    save_config(cfg)
    collapsed = collapse_metrics(_collapsed(random.Random(0)))
    rows = {"samples: sft": {**collapse_metrics(["a reply", "another reply"] * 20), "stage": "sft", "alarms": [],
                             "ask_ten_times": {"n": 10, "distinct_mean": 7.5, "distinct_min": 3}},
            "data: rl": {**collapsed, "stage": "rl", "alarms": collapse_alarms(collapsed)}}
    RunDir(cfg.run_dir).write_summary("eval", EvalSummary(collapse=rows))
    lines = run_report(cfg).read_text().splitlines()
    table = [line for line in lines if line.startswith("| data: ") or line.startswith("| samples: ")]
    assert [t.split("|")[1].strip() for t in table] == ["data: rl", "samples: sft"]  # datasets first
    assert "⚠ distinct_2" in table[0] and table[1].endswith("| 7.5 of 10 (fewest 3) | — |")
    assert any(line.startswith("- ⚠ **data: rl**: exact_duplicate_rate") for line in lines)
