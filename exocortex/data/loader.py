"""Token arrays and deterministic batch sources for the training loop.

Every source maps a micro-batch index to rows through a seeded per-epoch permutation, so the data order is
a pure function of (seed, index): resuming at step s replays exactly what an uninterrupted run would see.
"""
from __future__ import annotations

import numpy as np
import torch

from exocortex.tokenizer import Tokenizer


def tokenize_documents(tok: Tokenizer, docs: list[str], chunk: int = 2048) -> np.ndarray:
    """Concatenate documents, each starting with <|bos|>, into one flat token array (multi-threaded encode)."""
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    parts = []
    for i in range(0, len(docs), chunk):
        for ids in tok.encode_batch(docs[i:i + chunk], bos=True):
            parts.append(np.asarray(ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _epoch_perm(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class TokenRows:
    """Fixed-length rows cut from a flat token array; each micro-batch takes `rows` of them."""

    def __init__(self, tokens: np.ndarray, seq_len: int, rows: int, seed: int = 0):
        self.tokens, self.seq_len, self.rows, self.seed = tokens, seq_len, rows, seed
        self.n_rows = (len(tokens) - 1) // seq_len
        if self.n_rows < rows:
            raise ValueError(f"only {len(tokens)} tokens: too few for one batch of {rows} x {seq_len}")
        self._perms: dict[int, np.ndarray] = {}

    def _row_ids(self, index: int) -> np.ndarray:
        out = np.empty(self.rows, dtype=np.int64)
        for j in range(self.rows):
            k = index * self.rows + j
            epoch, pos = divmod(k, self.n_rows)
            if epoch not in self._perms:
                self._perms = {epoch: _epoch_perm(self.n_rows, self.seed, epoch)}
            out[j] = self._perms[epoch][pos]
        return out

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        starts = self._row_ids(index) * T
        chunk = np.stack([self.tokens[s:s + T + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(chunk)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def eval_batches(tokens: np.ndarray, seq_len: int, rows: int, max_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first max_tokens of a (val) array as fixed batches: the same every time, comparable across runs."""
    T = seq_len
    n_rows = min((len(tokens) - 1) // T, max(1, max_tokens // T))
    out = []
    for i in range(0, n_rows, rows):
        chunk = np.stack([tokens[r * T:r * T + T + 1] for r in range(i, min(n_rows, i + rows))]).astype(np.int64)
        t = torch.from_numpy(chunk)
        out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
    return out


def pack_conversations(rendered: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedily pack (ids, mask) conversations into rows of seq_len + 1 tokens, never splitting one.

    Returns inputs/targets arrays (n_rows, seq_len) with targets = -1 where no loss applies (prompts, tool
    outputs, padding). Conversations longer than a row are truncated.
    """
    L = seq_len + 1
    rows_ids, rows_mask = [], []
    cur_ids: list[int] = []
    cur_mask: list[int] = []
    for ids, mask in rendered:
        ids, mask = ids[:L], mask[:L]
        if len(cur_ids) + len(ids) > L:
            rows_ids.append(cur_ids + [pad_id] * (L - len(cur_ids)))
            rows_mask.append(cur_mask + [0] * (L - len(cur_mask)))
            cur_ids, cur_mask = [], []
        cur_ids += ids
        cur_mask += mask
    if cur_ids:
        rows_ids.append(cur_ids + [pad_id] * (L - len(cur_ids)))
        rows_mask.append(cur_mask + [0] * (L - len(cur_mask)))
    ids = np.asarray(rows_ids, dtype=np.int64)
    mask = np.asarray(rows_mask, dtype=bool)
    inputs = ids[:, :-1]
    targets = np.where(mask[:, 1:], ids[:, 1:], -1)
    return inputs, targets


class PackedRows:
    """Batch source over packed (inputs, targets) rows, e.g. SFT conversations."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, rows: int, seed: int = 0):
        self.inputs, self.targets, self.rows, self.seed = inputs, targets, rows, seed
        self.n_rows = len(inputs)
        self._perms: dict[int, np.ndarray] = {}

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = []
        for j in range(self.rows):
            epoch, pos = divmod(index * self.rows + j, self.n_rows)
            if epoch not in self._perms:
                self._perms = {epoch: _epoch_perm(self.n_rows, self.seed, epoch)}
            ids.append(self._perms[epoch][pos])
        return torch.from_numpy(self.inputs[ids]), torch.from_numpy(self.targets[ids])

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """All rows in order (for validation)."""
        return [(torch.from_numpy(self.inputs[i:i + self.rows]), torch.from_numpy(self.targets[i:i + self.rows]))
                for i in range(0, self.n_rows, self.rows)]
