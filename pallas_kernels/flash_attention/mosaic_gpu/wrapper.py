"""The Mosaic GPU attention wrapper that dispatch registers: checks, the XLA glue around the
kernels (zeroing rows no partner sees, padding, segment-id block ranges) and the ``custom_vjp``.

Padding: lengths to whole 128-row tiles and head dims to multiples of 64, with zeros, only when
not already aligned; per-query statistics (base-2 LSE, ``D``) float32 ``[b, h, q_pad]``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import shapes
from pallas_kernels.flash_attention import masks, pallas_gpu
from pallas_kernels.flash_attention.mosaic_gpu.backward import dkv_kernel, dq_kernel
from pallas_kernels.flash_attention.mosaic_gpu.config import (LOG2E, TILE, BlockSizes, Call,
                                                              default_block_sizes)
from pallas_kernels.flash_attention.mosaic_gpu.forward import forward_kernel
from pallas_kernels.flash_attention.residuals import tag_residuals
from pallas_kernels.interpret import mosaic_gpu_interpret

_LN2 = math.log(2.0)
_HEAD_DIM_MULTIPLE = 64  # 128-byte swizzle of 16-bit rows
_MAX_HEAD_DIM = 256
# Above it, two 64-row tiles of Q and dO (dq) or K and V (dk/dv) and a 2-slot ring overflow the
# 227 KiB of shared memory: the backward is then the Triton kernels of :mod:`..pallas_gpu`.
_MAX_BACKWARD_HEAD_DIM = 128


def attention(q, k, v, *, causal: bool = False, q_segment_ids=None, kv_segment_ids=None,
              window=None, softcap: float | None = None, scale: float, return_lse: bool = False,
              block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """Mosaic GPU forward and backward; arguments as validated by effjax's ``flash_attention``
  (``q [b, q_len, h, d]``, ``k [b, kv_len, kv_h, d]``, ``v [b, kv_len, kv_h, dv]``).

  Args:
    block_sizes: tiles and schedule; default :func:`default_block_sizes`.
    interpret: run in the Mosaic GPU interpreter (CPU); None follows
      ``pallas_kernels.interpret.interpret_mode``.

  Returns:
    The output ``[b, q_len, h, dv]`` in q's dtype, and with ``return_lse`` the float32
    natural-log LSE ``[b, h, q_len]`` (-inf for queries that see no key); differentiable.

  Raises:
    NotImplementedError: not on a Hopper GPU (and not interpreting), float32 inputs or head
      dims above 256 (dispatch then tries the next implementation).
    TypeError: ``block_sizes`` is not a :class:`BlockSizes`.
  """
  interpret = mosaic_gpu_interpret(interpret)
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
    raise NotImplementedError(f"the Mosaic GPU kernel takes bfloat16/float16 q, k, v, got "
                              f"{q.dtype}, {k.dtype}, {v.dtype}")
  if max(q.shape[-1], v.shape[-1]) > _MAX_HEAD_DIM:
    raise NotImplementedError(f"the Mosaic GPU kernel takes head dims up to {_MAX_HEAD_DIM}, "
                              f"got {q.shape[-1]} and {v.shape[-1]}")
  block_sizes = shapes.resolve_block_sizes(
      block_sizes, BlockSizes, lambda: default_block_sizes(max(q.shape[-1], v.shape[-1])))
  call = Call(mask=masks.MaskSpec.create(q.shape[1], k.shape[1], causal=causal, window=window),
              scale=float(scale), softcap=softcap, group=q.shape[2] // k.shape[2],
              segments=q_segment_ids is not None, blocks=block_sizes, interpret=interpret)
  ids = _segment_ids(q_segment_ids, kv_segment_ids)
  out, lse = _attention_jit(call, *_zero_unseen(call.mask, q, k, v, ids), ids)
  return (out, lse) if return_lse else out



def _seen(mask: masks.MaskSpec, side: str) -> tuple[int, int] | None:
  """The static ``[start, stop)`` of the keys (``side="kv"``) or queries (``"q"``) that some
  partner sees, or None when all are."""
  with jax.ensure_compile_time_eval():
    if side == "kv":
      length, (start, stop) = mask.kv_len, mask.kv_range(0, mask.q_len)
    else:
      length, (start, stop) = mask.q_len, mask.q_range(0, mask.kv_len)
    start, stop = int(start), int(stop)
  return None if (start, stop) == (0, length) else (start, max(stop, start))


_SegmentIds = tuple[jax.Array, jax.Array] | None  # (q ids [b, q_len], kv ids [b, kv_len]) int32


def _segment_ids(q_segment_ids, kv_segment_ids) -> _SegmentIds:
  if q_segment_ids is None:
    return None
  return q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)


def _has_partner(ids: jax.Array, other: jax.Array) -> jax.Array:
  """``[b, n]``: whether ``ids[b, i]`` occurs in ``other[b]`` (a sort and a binary search per
  row, no ``[n, m]`` comparison)."""
  def row(ids, other):
    other = jnp.sort(other)
    return other[jnp.clip(jnp.searchsorted(other, ids), 0, other.size - 1)] == ids
  return jax.vmap(row)(ids, other)


def _zero_rows(x, seen: tuple[int, int] | None, partnered: jax.Array | None = None):
  """``x [b, len, h, d]`` with rows outside ``seen`` or not ``partnered [b, len]`` set to zero
  (NaN included)."""
  if seen is None and partnered is None:
    return x
  keep = jnp.ones((1, x.shape[1]), bool) if partnered is None else partnered
  if seen is not None:
    position = jnp.arange(x.shape[1])[None, :]
    keep &= (position >= seen[0]) & (position < seen[1])
  return jnp.where(keep[:, :, None, None], x, jnp.zeros((), x.dtype))


def _zero_unseen(mask: masks.MaskSpec, q, k, v, ids: _SegmentIds):
  """q, k, v with the rows no partner sees zeroed: outside the band, or (segment ids) of an id
  the other side lacks."""
  q_partnered, kv_partnered = (None, None) if ids is None else (
      _has_partner(ids[0], ids[1]), _has_partner(ids[1], ids[0]))
  seen_keys = _seen(mask, "kv")
  return (_zero_rows(q, _seen(mask, "q"), q_partnered), _zero_rows(k, seen_keys, kv_partnered),
          _zero_rows(v, seen_keys, kv_partnered))


def _id_intervals(ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """Per block of ``ids [b, n * block]``: ``(min, max)``, each ``[b, n]``."""
  blocks = ids.reshape(ids.shape[0], -1, block)
  return blocks.min(-1), blocks.max(-1)


def _segment_ranges(tile_ids: jax.Array, streamed_ids: jax.Array, block: int) -> jax.Array:
  """``[b, tiles, 2]`` int32: per ``TILE`` rows of ``tile_ids``, the ``[first, stop)`` blocks of
  ``block`` streamed positions whose id intervals overlap the tile's (``[0, 0)``: none). Memory:
  a ``[b, tiles, blocks]`` boolean."""
  lo, hi = _id_intervals(tile_ids, TILE)
  block_lo, block_hi = _id_intervals(streamed_ids, block)
  overlap = (lo[:, :, None] <= block_hi[:, None, :]) & (block_lo[:, None, :] <= hi[:, :, None])
  found = overlap.any(-1)
  first = jnp.where(found, jnp.argmax(overlap, -1), 0)
  stop = jnp.where(found, overlap.shape[-1] - jnp.argmax(overlap[..., ::-1], -1), 0)
  return jnp.stack([first, stop], -1).astype(jnp.int32)


def _segment_inputs(ids: _SegmentIds, q_pad: int, kv_pad: int, block: int, *,
                    keys_streamed: bool) -> tuple[jax.Array, ...]:
  """A kernel's segment inputs: ``(own ids, streamed ids, ranges)`` (empty without ids), ids
  edge-padded (padding rows are masked by the length bounds anyway)."""
  if ids is None:
    return ()
  q_ids = shapes.pad_axis(ids[0], 1, q_pad, mode="edge")
  kv_ids = shapes.pad_axis(ids[1], 1, kv_pad, mode="edge")
  own, streamed = (q_ids, kv_ids) if keys_streamed else (kv_ids, q_ids)
  return own, streamed, _segment_ranges(own, streamed, block)


def _padded(x):
  """``[b, len, h, d] -> [b, len_pad, h, d_pad]``: whole tiles, head dims of 64 (zeros)."""
  return shapes.pad_axes(x, {1: shapes.round_up(x.shape[1], TILE),
                             3: shapes.round_up(x.shape[3], _HEAD_DIM_MULTIPLE)})


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(call: Call, q, k, v, ids: _SegmentIds):
  return _forward(call, q, k, v, ids)


def _attention_fwd(call: Call, q, k, v, ids: _SegmentIds):
  out, lse = tag_residuals(*_forward(call, q, k, v, ids))
  return (out, lse), (q, k, v, ids, out, lse)


def _attention_bwd(call: Call, residuals, cotangents):
  return (*_backward(call, residuals, cotangents), None)


def _backward(call: Call, residuals, cotangents):
  q, k, v, ids, out, lse = residuals
  if max(q.shape[3], v.shape[3]) > _MAX_BACKWARD_HEAD_DIM:  # over shared memory: Triton's
    triton = pallas_gpu.Call.create(call.mask, scale=call.scale, softcap=call.softcap,
                                    heads=q.shape[2], kv_heads=k.shape[2],
                                    head_dim=max(q.shape[3], v.shape[3]), dtype=q.dtype,
                                    segments=call.segments, block_sizes=None,
                                    interpret=bool(call.interpret))
    return pallas_gpu.backward(triton, (q, k, v, *(ids or (None, None)), out, lse), cotangents)
  d_out, d_lse = cotangents
  d_out = _zero_rows(d_out, _seen(call.mask, "q"),
                     None if ids is None else _has_partner(ids[0], ids[1]))
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  pad_stats = lambda x: shapes.pad_to_multiple(x, 2, TILE)
  lse2 = pad_stats(jnp.where(lse == -jnp.inf, 0.0, lse * LOG2E))  # rows that see no key
  delta = pad_stats(delta - d_lse)
  qp, dop, kp, vp = (_padded(x) for x in (q, d_out, k, v))
  q_pad, kv_pad = qp.shape[1], kp.shape[1]
  dq = dq_kernel(call, qp, kp, vp, dop, lse2, delta,
                 *_segment_inputs(ids, q_pad, kv_pad, call.blocks.block_kv_dq,
                                  keys_streamed=True))
  dk, dv = dkv_kernel(call, qp, kp, vp, dop, lse2, delta,
                      *_segment_inputs(ids, q_pad, kv_pad, call.blocks.block_q_dkv,
                                       keys_streamed=False))
  unpad = lambda x, like: x[:, :like.shape[1], :, :like.shape[3]]
  return unpad(dq, q), unpad(dk, k), unpad(dv, v)


_attention.defvjp(_attention_fwd, _attention_bwd)
_attention_jit = jax.jit(_attention, static_argnums=0)


def _forward(call: Call, q, k, v, ids: _SegmentIds):
  """Pads, runs the kernel, unpads: ``([b, q_len, h, dv] in q's dtype, [b, h, q_len])``."""
  qp, kp, vp = (_padded(x) for x in (q, k, v))
  out, lse2 = forward_kernel(call, qp, kp, vp,
                             *_segment_inputs(ids, qp.shape[1], kp.shape[1],
                                              call.blocks.block_kv, keys_streamed=True))
  lse = jnp.where(lse2 == -jnp.inf, -jnp.inf, lse2 * _LN2)
  return out[:, :q.shape[1], :, :v.shape[3]], lse[:, :, :q.shape[1]]
