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

import functools
import math
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from effjax.ops.attention import xla
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


class Call(NamedTuple):
  """One ``flash_attention`` call of a step: rows of the queries and keys, and its mask."""
  q_rows: slice
  kv_rows: slice
  causal: bool = False
  window: tuple[int, int] | None = None


EVERYTHING = slice(None)


def _band_call(length: int, lo_hi: Band) -> Call | None:
  """The band ``lo <= b - a <= hi`` as one windowed call on a slice (bottom-right aligned)."""
  if lo_hi is None:
    return None
  lo, hi = lo_hi
  if lo > 0:  # strictly above the diagonal: queries [0, length - lo) see keys from a + lo
    return Call(slice(0, length - lo), EVERYTHING, window=(0, hi - lo))
  if hi < 0:  # strictly below: keys [0, length + hi) seen up to a + hi
    return Call(EVERYTHING, slice(0, length + hi), window=(hi - lo, 0))
  return Call(EVERYTHING, EVERYTHING, window=(-lo, hi))


def step_calls(options: StepOptions, me: Int[Array, ""], step: int | Int[Array, ""],
               length: int) -> tuple[Int[Array, ""] | int, tuple[Call | None, ...]]:
  """``(which, calls)``: the step runs ``calls[which]`` (None: nothing); see the module table.

  ``step`` must be a Python int when ``options.window`` is set.
  """
  if options.window is not None:
    here, wrapped = step_bands(options, length, step)
    if step == 0:
      return 0, (_band_call(length, here),)
    return jnp.where(me >= step, 0, 1), (_band_call(length, here), _band_call(length, wrapped))
  if not options.causal:
    return 0, (Call(EVERYTHING, EVERYTHING),)
  which = relation(me, (me - step) % options.num_devices)
  diagonal, half = Call(EVERYTHING, EVERYTHING, causal=True), length // 2
  if options.layout == "contiguous":
    return which, (diagonal, Call(EVERYTHING, EVERYTHING), None)
  if options.layout == "zigzag":
    return which, (diagonal, Call(EVERYTHING, slice(0, half)), Call(slice(half, length),
                                                                      EVERYTHING))
  # striped: after the diagonal, key b is seen by queries a > b only
  shifted = Call(EVERYTHING, slice(0, length - 1), causal=True) if length > 1 else None
  return which, (diagonal, diagonal, shifted)


def _select(which, branches, *operands):
  """``branches[which](*operands)``; a single branch is called directly, without a switch."""
  return branches[0](*operands) if len(branches) == 1 else lax.switch(which, branches, *operands)


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

  Returns the block's output (q's dtype) and LSE (float32), normalized within the block; queries
  that see none of the block's keys get output 0 and LSE -inf, so :func:`merge` ignores them.
  """
  length = q.shape[1]

  def run(call: Call | None):
    if call is None:
      return nothing_seen(q, v, q.dtype)
    out, lse = flash_attention(
        q[:, call.q_rows], k[:, call.kv_rows], v[:, call.kv_rows], causal=call.causal,
        window=call.window, softcap=options.softcap, scale=options.scale, return_lse=True,
        implementation=options.implementation,
        **_segments(call, q_segment_ids, kv_segment_ids))
    return _pad(out, call.q_rows, length, 1), _pad(lse, call.q_rows, length, 2, -jnp.inf)

  which, calls = step_calls(options, me, step, length)
  return _select(which, [functools.partial(run, call) for call in calls])


def nothing_seen(q: Float[Array, "batch c heads head_dim"],
                 v: Float[Array, "batch c kv_heads v_head_dim"], dtype: Any
                 ) -> tuple[Float[Array, "batch c heads v_head_dim"], Float[Array, "batch heads c"]]:
  """The partial result of queries that saw no key: output 0 (``dtype``), LSE -inf."""
  return (jnp.zeros((*q.shape[:3], v.shape[3]), dtype),
          jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf, jnp.float32))


def step_gradients(
    options: StepOptions,
    me: Int[Array, ""],
    step: int | Int[Array, ""],
    q: Float[Array, "batch c heads head_dim"],
    k: Float[Array, "batch c kv_heads head_dim"],
    v: Float[Array, "batch c kv_heads v_head_dim"],
    q_segment_ids: Int[Array, "batch c"] | None,
    kv_segment_ids: Int[Array, "batch c"] | None,
    lse: Float[Array, "batch heads c"],
    d_out: Float[Array, "batch c heads v_head_dim"],
    delta: Float[Array, "batch heads c"],
    grads: tuple[Array, Array, Array],
) -> tuple[Array, Array, Array]:
  """Adds this step's share of the gradient to the float32 accumulators ``grads = (dq, dk, dv)``.

  The same calls as :func:`step_attention`, each through FlashAttention-2's backward
  (``effjax.ops.attention.xla.attention_backward``) with the full attention's LSE and
  ``delta = rowsum(d_out * out) - d_lse``, so no forward is recomputed and no per-block
  statistics are kept. Each call's gradients are added into the rows it covers, in place.
  """
  def run(call: Call | None, grads):
    if call is None:
      return grads
    rows, keys = call.q_rows, call.kv_rows
    parts = xla.attention_backward(
        q[:, rows], k[:, keys], v[:, keys], lse[:, :, rows], d_out[:, rows], delta[:, :, rows],
        causal=call.causal, window=call.window, softcap=options.softcap, scale=options.scale,
        **_segments(call, q_segment_ids, kv_segment_ids))
    return tuple(total.at[:, where].add(part.astype(jnp.float32))
                 for total, part, where in zip(grads, parts, (rows, keys, keys)))

  which, calls = step_calls(options, me, step, q.shape[1])
  return _select(which, [functools.partial(run, call) for call in calls], grads)


def _segments(call: Call, q_segment_ids, kv_segment_ids) -> dict[str, Array]:
  if q_segment_ids is None:
    return {}
  return dict(q_segment_ids=q_segment_ids[:, call.q_rows],
              kv_segment_ids=kv_segment_ids[:, call.kv_rows])


def _pad(x: Array, rows: slice, length: int, axis: int, value: float = 0.0) -> Array:
  """Places ``x``'s rows ``rows`` (along ``axis``) among ``length``; the others get ``value``."""
  start, stop, _ = rows.indices(length)
  if (start, stop) == (0, length):
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (start, length - stop)
  return jnp.pad(x, pad, constant_values=value)


def merge(out_a: Float[Array, "batch c heads dv"], lse_a: Float[Array, "batch heads c"],
          out_b: Float[Array, "batch c heads dv"], lse_b: Float[Array, "batch heads c"]
          ) -> tuple[Float[Array, "batch c heads dv"], Float[Array, "batch heads c"]]:
  """Combines two normalized partial attentions over disjoint key sets by log-sum-exp.

  ``out = w_a out_a + w_b out_b`` with ``w = exp(lse - lse_total)``; float32. Rows that saw no key
  in either part keep output 0 and LSE -inf, with finite gradients.
  """
  lse = _logaddexp(lse_a, lse_b)
  out = (out_a * _rows(_block_weight(lse_a, lse)) + out_b * _rows(_block_weight(lse_b, lse)))
  return out, lse


def _logaddexp(a: Array, b: Array) -> Array:
  """``log(exp(a) + exp(b))`` whose gradient stays finite (0) where both are -inf."""
  shift = lax.stop_gradient(jnp.maximum(a, b))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  total = jnp.exp(a - shift) + jnp.exp(b - shift)
  seen = total > 0
  return jnp.where(seen, shift + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)


def _block_weight(lse_block: Float[Array, "batch heads c"],
                  lse_total: Float[Array, "batch heads c"]) -> Float[Array, "batch heads c"]:
  """``exp(lse_block - lse_total)``: the share of a block in the total; 0 where it saw nothing."""
  seen = lse_block > -jnp.inf
  return jnp.where(seen, jnp.exp(jnp.where(seen, lse_block - lse_total, 0.0)), 0.0)


def _rows(weight: Float[Array, "batch heads c"]) -> Float[Array, "batch c heads 1"]:
  return jnp.swapaxes(weight, 1, 2)[..., None]
