import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exocortex.config import DataConfig
from exocortex.errors import ExocortexError
from exocortex.data.sources import iter_documents, load_documents, split_train_val


def test_reads_every_supported_format(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# markdown\nbody")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}", "id": i}) for i in range(3)) + "\n\n")
    pq.write_table(pa.table({"text": ["pq one", "pq two", None], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    docs = list(iter_documents(tmp_path))
    assert docs == ["plain text file", "row 0", "row 1", "row 2", "pq one", "pq two", "# markdown\nbody"]
    loaded, desc = load_documents(DataConfig(path=str(tmp_path)))
    assert loaded == docs and str(tmp_path) in desc


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(ExocortexError, match='no "text" column'):
        list(iter_documents(tmp_path / "d.parquet"))


def test_split_is_deterministic_and_disjoint():
    docs = [f"doc {i}" for i in range(1000)]
    tr, va = split_train_val(docs, 0.01)
    assert len(va) == 10 and len(tr) == 990 and not set(tr) & set(va)
    assert split_train_val(docs, 0.01) == (tr, va)
    tr1, va1 = split_train_val(["one long document " * 100], 0.1)
    assert tr1[0] and va1[0]
