"""Exact and near-duplicate detection for texts (user corpora, generated datasets, model samples).

Two documents are *exact* duplicates when their normalised text (lower case, runs of whitespace made one
space, trimmed) is the same: a 64-bit hash of it is kept per document. They are *near* duplicates when the
Jaccard similarity of their sets of word shingles (`shingle` consecutive words) is about `threshold` or more:
a MinHash signature of each document (datasketch, `num_perm` permutations) goes into a MinHashLSH index.
The index's bands are tuned for recall (two documents with similarity s collide with probability
1 - (1 - s^r)^b: b=14 bands of r=9 rows give 0.87 at s=0.8, 0.97 at 0.85, 0.13 at 0.6), and each collision
is then confirmed by the two signatures' estimate of the similarity (>= threshold; standard error ~0.035 at
0.8 with 128 permutations). With datasketch's default, balanced bands the recall at s=0.85 was 0.69.

The first occurrence wins: `check_and_add` returns True for a text that duplicates something added before,
and adds it otherwise, so the result depends only on the order of the texts (deterministic: fixed seeds, no
`hash()`).

Memory: about 4 KB per indexed document (measured: datasketch keeps each document's band keys twice, and the
signatures take 512 bytes). A corpus larger than `index_limit` documents keeps checking every later document
against the index but stops adding to it (it says so once): near duplicates of the first `index_limit`
documents are still found everywhere, near duplicates among the later ones only when they are exact. Exact
hashes are kept for every document (~70 bytes each).
"""
from __future__ import annotations

import functools
import hashlib
import re

import numpy as np
from datasketch import MinHash, MinHashLSH


WORD = re.compile(r"\w+")
INDEX_LIMIT = 1_000_000  # documents in the near-duplicate index: ~4 GB
CHUNK = 4096  # signatures are stored in blocks of this many rows


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def exact_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=8).digest(), "little")


def shingles(text: str, n: int) -> list[bytes]:
    """The distinct n-word shingles of a text (lower case, words = runs of letters/digits). A text shorter
    than n words is one shingle: all of it."""
    words = WORD.findall(text.lower())
    if len(words) <= n:
        return [" ".join(words).encode("utf-8")]
    return list({" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)})


@functools.lru_cache(maxsize=4)
def _permutations(num_perm: int) -> np.ndarray:
    return MinHash(num_perm=num_perm, seed=1).permutations  # shared by every signature: building them is slow


def signature(text: str, num_perm: int = 128, shingle: int = 5) -> np.ndarray:
    """The MinHash signature (num_perm uint32) of a text's word shingles."""
    m = MinHash(num_perm=num_perm, permutations=_permutations(num_perm), scheme="affine32")
    m.update_batch(shingles(text, shingle))
    return m.hashvalues


class NearDuplicates:
    """An incremental exact + near-duplicate filter (see the module docstring)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5,
                 index_limit: int = INDEX_LIMIT):
        self.threshold, self.num_perm, self.shingle, self.index_limit = threshold, num_perm, shingle, index_limit
        # weights (false positives, false negatives): favour recall, the signatures confirm each candidate
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
        self.signatures: list[np.ndarray] = []  # blocks of CHUNK rows: row i is indexed document i
        self.exact: set[int] = set()
        self.indexed = 0
        self.stats = {"exact": 0, "near": 0, "kept": 0}
        self.full_warning: str | None = None

    def check_signature(self, key: int, signature: np.ndarray) -> str | None:
        """'exact' or 'near' if this document duplicates one added before; else adds it and returns None.
        (The split of check_and_add that lets worker processes compute keys and signatures.)"""
        if key in self.exact:
            self.stats["exact"] += 1
            return "exact"
        m = MinHash(hashvalues=signature, permutations=_permutations(self.num_perm), scheme="affine32")
        candidates = self.lsh.query(m) if self.indexed else []
        if candidates:
            rows = np.stack([self.signatures[i // CHUNK][i % CHUNK] for i in candidates])
            if (rows == signature).mean(axis=1).max() >= self.threshold:  # the estimated Jaccard similarity
                self.stats["near"] += 1
                return "near"
        self.exact.add(key)
        self.stats["kept"] += 1
        if self.indexed < self.index_limit:
            if self.indexed % CHUNK == 0:
                self.signatures.append(np.empty((CHUNK, self.num_perm), np.uint32))
            self.signatures[-1][self.indexed % CHUNK] = signature
            self.lsh.insert(self.indexed, m, check_duplication=False)
            self.indexed += 1
        elif self.full_warning is None:
            self.full_warning = (f"dedup: the near-duplicate index is full ({self.index_limit:,} documents); later "
                                 f"documents are checked against it but not added")
            print(self.full_warning, flush=True)
        return None

    def check_and_add(self, text: str) -> bool:
        """True if `text` is an exact or near duplicate of a text added before; else adds it, returns False."""
        return self.check_signature(exact_key(text), signature(text, self.num_perm, self.shingle)) is not None


def dedup_texts(texts: list[str], threshold: float = 0.8, shingle: int = 5) -> tuple[list[int], dict]:
    """Indices of the texts to keep (first occurrences, in order) and {"exact": n, "near": n} removed."""
    nd = NearDuplicates(threshold=threshold, shingle=shingle)
    kept = [i for i, t in enumerate(texts) if not nd.check_and_add(t)]
    return kept, {"exact": nd.stats["exact"], "near": nd.stats["near"]}

