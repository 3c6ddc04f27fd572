"""One ring step: the local queries against one device's K/V block, and merging the partials.

Under a causal mask, which (query, key) pairs of device ``i``'s queries and device ``j``'s keys
interact depends only on the layout and on whether ``j`` is ``i``, before it or after it, and in
every case reduces to a plain ``flash_attention`` call on slices of the blocks (so each step runs
whatever implementation the platform picks, with its block skipping):

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
Segment ids (packed documents, possibly crossing device borders) are sliced with their blocks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from effjax.ops.attention.api import flash_attention

# Relation of the K/V block's owner j to the queries' owner i.
DIAGONAL, BEFORE, AFTER = 0, 1, 2


class StepOptions(NamedTuple):
  """The static part of a step: layout, masking and what is passed on to ``flash_attention``."""
  layout: str
  causal: bool
  softcap: float | None
  scale: float
  implementation: Any


def relation(i: Int[Array, ""], j: Int[Array, ""]) -> Int[Array, ""]:
  """``DIAGONAL``, ``BEFORE`` or ``AFTER``: where the K/V owner ``j`` stands relative to ``i``."""
  return jnp.where(j == i, DIAGONAL, jnp.where(j < i, BEFORE, AFTER))


def step_attention(
    options: StepOptions,
    where: Int[Array, ""],
    q: Float[Array, "batch c heads head_dim"],
    k: Float[Array, "batch c kv_heads head_dim"],
    v: Float[Array, "batch c kv_heads v_head_dim"],
    q_segment_ids: Int[Array, "batch c"] | None,
    kv_segment_ids: Int[Array, "batch c"] | None,
) -> tuple[Float[Array, "batch c heads v_head_dim"], Float[Array, "batch heads c"]]:
  """Attention of the local queries to one K/V block, normalized within the block.

  Returns the block's output (q's dtype) and LSE (float32); queries that see none of the block's
  keys get output 0 and LSE -inf, so :func:`merge` ignores them.
  """

  def attend(q_rows: slice, kv_rows: slice, causal: bool):
    segments = {} if q_segment_ids is None else dict(
        q_segment_ids=q_segment_ids[:, q_rows], kv_segment_ids=kv_segment_ids[:, kv_rows])
    out, lse = flash_attention(
        q[:, q_rows], k[:, kv_rows], v[:, kv_rows], causal=causal, softcap=options.softcap,
        scale=options.scale, return_lse=True, implementation=options.implementation, **segments)
    return _pad_rows(out, lse, q_rows, q.shape[1])

  everything = slice(None)
  if not options.causal:
    return attend(everything, everything, False)
  length, half = q.shape[1], q.shape[1] // 2
  diagonal = lambda: attend(everything, everything, True)
  if options.layout == "contiguous":
    branches = (diagonal, lambda: attend(everything, everything, False),
                lambda: _pad_rows(None, None, slice(0, 0), length, like=(q, v)))
  elif options.layout == "zigzag":
    branches = (diagonal, lambda: attend(everything, slice(0, half), False),
                lambda: attend(slice(half, length), everything, False))
  else:  # striped: after the diagonal, key b is seen by queries a > b only
    shifted = (lambda: attend(everything, slice(0, length - 1), True)) if length > 1 else (
        lambda: _pad_rows(None, None, slice(0, 0), length, like=(q, v)))
    branches = (diagonal, diagonal, shifted)
  return lax.switch(where, branches)


def _pad_rows(out, lse, rows: slice, length: int, like: tuple[Array, Array] | None = None):
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
