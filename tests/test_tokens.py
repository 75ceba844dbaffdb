"""Parallel streaming tokenization into token files: deterministic, equal to the in-memory path, and
bad input named in one line."""
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exocortex.errors import ExocortexError
from exocortex.data.sources import find_files, iter_documents, plan_tasks, read_task, split_train_val
from exocortex.data.tokens import read_split, write_token_data


@pytest.fixture
def corpus(tmp_path, texts):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(3):  # several row groups per file
        pq.write_table(pa.table({"text": texts[i * 100:(i + 1) * 100], "id": list(range(100))}),
                       d / f"shard_{i}.parquet", row_group_size=17)
    (d / "rows.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[300:380]) + "\n")
    for i, t in enumerate(texts[380:400]):
        (d / "sub" / f"note_{i:02d}.md").write_text(t)
    return d


def _tokenize(tok, d, out, workers, **plan):
    return write_token_data(tok, plan_tasks(find_files(d), **plan), out, val_fraction=0.05, workers=workers)


def test_parallel_tokenization_is_deterministic_and_equals_in_memory(tok, corpus, tmp_path):
    s1 = _tokenize(tok, corpus, tmp_path / "w1", workers=1)
    # two processes, .jsonl read in byte ranges and text files in small batches: the same bytes
    s2 = _tokenize(tok, corpus, tmp_path / "w2", workers=2, jsonl_chunk_bytes=500, text_batch_bytes=300)
    assert s1 == s2 and s1.documents == 400
    for name in ("train.bin", "val.bin", "train.docs.npy", "val.docs.npy"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    # the same as encoding the in-memory split document by document
    train_docs, val_docs = split_train_val(list(iter_documents(corpus)), 0.05)
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ref = [tok.bos_id if j == 0 else t for d in docs for j, t in enumerate([0] + tok.encode(d))]
        got = read_split(tmp_path / "w2", split)
        assert got.tokens.tolist() == ref
        assert got.starts.tolist() == np.flatnonzero(np.asarray(ref) == tok.bos_id).tolist()
    meta = json.loads((tmp_path / "w2" / "meta.json").read_text())
    assert meta["train_documents"] == len(train_docs) and meta["val_documents"] == len(val_docs) == 20


@pytest.mark.parametrize("chunk", [1, 7, 64, 10**6])
def test_jsonl_byte_ranges_partition_the_lines(tmp_path, chunk):
    rows = [{"text": "x" * (i % 13 + 1) + f" row {i} é"} for i in range(60)]
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" + ("\n" if i % 9 == 0 else "") for i, r in enumerate(rows)))
    docs = [d for t in plan_tasks([f], jsonl_chunk_bytes=chunk) for d in read_task(t)]
    assert docs == [r["text"] for r in rows]


def test_single_document_is_split_into_train_and_val(tok, tmp_path, texts):
    (tmp_path / "book.txt").write_text(" ".join(texts))
    s = _tokenize(tok, tmp_path / "book.txt", tmp_path / "out", workers=1)
    train, val = read_split(tmp_path / "out", "train"), read_split(tmp_path / "out", "val")
    assert s.documents == 1 and train.tokens[0] == val.tokens[0] == tok.bos_id
    assert 0.9 < len(train.tokens) / (len(train.tokens) + len(val.tokens)) < 0.99


def _bad_files(d):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), d / "empty.parquet")
    pq.write_table(pa.table({"content": ["x"]}), d / "notext.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), d / "ints.parquet")
    pq.write_table(pa.table({"text": ["", "  ", None]}), d / "blank.parquet")
    pq.write_table(pa.table({"text": pa.array([b"fine", b"caf\xe9"], pa.binary())}), d / "latin1.parquet")
    (d / "truncated.parquet").write_bytes(b"PAR1" + b"\x00" * 50)
    (d / "zero.jsonl").write_bytes(b"")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    lines = [json.dumps({"text": f"line {i}"}) for i in range(40)]
    (d / "late.jsonl").write_bytes(("\n".join(lines[:33]) + "\n").encode() + b'{"text": "caf\xe9"}\n')
    (d / "blank.md").write_text("  \n\n")


@pytest.mark.parametrize("name,needle", [
    ("empty.parquet", "empty.parquet: empty parquet file (0 rows)"),
    ("notext.parquet", 'notext.parquet: parquet file has no "text" column (columns: content)'),
    ("ints.parquet", 'ints.parquet: the "text" column holds int64, not strings'),
    ("blank.parquet", "blank.parquet: no text"),
    ("latin1.parquet", "latin1.parquet: row 1 of the text column is not UTF-8"),
    ("truncated.parquet", "truncated.parquet: not a readable parquet file"),
    ("zero.jsonl", "zero.jsonl: empty file (0 bytes)"),
    ("latin1.txt", "latin1.txt is not UTF-8 text"),
    ("late.jsonl", "late.jsonl:34: not UTF-8"),  # found in a later byte range: still the right line
    ("blank.md", "blank.md: no text"),
])
def test_bad_input_names_the_file(tok, tmp_path, name, needle):
    _bad_files(tmp_path)
    with pytest.raises(ExocortexError) as e:
        _tokenize(tok, tmp_path / name, tmp_path / "out", workers=2, jsonl_chunk_bytes=100)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_shard_in_a_directory_writes_nothing(tmp_path, texts):
    d = tmp_path / "shards"
    d.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": texts[i * 50:(i + 1) * 50]}), d / f"shard_{i}.parquet")
    pq.write_table(pa.table({"text": ["", None]}), d / "shard_3.parquet")  # readable, but no text at all
    r = subprocess.run([sys.executable, "-m", "exocortex", "tokenizer", "--data", str(d), "--set",
                        "tokenizer.vocab_size=300"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "shard_3.parquet: no text" in err[0], r.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-written
