"""Sequence layouts for ring attention: which tokens each of ``n`` devices holds.

A global sequence of length ``S`` sharded over ``n`` devices gives device ``d`` the ``d``-th
contiguous slice of the LAID-OUT sequence. The layout chooses the permutation applied before that
split, so that causal attention costs every device the same (LightSeq's and Striped Attention's
load balancing):

* ``"contiguous"``: device ``d`` holds tokens ``[d * S/n, (d + 1) * S/n)``. Under a causal mask the
  last device computes ``n`` blocks of the ring and the first one: ``2n - 1`` times the least
  loaded device's work when counted in half-blocks.
* ``"zigzag"``: the sequence is cut into ``2n`` chunks; device ``d`` holds chunks ``d`` and
  ``2n - 1 - d`` (an early and a late one), so every device does the same causal work.
* ``"striped"``: device ``d`` holds tokens ``d, d + n, d + 2n, ...`` (token ``t`` on device
  ``t mod n``).

Models permute the inputs once (token ids, positions for RoPE, segment ids, labels) with
:func:`to_layout`, run every layer on the laid-out sequence (only attention cares about order, and
it is told the layout), and permute back with :func:`from_layout` where order matters again. The
loss is a mean over tokens, so labels permuted like the inputs need no inverse.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
from jaxtyping import Array

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout: str, seq_len: int, num_devices: int, *, name: str = "layout") -> None:
  """Raises ValueError unless ``seq_len`` tokens can be laid out over ``num_devices`` this way."""
  if layout not in LAYOUTS:
    raise ValueError(f"{name} must be one of {LAYOUTS}, got {layout!r}")
  if not isinstance(num_devices, int) or num_devices < 1:
    raise ValueError(f"num_devices must be a positive int, got {num_devices!r}")
  chunks = 2 * num_devices if layout == "zigzag" else num_devices
  if seq_len % chunks:
    raise ValueError(
        f"sequence length {seq_len} must be divisible by {chunks} for layout {layout!r} over "
        f"{num_devices} devices" + (" (2 chunks per device)" if layout == "zigzag" else ""))


def permutation(seq_len: int, num_devices: int, layout: str) -> np.ndarray:
  """``perm`` such that ``x_laid_out = x[perm]``: the global position of each laid-out token.

  These are also the positions a model needs for RoPE on the laid-out sequence.
  """
  check_layout(layout, seq_len, num_devices)
  positions = np.arange(seq_len)
  if layout == "contiguous":
    return positions
  if layout == "striped":
    return positions.reshape(-1, num_devices).T.reshape(-1)
  chunks = positions.reshape(2 * num_devices, -1)
  order = np.stack([np.arange(num_devices), 2 * num_devices - 1 - np.arange(num_devices)], 1)
  return chunks[order.reshape(-1)].reshape(-1)


def positions(seq_len: int, num_devices: int, layout: str) -> Array:
  """Global positions ``[seq_len]`` (int32) of the laid-out tokens, for RoPE and masks."""
  return jnp.asarray(permutation(seq_len, num_devices, layout), jnp.int32)


def to_layout(x: Array, num_devices: int, layout: str, *, axis: int = 1) -> Array:
  """Permutes the sequence axis (default 1: ``[batch, seq, ...]``) into ``layout``."""
  return jnp.take(x, positions(x.shape[axis], num_devices, layout), axis=axis)


def from_layout(x: Array, num_devices: int, layout: str, *, axis: int = 1) -> Array:
  """Inverse of :func:`to_layout`: back to the natural token order."""
  inverse = np.argsort(permutation(x.shape[axis], num_devices, layout))
  return jnp.take(x, jnp.asarray(inverse, jnp.int32), axis=axis)
