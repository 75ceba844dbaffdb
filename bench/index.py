"""Document lookup: the on-disk SQLite FTS5 index (exocortex/infer/docstore.py) vs the in-memory BM25 index
(exocortex/infer/lookup.py: DocumentIndex), at 10k and 100k passages.

    python bench/index.py                       # 10k and 100k passages
    python bench/index.py --sizes 10000 --queries 200

The passages are the generated world's documents written as text files (~500 characters a passage, 100
files). Each side runs in its own process (so peak memory is its own): build time (FTS5: `update` of the
folder; BM25: reading the files and building, which every process that serves must do), the index's memory
(peak RSS over the process's before building), a query's median and p95 latency over world fact questions,
and how often the top passage holds the answer (hit@1, the same questions). FTS5 also reports an update after
one file changed, a fresh process opening the built index, and its file size. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FILES = 100


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_corpus(folder: Path, passages: int) -> None:
    """World documents as FILES text files, paragraphs of ~400-500 characters, until `passages` passages."""
    from exocortex.data.world import generate_documents
    from exocortex.infer.docstore import split_passages

    docs = generate_documents(0, target_bytes=passages * 520)
    per_file = -(-len(docs) // FILES)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(FILES):
        if docs[i * per_file:(i + 1) * per_file]:
            (folder / f"doc{i:03d}.txt").write_text("\n\n".join(docs[i * per_file:(i + 1) * per_file]) + "\n")
    n = sum(len(split_passages(f.read_text())) for f in folder.glob("*.txt"))
    print(f"corpus: {n:,} passages in {len(list(folder.glob('*.txt')))} files ({sum(f.stat().st_size for f in folder.glob('*.txt')) / 1e6:.1f} MB)",
          flush=True)


def questions(n: int) -> list[tuple[str, str]]:
    from exocortex.data.world import World
    world = World(seed=0)
    rng = random.Random(0)
    facts = world.facts()
    return [(world.ask(f, rng), f.value) for f in rng.sample(facts, min(n, len(facts)))]


def measure(side: str, folder: Path, db: Path, n_queries: int) -> dict:
    """Runs in a child process: one side's numbers."""
    from exocortex.infer.docstore import DocumentStore
    from exocortex.infer.lookup import DocumentIndex  # both sides import both: memory counts the index only

    qs = questions(n_queries)
    base = rss_mb()
    t = time.perf_counter()
    if side == "fts5":
        store = DocumentStore(db)
        store.update([folder])
        search = lambda q: [h.text for h in store.search(q, 1)]  # noqa: E731
    else:
        index = DocumentIndex.from_paths([folder])
        search = lambda q: [p for _, p in index.search(q, 1)]  # noqa: E731
    out = {"build_s": time.perf_counter() - t, "memory_mb": rss_mb() - base}
    for q, _ in qs[:5]:
        search(q)  # warm
    times, hits = [], 0
    for q, answer in qs:
        t = time.perf_counter()
        top = search(q)
        times.append(time.perf_counter() - t)
        hits += bool(top) and answer.lower() in top[0].lower()
    times.sort()
    out.update(query_ms=statistics.median(times) * 1e3, query_p95_ms=times[int(0.95 * (len(times) - 1))] * 1e3,
               hit_at_1=hits / len(qs))
    if side == "fts5":
        f = sorted(folder.glob("*.txt"))[0]
        f.write_text(f.read_text() + "\nA new line about the kettle.\n")
        t = time.perf_counter()
        s = store.update([folder])
        out["update_one_file_s"] = time.perf_counter() - t
        assert s.changed == 1 and s.unchanged == len(list(folder.glob("*.txt"))) - 1, s.line()
        store.close()
        t = time.perf_counter()
        again = DocumentStore(db)
        again.search(qs[0][0])
        out["open_s"] = time.perf_counter() - t
        out["disk_mb"] = db.stat().st_size / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000", help="passages, comma-separated")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--child", nargs=4, metavar=("SIDE", "FOLDER", "DB", "QUERIES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, folder, db, nq = args.child
        print(json.dumps(measure(side, Path(folder), Path(db), int(nq))))
        return
    results = {}
    print(f"{'passages':>9} {'index':>6} {'build s':>8} {'memory MB':>10} {'query ms':>9} {'p95 ms':>7} {'hit@1':>6}"
          f" {'update 1 file s':>16} {'open s':>7} {'disk MB':>8}")
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "docs"
            write_corpus(folder, size)
            for side in ("bm25", "fts5"):
                db = Path(tmp) / f"{side}.sqlite"
                r = subprocess.run([sys.executable, __file__, "--child", side, str(folder), str(db), str(args.queries)],
                                   capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                if r.returncode:
                    sys.exit(f"error: the {side} side failed:\n{r.stderr[-2000:]}")
                m = json.loads(r.stdout.strip().splitlines()[-1])
                results[f"{side}_{size}"] = m
                print(f"{size:>9,} {side:>6} {m['build_s']:>8.2f} {m['memory_mb']:>10.1f} {m['query_ms']:>9.2f} "
                      f"{m['query_p95_ms']:>7.2f} {m['hit_at_1']:>6.2f} {m.get('update_one_file_s', float('nan')):>16.3f}"
                      f" {m.get('open_s', float('nan')):>7.3f} {m.get('disk_mb', float('nan')):>8.1f}", flush=True)
            b, f = results[f"bm25_{size}"], results[f"fts5_{size}"]
            results[f"query_speedup_{size}"] = round(b["query_ms"] / f["query_ms"], 2)
            results[f"memory_ratio_{size}"] = round(f["memory_mb"] / max(b["memory_mb"], 0.1), 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
