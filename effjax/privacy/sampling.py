"""Poisson sampling of DP-SGD batches, in fixed shapes.

The accountants' guarantee assumes every example joins each batch independently with probability
``q`` (Poisson sampling), so batch sizes vary. A jitted step needs one shape: each batch is
padded to ``max_batch_size`` rows with a mask, and a batch that draws more than
``max_batch_size`` examples keeps a uniformly random subset of that many (truncated Poisson
sampling). The truncation changes the mechanism; the PLD accountant accounts for it exactly
(``dp_accounting.TruncatedSubsampledGaussianDpEvent``, arXiv 2508.15089), so a truncated
sampling must be accounted with ``accountant="pld"``. With ``max_batch_size`` a few standard
deviations above the expected size the truncation almost never fires and costs almost nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PoissonSampling:
  """Each of ``dataset_size`` examples joins a batch with probability
  ``expected_batch_size / dataset_size``; batches are padded (or truncated) to ``max_batch_size``
  rows (``None``: not truncated, only for accounting)."""
  dataset_size: int
  expected_batch_size: float
  max_batch_size: int | None = None

  def __post_init__(self):
    if not (isinstance(self.dataset_size, int) and self.dataset_size > 0):
      raise ValueError(f"dataset_size is {self.dataset_size!r}; expected a positive integer")
    if not 0 < self.expected_batch_size <= self.dataset_size:
      raise ValueError(f"expected_batch_size is {self.expected_batch_size}; expected a number in "
                       f"(0, dataset_size = {self.dataset_size}]")
    if self.max_batch_size is not None and not (
        isinstance(self.max_batch_size, int) and self.max_batch_size >= self.expected_batch_size):
      raise ValueError(f"max_batch_size is {self.max_batch_size!r}; expected an integer >= "
                       f"expected_batch_size = {self.expected_batch_size} (or None)")

  @property
  def rate(self) -> float:
    """The probability ``q`` that an example joins a batch."""
    return self.expected_batch_size / self.dataset_size

  def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One batch: example indices ``[max_batch_size]`` (padding rows point at example 0) and the
    mask of real rows ``[max_batch_size]`` (bool)."""
    if self.max_batch_size is None:
      raise ValueError("max_batch_size is None; sampling fixed-shape batches needs one")
    drawn = np.flatnonzero(rng.random(self.dataset_size) < self.rate)
    if drawn.size > self.max_batch_size:
      drawn = np.sort(rng.choice(drawn, self.max_batch_size, replace=False))
    indices = np.zeros(self.max_batch_size, np.int64)
    indices[:drawn.size] = drawn
    return indices, np.arange(self.max_batch_size) < drawn.size
