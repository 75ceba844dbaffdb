"""Exact and near-duplicate removal (data/dedup.py) before the train/val split of user corpora."""
import json
import random

import numpy as np

from exocortex.config import make_config
from exocortex.data.dedup import NearDuplicates, dedup_texts
from exocortex.data.tokens import corpus_duplicates
from exocortex.data.sources import find_files, plan_tasks, split_train_val
from exocortex.data.tokens import read_split
from exocortex.tokenizer import Tokenizer

WORDS = ("river town market lantern harbour copper meadow winter stone bridge baker weaver orchard festival "
         "north south tide ferry mill candle road hill forest wheat salt iron glass wool letter song").split()


def _doc(rng: random.Random, i: int) -> str:
    return f"Record {i}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(200, 300))) + "."


def _edit(rng: random.Random, doc: str) -> str:
    """A near copy: one word changed and one dropped (word-5-gram Jaccard ~0.9), maybe case and spacing too."""
    words = doc.split()
    words[rng.randrange(len(words))] = rng.choice(WORDS)
    del words[rng.randrange(len(words))]
    return "  ".join(words).upper() if rng.random() < 0.5 else " ".join(words)


def _planted_corpus(n_unique=300, n_near=40, n_exact=10, seed=0):
    """Unique documents, then near copies (small edits) and exact copies of some of them, scattered; and the
    planted (original, copy) pairs."""
    rng = random.Random(seed)
    docs = [_doc(rng, i) for i in range(n_unique)]
    originals = rng.sample(range(n_unique), n_near + n_exact)
    pairs = [(docs[j], _edit(rng, docs[j])) for j in originals[:n_near]]
    pairs += [(docs[j], docs[j]) for j in originals[n_near:]]
    for _, c in pairs:
        docs.insert(rng.randrange(len(docs) + 1), c)
    return docs, pairs


def _straddling(pairs, train, val) -> list:
    """Planted pairs with one text in train and the other in val."""
    train, val = set(train), set(val)
    return [(a, b) for a, b in pairs if (a in train and b in val) or (b in train and a in val)]


def test_near_duplicates_found_and_distinct_texts_kept():
    docs, pairs = _planted_corpus()
    kept, stats = dedup_texts(docs)
    assert stats == {"exact": 10, "near": 40}
    assert len(kept) == len(docs) - len(pairs) and kept == sorted(kept)
    nd = NearDuplicates()
    assert not nd.check_and_add("the cat sat on the mat today")
    assert nd.check_and_add("The  cat sat on the mat TODAY\n")       # exact after normalisation
    assert not nd.check_and_add("a wholly different sentence about ships")


def test_no_planted_duplicate_straddles_train_and_val():
    docs, pairs = _planted_corpus()
    train, val = split_train_val(docs, 0.1)
    assert _straddling(pairs, train, val) == [] and len(train) + len(val) == len(docs) - len(pairs)
    # without dedup the same split does put copies on both sides (so the check above can fail)
    assert _straddling(pairs, *split_train_val(docs, 0.1, dedup=False))


def test_tokenizer_stage_removes_duplicates_before_the_split_and_reports_them(tmp_path, capsys):
    from exocortex.stages.tokenizer import run_tokenizer

    docs, pairs = _planted_corpus()
    n_near, n_exact = 40, 10
    data = tmp_path / "corpus"
    data.mkdir()
    half = len(docs) // 2  # two files: duplicates are found across files too
    (data / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:half]))
    (data / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[half:]))
    cfg = make_config("tiny", [f"data.path={data}", "data.val_fraction=0.1", "tokenizer.vocab_size=300",
                               "data.workers=2"], name="d")
    cfg.runs_dir = str(tmp_path / "runs")
    summary = run_tokenizer(cfg)
    assert summary.duplicates["exact"] == n_exact and summary.duplicates["near"] == n_near
    assert summary.documents == len(docs) - n_near - n_exact
    assert f"removed {n_exact} exact and {n_near} near duplicates" in capsys.readouterr().out
    # decode both splits back into documents: no near copy on the other side
    tok = Tokenizer.load(cfg.run_dir / "tokenizer")
    split_docs = {}
    for split in ("train", "val"):
        s = read_split(cfg.run_dir / "data", split)
        ends = [*s.starts[1:].tolist(), len(s.tokens)]
        split_docs[split] = [tok.decode(s.tokens[a + 1:b].tolist()) for a, b in zip(s.starts.tolist(), ends)]
    assert _straddling(pairs, split_docs["train"], split_docs["val"]) == []
    assert split_docs == dict(zip(("train", "val"), split_train_val(docs, 0.1)))
    meta = json.loads((cfg.run_dir / "data" / "meta.json").read_text())
    assert meta["duplicates_removed"] == n_near + n_exact


def test_corpus_pass_does_not_depend_on_workers(tmp_path):
    docs, _ = _planted_corpus(seed=1)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tasks = plan_tasks(find_files(tmp_path), jsonl_chunk_bytes=5000)
    one, two = corpus_duplicates(tasks, workers=1), corpus_duplicates(tasks, workers=2)
    assert np.array_equal(one.drop, two.drop) and (one.exact, one.near) == (two.exact, two.near) == (10, 40)
    kept, _ = dedup_texts(docs)
    assert sorted(set(range(len(docs))) - set(kept)) == one.drop.tolist()
