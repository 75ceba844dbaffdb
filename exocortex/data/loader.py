"""Token arrays and deterministic batch sources for the training loop.

Every source maps a micro-batch index to rows through a seeded per-epoch permutation, so the data order is
a pure function of (seed, index): resuming at step s replays exactly what an uninterrupted run would see,
and rank r of N (which takes micro-batches r, r+N, ...) sees exactly its share of one process's stream.

Pretraining rows come in two packings (config data.packing):
  bestfit  every row starts at a document's <|bos|> and is filled with whole documents chosen best-fit
           from a window of upcoming ones; a document is cropped only when none fits the room left.
           No padding, and no document is seen without its beginning (crops keep a document's start).
  stream   the token stream cut into consecutive rows (rows start mid-document).
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right, insort

import numpy as np
import torch

from exocortex.config import RunConfig
from exocortex.data.tokens import TokenSplit, has_token_data, read_split
from exocortex.errors import ExocortexError, first_line
from exocortex.fileio import read_json_object
from exocortex.tokenizer import Tokenizer


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


_LOW = (1 << 32) - 1


def pack_bestfit(lens: list[int], row_len: int, window: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack documents (token counts `lens`, in stream order) into rows of exactly `row_len` tokens.

    A window of the next `window` documents is kept sorted by length. Each row starts with a document
    and takes, again and again, the longest one that still fits; when none fits the room left, the
    shortest is cropped to fill the row exactly (its rest is dropped: rows must start at a document's
    start). A document longer than a row can never fit whole, so it opens a row of its own, cropped to
    the row, where its crop keeps the most of it (measured: on web-like lengths with 2049-token rows,
    80% of tokens used vs 67% when long documents wait to be cropped into small gaps; they would also
    crowd the window). The window refills in stream order, so the mix of documents stays the stream's.
    A last row that the documents cannot fill is dropped (no padding).

    Returns (row_ptr, doc, take): row r is pieces row_ptr[r]:row_ptr[r+1]; a piece is the first
    take[i] tokens of document doc[i] (an index into lens).
    """
    keys: list[int] = []  # (length << 32) | index: sorted by length, ties in stream order
    nxt, n = 0, len(lens)
    docs: list[int] = []
    takes: list[int] = []
    row_ptr = [0]
    while True:
        room = row_len
        while room > 0:
            while len(keys) < window and nxt < n:
                insort(keys, (lens[nxt] << 32) | nxt)
                nxt += 1
            if not keys:
                break
            i = bisect_right(keys, (room << 32) | _LOW) - 1
            if room == row_len and keys[-1] >> 32 > row_len:  # too long for any row: a row of its own
                key = keys.pop()
                take = room
            elif i >= 0:  # the longest that fits (the earliest of equals: none waits forever)
                take = keys[i] >> 32
                key = keys.pop(bisect_left(keys, take << 32))
            else:  # nothing fits: crop the shortest
                key = keys.pop(0)
                take = room
            docs.append(key & _LOW)
            takes.append(take)
            room -= take
        if room > 0:  # out of documents: drop the unfinished row
            del docs[row_ptr[-1]:], takes[row_ptr[-1]:]
            break
        row_ptr.append(len(docs))
    return np.asarray(row_ptr, np.int64), np.asarray(docs, np.int64), np.asarray(takes, np.int64)


def _doc_lengths(tokens: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.diff(np.append(np.asarray(starts, np.int64), len(tokens)))


class BestFitRows:
    """Best-fit packed rows of seq_len + 1 tokens, each starting at a document's <|bos|> (see pack_bestfit).

    Documents are shuffled per epoch (seeded) and packed in blocks of `block_docs`, lazily: get(index)
    is a pure function of index (exact resume, rank sharding) that only ever packs the blocks up to the
    one it needs, so a huge corpus costs neither a long start nor memory for a whole-epoch plan.
    """

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, seq_len: int, rows: int, seed: int = 0,
                 window: int = 1000, block_docs: int = 1 << 16):
        self.tokens, self.seq_len, self.rows, self.seed = tokens, seq_len, rows, seed
        self.starts = np.asarray(starts, np.int64)
        self.lens = _doc_lengths(tokens, self.starts)
        self.window, self.block_docs = window, block_docs
        self.n_docs = len(self.starts)
        self.n_blocks = max(1, -(-self.n_docs // block_docs))
        if len(tokens) < rows * (seq_len + 1):
            raise ValueError(f"only {len(tokens)} tokens: too few for one batch of {rows} x {seq_len}")
        self._perm: tuple[int, np.ndarray] | None = None
        self._cum: dict[int, list[int]] = {}   # epoch -> rows before each packed block
        self._plans: dict[tuple[int, int], tuple] = {}

    def _block(self, epoch: int, b: int):
        """(document ids, row_ptr, piece doc positions, piece lengths) of block b of an epoch."""
        key = (epoch, b)
        if key not in self._plans:
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, _epoch_perm(self.n_docs, self.seed, epoch))
            ids = self._perm[1][b * self.block_docs:(b + 1) * self.block_docs]
            plan = pack_bestfit(self.lens[ids].tolist(), self.seq_len + 1, self.window)
            if len(self._plans) >= 2:  # get() walks forward: the current block and the next suffice
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = (ids, *plan)
        return self._plans[key]

    def _locate(self, k: int) -> tuple[int, int, int]:
        """Global row number -> (epoch, block, row in block)."""
        epoch = 0
        while True:
            cum = self._cum.setdefault(epoch, [0])
            while len(cum) <= self.n_blocks and cum[-1] <= k:
                cum.append(cum[-1] + len(self._block(epoch, len(cum) - 1)[1]) - 1)
            if cum[-1] > k:
                b = bisect_right(cum, k) - 1
                return epoch, b, k - cum[b]
            if cum[-1] == 0:
                raise ValueError("no document packs into a full row")
            k -= cum[-1]
            epoch += 1

    def row(self, k: int) -> np.ndarray:
        epoch, b, r = self._locate(k)
        ids, row_ptr, pos, take = self._block(epoch, b)
        parts = [self.tokens[s:s + n] for s, n in zip(self.starts[ids[pos[row_ptr[r]:row_ptr[r + 1]]]],
                                                     take[row_ptr[r]:row_ptr[r + 1]])]
        return np.concatenate(parts)

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = np.stack([self.row(index * self.rows + j) for j in range(self.rows)]).astype(np.int64)
        t = torch.from_numpy(chunk)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def packed_eval_batches(tokens: np.ndarray, starts: np.ndarray, seq_len: int, rows: int,
                        max_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Val batches packed like BestFitRows, from the first documents in order (no shuffle): the same every
    time, comparable across runs."""
    n_rows = max(1, max_tokens // seq_len)
    lens = _doc_lengths(tokens, starts)
    # enough documents for n_rows rows, with a margin for what cropping drops
    n_docs = int(np.searchsorted(np.cumsum(lens), 2 * n_rows * (seq_len + 1) + 1000)) + 1000
    row_ptr, pos, take = pack_bestfit(lens[:n_docs].tolist(), seq_len + 1)
    out_rows = []
    for r in range(min(n_rows, len(row_ptr) - 1)):
        sl = slice(row_ptr[r], row_ptr[r + 1])
        out_rows.append(np.concatenate([tokens[s:s + n] for s, n in zip(starts[pos[sl]], take[sl])]))
    out = []
    for i in range(0, len(out_rows), rows):
        t = torch.from_numpy(np.stack(out_rows[i:i + rows]).astype(np.int64))
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


# ----------------------------------------------------------------------------- a run's token files

def load_splits(cfg: RunConfig) -> tuple[TokenSplit, TokenSplit]:
    """The run's tokenized (train, val) splits, memory-mapped, checked against data/meta.json and the
    tokenizer's vocabulary."""
    d = cfg.run.data_dir
    if not has_token_data(d):
        raise ExocortexError(f"{cfg.run_dir} has no tokenized data; run `exocortex tokenizer --run {cfg.name}` first")
    meta = _token_meta(d, cfg.name) if (d / "meta.json").exists() else None
    tok = Tokenizer.load(cfg.run.tokenizer_dir)
    try:
        splits = read_split(d, "train", tok.bos_id), read_split(d, "val", tok.bos_id)
    except Exception as e:  # numpy and the OS raise many kinds on a damaged file; say where and what to do
        raise ExocortexError(f"the token files in {d} are damaged ({first_line(e, 200)}); "
                             f"{_REDO.format(cfg.name)}") from None
    if meta is not None:
        for name, split in zip(("train", "val"), splits):
            _check_split(d, name, split, meta, cfg.name)
    _check_ids(cfg, splits, meta and meta.get("max_token_id"), tok.vocab_size)
    return splits


_REDO = "re-run `exocortex tokenizer --run {}`"


def _token_meta(d, run_name: str) -> dict:
    path = d / "meta.json"
    meta = read_json_object(path, _REDO.format(run_name))
    counts = ("vocab_size", "train_tokens", "val_tokens")
    recorded = meta.get("max_token_id", 0)  # absent in runs tokenized before it was recorded
    if not (meta.get("dtype") in ("uint16", "uint32") and isinstance(recorded, int) and recorded >= 0
            and all(isinstance(meta.get(k), int) and meta[k] >= 0 for k in counts)):
        raise ExocortexError(f"{path} is damaged (it needs dtype uint16/uint32 and the counts {', '.join(counts)}); "
                             + _REDO.format(run_name))
    return meta


def _check_split(d, name: str, split: TokenSplit, meta: dict, run_name: str) -> None:
    """Cheap checks that catch a cut or overwritten file: the length meta.json recorded, document starts
    inside the tokens in order. (Token ids: _check_ids.)"""
    n, s = meta[f"{name}_tokens"], split.starts
    if len(split.tokens) != n:
        raise ExocortexError(f"{d / (name + '.bin')} holds {len(split.tokens):,} tokens but {d / 'meta.json'} "
                             f"recorded {n:,}: it was cut or replaced; {_REDO.format(run_name)}")
    if s.ndim != 1 or s.dtype.kind not in "iu" or (len(s) and (s[0] < 0 or s[-1] >= max(1, n) or np.any(np.diff(s) <= 0))):
        raise ExocortexError(f"{d / (name + '.docs.npy')} is damaged (document starts out of order or past the "
                             f"tokens); {_REDO.format(run_name)}")


def _check_ids(cfg: RunConfig, splits: tuple[TokenSplit, TokenSplit], recorded: int | None, vocab: int) -> None:
    """Every token id inside the tokenizer's vocabulary (the model would index past its embedding). For the
    train split, which can be tens of GB read on every rank at every start, the largest id meta.json recorded
    at tokenization stands in; runs tokenized before it was recorded have their train split read through. The
    val split is small: always read. A train file overwritten in place with its size kept passes here; its
    batches are checked as they are made (_InVocab)."""
    (train, val), d = splits, cfg.run.data_dir
    found = {d / "meta.json": recorded} if recorded is not None else {d / "train.*": _largest(train.tokens)}
    found[d / "val.*"] = _largest(val.tokens)
    for where, top in found.items():
        if top >= vocab:
            raise ExocortexError(f"{where} holds token id {top}, outside the vocabulary of {vocab}: it was "
                                 f"overwritten or belongs to another tokenizer; {_REDO.format(cfg.name)}")


def _largest(tokens: np.ndarray) -> int:
    """The largest id, chunked: a memory-mapped split never has to fit in memory."""
    chunk = 1 << 24
    return max((int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk)), default=0)


class _InVocab:
    """A batch source whose batches are checked against the vocabulary as they are made: the train split is
    not read through at start (_check_ids), so a file damaged in place is found here, a one-line error before
    the model indexes past its embedding (on a GPU, an assertion that kills the process)."""

    def __init__(self, source, vocab: int, cfg: RunConfig):
        self.source, self.rows, self.vocab, self.cfg = source, source.rows, vocab, cfg

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.source.get(index)
        top = int(max(t.max() for t in batch))
        if top >= self.vocab:
            raise ExocortexError(f"{self.cfg.run.data_dir / 'train.bin'} holds token id {top} (micro-batch {index}), "
                                 f"outside the vocabulary of {self.vocab}: it was overwritten; "
                                 f"{_REDO.format(self.cfg.name)}")
        return batch


def _too_small(cfg: RunConfig, split: str, have: int, seq_len: int, rows: int) -> ExocortexError:
    """How much text a split lacks, in words a user can act on."""
    need = rows * (seq_len + 1)
    share = cfg.data.val_fraction if split == "val" else 1 - cfg.data.val_fraction
    hint = " or raise data.val_fraction" if split == "val" else " or lower the device batch"
    return ExocortexError(f"the {split} split has {have:,} tokens, fewer than {need:,} ({rows} row(s) of "
                          f"{seq_len + 1}): the corpus needs at least about {int(need / share):,} tokens in all; "
                          f"give it more text{hint}")


def train_source(cfg: RunConfig, seq_len: int, rows: int):
    """The pretraining batch source, packed as cfg.data.packing says."""
    train, _ = load_splits(cfg)
    if len(train.tokens) < rows * (seq_len + 1):
        raise _too_small(cfg, "train", len(train.tokens), seq_len, rows)
    if cfg.data.packing == "bestfit":
        source = BestFitRows(train.tokens, train.starts, seq_len, rows, seed=cfg.seed)
    else:
        source = TokenRows(train.tokens, seq_len, rows, seed=cfg.seed)
    return _InVocab(source, Tokenizer.load(cfg.run.tokenizer_dir).vocab_size, cfg)


def val_batches(cfg: RunConfig, seq_len: int, rows: int, max_tokens: int) -> list:
    """Fixed val batches, packed the way training rows are (so val loss measures the training objective)."""
    _, val = load_splits(cfg)
    if len(val.tokens) < seq_len + 1:
        raise _too_small(cfg, "val", len(val.tokens), seq_len, 1)
    if cfg.data.packing == "bestfit":
        return packed_eval_batches(val.tokens, val.starts, seq_len, rows, max_tokens)
    return eval_batches(val.tokens, seq_len, rows, max_tokens)
