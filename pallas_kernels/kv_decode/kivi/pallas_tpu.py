"""Flash-decoding over KIVI's packed quantized cache as a Pallas kernel for TPU (Mosaic lowering).

Grid, splits and online softmax: :mod:`pallas_kernels.kv_decode.common_tpu` (grid ``(batch,
split, step)``, one block of ``block`` slots per step, every kv head per block, each with all its
GQA query rows at once).

Dequantization in VMEM without lane gathers: the packed words of kv head ``h`` are moved to their
channels by one-hot matmuls (``[block, kv_heads * words] @ [kv_heads * words, head_dim]``, on the
16-bit halves of each word so float32 is exact), then shifted and masked per channel; the
per-group key scales/zeros and per-token value scales/zeros are broadcast to ``[block,
head_dim]`` by one-hot matmuls too (exact at ``precision=HIGHEST``). float16 scales and zero
points travel as their uint16 bits (:func:`pallas_kernels.kv_decode.common_tpu.float16_bits`).

Memory: HBM reads are the packed codes and scales of the filled blocks (no full-precision copy
of the cache); results ``batch * num_splits * kv_heads * rows * (head_dim + 128)`` float32 (the
LSE lane-broadcast). VMEM: the double-buffered code/scale blocks, a few ``[block, head_dim]``
float32 tiles and the accumulators (kv heads are a loop, not unrolled). Compute: the one-hot
dequantization spends MXU work (about 10 small matmuls per kv head and block) that a
lane-shuffle version could save.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int, UInt32

from pallas_kernels.interpret import require_tpu_or_interpret
from pallas_kernels.kv_decode import common
from pallas_kernels.kv_decode.common_tpu import (
    as_float32,
    decode_step,
    float16_bits,
    gather_lanes,
    key_group_tiling,
    launch,
    online_update,
    slots_to_groups,
    word_halves,
)
from pallas_kernels.shapes import cdiv


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
    block_sizes: common.DecodeBlockSizes | None = None,
    interpret: bool | None = None,
) -> tuple[Float[Array, "batch splits seq heads head_dim"], Float[Array, "batch splits seq heads"]]:
  """Per-split attention of ``q`` over the quantized slots ``[start[b], end)``; arguments and
  results as :func:`pallas_kernels.kv_decode.kivi.pallas_gpu.decode_partials` (layout:
  :mod:`pallas_kernels.kv_decode.common`).

  Args:
    block_sizes: None fields: :func:`pallas_kernels.kv_decode.common_tpu.key_group_tiling`.
    interpret: True runs the TPU interpreter, False the compiled kernel; None follows
      ``pallas_kernels.interpret.interpret_mode``.

  Raises:
    NotImplementedError: not on a TPU, not interpreting and not compiling for a TPU.
    ValueError: the arrays do not have KIVI's layout, or ``block_slots`` does not tile them.
  """
  interpret = require_tpu_or_interpret(interpret)
  block, num_splits = key_group_tiling(block_sizes, k_codes, group_size)
  common.check(q, k_codes, k_scale, v_codes, v_scale, key_bits=key_bits, value_bits=value_bits,
               group_size=group_size)
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


def _head_lanes(x, h: int, head_dim: int, per_column: int):
  """float32 ``[n, head_dim]``: lane ``c`` is column ``h * head_dim / per_column + c //
  per_column`` of ``x [n, kv_heads * head_dim / per_column]``."""
  lane = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
  return gather_lanes(x, h * (head_dim // per_column) + lax.div(lane, per_column))


def _unpack(words, bits: int, h: int, head_dim: int):
  """int32 ``[block, head_dim]`` codes of kv head ``h`` from ``[block, kv_heads * words]``."""
  per_word = 32 // bits
  lane = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
  lo, hi = word_halves(words, h * cdiv(head_dim, per_word) + lax.div(lane, per_word))
  word = lo | (hi << 16)
  return lax.shift_right_logical(word, lax.rem(lane, per_word) * bits) & ((1 << bits) - 1)


