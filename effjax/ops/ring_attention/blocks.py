"""One ring step: the local queries against one device's K/V block, and merging the partials.

At step ``s`` device ``i`` holds the K/V block of device ``j = (i - s) mod n``. Which (query, key)
pairs of the two blocks interact depends on the layout and the mask, and in every case reduces to
plain ``flash_attention`` calls on slices of the blocks, so each step runs whatever implementation
the platform picks, with its own block skipping.

Causal, no window (the relation of ``j`` to ``i`` is known only at run time; ``lax.switch``):

============  ===================  =========================  ================================
layout        ``j == i``           ``j < i``                  ``j > i``
============  ===================  =========================  ================================
contiguous    causal               full                       nothing (the step is skipped)
zigzag        causal               all queries x first half   second half of queries x all
striped       causal               causal                     causal, keys shifted by one
============  ===================  =========================  ================================

Zigzag's off-diagonal steps are half a block each and striped's are triangles, so every device
does the same work at every step; contiguous skips the steps above the diagonal, which leaves
devices idle for different numbers of steps. Without ``causal`` every step is one full call.

Sliding window (contiguous and striped layouts): the global distance between query ``a`` of
device ``i`` and key ``b`` of device ``j`` depends only on ``b - a`` and on ``t = i - j``, which is
``s`` or ``s - n``: for a static step, two bands ``lo <= b - a <= hi`` on the block, each one
``flash_attention`` call with a window on a slice of the queries or keys (:func:`band`). Steps
whose bands are empty for every device are not run at all, so a window ends the ring early.

Segment ids (packed documents, possibly crossing device borders) are sliced with their blocks.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from effjax.ops.attention.api import flash_attention

# Relation of the K/V block's owner j to the queries' owner i.
DIAGONAL, BEFORE, AFTER = 0, 1, 2

Band = tuple[int, int] | None  # lo <= b - a <= hi on a block, or None: nothing visible


class StepOptions(NamedTuple):
  """The static part of a step: layout, masking and what is passed on to ``flash_attention``."""
  layout: str
  num_devices: int
  causal: bool
  window: tuple[int | None, int | None] | None
  softcap: float | None
  scale: float
  implementation: Any


def relation(i: Int[Array, ""], j: Int[Array, ""]) -> Int[Array, ""]:
  """``DIAGONAL``, ``BEFORE`` or ``AFTER``: where the K/V owner ``j`` stands relative to ``i``."""
  return jnp.where(j == i, DIAGONAL, jnp.where(j < i, BEFORE, AFTER))


def band(options: StepOptions, block: int, shift: int) -> Band:
  """The keys ``b`` a query ``a`` sees in a block whose owner is ``shift = i - j`` devices before.

  Returns ``(lo, hi)`` with ``lo <= b - a <= hi`` clipped to the block, or None when no pair of
  the two blocks is within the window.
  """
  left, right = options.window
  right = 0 if options.causal else right
  n = options.num_devices
  if options.layout == "contiguous":  # global distance: a - b + shift * block
    lo = None if left is None else shift * block - left
    hi = None if right is None else shift * block + right
  else:  # striped: (a - b) * n + shift
    lo = None if left is None else math.ceil((shift - left) / n)
    hi = None if right is None else math.floor((shift + right) / n)
  lo = -(block - 1) if lo is None else max(lo, -(block - 1))
  hi = block - 1 if hi is None else min(hi, block - 1)
  return (lo, hi) if lo <= hi else None


def step_bands(options: StepOptions, block: int, step: int) -> tuple[Band, Band]:
  """The bands of step ``step`` on devices ``i >= step`` (shift ``step``) and ``i < step``."""
  return band(options, block, step), band(options, block, step - options.num_devices)


def window_steps(options: StepOptions, block: int) -> int:
  """How many ring steps a window needs: one past the last step with a non-empty band."""
  return 1 + max(step for step in range(options.num_devices)
                 if step_bands(options, block, step) != (None, None))


def step_attention(
    options: StepOptions,
    me: Int[Array, ""],
    step: int | Int[Array, ""],
    q: Float[Array, "batch c heads head_dim"],
    k: Float[Array, "batch c kv_heads head_dim"],
    v: Float[Array, "batch c kv_heads v_head_dim"],
    q_segment_ids: Int[Array, "batch c"] | None,
    kv_segment_ids: Int[Array, "batch c"] | None,
) -> tuple[Float[Array, "batch c heads v_head_dim"], Float[Array, "batch heads c"]]:
  """Attention of device ``me``'s queries to the K/V block it holds at ``step``.

  ``step`` must be a Python int when ``options.window`` is set. Returns the block's output (q's
  dtype) and LSE (float32), normalized within the block; queries that see none of the block's
  keys get output 0 and LSE -inf, so :func:`merge` ignores them.
  """
  length = q.shape[1]
  empty = lambda: _place(None, None, slice(0, 0), length, like=(q, v))

  def attend(q_rows: slice, kv_rows: slice, causal: bool, window=None):
    segments = {} if q_segment_ids is None else dict(
        q_segment_ids=q_segment_ids[:, q_rows], kv_segment_ids=kv_segment_ids[:, kv_rows])
    out, lse = flash_attention(
        q[:, q_rows], k[:, kv_rows], v[:, kv_rows], causal=causal, window=window,
        softcap=options.softcap, scale=options.scale, return_lse=True,
        implementation=options.implementation, **segments)
    return _place(out, lse, q_rows, length)

  def banded(lo_hi: Band):
    """The band ``lo <= b - a <= hi`` as one windowed call on a slice (bottom-right aligned)."""
    if lo_hi is None:
      return empty
    lo, hi = lo_hi
    if lo > 0:  # strictly above the diagonal: queries [0, length - lo) see keys from a + lo
      return lambda: attend(slice(0, length - lo), everything, False, (0, hi - lo))
    if hi < 0:  # strictly below: keys [0, length + hi) seen up to a + hi
      return lambda: attend(everything, slice(0, length + hi), False, (hi - lo, 0))
    return lambda: attend(everything, everything, False, (-lo, hi))

  everything = slice(None)
  if options.window is not None:
    here, wrapped = step_bands(options, length, step)
    if step == 0:
      return banded(here)()
    return lax.cond(me >= step, banded(here), banded(wrapped))
  if not options.causal:
    return attend(everything, everything, False)
  where = relation(me, (me - step) % options.num_devices)
  half = length // 2
  diagonal = lambda: attend(everything, everything, True)
  if options.layout == "contiguous":
    branches = (diagonal, lambda: attend(everything, everything, False), empty)
  elif options.layout == "zigzag":
    branches = (diagonal, lambda: attend(everything, slice(0, half), False),
                lambda: attend(slice(half, length), everything, False))
  else:  # striped: after the diagonal, key b is seen by queries a > b only
    shifted = (lambda: attend(everything, slice(0, length - 1), True)) if length > 1 else empty
    branches = (diagonal, diagonal, shifted)
  return lax.switch(where, branches)


def _place(out, lse, rows: slice, length: int, like: tuple[Array, Array] | None = None):
  """Places the rows ``rows`` of a partial result among ``length`` rows; the others see nothing."""
  if out is None:
    q, v = like
    return (jnp.zeros((*q.shape[:3], v.shape[3]), q.dtype),
            jnp.full((q.shape[0], q.shape[2], length), -jnp.inf, jnp.float32))
  start, stop, _ = rows.indices(length)
  if (start, stop) == (0, length):
    return out, lse
  pad = ((0, 0), (start, length - stop), (0, 0), (0, 0))
  return (jnp.pad(out, pad),
          jnp.pad(lse, pad[:1] + pad[2:3] + pad[1:2], constant_values=-jnp.inf))


def merge(out_a: Float[Array, "batch c heads dv"], lse_a: Float[Array, "batch heads c"],
          out_b: Float[Array, "batch c heads dv"], lse_b: Float[Array, "batch heads c"]
          ) -> tuple[Float[Array, "batch c heads dv"], Float[Array, "batch heads c"]]:
  """Combines two normalized partial attentions over disjoint key sets by log-sum-exp.

  ``out = w_a out_a + w_b out_b`` with ``w = exp(lse - lse_total)``; float32. Rows that saw no key
  in either part keep output 0 and LSE -inf, with finite gradients.
  """
  lse = _logaddexp(lse_a, lse_b)
  out = (out_a * _rows(block_weight(lse_a, lse)) + out_b * _rows(block_weight(lse_b, lse)))
  return out, lse


def _logaddexp(a: Array, b: Array) -> Array:
  """``log(exp(a) + exp(b))`` whose gradient stays finite (0) where both are -inf."""
  shift = lax.stop_gradient(jnp.maximum(a, b))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  total = jnp.exp(a - shift) + jnp.exp(b - shift)
  seen = total > 0
  return jnp.where(seen, shift + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)


def block_weight(lse_block: Float[Array, "batch heads c"], lse_total: Float[Array, "batch heads c"]
                 ) -> Float[Array, "batch heads c"]:
  """``exp(lse_block - lse_total)``: the share of a block in the total; 0 where it saw nothing."""
  seen = lse_block > -jnp.inf
  return jnp.where(seen, jnp.exp(jnp.where(seen, lse_block - lse_total, 0.0)), 0.0)


def _rows(weight: Float[Array, "batch heads c"]) -> Float[Array, "batch c heads 1"]:
  return jnp.swapaxes(weight, 1, 2)[..., None]


def row_dot(a: Float[Array, "batch c heads dv"], b: Float[Array, "batch c heads dv"]
            ) -> Float[Array, "batch heads c"]:
  """Per-row inner product in float32, laid out like an LSE."""
  return jnp.swapaxes(jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), -1), 1, 2)
