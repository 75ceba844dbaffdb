"""`exocortex data download` against a local fake hub (tests/fakehub.py): the real HTTP code path."""
import io
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exocortex.config import ExocortexError
from exocortex.data.hub import MANIFEST, Hub, download
from fakehub import FakeHub

REPO = "acme/corpus"


def _parquet(texts) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=50)
    return buf.getvalue()


@pytest.fixture
def hub():
    h = FakeHub()
    h.repos[REPO] = {
        f"data/shard_{i:05d}.parquet": _parquet([f"document {i}.{j}: " + "lorem ipsum " * (j % 7 + 1)
                                                  for j in range(120)]) for i in range(3)}
    h.repos[REPO]["README.md"] = b"# a dataset card\n"
    yield h
    h.close()


def _hub(h, **kw):
    return Hub(base=h.url, retries=kw.pop("retries", 4), backoff=0.001, **kw)


def test_download_lists_pages_verifies_and_skips_what_is_cached(hub, tmp_path, capsys):
    hub.page_size = 2  # the listing arrives in pages linked by Link headers
    paths = download(REPO, shards=2, cache_dir=tmp_path, hub=_hub(hub), workers=2, progress=True)
    files = hub.repos[REPO]
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["data/shard_00000.parquet", "data/shard_00001.parquet"]
    for p in paths:
        assert p.read_bytes() == files[p.relative_to(tmp_path).as_posix()]
    assert not list(tmp_path.rglob("*.part"))
    assert not (tmp_path / "data" / "shard_00002.parquet").exists()  # --shards 2
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["files"]["data/shard_00000.parquet"]["checksum"].startswith("sha256:")
    err = capsys.readouterr().err
    assert "download" in err and "100%" in err  # the progress bar
    n = len(hub.resolves())
    assert n == 2
    download(REPO, shards=2, cache_dir=tmp_path, hub=_hub(hub))  # verified files are not fetched again
    assert len(hub.resolves()) == n
    # a small (non-LFS) file is checked by its git blob id
    (md,) = download(REPO, include="*.md", cache_dir=tmp_path, hub=_hub(hub))
    assert md.read_bytes() == files["README.md"]
    assert json.loads((tmp_path / MANIFEST).read_text())["files"]["README.md"]["checksum"].startswith("git-sha1:")


def test_dropped_connection_resumes_with_range(hub, tmp_path):
    name = "data/shard_00001.parquet"
    q = len(hub.repos[REPO][name]) // 4
    hub.drop[name] = [q, q]  # hang up twice mid-file
    (p,) = download(REPO, include="data/shard_00001.parquet", cache_dir=tmp_path, hub=_hub(hub))
    assert p.read_bytes() == hub.repos[REPO][name]
    assert hub.resolves(name) == [None, f"bytes={q}-", f"bytes={2 * q}-"]


def test_part_file_from_an_earlier_run_is_resumed(hub, tmp_path):
    name = "data/shard_00000.parquet"
    data = hub.repos[REPO][name]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shard_00000.parquet.part").write_bytes(data[:777])
    (p,) = download(REPO, shards=1, cache_dir=tmp_path, hub=_hub(hub))
    assert p.read_bytes() == data
    assert hub.resolves(name) == ["bytes=777-"]


def test_retries_server_errors_then_gives_up_clearly(hub, tmp_path):
    hub.fail = {"/api/": 2, "shard_00000": 3}
    (p,) = download(REPO, shards=1, cache_dir=tmp_path, hub=_hub(hub))
    assert p.read_bytes() == hub.repos[REPO]["data/shard_00000.parquet"]
    hub.fail = {"shard_00001": 100}
    with pytest.raises(ExocortexError, match=r"shard_00001.parquet: download failed \(HTTP 500"):
        download(REPO, shards=2, cache_dir=tmp_path, hub=_hub(hub, retries=2))


def test_corrupt_download_is_detected_and_fetched_again(hub, tmp_path, capsys):
    name = "data/shard_00002.parquet"
    hub.corrupt[name] = 1
    (p,) = download(REPO, include=name, cache_dir=tmp_path, hub=_hub(hub))
    assert p.read_bytes() == hub.repos[REPO][name]
    assert len(hub.resolves(name)) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    hub.corrupt[name] = 10  # a server that always corrupts it: a clear error, not a loop
    p.unlink()
    with pytest.raises(ExocortexError, match="shard_00002.parquet: checksum mismatch on 3 downloads"):
        download(REPO, include=name, cache_dir=tmp_path, hub=_hub(hub))


def test_corrupted_cache_file_is_redownloaded(hub, tmp_path, capsys):
    (p,) = download(REPO, shards=1, cache_dir=tmp_path, hub=_hub(hub))
    good = p.read_bytes()
    p.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])  # bit rot, same size
    download(REPO, shards=1, cache_dir=tmp_path, hub=_hub(hub))
    assert p.read_bytes() == good
    assert "does not match its checksum" in capsys.readouterr().err
    # --verify re-hashes even a file whose size and mtime look untouched
    st = p.stat()
    p.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    download(REPO, shards=1, cache_dir=tmp_path, hub=_hub(hub))
    assert p.read_bytes() != good  # without --verify the manifest is trusted
    download(REPO, shards=1, cache_dir=tmp_path, hub=_hub(hub), verify=True)
    assert p.read_bytes() == good


@pytest.mark.parametrize("repo,kw,needle", [
    ("acme/nothing", {}, "dataset acme/nothing not found"),
    ("not-a-repo", {}, "not a hub dataset id"),
    ("a/b/c", {}, "not a hub dataset id"),
    (REPO, {"revision": "v9"}, "has no revision 'v9'"),
    (REPO, {"include": "*.csv"}, "no files matching '*.csv'"),
    (REPO, {"include": "missing/*.parquet"}, "has no directory 'missing'"),
])
def test_bad_dataset_is_a_clear_error(hub, tmp_path, repo, kw, needle):
    with pytest.raises(ExocortexError, match=needle.replace("*", r"\*").replace(".", r"\.")):
        download(repo, cache_dir=tmp_path, hub=_hub(hub), **kw)


def _cli(args, cwd, env):
    return subprocess.run([sys.executable, "-m", "exocortex", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_cli_download_then_tokenize_from_the_cache(hub, tmp_path):
    env = {"EXOCORTEX_HF_ENDPOINT": hub.url, "EXOCORTEX_CACHE": str(tmp_path / "cache"),
           "EXOCORTEX_HTTP_BACKOFF": "0.001"}
    hub.drop["data/shard_00000.parquet"] = [3000]
    r = _cli(["data", "download", "--dataset", REPO, "--shards", "2", "--workers", "2"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    cache = tmp_path / "cache" / "datasets" / "acme" / "corpus"
    assert "exocortex pretrain --data" in r.stdout and (cache / "data" / "shard_00001.parquet").exists()
    r = _cli(["tokenizer", "--data", f"hf:{REPO}", "--run", "hubrun", "--set", "tokenizer.vocab_size=300",
              "--set", "data.workers=2"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "runs" / "hubrun" / "data" / "meta.json").read_text())
    assert meta["documents"] == 240 and meta["val_documents"] == 3
    # bad input through the CLI: one line, no traceback
    for args, needle in ((["data", "download", "--dataset", "acme/nothing"], "not found"),
                         (["tokenizer", "--data", "hf:acme/other"], "is not downloaded")):
        r = _cli(args, tmp_path, env)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
