"""Seeded offline generators of the synthetic long-range tasks long-convolution papers use.

Every task is a batch of token sequences with per-position targets (``-1`` where there is no
target), so one next-token-style loss trains them all: ``tokens`` int32 ``[n, length]``,
``targets`` int32 ``[n, length]``. Token 0 is padding. Same seed, same data.

* :func:`associative_recall` (H3 / Hyena / safari ``synthetics.py``): key-value pairs, then a
  query key; the target at the last position is its value.
* :func:`selective_copying` (Mamba; Jing et al.): data tokens scattered among noise tokens, then
  one marker per data token; the targets at the markers are the data tokens in order.
* :func:`listops` (LRA, Nangia & Bowman 2018, rules of ``lra_benchmarks/data/listops.py``):
  nested ``[MAX 2 9 [MIN 4 7 ] 0 ]``-style expressions over MIN, MAX, MED (median, rounded
  down) and SM (sum mod 10); the target at the last position is the value, a digit.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticData:
  """``tokens`` and ``targets`` ``[n, length]`` int32 (targets -1 where none); ``vocab_size``."""
  tokens: np.ndarray
  targets: np.ndarray
  vocab_size: int


def associative_recall(n: int, length: int, vocab_size: int = 20, *, seed: int = 0
                       ) -> SyntheticData:
  """``k1 v1 k2 v2 ... q``: keys from tokens ``[1, vocab/2)``, values from ``[vocab/2, vocab)``,
  each key distinct within a sequence; ``q`` is one of the keys and the last target its value.

  ``length`` must be odd (pairs plus the query) and leave at most ``vocab/2 - 1`` pairs.
  """
  pairs, half = (length - 1) // 2, vocab_size // 2
  if length % 2 == 0 or not 1 <= pairs <= half - 1:
    raise ValueError(f"length must be odd with 1 <= (length - 1) / 2 <= vocab_size / 2 - 1 = "
                     f"{half - 1}, got length={length}, vocab_size={vocab_size}")
  rng = np.random.default_rng(seed)
  keys = np.argsort(rng.random((n, half - 1)), axis=1)[:, :pairs] + 1
  values = rng.integers(half, vocab_size, (n, pairs))
  tokens = np.zeros((n, length), np.int32)
  tokens[:, 0:-1:2], tokens[:, 1:-1:2] = keys, values
  query = rng.integers(0, pairs, n)
  tokens[:, -1] = keys[np.arange(n), query]
  targets = np.full((n, length), -1, np.int32)
  targets[:, -1] = values[np.arange(n), query]
  return SyntheticData(tokens, targets, vocab_size)


def selective_copying(n: int, length: int, num_data: int = 16, vocab_size: int = 16, *,
                      seed: int = 0) -> SyntheticData:
  """``length`` positions of noise (token 1) holding ``num_data`` data tokens (``[3, vocab)``)
  at random places, then ``num_data`` markers (token 2): sequences of ``length + num_data``."""
  if not 1 <= num_data <= length or vocab_size < 4:
    raise ValueError(f"need 1 <= num_data <= length and vocab_size >= 4, got num_data="
                     f"{num_data}, length={length}, vocab_size={vocab_size}")
  rng = np.random.default_rng(seed)
  data = rng.integers(3, vocab_size, (n, num_data))
  places = np.sort(np.argsort(rng.random((n, length)), axis=1)[:, :num_data], axis=1)
  tokens = np.ones((n, length + num_data), np.int32)
  np.put_along_axis(tokens, places, data, axis=1)
  tokens[:, length:] = 2
  targets = np.full(tokens.shape, -1, np.int32)
  targets[:, length:] = data
  return SyntheticData(tokens, targets, vocab_size)


LISTOPS_OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
# Tokens: 0 pad, 1..10 the digits 0..9, 11..14 the operators, 15 the closing bracket.
LISTOPS_VOCAB = ("<pad>", *map(str, range(10)), *LISTOPS_OPERATORS, "]")


def _listops_value(operator: str, args: list[int]) -> int:
  if operator == "[MIN":
    return min(args)
  if operator == "[MAX":
    return max(args)
  if operator == "[MED":
    return int(np.median(args))
  return sum(args) % 10


def _listops_tree(rng: np.random.Generator, depth: int, max_depth: int, max_args: int,
                  out: list[int]) -> int:
  """Appends one expression's tokens to ``out``; returns its value."""
  if depth >= max_depth or (depth > 0 and rng.random() < 0.25):
    digit = int(rng.integers(0, 10))
    out.append(digit + 1)
    return digit
  operator = LISTOPS_OPERATORS[int(rng.integers(0, 4))]
  out.append(LISTOPS_VOCAB.index(operator))
  args = [_listops_tree(rng, depth + 1, max_depth, max_args, out)
          for _ in range(int(rng.integers(2, max_args + 1)))]
  out.append(LISTOPS_VOCAB.index("]"))
  return _listops_value(operator, args)


def listops(n: int, length: int, *, max_depth: int = 6, max_args: int = 5, min_length: int = 0,
            seed: int = 0) -> SyntheticData:
  """``n`` expressions of at most ``length - 1`` tokens (at least ``min_length``), left-padded
  with 0 to ``length - 1``, then a final 0 whose target is the value (a digit token ``1..10``).

  Rejection sampling as LRA (expressions outside the length range are drawn again)."""
  if length < 4:
    raise ValueError(f"length must be >= 4, got {length}")
  rng = np.random.default_rng(seed)
  tokens = np.zeros((n, length), np.int32)
  targets = np.full((n, length), -1, np.int32)
  for row in range(n):
    while True:
      expression: list[int] = []
      value = _listops_tree(rng, 0, max_depth, max_args, expression)
      if min_length <= len(expression) <= length - 1:
        break
    tokens[row, length - 1 - len(expression):length - 1] = expression
    targets[row, -1] = value + 1
  return SyntheticData(tokens, targets, len(LISTOPS_VOCAB))


def evaluate_listops(tokens: list[int] | np.ndarray) -> int:
  """The value of one tokenized expression (padding ignored): an independent check."""
  stack: list[list] = []
  for token in (int(t) for t in tokens if t != 0):
    word = LISTOPS_VOCAB[token]
    if word in LISTOPS_OPERATORS:
      stack.append([word])
    elif word == "]":
      operator, *args = stack.pop()
      value = _listops_value(operator, args)
      if not stack:
        return value
      stack[-1].append(value)
    elif stack:
      stack[-1].append(int(word))
    else:
      return int(word)
  raise ValueError("unbalanced expression")


TASKS = {"associative_recall": associative_recall, "selective_copying": selective_copying,
         "listops": listops}
