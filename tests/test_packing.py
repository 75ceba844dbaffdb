"""Best-fit packing: rows start at documents, crop only when nothing fits, and get(index) is a pure
function of index, so stopping and resuming (or splitting across ranks) replays the same batches."""
import numpy as np
import pytest
import torch

from exocortex.config import TrainConfig
from exocortex.errors import ExocortexError
from exocortex.data.loader import BestFitRows, pack_bestfit, packed_eval_batches
from exocortex.model import GPT
from exocortex.train.loop import train

BOS = 60000


def _corpus(n_docs=3000, max_len=80, seed=0):
    """Document d is BOS followed by 1, 2, 3, ...: any row can be checked for being made of document starts."""
    lens = np.random.default_rng(seed).integers(2, max_len, n_docs)
    tokens = np.concatenate([np.arange(n) for n in lens]).astype(np.uint16)
    starts = np.concatenate([[0], np.cumsum(lens[:-1])])
    tokens[starts] = BOS
    return tokens, starts, lens


def test_best_fit_takes_the_longest_that_fits_and_crops_only_when_none_does():
    row_ptr, doc, take = pack_bestfit([4, 7, 3, 9, 2], row_len=10)
    rows = [list(zip(doc[a:b].tolist(), take[a:b].tolist())) for a, b in zip(row_ptr[:-1], row_ptr[1:])]
    # row 1: 9 fits best, then room 1 < every length: crop the shortest (2) to 1 token
    # row 2: 7, then 3 fills it exactly; the leftover 4 cannot fill a row alone: dropped, never padded
    assert rows == [[(3, 9), (4, 1)], [(1, 7), (2, 3)]]
    # a document longer than any row opens a row of its own (rather than being cropped into a small gap)
    row_ptr, doc, take = pack_bestfit([6, 30, 6, 6], row_len=10)
    assert row_ptr.tolist() == [0, 1, 3] and doc.tolist() == [1, 0, 2] and take.tolist() == [10, 6, 4]


def test_rows_are_whole_documents_from_their_start_without_padding():
    tokens, starts, lens = _corpus()
    src = BestFitRows(tokens, starts, seq_len=63, rows=8, seed=1, window=100, block_docs=700)
    for i in range(40):
        x, y = src.get(i)
        assert x.shape == y.shape == (8, 63) and torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], 1).numpy():
            assert row[0] == BOS
            pos = np.arange(len(row)) - np.maximum.accumulate(np.where(row == BOS, np.arange(len(row)), 0))
            assert np.array_equal(np.where(row == BOS, 0, row), pos)  # BOS, 1, 2, ... per document


def test_an_epoch_uses_each_document_at_most_once_and_wastes_little():
    tokens, starts, lens = _corpus(n_docs=2000)
    T = 127
    src = BestFitRows(tokens, starts, T, rows=1, seed=0, window=200, block_docs=500)
    epoch_rows = sum(len(src._block(0, b)[1]) - 1 for b in range(src.n_blocks))
    used = []
    for b in range(src.n_blocks):
        ids, row_ptr, pos, take = src._block(0, b)
        used += ids[pos].tolist()
    assert len(used) == len(set(used))  # no document twice in an epoch
    assert len(used) > 0.97 * len(lens)
    assert epoch_rows * (T + 1) > 0.95 * len(tokens)  # cropping and the dropped last rows cost < 5%


def test_get_is_a_pure_function_of_index_across_blocks_and_epochs():
    tokens, starts, _ = _corpus(n_docs=400)
    kw = dict(seq_len=63, rows=4, seed=3, window=50, block_docs=128)
    a = BestFitRows(tokens, starts, **kw)
    n = 3 * (len(tokens) // (4 * 64))  # about three epochs
    straight = [a.get(i)[0] for i in range(n)]
    resumed = BestFitRows(tokens, starts, **kw)  # a fresh process resuming at batch n // 2
    assert all(torch.equal(resumed.get(i)[0], straight[i]) for i in range(n // 2, n))
    shuffled = BestFitRows(tokens, starts, **kw)  # any access order, e.g. ranks interleaving
    for i in np.random.default_rng(0).permutation(n):
        assert torch.equal(shuffled.get(int(i))[0], straight[i])
    assert not torch.equal(straight[0], straight[n - 1])


def test_packed_eval_batches_are_fixed_and_bos_aligned():
    tokens, starts, _ = _corpus(n_docs=300)
    b1 = packed_eval_batches(tokens, starts, 31, rows=4, max_tokens=31 * 10)
    b2 = packed_eval_batches(tokens, starts, 31, rows=4, max_tokens=31 * 10)
    assert [x.shape[0] for x, _ in b1] == [4, 4, 2]
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(b1, b2))
    assert all((x[:, 0] == BOS).all() for x, _ in b1)


class Interrupting:
    def __init__(self, inner, at):
        self.inner, self.at, self.rows = inner, at, inner.rows

    def get(self, index):
        if index == self.at:
            raise KeyboardInterrupt
        return self.inner.get(index)


def test_training_resumes_exactly_on_best_fit_rows(small_cfg, tmp_path):
    tokens, starts, _ = _corpus(n_docs=1500, max_len=40)
    tokens = np.where(tokens == BOS, small_cfg.vocab_size - 1, tokens % (small_cfg.vocab_size - 1)).astype(np.uint16)
    src = BestFitRows(tokens, starts, small_cfg.seq_len, rows=4, seed=1, block_docs=300)
    val = packed_eval_batches(tokens[-3000:], starts[starts >= len(tokens) - 3000] - (len(tokens) - 3000),
                              small_cfg.seq_len, 4, 256)
    t = TrainConfig(batch_tokens=256, device_batch=4, checkpoint_every=0, eval_every=3, dtype="float32",
                    warmup_frac=0.2, warmdown_frac=0.4)
    torch.manual_seed(0)
    ref = train(GPT(small_cfg), t, "pretrain", tmp_path / "a", src, val, torch.device("cpu"), torch.float32,
                total_steps=8)
    torch.manual_seed(0)
    with pytest.raises(ExocortexError, match="resume"):
        train(GPT(small_cfg), t, "pretrain", tmp_path / "b", Interrupting(src, at=2 * 5), val,
              torch.device("cpu"), torch.float32, total_steps=8)
    fresh = BestFitRows(tokens, starts, small_cfg.seq_len, rows=4, seed=1, block_docs=300)  # a new process
    torch.manual_seed(123)
    res = train(GPT(small_cfg), t, "pretrain", tmp_path / "b", fresh, val, torch.device("cpu"), torch.float32,
                total_steps=8, resume=True)
    assert [h["loss"] for h in ref.history] == pytest.approx([h["loss"] for h in res.history], rel=1e-6, abs=1e-6)
