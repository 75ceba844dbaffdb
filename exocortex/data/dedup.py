"""Exact and near-duplicate detection for texts (user corpora, generated datasets, model samples).

Two documents are *exact* duplicates when their normalised text (lower case, runs of whitespace made one
space, trimmed) is the same: a 64-bit hash of it is kept per document. They are *near* duplicates when the
Jaccard similarity of their sets of word shingles (`shingle` consecutive words) is about `threshold` or more:
a MinHash signature of each document (datasketch, `num_perm` permutations) goes into a MinHashLSH index,
whose bands make two documents with similarity s collide with probability 1 - (1 - s^r)^b (an S-curve
centred near `threshold`, chosen by datasketch). A collision counts as a duplicate without a second check
against the stored signature: the index keeps band hashes only, never the signatures, which is what bounds
its memory.

The first occurrence wins: `check_and_add` returns True for a text that duplicates something added before,
and adds it otherwise, so the result depends only on the order of the texts (deterministic: fixed seeds, no
`hash()`).

Memory: about 3.5 KB per indexed document (measured: the LSH's band keys, stored twice by datasketch). A corpus larger than `index_limit` documents
keeps checking every later document against the index but stops adding to it (it says so once): near
duplicates of the first `index_limit` documents are still found everywhere, near duplicates among the later
ones only when they are exact. Exact hashes are kept for every
document (~70 bytes each).
"""
from __future__ import annotations

import hashlib
import re

import numpy as np
from datasketch import MinHash, MinHashLSH

WORD = re.compile(r"\w+")
INDEX_LIMIT = 1_000_000  # documents in the near-duplicate index: ~3.5 GB


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


class NearDuplicates:
    """An incremental exact + near-duplicate filter (see the module docstring)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5,
                 index_limit: int = INDEX_LIMIT):
        self.threshold, self.num_perm, self.shingle, self.index_limit = threshold, num_perm, shingle, index_limit
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._permutations = MinHash(num_perm=num_perm, seed=1).permutations  # shared: building them is slow
        self.exact: set[int] = set()
        self.indexed = 0
        self.stats = {"exact": 0, "near": 0, "kept": 0}
        self.full_warning: str | None = None

    def signature(self, text: str) -> np.ndarray:
        """The MinHash signature (num_perm uint32) of a text's word shingles."""
        m = MinHash(num_perm=self.num_perm, permutations=self._permutations, scheme="affine32")
        m.update_batch(shingles(text, self.shingle))
        return m.hashvalues

    def check_signature(self, key: int, signature: np.ndarray) -> str | None:
        """'exact' or 'near' if this document duplicates one added before; else adds it and returns None.
        (The split of check_and_add that lets worker processes compute keys and signatures.)"""
        if key in self.exact:
            self.stats["exact"] += 1
            return "exact"
        m = MinHash(hashvalues=signature, permutations=self._permutations, scheme="affine32")
        if self.indexed and self.lsh.query(m):
            self.stats["near"] += 1
            return "near"
        self.exact.add(key)
        self.stats["kept"] += 1
        if self.indexed < self.index_limit:
            self.lsh.insert(self.indexed, m, check_duplication=False)
            self.indexed += 1
        elif self.full_warning is None:
            self.full_warning = (f"dedup: the near-duplicate index is full ({self.index_limit:,} documents); later "
                                 f"documents are checked against it but not added")
            print(self.full_warning, flush=True)
        return None

    def check_and_add(self, text: str) -> bool:
        """True if `text` is an exact or near duplicate of a text added before; else adds it, returns False."""
        return self.check_signature(exact_key(text), self.signature(text)) is not None


def dedup_texts(texts: list[str], threshold: float = 0.8, shingle: int = 5) -> tuple[list[int], dict]:
    """Indices of the texts to keep (first occurrences, in order) and {"exact": n, "near": n} removed."""
    nd = NearDuplicates(threshold=threshold, shingle=shingle)
    kept = [i for i, t in enumerate(texts) if not nd.check_and_add(t)]
    return kept, {"exact": nd.stats["exact"], "near": nd.stats["near"]}
