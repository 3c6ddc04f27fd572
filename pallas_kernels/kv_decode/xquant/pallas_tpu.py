"""Flash-decoding over XQuant's quantized stream with keys rematerialized in-kernel (Mosaic TPU).

The TPU counterpart of :mod:`pallas_kernels.kv_decode.xquant.pallas_gpu` (same math, same
results). Grid ``(batch, split, step)``: each (row, split) walks its share of the filled quantized
slots one block of ``block`` slots per step (the "arbitrary" axis; a step past the share does no
compute and no DMA, its block index clamped as in :mod:`pallas_kernels.kv_decode.common_tpu`),
with float32 online-softmax statistics per kv head in VMEM scratch. Per block, in VMEM:

1. the block's packed words ``[block, words]`` and per-token scales/zeros are DMA'd once for all
   kv heads (the stream is shared by every kv head: one program per row reads it once); the
   float16 scales/zeros travel as their uint16 bits and are decoded to float32 in VMEM
   (:func:`pallas_kernels.kv_decode.common_tpu.float16_to_float32`: Mosaic rejects float16 vector
   loads on v4 to v6e; same bytes read);
2. code position ``j`` of every word is a ``[block, words]`` tile (shift and mask, no lane
   gather) written to a VMEM scratch; its per-group scales/zeros are broadcast to it by one-hot
   matmuls (exact);
3. per kv head (a loop, as the code positions within it): keys ``rope(Z_k C_k)`` as ``32 /
   bits`` matmuls per RoPE half against the matching rows of ``C_k`` (permuted outside; ``C_k``
   stays resident in VMEM, its block index never changes), rotated at ``max(slot - start, 0)``,
   logits with all ``seq * group`` query rows of the kv head (causal per query), online softmax,
   and ``p @ Z`` accumulated in the permuted order.

Why all kv heads in one program (unlike the GPU kernel): the block is in VMEM anyway and every kv
head reads all its channels, so one program per (row, split) reads the stream from HBM exactly
once; splitting by kv head would multiply HBM reads by ``kv_heads`` (TPU has no L2 to absorb them).

HBM bytes read per slot: as the GPU kernel (SmolLM2 latents, G = 64: 216 at 4 bits, 120 at 2
bits, vs 768 for float16 K/V), read once. Results: ``batch * splits * kv_heads * rows * (words
* 32 / bits + 128)`` float32. VMEM: the double-buffered code/scale blocks, ``C_k`` (``kv_heads *
words * 32 / bits * head_dim`` float32, double-buffered), the ``32 / bits`` dequantized ``[block,
words]`` tiles, and the accumulators.

Limits: every segment is the whole slot's words (Mosaic has no cheap unaligned lane slice), so a
latent stream's key projection also multiplies the value words by zero weights and its
accumulator also sums the key words (twice the MXU work of the GPU kernel's segments); the
projection runs as ``32 / bits`` matmuls of depth ``words`` (under-filling the MXU depth for
narrow streams).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int, UInt32

from pallas_kernels.interpret import require_tpu_or_interpret
from pallas_kernels.kv_decode import common
from pallas_kernels.kv_decode.common_tpu import (
    LANES,
    SUBLANES,
    as_float32,
    decode_step,
    float16_bits,
    gather_lanes,
    lanes,
    softmax_update,
    split_range,
    tiling,
)
from pallas_kernels.shapes import cdiv, round_up

_TARGET_BLOCK = 256  # default slots per grid step: a multiple of 8 dividing the slots, up to it


def decode_partials(
    q: Float[Array, "batch seq heads head_dim"],
    codes: UInt32[Array, "batch slots words"],
    code_scale: Float[Array, "batch slots groups"],
    code_zero: Float[Array, "batch slots groups"],
    key_up: Float[Array, "key_width kv_heads head_dim"],
    inv_freq: Float[Array, "half"],
    start: Int[Array, "batch"],
    end: Int[Array, ""],
    length: Int[Array, ""],
    *,
    bits: int,
    group_size: int,
    key_channels: tuple[int, int],
    value_channels: tuple[int, int],
    scale: float,
    block_sizes: common.DecodeBlockSizes | None = None,
    interpret: bool | None = None,
) -> tuple[Float[Array, "batch splits seq heads value_width"],
           Float[Array, "batch splits seq heads"]]:
  """Per-split attention over the quantized stream slots ``[start[b], end)``; arguments and
  results as :func:`pallas_kernels.kv_decode.xquant.pallas_gpu.decode_partials`.

  Args:
    block_sizes: ``block_slots``, a multiple of 8 dividing the slots, or all of them (None: the
      largest such up to :data:`_TARGET_BLOCK`); ``num_splits`` (None:
      :func:`pallas_kernels.kv_decode.common_tpu.default_num_splits`).
    interpret: True runs the TPU interpreter, False the compiled kernel; None follows
      ``pallas_kernels.interpret.interpret_mode``.

  Raises:
    NotImplementedError: not on a TPU, not interpreting and not compiling for a TPU.
    ValueError: the arrays do not have XQuant's layout, or ``block_slots`` does not tile them.
  """
  interpret = require_tpu_or_interpret(interpret)
  block, num_splits = tiling(block_sizes, codes.shape[1], SUBLANES, _TARGET_BLOCK)
  settings = common.xquant_settings(
      q, codes, code_scale, code_zero, key_up, inv_freq, bits=bits, group_size=group_size,
      key_channels=key_channels, value_channels=value_channels, logit_scale=scale,
      num_splits=num_splits, tiles="whole")
  return _decode_jit(settings, block, interpret, q, codes, code_scale, code_zero, key_up,
                     inv_freq, start, end, length)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode_jit(settings: common.XQuantSettings, block: int, interpret, q, codes, code_scale,
                code_zero, key_up, inv_freq, start, end, length):
  batch, slots, words = codes.shape
  kv_heads = key_up.shape[1]
  rows = round_up(settings.rows, SUBLANES)
  half, per_word, splits = settings.head_dim // 2, settings.per_word, settings.num_splits
  steps = cdiv(slots // block, splits)
  queries = common.split_queries(q, kv_heads, settings.scale, rows)
  weights = common.key_weights(settings, key_up)
  bounds = jnp.stack([start.astype(jnp.int32)] + [
      jnp.broadcast_to(x.astype(jnp.int32), (batch,)) for x in (end, length)], axis=1).reshape(-1)

  def block_index(b, s, t, bounds_ref):
    first, stop, per_split = split_range(bounds_ref[3 * b], bounds_ref[3 * b + 1], s, block,
                                         splits)
    return jnp.clip(first + t, 0, jnp.maximum(jnp.minimum(first + per_split, stop) - 1, 0))

  def stream_spec(array):
    return pl.BlockSpec((None, block, array.shape[2]),
                        lambda b, s, t, bounds_ref: (b, block_index(b, s, t, bounds_ref), 0))

  def whole(array):
    return pl.BlockSpec(array.shape, lambda b, s, t, _, n=array.ndim: (0,) * n)

  inv_freq = inv_freq.reshape(1, half).astype(jnp.float32)
  code_scale, code_zero = float16_bits(code_scale), float16_bits(code_zero)
  out, lse = pl.pallas_call(
      functools.partial(_kernel, settings, block),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, splits, steps),
          in_specs=[pl.BlockSpec((None, kv_heads, 2, rows, half),
                                 lambda b, s, t, _: (b, 0, 0, 0, 0)),
                    stream_spec(codes), stream_spec(code_scale), stream_spec(code_zero),
                    whole(weights), whole(inv_freq)],
          out_specs=[pl.BlockSpec((None, None, kv_heads * per_word, rows, words),
                                  lambda b, s, t, _: (b, s, 0, 0, 0)),
                     pl.BlockSpec((None, None, kv_heads, rows, LANES),
                                  lambda b, s, t, _: (b, s, 0, 0, 0))],
          scratch_shapes=[pltpu.VMEM((kv_heads, rows, LANES), jnp.float32),
                          pltpu.VMEM((kv_heads, rows, LANES), jnp.float32),
                          pltpu.VMEM((kv_heads * per_word, rows, words), jnp.float32),
                          pltpu.VMEM((per_word, block, words), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((batch, splits, kv_heads * per_word, rows, words),
                                      jnp.float32),
                 jax.ShapeDtypeStruct((batch, splits, kv_heads, rows, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)),
      interpret=interpret,
      name="xquant_decode",
  )(bounds, queries, codes, code_scale, code_zero, weights, inv_freq)
  out = out.reshape(batch, splits, kv_heads, per_word, rows, words).swapaxes(1, 2)
  out = common.stream_output(settings, out)
  return common.ungroup(settings, out, lse[..., 0].swapaxes(1, 2))


def _kernel(settings: common.XQuantSettings, block: int, bounds_ref, q_ref, codes_ref, scale_ref,
            zero_ref, w_ref, f_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, z_ref):
  """One block of one split: the block dequantized into ``z_ref`` once, then every kv head's
  online-softmax update (``decode_step`` resets and writes). Kv heads and code positions are
  loops, not unrolled: Mosaic gives every unrolled matmul result its own VMEM."""
  b = pl.program_id(0)
  kv_heads, _, rows, half = q_ref.shape
  per_word = settings.per_word

  def attend_block(index, bounds):
    start, end, length = bounds
    _dequantize(settings, codes_ref[...], as_float32(scale_ref[...]), as_float32(zero_ref[...]),
                index * block + lax.broadcasted_iota(jnp.int32, z_ref.shape[1:], 0), start, end,
                z_ref)
    slot = index * block + lax.broadcasted_iota(jnp.int32, (block, half), 0)
    angles = jnp.maximum(slot - start, 0).astype(jnp.float32) * f_ref[...]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    visible = common.visible_to_rows(
        index * block + lax.broadcasted_iota(jnp.int32, (rows, block), 1),
        lax.broadcasted_iota(jnp.int32, (rows, block), 0), start, end, length - settings.seq,
        settings.group)

    @pl.loop(0, kv_heads)
    def _(h):
      def project(j, k):
        return tuple(part + common.dot(z_ref[j], w_ref[h, i, j]) for i, part in enumerate(k))

      k_lo, k_hi = lax.fori_loop(0, per_word, project,
                                 (jnp.zeros((block, half), jnp.float32),) * 2)
      logits = (common.dot(q_ref[h, 0], k_lo * cos - k_hi * sin, trans_b=True)
                + common.dot(q_ref[h, 1], k_hi * cos + k_lo * sin, trans_b=True))
      p, rescale = softmax_update(h, jnp.where(visible, logits, -jnp.inf), m_ref, l_ref)
      rescale = lanes(rescale, z_ref.shape[2])

      @pl.loop(0, per_word)
      def _(j):
        acc_ref[h * per_word + j] = rescale * acc_ref[h * per_word + j] + common.dot(p, z_ref[j])

  decode_step(settings, block, [bounds_ref[3 * b + i] for i in range(3)], attend_block, o_ref,
              lse_ref, m_ref, l_ref, acc_ref)


def _dequantize(settings: common.XQuantSettings, words, code_scale, code_zero, slot, start, end,
                z_ref) -> None:
  """Writes ``z_ref [32 / bits, block, words]``: float32 tiles of code positions ``0 .. 32 / bits
  - 1``, channel ``word * 32 / bits + j`` in tile ``j``; 0 on slots outside ``[start, end)`` (0 *
  garbage stays 0)."""
  segment = settings.key_segment  # the whole slot
  lane = lax.broadcasted_iota(jnp.int32, (1, segment.tile), 1)
  valid = (slot >= start) & (slot < end)
  affine = {}
  for j in range(settings.per_word):
    variant = settings.scale_variant(j)
    if variant not in affine:
      columns = common.group_of_lane(settings, segment, lane, variant)
      affine[variant] = (gather_lanes(code_scale, columns), gather_lanes(code_zero, columns))
    scale, zero = affine[variant]
    codes = ((words >> (settings.bits * j)) & jnp.uint32((1 << settings.bits) - 1))
    z_ref[j] = jnp.where(valid, codes.astype(jnp.int32).astype(jnp.float32) * scale + zero, 0.0)
