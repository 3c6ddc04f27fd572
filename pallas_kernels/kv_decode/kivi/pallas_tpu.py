"""Flash-decoding over KIVI's packed quantized cache as a Pallas kernel for TPU (Mosaic lowering).

Grid ``(batch, split, step)``: each (row, split) walks its share of the filled quantized prefix
one block of ``block`` slots per step (the "arbitrary" axis), keeping float32 online-softmax
statistics per kv head in VMEM scratch; the last step writes the split's normalized output and
natural-log LSE, which the caller combines with
:func:`pallas_kernels.kv_decode.common.combine`. A block carries every kv head (the cache is
slot-major, ``[batch, slots, kv_heads, ...]``: merging its two minor dims is a free reshape, and
the merged minor dim is whole, as Mosaic's (8, 128) tiling asks), and each kv head attends with all
its GQA query rows at once.

Dequantization in VMEM without lane gathers: the packed words of kv head ``h`` are moved to their
channels by one-hot matmuls (``[block, kv_heads * words] @ [kv_heads * words, head_dim]``, on the
16-bit halves of each word so float32 is exact), then shifted and masked per channel; the
per-group key scales/zeros and per-token value scales/zeros are broadcast to ``[block,
head_dim]`` by one-hot matmuls too (exact at ``precision=HIGHEST``).

Split-K: the filled range of blocks ``[start // block, ceil(end / block))`` is traced; the
``num_splits`` splits share it equally and a step past its split's share does no compute, and no
DMA: its BlockSpec index is clamped to the split's last block (already resident).

Memory: HBM reads are the packed codes and scales of the filled blocks (no full-precision copy
of the cache); results ``batch * num_splits * kv_heads * rows * (head_dim + 128)`` float32 (the
LSE lane-broadcast). VMEM: the double-buffered code/scale blocks, a few ``[block, head_dim]``
float32 tiles and the accumulators (kv heads are a loop, not unrolled): compiled for v5e, 4.5 MiB
of scoped VMEM at 2 bits, ``head_dim = 64``, 3 kv heads, 512 slots per block (5.5 MiB at 4 bits,
``head_dim = 128``; v5e's default limit is 16 MiB).

float16 scales and zero points: Mosaic rejects float16 vector loads on v4 to v6e ("Invalid vector
type for load"), so the wrapper passes them as their uint16 bits (:func:`float16_bits`, a free
bitcast: the cache format and the bytes read stay the same) and the kernel decodes the loaded
bits to float32 with 32-bit integer ops (:func:`float16_to_float32`, exact).

Limits: checked in the TPU interpreter and compiled by Mosaic's own compiler for v4, v5e, v5p
and v6e (libtpu's compile-only devices, :mod:`pallas_kernels.aot`), not run or timed on a TPU;
the one-hot dequantization spends MXU work (about 10 small matmuls per kv head and block) that a
lane-shuffle version could save.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int, UInt16, UInt32

from pallas_kernels.interpret import require_tpu_or_interpret
from pallas_kernels.kv_decode import common

_LANES = 128
_SUBLANES = 8
_TARGET_BLOCK = 512  # slots per grid step
_MIN_BLOCKS_PER_SPLIT = 4
_TARGET_SPLITS = 8


def plan(k_codes, group_size: int, num_splits: int | None) -> tuple[int, int]:
  """``(block, num_splits)`` of a call over ``k_codes [batch, slots, ...]``: :func:`block_slots`
  and ``num_splits`` or, when None, :func:`default_num_splits`."""
  block = block_slots(k_codes.shape[1], group_size)
  return block, default_num_splits(k_codes.shape[1], block) if num_splits is None else num_splits


def default_num_splits(slots: int, block: int) -> int:
  """Splits per row: up to :data:`_TARGET_SPLITS` (a "parallel" grid axis, so a chip's cores
  share the work even at batch 1), each of at least :data:`_MIN_BLOCKS_PER_SPLIT` blocks of a
  full cache. A guess: not tuned on a TPU."""
  return max(1, min(_TARGET_SPLITS, slots // block // _MIN_BLOCKS_PER_SPLIT))


def block_slots(slots: int, group_size: int) -> int:
  """Slots per grid step: ``8 * k`` key groups (a whole number of (8, 128) tiles of the key
  scales) dividing ``slots``, up to :data:`_TARGET_BLOCK` slots, else all ``slots``."""
  groups = slots // group_size
  best = groups
  for count in range(_SUBLANES, groups, _SUBLANES):
    if groups % count == 0 and count * group_size <= max(_TARGET_BLOCK, _SUBLANES * group_size):
      best = count
  return best * group_size


def decode_partials(
    q: Float[Array, "batch seq heads head_dim"],
    k_codes: UInt32[Array, "batch slots kv_heads key_words"],
    k_scale: Float[Array, "batch key_groups kv_heads head_dim"],
    k_zero: Float[Array, "batch key_groups kv_heads head_dim"],
    v_codes: UInt32[Array, "batch slots kv_heads value_words"],
    v_scale: Float[Array, "batch slots kv_heads value_groups"],
    v_zero: Float[Array, "batch slots kv_heads value_groups"],
    start: Int[Array, "batch"],
    end: Int[Array, ""],
    *,
    key_bits: int,
    value_bits: int,
    group_size: int,
    scale: float,
    num_splits: int | None = None,
) -> tuple[Float[Array, "batch splits seq heads head_dim"], Float[Array, "batch splits seq heads"]]:
  """Per-split attention of ``q`` over the quantized slots ``[start[b], end)``; arguments and
  results as :func:`pallas_kernels.kv_decode.gpu.decode_partials` (layout:
  :mod:`pallas_kernels.kv_decode.common`).

  Raises:
    NotImplementedError: not on a TPU and not inside ``pallas_kernels.interpret.interpret_mode``.
    ValueError: the arrays do not have KIVI's layout.
  """
  interpret = require_tpu_or_interpret()
  block, num_splits = plan(k_codes, group_size, num_splits)
  common.check(q, k_codes, k_scale, v_codes, v_scale, key_bits=key_bits, value_bits=value_bits,
               group_size=group_size, num_splits=num_splits)
  settings = common.Settings(key_bits=key_bits, value_bits=value_bits, **common.geometry(
      q, k_codes.shape[2], group_size=group_size, num_splits=num_splits, scale=scale))
  return _decode_jit(settings, block, interpret, q, k_codes, k_scale, k_zero, v_codes, v_scale,
                     v_zero, start, end)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode_jit(settings: common.Settings, block: int, interpret, q, k_codes, k_scale, k_zero,
                v_codes, v_scale, v_zero, start, end):
  group_rows = block // settings.group_size
  blocked = [(k_codes, block), (k_scale, group_rows), (k_zero, group_rows), (v_codes, block),
             (v_scale, block), (v_zero, block)]
  blocked = [(float16_bits(x), rows_per_block) for x, rows_per_block in blocked]
  return launch(functools.partial(_kernel, settings, block), settings, block, interpret, q,
                blocked, [], [start, end], "kivi_decode")


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
  rows = -(-settings.rows // _SUBLANES) * _SUBLANES
  head_dim, splits = settings.head_dim, settings.num_splits
  queries = common.group_queries(q, kv_heads, settings.scale, rows)
  per_row = len(bounds)
  bounds = jnp.stack([jnp.broadcast_to(x.astype(jnp.int32), (batch,)) for x in bounds],
                     axis=1).reshape(-1)
  steps = -(-blocked[0][0].shape[1] // block // splits)

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
                     pl.BlockSpec((None, None, kv_heads, rows, _LANES),
                                  lambda b, s, t, _: (b, s, 0, 0, 0))],
          scratch_shapes=[pltpu.VMEM((kv_heads, rows, _LANES), jnp.float32),
                          pltpu.VMEM((kv_heads, rows, _LANES), jnp.float32),
                          pltpu.VMEM((kv_heads, rows, head_dim), jnp.float32), *scratch]),
      out_shape=[jax.ShapeDtypeStruct((batch, splits, kv_heads, rows, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, splits, kv_heads, rows, _LANES), jnp.float32)],
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
      o_ref[i] = acc_ref[i] / _lanes(l[i // per_head], acc_ref.shape[2])
    lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(l), -jnp.inf)


def online_update(h: int, q, k, v, visible, value_visible, m_ref, l_ref, acc_ref) -> None:
  """Folds one block of kv head ``h`` into its float32 online-softmax statistics: ``q [rows,
  head_dim]``, ``k, v [block, head_dim]``, ``visible [rows, block]``, ``value_visible [block,
  head_dim]`` (invisible values are zeroed: 0 * garbage stays 0)."""
  p, rescale = softmax_update(h, jnp.where(visible, common.dot(q, k, trans_b=True), -jnp.inf),
                             m_ref, l_ref)
  acc_ref[h] = (_lanes(rescale, v.shape[1]) * acc_ref[h]
                + common.dot(p, jnp.where(value_visible, v, 0.0)))


def softmax_update(h: int, logits, m_ref, l_ref):
  """Folds kv head ``h``'s masked logits ``[rows, block]`` into its running max and sum
  (lane-broadcast ``[rows, 128]``); returns the block's probabilities and the lane-broadcast
  factor that rescales the accumulators."""
  m_prev, l_prev = m_ref[h], l_ref[h]
  m_new = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen nothing stay at 0
  p = jnp.exp(logits - _lanes(shift, logits.shape[1]))
  rescale = jnp.exp(m_prev - shift)
  m_ref[h] = m_new
  l_ref[h] = rescale * l_prev + p.sum(axis=1, keepdims=True)
  return p, rescale


def _kernel(settings: common.Settings, block: int, bounds_ref, q_ref, kc_ref, ks_ref, kz_ref,
            vc_ref, vs_ref, vz_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref):
  """One block of one split: every kv head's online-softmax update; the last step writes."""
  b = pl.program_id(0)
  kv_heads, rows, head_dim = q_ref.shape
  size = settings.group_size

  def attend_block(index, bounds):
    start, end = bounds
    slot = index * block + lax.broadcasted_iota(jnp.int32, (rows, block), 1)
    visible = (slot >= start) & (slot < end)
    value_slot = index * block + lax.broadcasted_iota(jnp.int32, (block, head_dim), 0)
    value_visible = (value_slot >= start) & (value_slot < end)
    slot_to_group = slots_to_groups(block, size)
    k_codes, v_codes = kc_ref[...], vc_ref[...]
    k_scale, k_zero, v_scale, v_zero = (as_float32(ref[...]) for ref in (ks_ref, kz_ref, vs_ref,
                                                                          vz_ref))

    @pl.loop(0, kv_heads)  # a loop, not unrolled: half the VMEM and compile time
    def _(h):
      k = (_unpack(k_codes, settings.key_bits, h, head_dim).astype(jnp.float32)
           * common.dot(slot_to_group, _head_lanes(k_scale, h, head_dim, 1))
           + common.dot(slot_to_group, _head_lanes(k_zero, h, head_dim, 1)))
      v = (_unpack(v_codes, settings.value_bits, h, head_dim).astype(jnp.float32)
           * _head_lanes(v_scale, h, head_dim, size)
           + _head_lanes(v_zero, h, head_dim, size))
      online_update(h, q_ref[h], k, v, visible, value_visible, m_ref, l_ref, acc_ref)

  decode_step(settings, block, (bounds_ref[2 * b], bounds_ref[2 * b + 1]), attend_block, o_ref,
              lse_ref, m_ref, l_ref, acc_ref)


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


def _head_lanes(x, h: int, head_dim: int, per_column: int):
  """float32 ``[n, head_dim]``: lane ``c`` is column ``h * head_dim / per_column + c //
  per_column`` of ``x [n, kv_heads * head_dim / per_column]``."""
  lane = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
  return gather_lanes(x, h * (head_dim // per_column) + lax.div(lane, per_column))


def _unpack(words, bits: int, h: int, head_dim: int):
  """int32 ``[block, head_dim]`` codes of kv head ``h`` from ``[block, kv_heads * words]``."""
  per_word = 32 // bits
  lane = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
  lo, hi = word_halves(words, h * -(-head_dim // per_word) + lax.div(lane, per_word))
  word = lo | (hi << 16)
  return lax.shift_right_logical(word, lax.rem(lane, per_word) * bits) & ((1 << bits) - 1)


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


def _lanes(x, width: int):
  """A lane-broadcast ``[rows, 128]`` array as ``[rows, width]`` (tiled, then cut)."""
  return jnp.tile(x, (1, -(-width // _LANES)))[:, :width]
