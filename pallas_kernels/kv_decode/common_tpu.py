"""What the three Mosaic TPU decode kernels (``kivi``, ``vidkv``, ``xquant`` ``.pallas_tpu``)
share: the block and split heuristics, the ``pallas_call`` on grid ``(batch, split, step)``, the
per-step online softmax, and the one-hot matmuls and float16 decoding they dequantize with.

Grid ``(batch, split, step)``: each (row, split) walks its share of the filled quantized slots
one block of ``block`` slots per step (the "arbitrary" axis), keeping float32 online-softmax
statistics per kv head in VMEM scratch; the last step writes the split's normalized output and
natural-log LSE, which the caller combines with :func:`pallas_kernels.kv_decode.common.combine`.
A block carries every kv head (the caches are slot-major: merging a block's two minor dims is a
free reshape, and the merged minor dim is whole, as Mosaic's (8, 128) tiling asks).

Split-K: the filled range of blocks ``[start // block, ceil(end / block))`` is traced; the
``num_splits`` splits share it equally and a step past its split's share does no compute, and no
DMA: its BlockSpec index is clamped to the split's last block (already resident).

float16 operands (scales, zero points): Mosaic rejects float16 vector loads on v4 to v6e
("Invalid vector type for load"), so wrappers pass them as their uint16 bits
(:func:`float16_bits`, a free bitcast: the cache format and the bytes read stay the same) and the
kernels decode the loaded bits to float32 with 32-bit integer ops (:func:`float16_to_float32`,
exact).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, UInt16

from pallas_kernels.kv_decode import common
from pallas_kernels.shapes import cdiv, round_up

LANES = 128
SUBLANES = 8
_KEY_GROUP_BLOCK = 512  # target slots per grid step of the kernels that read key groups
_MIN_BLOCKS_PER_SPLIT = 4
_TARGET_SPLITS = 8


def tiling(block_sizes: common.DecodeBlockSizes | None, slots: int, unit: int, target: int
           ) -> tuple[int, int]:
  """``(block, num_splits)`` of a call over a cache of ``slots`` slots: ``block_sizes``' fields,
  :func:`default_block_slots` and :func:`default_num_splits` where they are None.

  Args:
    unit: what a block is a multiple of, unless it is all the slots (its rows must tile (8, 128)).
    target: the default block's largest size (at least ``unit``).

  Raises:
    ValueError: ``block_slots`` does not divide ``slots`` or is not a multiple of ``unit``.
  """
  sizes = common.block_sizes_or_default(block_sizes)
  block = sizes.block_slots
  if block is None:
    block = default_block_slots(slots, unit, target)
  elif slots % block or (block % unit and block != slots):
    raise ValueError(f"block_slots is {block}; expected a divisor of the cache's {slots} slots "
                     f"that is a multiple of {unit}, or {slots}")
  return block, default_num_splits(slots, block) if sizes.num_splits is None else sizes.num_splits


def key_group_tiling(block_sizes: common.DecodeBlockSizes | None, k_codes, group_size: int
                     ) -> tuple[int, int]:
  """:func:`tiling` of the KIVI and VidKV kernels over ``k_codes [batch, slots, ...]``: blocks of
  8k key groups (a whole number of (8, 128) tiles of the per-group scales), up to about
  :data:`_KEY_GROUP_BLOCK` slots."""
  return tiling(block_sizes, k_codes.shape[1], SUBLANES * group_size, _KEY_GROUP_BLOCK)


def default_block_slots(slots: int, unit: int, target: int) -> int:
  """The largest multiple of ``unit`` that divides ``slots`` and is at most ``max(target, unit)``,
  else all ``slots``."""
  fits = [size for size in range(unit, min(slots, max(target, unit)) + 1, unit)
          if slots % size == 0]
  return fits[-1] if fits else slots


def default_num_splits(slots: int, block: int) -> int:
  """Splits per row: up to :data:`_TARGET_SPLITS` (a "parallel" grid axis, so a chip's cores
  share the work even at batch 1), each of at least :data:`_MIN_BLOCKS_PER_SPLIT` blocks of a
  full cache."""
  return max(1, min(_TARGET_SPLITS, slots // block // _MIN_BLOCKS_PER_SPLIT))


def launch(kernel, settings: common.Geometry, block: int, interpret, q, blocked, constants,
           bounds, name: str, *, scratch=()):
  """``pallas_call`` of a decode kernel on grid ``(batch, num_splits, steps)``.

  Args:
    kernel: ``kernel(bounds_ref, q_ref, *blocked_refs, *constant_refs, o_ref, lse_ref, m_ref,
      l_ref, acc_ref, *scratch_refs)``; see :func:`decode_step`.
    blocked: ``(array [batch, n, ...], rows per block)``: arrays read one block of slots per step
      (their two minor dims merged, a free reshape), ``n`` slots or key groups.
    constants: arrays read whole, once.
    scratch: the kernel's own VMEM scratch shapes.
    bounds: per-row ``[batch]`` or scalar int32 values: start, end of the read range, then any the
      kernel wants; scalar-prefetched as ``bounds_ref[len(bounds) * b + i]``.
  """
  batch, kv_heads = q.shape[0], q.shape[2] // settings.group
  rows = round_up(settings.rows, SUBLANES)
  head_dim, splits = settings.head_dim, settings.num_splits
  queries = common.group_queries(q, kv_heads, settings.scale, rows)
  per_row = len(bounds)
  bounds = jnp.stack([jnp.broadcast_to(x.astype(jnp.int32), (batch,)) for x in bounds],
                     axis=1).reshape(-1)
  steps = cdiv(blocked[0][0].shape[1] // block, splits)

  def block_index(b, s, t, bounds_ref):
    first, stop, per_split = split_range(bounds_ref[per_row * b], bounds_ref[per_row * b + 1], s,
                                         block, splits)
    return jnp.clip(first + t, 0, jnp.maximum(jnp.minimum(first + per_split, stop) - 1, 0))

  def spec(array, rows_per_block):
    return pl.BlockSpec((None, rows_per_block, array.shape[2]),
                        lambda b, s, t, bounds_ref: (b, block_index(b, s, t, bounds_ref), 0))

  merged = [(x.reshape(*x.shape[:2], -1), rows_per_block) for x, rows_per_block in blocked]
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, splits, steps),
          in_specs=[pl.BlockSpec((None, kv_heads, rows, head_dim), lambda b, s, t, _: (b, 0, 0, 0)),
                    *(spec(x, rows_per_block) for x, rows_per_block in merged),
                    *(pl.BlockSpec(x.shape, lambda b, s, t, _, n=x.ndim: (0,) * n)
                      for x in constants)],
          out_specs=[pl.BlockSpec((None, None, kv_heads, rows, head_dim),
                                  lambda b, s, t, _: (b, s, 0, 0, 0)),
                     pl.BlockSpec((None, None, kv_heads, rows, LANES),
                                  lambda b, s, t, _: (b, s, 0, 0, 0))],
          scratch_shapes=[pltpu.VMEM((kv_heads, rows, LANES), jnp.float32),
                          pltpu.VMEM((kv_heads, rows, LANES), jnp.float32),
                          pltpu.VMEM((kv_heads, rows, head_dim), jnp.float32), *scratch]),
      out_shape=[jax.ShapeDtypeStruct((batch, splits, kv_heads, rows, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, splits, kv_heads, rows, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)),
      interpret=interpret,
      name=name,
  )(bounds, queries, *(x for x, _ in merged), *constants)
  return common.ungroup(settings, out.transpose(0, 2, 1, 3, 4), lse[..., 0].transpose(0, 2, 1, 3))


def split_range(start, end, s, block: int, splits: int):
  """``(first block of split s, end of the filled blocks, blocks per split)`` of a row whose read
  range is ``[start, end)``."""
  lo = lax.div(start, block)  # lax.div/rem: non-negative operands; jnp's // lowers via sign
  hi = jnp.maximum(lax.div(end + block - 1, block), lo)
  per_split = lax.div(hi - lo + splits - 1, splits)
  return lo + s * per_split, hi, per_split


def decode_step(settings: common.Geometry, block: int, bounds, attend_block, o_ref, lse_ref,
                m_ref, l_ref, acc_ref) -> None:
  """One grid step ``(b, s, t)``: resets the statistics at ``t = 0``, runs
  ``attend_block(index, bounds)`` on the split's block ``index`` when ``t`` is inside its share,
  and writes the normalized output and lane-broadcast natural-log LSE at the last step.

  Args:
    bounds: this row's scalars (start and end of the read range, then the kernel's own).
    acc_ref: ``[kv_heads * n, rows, width]``, ``n`` accumulators per kv head (accumulator ``i``
      belongs to kv head ``i // n``; ``n = 1`` but for XQuant), normalized into ``o_ref`` alike.
  """
  s, t = pl.program_id(1), pl.program_id(2)
  first, stop, per_split = split_range(bounds[0], bounds[1], s, block, settings.num_splits)
  index = first + t

  @pl.when(t == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when((t < per_split) & (index < stop))
  def _():
    attend_block(index, bounds)

  @pl.when(t == pl.num_programs(2) - 1)
  def _():
    l = l_ref[...]
    seen = l > 0
    l = jnp.where(seen, l, 1.0)
    per_head = acc_ref.shape[0] // l.shape[0]  # accumulators per kv head (XQuant: 32 / bits)
    for i in range(acc_ref.shape[0]):
      o_ref[i] = acc_ref[i] / lanes(l[i // per_head], acc_ref.shape[2])
    lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(l), -jnp.inf)


def online_update(h: int, q, k, v, visible, value_visible, m_ref, l_ref, acc_ref) -> None:
  """Folds one block of kv head ``h`` into its float32 online-softmax statistics: ``q [rows,
  head_dim]``, ``k, v [block, head_dim]``, ``visible [rows, block]``, ``value_visible [block,
  head_dim]`` (invisible values are zeroed: 0 * garbage stays 0)."""
  p, rescale = softmax_update(h, jnp.where(visible, common.dot(q, k, trans_b=True), -jnp.inf),
                             m_ref, l_ref)
  acc_ref[h] = (lanes(rescale, v.shape[1]) * acc_ref[h]
                + common.dot(p, jnp.where(value_visible, v, 0.0)))


def softmax_update(h: int, logits, m_ref, l_ref):
  """Folds kv head ``h``'s masked logits ``[rows, block]`` into its running max and sum
  (lane-broadcast ``[rows, 128]``); returns the block's probabilities and the lane-broadcast
  factor that rescales the accumulators."""
  m_prev, l_prev = m_ref[h], l_ref[h]
  m_new = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen nothing stay at 0
  p = jnp.exp(logits - lanes(shift, logits.shape[1]))
  rescale = jnp.exp(m_prev - shift)
  m_ref[h] = m_new
  l_ref[h] = rescale * l_prev + p.sum(axis=1, keepdims=True)
  return p, rescale


def slots_to_groups(block: int, size: int) -> jax.Array:
  """float32 one-hot ``[block, block / G]``: slot ``t``'s key group."""
  return _one_hot(block, block // size, lambda r, c: lax.div(r, size) == c)


def _one_hot(rows: int, columns: int, predicate) -> jax.Array:
  """float32 ``[rows, columns]``: 1 where ``predicate(row, column)``."""
  r = lax.broadcasted_iota(jnp.int32, (rows, columns), 0)
  c = lax.broadcasted_iota(jnp.int32, (rows, columns), 1)
  return jnp.where(predicate(r, c), 1.0, 0.0).astype(jnp.float32)


def gather_lanes(x, column_of_lane) -> jax.Array:
  """float32 ``[n, lanes]``: lane ``c`` is column ``column_of_lane[0, c]`` of ``x [n, columns]``
  (0 where it is out of range), a one-hot matmul: exact."""
  select = _one_hot(x.shape[1], column_of_lane.shape[1], lambda r, c: r == column_of_lane)
  return common.dot(x.astype(jnp.float32), select)


def word_halves(words, column_of_lane):
  """int32 16-bit halves ``(lo, hi)`` of the uint32 word ``column_of_lane[0, c]`` of each row of
  ``words``, per lane (two exact one-hot matmuls)."""
  return tuple(gather_lanes(((words >> shift) & jnp.uint32(0xFFFF)).astype(jnp.int32),
                            column_of_lane).astype(jnp.int32) for shift in (0, 16))


def float16_bits(x: jax.Array) -> jax.Array:
  """``x`` for a TPU kernel operand: float16 as its uint16 bit patterns (a free bitcast: same
  bytes in HBM and VMEM), anything else unchanged. Mosaic rejects float16 vector loads on v4 to
  v6e ("Invalid vector type for load"); the kernel decodes the bits with :func:`as_float32`."""
  return lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.float16 else x


def as_float32(x: jax.Array) -> Float[Array, "*shape"]:
  """A loaded kernel operand as float32: uint16 holds float16 bits (:func:`float16_bits`),
  decoded by :func:`float16_to_float32`; any other dtype is converted."""
  return float16_to_float32(x) if x.dtype == jnp.uint16 else x.astype(jnp.float32)


def float16_to_float32(bits: UInt16[Array, "*shape"]) -> Float[Array, "*shape"]:
  """Exact float32 values of float16 bit patterns (uint16), with 32-bit integer ops only:
  normals re-biased (``<< 13``, exponent + 112), infinities and NaNs (payload kept) re-biased to
  exponent 255, subnormals ``mantissa * 2**-24`` (a normal float32: nothing relies on float
  denormals, which TPUs flush), and the sign bit moved to bit 31. Equals numpy's
  ``float16 -> float32`` bit for bit on all 65536 patterns."""
  h = bits.astype(jnp.int32)
  exponent = lax.shift_right_logical(h, 10) & 31
  rebias = jnp.where(exponent == 31, 255 - 31, 127 - 15) << 23
  normal = ((h & 0x7FFF) << 13) + rebias
  subnormal = lax.bitcast_convert_type((h & 1023).astype(jnp.float32) * 2.0**-24, jnp.int32)
  magnitude = jnp.where(exponent == 0, subnormal, normal)
  return lax.bitcast_convert_type(magnitude | ((h & 0x8000) << 16), jnp.float32)


def lanes(x, width: int):
  """A lane-broadcast ``[rows, 128]`` array as ``[rows, width]`` (tiled, then cut)."""
  return jnp.tile(x, (1, cdiv(width, LANES)))[:, :width]
