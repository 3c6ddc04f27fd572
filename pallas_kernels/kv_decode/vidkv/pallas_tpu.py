"""Flash-decoding over VidKV's packed 1.x-bit cache as a Pallas kernel for TPU (Mosaic lowering).

Layout of the cache: :mod:`pallas_kernels.kv_decode.vidkv.pallas_gpu`. Grid, splits and online
softmax: :mod:`pallas_kernels.kv_decode.common_tpu` (grid ``(batch, split, step)``, each (row,
split) walking its share of the quantized slots one block of ``block`` slots, 8k key groups
(:func:`pallas_kernels.kv_decode.common_tpu.key_group_tiling`), per step, every kv head per block
with all its GQA query rows).

Dequantization in VMEM, per kv head and block, with matmuls instead of lane gathers:

1. one-hot matmuls move each lane's key code word (a 2-bit or 1-bit one; 16-bit halves, so
   float32 is exact) and its group's step/zero/scale into place; shifts and masks give
   ``code * step + zero`` (2-bit lanes) or ``(2 code - 1) * a`` (1-bit lanes), in stored order;
2. ``[block, D] @ [D, D]`` with the constant ``blockdiag(I_hot, inverse real FFT)`` gives the
   anomalous and the normal channels;
3. per key group, ``[G, D] @ P [D, D]`` puts the channels in place, ``P`` one-hot at
   ``(position[c], c)``, the positions from the group's mask and its prefix sum (a triangular-ones
   matmul over all the block's groups at once); the keys gather in a ``[block, D]`` VMEM scratch;
4. values: the base-3 word of each lane by one-hot matmuls, its digit by int32 arithmetic
   (:func:`pallas_kernels.kv_decode.common.ternary_digit`), ``(digit - 1) * a``.

Query rows are causal (``seq > 1``): row ``r`` sees slots up to ``last + r // group``.

Memory: HBM reads are the packed codes, scales, zero points and masks of the filled blocks (about
36 bytes per slot and kv head at ``D = 64``, ``G = 32``, ``key_bits = 1.5``, 3 kv heads, against
256 for float16 K and V; see :mod:`pallas_kernels.kv_decode.vidkv.pallas_gpu`); results ``batch *
num_splits * kv_heads * rows * (D + 128)`` float32. VMEM: the double-buffered blocks, the
``[block, D]`` key scratch, a few ``[block, D]`` float32 tiles and the accumulators (kv heads are
a loop, not unrolled).

float16 steps, zero points and value scales travel as their uint16 bits and are decoded in VMEM
(:func:`pallas_kernels.kv_decode.common_tpu.float16_bits`; same bytes read).

Compute: per kv head and block the MXU does two ``[block, D] @ [D, D]`` float32 matmuls
(transform, permutations) and the one-hot gathers, beyond the attention's: more than KIVI's
kernel; the block's key groups are unrolled.
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


def decode_partials(
    q: Float[Array, "batch seq heads head_dim"],
    k_codes: UInt32[Array, "batch slots kv_heads key_words"],
    k_scale: Float[Array, "batch key_groups kv_heads head_dim"],
    k_zero: Float[Array, "batch key_groups kv_heads hot"],
    k_hot: UInt32[Array, "batch key_groups kv_heads mask_words"],
    v_codes: UInt32[Array, "batch slots value_words"],
    v_scale: Float[Array, "batch key_groups kv_heads head_dim"],
    transform: Float[Array, "head_dim head_dim"],
    start: Int[Array, "batch"],
    end: Int[Array, ""],
    last: Int[Array, ""],
    *,
    hot: int,
    group_size: int,
    scale: float,
    block_sizes: common.DecodeBlockSizes | None = None,
    interpret: bool | None = None,
) -> tuple[Float[Array, "batch splits seq heads head_dim"], Float[Array, "batch splits seq heads"]]:
  """Per-split attention of ``q`` over the quantized slots ``[start[b], end)``, query ``s`` seeing
  slots up to ``last + s`` only; arguments and results as
  :func:`pallas_kernels.kv_decode.vidkv.pallas_gpu.decode_partials`.

  Args:
    block_sizes: None fields: :func:`pallas_kernels.kv_decode.common_tpu.key_group_tiling`.
    interpret: True runs the TPU interpreter, False the compiled kernel; None follows
      ``pallas_kernels.interpret.interpret_mode``.

  Raises:
    NotImplementedError: not on a TPU, not interpreting and not compiling for a TPU.
    ValueError: the arrays do not have VidKV's layout, or ``block_slots`` does not tile them.
  """
  interpret = require_tpu_or_interpret(interpret)
  block, num_splits = key_group_tiling(block_sizes, k_codes, group_size)
  common.check_vidkv(q, k_codes, k_scale, k_zero, k_hot, v_codes, v_scale, transform, hot=hot,
                     group_size=group_size)
  settings = common.VidKVSettings(hot=hot, **common.geometry(
      q, k_codes.shape[2], group_size=group_size, num_splits=num_splits, scale=scale))
  return _decode_jit(settings, block, interpret, q, k_codes, k_scale, k_zero, k_hot, v_codes,
                     v_scale, transform, start, end, last)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode_jit(settings: common.VidKVSettings, block: int, interpret, q, k_codes, k_scale,
                k_zero, k_hot, v_codes, v_scale, transform, start, end, last):
  if not settings.hot:
    k_zero = k_scale  # no 2-bit channel: never read, stands in for the empty array
  groups = block // settings.group_size
  blocked = [(k_codes, block), (k_scale, groups), (k_zero, groups), (k_hot, groups),
             (v_codes, block), (v_scale, groups)]
  blocked = [(float16_bits(x), rows_per_block) for x, rows_per_block in blocked]
  return launch(functools.partial(_kernel, settings, block), settings, block, interpret, q,
                blocked, [transform], [start, end, last], "vidkv_decode",
                scratch=[pltpu.VMEM((block, settings.head_dim), jnp.float32)])


def _kernel(settings: common.VidKVSettings, block: int, bounds_ref, q_ref, kc_ref, ks_ref, kz_ref,
            kh_ref, vc_ref, vs_ref, t_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, k_ref):
  """One block of one split: every kv head's keys and values dequantized (module docstring),
  then its online-softmax update; the last step writes."""
  b = pl.program_id(0)
  kv_heads, rows, head_dim = q_ref.shape
  size, hot = settings.group_size, settings.hot
  key_words, mask_words = kc_ref.shape[1] // kv_heads, kh_ref.shape[1] // kv_heads
  lane = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
  two_bit = lane < hot
  key_word, key_shift, key_mask = common.key_code_lanes(lane, hot)
  channel_row = lax.broadcasted_iota(jnp.int32, (head_dim, head_dim), 0)
  upper = jnp.where(channel_row <= lane, 1.0, 0.0)

  def attend_block(index, bounds):
    start, end, last = bounds
    slot = index * block + lax.broadcasted_iota(jnp.int32, (rows, block), 1)
    row = lax.broadcasted_iota(jnp.int32, (rows, block), 0)
    visible = common.visible_to_rows(slot, row, start, end, last, settings.group)
    value_slot = index * block + lax.broadcasted_iota(jnp.int32, (block, head_dim), 0)
    value_visible = (value_slot >= start) & (value_slot < end)
    slot_to_group = slots_to_groups(block, size)
    k_codes, k_hot, v_codes = kc_ref[...], kh_ref[...], vc_ref[...]
    k_scale, k_zero, v_scale = (as_float32(ref[...]) for ref in (ks_ref, kz_ref, vs_ref))

    @pl.loop(0, kv_heads)  # a loop, not unrolled: half the VMEM and compile time
    def _(h):
      lo, hi = word_halves(k_codes, h * key_words + key_word)
      codes = lax.shift_right_logical(lo | (hi << 16), key_shift) & key_mask
      a = common.dot(slot_to_group, gather_lanes(k_scale, h * head_dim + lane))
      zero = common.dot(slot_to_group,
                        gather_lanes(k_zero, jnp.where(two_bit, h * hot + lane, -1)))
      u = (codes.astype(jnp.float32) * jnp.where(two_bit, a, 2 * a)
           + jnp.where(two_bit, zero, -a))
      u = common.dot(u, t_ref[...])
      lo, hi = word_halves(k_hot, h * mask_words + lax.div(lane, 32))
      anomalous = (lax.shift_right_logical(lo | (hi << 16), lax.rem(lane, 32)) & 1).astype(
          jnp.float32)
      position = common.channel_positions(anomalous, common.dot(anomalous, upper), hot)
      for g in range(block // size):
        permutation = jnp.where(channel_row == position[g:g + 1, :], 1.0, 0.0)
        k_ref[g * size:(g + 1) * size, :] = common.dot(u[g * size:(g + 1) * size, :], permutation)
      value_word, value_digit = common.value_code_lanes(h * head_dim + lane)
      lo, hi = word_halves(v_codes, value_word)
      digits = common.ternary_digit(lo, hi, value_digit)
      v = ((digits - 1).astype(jnp.float32)
           * common.dot(slot_to_group, gather_lanes(v_scale, h * head_dim + lane)))
      online_update(h, q_ref[h], k_ref[...], v, visible, value_visible, m_ref, l_ref, acc_ref)

  decode_step(settings, block, tuple(bounds_ref[3 * b + i] for i in range(3)), attend_block,
              o_ref, lse_ref, m_ref, l_ref, acc_ref)
