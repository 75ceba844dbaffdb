"""`exocortex data download` against a local fake hub (tests/fakehub.py): the real HTTP code path."""
import io
import json
import os
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exocortex.errors import ExocortexError
from exocortex.data.hub import MANIFEST, Hub, download, hub_files, parse_ref, sync
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


def test_concurrent_downloads_of_one_cache_fetch_each_file_once(hub, tmp_path):
    """Torchrun ranks loading the same files: one downloads, the others wait and find them verified."""
    out, errors = [], []

    def run():
        try:
            out.append(download(REPO, cache_dir=tmp_path, hub=_hub(hub), workers=2))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 3 and out[0] == out[1] == out[2]
    assert len(hub.resolves()) == 3  # three shards, each fetched once
    for p in out[0]:
        assert p.read_bytes() == hub.repos[REPO][p.relative_to(tmp_path).as_posix()]


@pytest.mark.parametrize("ref,want", [
    ("hf:acme/corpus", ("acme/corpus", "main", "")),
    ("hf:acme/corpus/data/", ("acme/corpus", "main", "data")),
    ("hf:openai/gsm8k@v1.0/main/test-00000-of-00001.parquet",
     ("openai/gsm8k", "v1.0", "main/test-00000-of-00001.parquet")),
    ("hf:acme/corpus@refs%2Fconvert%2Fparquet/default", ("acme/corpus", "refs/convert/parquet", "default")),
])
def test_parse_ref(ref, want):
    assert parse_ref(ref) == want


@pytest.mark.parametrize("ref,needle", [
    ("hf:acme", "is not a hub reference"),
    ("hf:../x/y", "is not a hub reference"),
    ("acme/corpus", "is not a hub reference"),
    ("hf://datasets/openai/gsm8k/main/x.parquet", "here hf:openai/gsm8k/main/x.parquet"),
])
def test_bad_ref_is_a_clear_error(ref, needle):
    with pytest.raises(ExocortexError, match=needle):
        parse_ref(ref)


def test_hub_files_share_the_cache_and_need_no_network_once_fetched(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("EXOCORTEX_HF_ENDPOINT", hub.url)
    monkeypatch.setenv("EXOCORTEX_CACHE", str(tmp_path))
    monkeypatch.setenv("EXOCORTEX_HTTP_BACKOFF", "0.001")
    cache = tmp_path / "datasets" / "acme" / "corpus"
    hub.repos[REPO]["data/extra/notes.txt"] = b"not a shard"
    hub.repos[REPO]["data/extra/more.jsonl"] = b'{"text": "x"}\n'
    hub.revisions[REPO] = {"refs/convert/parquet": {"data/shard_00000.parquet": hub.repos[REPO]["README.md"]}}
    suffixes = (".jsonl", ".parquet")
    got = hub_files(f"hf:{REPO}/data", suffixes)  # a folder: its files with those suffixes, at any depth
    assert [name for _, name in got] == ["data/extra/more.jsonl"] + [f"data/shard_{i:05d}.parquet" for i in range(3)]
    assert [p for p, _ in got] == [cache / name for _, name in got]
    assert (cache / MANIFEST).exists() and not (cache / "data" / "extra" / "notes.txt").exists()
    n = len(hub.requests)
    assert hub_files(f"hf:{REPO}/data", suffixes) == got and len(hub.requests) == n  # cache-first: no request
    # `data download` of the same files finds them verified (the cache is one), and refreshes: the next use of
    # a reference lists again (a moved branch is seen), fetching nothing unchanged
    download(REPO, include="data/*.parquet", hub=_hub(hub))
    assert len(hub.resolves()) == 4
    n = len(hub.requests)
    assert hub_files(f"hf:{REPO}/data", suffixes) == got and len(hub.requests) > n and len(hub.resolves()) == 4
    n = len(hub.requests)
    assert hub_files(f"hf:{REPO}/data", suffixes) == got and len(hub.requests) == n
    # a file that changed since is noticed: the hub is asked again and the file verified (and refetched)
    (cache / "data" / "shard_00001.parquet").write_bytes(b"damaged")
    assert hub_files(f"hf:{REPO}/data", suffixes) == got and len(hub.resolves()) == 5
    # a pinned revision (URL-encoded slash) is fetched from that revision; a glob picks files too
    ((p, name),) = hub_files(f"hf:{REPO}@refs%2Fconvert%2Fparquet/data/shard_00000.parquet", suffixes)
    assert name == "data/shard_00000.parquet" and p.read_bytes() == hub.repos[REPO]["README.md"]
    assert [n for _, n in hub_files(f"hf:{REPO}/data/shard_0000[12].parquet", suffixes)] == \
        ["data/shard_00001.parquet", "data/shard_00002.parquet"]
    with pytest.raises(ExocortexError, match="has no directory 'nope'"):
        hub_files(f"hf:{REPO}/nope", suffixes)
    with pytest.raises(ExocortexError, match="no files matching 'data/missing.parquet'"):
        hub_files(f"hf:{REPO}/data/missing.parquet", suffixes)
    assert sync(REPO, ("*.md",), reuse=True, hub=_hub(hub))[0].read_bytes() == hub.repos[REPO]["README.md"]


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


@pytest.mark.parametrize("damage", [b"[" * 100_000, b"\xff\xfe", b"[1, 2]", b'{"files": [1], "listings": 3}', b"{"])
def test_a_damaged_manifest_only_costs_re_verification(tmp_path, damage):
    from exocortex.data.hub import MANIFEST, _Manifest
    (tmp_path / MANIFEST).write_bytes(damage)
    m = _Manifest(tmp_path)
    assert m.files == {} and m.listings == {}
