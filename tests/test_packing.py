"""Sequence packing (effjax.data.packing): invariants, the FFD rule, training rows, bad input."""

import itertools

import numpy as np
import pytest

from effjax import data


def random_sequences(rng, count, max_len):
  return [rng.integers(1, 1000, size=rng.integers(1, max_len + 1)).astype(np.int32)
          for _ in range(count)]


@pytest.mark.parametrize("layout", [data.pack, data.pad])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_token_is_lost_or_duplicated_and_boundaries_hold(layout, seed):
  rng = np.random.default_rng(seed)
  sequences = random_sequences(rng, 40, 23)
  packed = layout(sequences, row_len=23, pad_id=-1)
  # Every sequence reads back exactly; the slots no sequence uses are padding.
  for seq, back, positions in zip(sequences, packed.unpack(packed.tokens),
                                  packed.unpack(packed.positions)):
    assert np.array_equal(seq, back)
    assert np.array_equal(positions, np.arange(len(seq)))
  assert sum(map(len, sequences)) == np.sum(packed.segment_ids > 0) == np.sum(packed.tokens >= 0)
  assert np.all(packed.tokens[packed.segment_ids == 0] == -1)
  # A row's segments are 1, 2, ... contiguous, in order, and the loss mask stops at every border.
  for row, mask in zip(packed.segment_ids, packed.loss_mask()):
    ids = row[row > 0]
    assert np.all(np.diff(ids) >= 0) and np.array_equal(np.unique(ids), np.arange(1, ids.max() + 1))
    assert np.array_equal(mask, (row[:-1] > 0) & (row[:-1] == row[1:]))
  assert packed.loss_mask().sum() == sum(len(s) - 1 for s in sequences)
  if layout is data.pad:
    assert packed.num_rows == len(sequences)


def test_first_fit_decreasing_places_longest_first_into_the_first_row_with_room():
  packed = data.pack([[1] * 3, [2] * 6, [3] * 2, [4] * 5, [5] * 4], row_len=8)
  # Longest first: 6 -> row 0, 5 -> row 1, 4 -> row 2, 3 -> row 1, 2 -> row 0; in input order.
  assert packed.tokens.tolist() == [[2] * 6 + [3] * 2, [1] * 3 + [4] * 5, [5] * 4 + [0] * 4]
  assert packed.placements.tolist() == [[1, 0, 3], [0, 0, 6], [0, 6, 2], [1, 3, 5], [2, 0, 4]]


@pytest.mark.parametrize("seed", range(5))
def test_no_two_packed_rows_would_fit_in_one(seed):
  # FFD's invariant: a later row's longest sequence would have fit in an earlier row then.
  packed = data.pack(random_sequences(np.random.default_rng(seed), 60, 31), row_len=32)
  fill = np.sum(packed.segment_ids > 0, axis=1)
  assert all(a + b > 32 for a, b in itertools.combinations(fill, 2))
  assert packed.non_padding_fraction > data.pad(
      random_sequences(np.random.default_rng(seed), 60, 31), 32).non_padding_fraction


def test_fixed_row_count_pads_with_empty_rows():
  packed = data.pack([[1, 2], [3]], row_len=4, num_rows=3)
  assert packed.tokens.shape == (3, 4) and not packed.segment_ids[1:].any()
  with pytest.raises(ValueError, match="num_rows is 1; expected None or an int >= 2"):
    data.pad([[1, 2], [3]], row_len=4, num_rows=1)


def test_split_long_cuts_in_order_and_drops_short_remainders():
  pieces = data.split_long([np.arange(10), np.arange(3)], max_len=4, min_len=2)
  assert [p.tolist() for p in pieces] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2]]
  assert [len(p) for p in data.split_long([np.arange(9)], 4, min_len=2)] == [4, 4]
  assert [len(p) for p in data.split_long([np.arange(9)], 4)] == [4, 4, 1]


def test_packed_rows_serve_resumable_batches_of_whole_documents():
  rng = np.random.default_rng(0)
  docs = random_sequences(rng, 30, 50)
  rows = data.PackedRows(docs, seq_len=15)
  batch = rows.batch(step=3, batch_size=4, seed=7)
  assert batch["tokens"].shape == batch["segment_ids"].shape == (4, 16)
  assert np.array_equal(batch["tokens"], data.PackedRows(docs, 15).batch(3, 4, seed=7)["tokens"])
  # Every prediction the mask allows is a true next token of some document piece.
  pieces = data.split_long(docs, 16, min_len=2)
  pairs = {(a, b) for p in pieces for a, b in zip(p[:-1], p[1:])}
  packed = rows.packed
  mask = packed.loss_mask()
  assert mask.sum() == sum(len(p) - 1 for p in pieces)
  assert all((a, b) in pairs for a, b in zip(packed.tokens[:, :-1][mask], packed.tokens[:, 1:][mask]))
  # An epoch visits every row once.
  starts = np.concatenate([rows.batch(s, 1, seed=0)["tokens"] for s in range(rows.num_rows)])
  assert sorted(map(tuple, starts.tolist())) == sorted(map(tuple, packed.tokens.tolist()))


@pytest.mark.parametrize("call, message", [
    (lambda: data.pack([[1, 2, 3], [1] * 5], row_len=4),
     r"sequences\[1\] has 5 tokens; expected at most row_len=4"),
    (lambda: data.pack([], row_len=4), "sequences is empty"),
    (lambda: data.pack([[1], []], row_len=4), r"sequences\[1\] has shape \(0,\)"),
    (lambda: data.pack([[0.5]], row_len=4), r"sequences\[0\] has shape \(1,\) and dtype float64"),
    (lambda: data.pack([[1]], row_len=0), "row_len is 0; expected a positive int"),
    (lambda: data.split_long([[1]], max_len=0), "max_len is 0"),
    (lambda: data.split_long([[1]], max_len=2, min_len=3), r"min_len is 3; expected an int in \[1"),
    (lambda: data.PackedRows([[1, 2]], seq_len=0), "seq_len is 0"),
    (lambda: data.PackedRows([[1, 2]], seq_len=4).batch(0, 2, 0),
     r"batch_size is 2; expected an int in \[1, num_rows = 1\]"),
    (lambda: data.pack([[1]], 4).unpack(np.zeros((2, 4))),
     r"values has shape \(2, 4\); expected leading dims \(1, 4\)"),
])
def test_bad_input_is_a_clear_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()
