"""Flash-decoding over VidKV's packed 1.x-bit cache as a Pallas kernel with Triton lowering.

Layout (``effjax.kv_cache.VidKVCache``; ``H`` kv heads, ``D = head_dim``, ``hot`` 2-bit channels
per key group, ``n = D - hot``):

* ``k_codes`` uint32 ``[batch, slots, H, ceil(hot / 16) + ceil(n / 32)]``: a slot's key in the
  group's stored order: 2-bit codes of its ``hot`` anomalous channels (ascending), then 1-bit codes
  of the orthonormal real FFT of its ``n`` normal channels;
* ``k_scale`` ``[batch, slots / G, H, D]`` (2-bit steps, then 1-bit scales ``a``), ``k_zero``
  ``[batch, slots / G, H, hot]``, ``k_hot`` uint32 ``[batch, slots / G, H, ceil(D / 32)]`` (the
  group's anomalous-channel mask);
* ``v_codes`` uint32 ``[batch, slots, ceil(H * D / 20)]``: base-3 ternary codes of a token's values,
  heads then channels, 20 per word; ``v_scale`` ``[batch, slots / G, H, D]``.

One program per (batch row, kv head, split) holds all ``seq * group`` query rows of its kv head
(GQA: the codes are read once per kv head) and walks its share of the quantized slots one key
group (G slots) at a time (:func:`pallas_kernels.kv_decode.gpu.flash_decode`: float32 online
softmax, per-split normalized output and natural-log LSE, combined by the caller with
:func:`pallas_kernels.kv_decode.common.combine`). Per group, in registers:

1. keys in stored order: each lane selects its code word (a 2-bit or a 1-bit one), shifts and
   masks, and decodes ``code * step + zero`` (2-bit lanes) or ``(2 code - 1) * a`` (1-bit lanes);
2. ``u @ transform`` (``[G, D] @ [D, D]``, the constant ``blockdiag(I_hot, inverse real FFT)``)
   turns the coefficients back into the normal channels;
3. the channels go back in place with ``u @ P``, ``P [D, D]`` one-hot at ``(position[c], c)``,
   where ``position`` comes from the group's mask and its prefix sum (a Triton scan);
4. values: each lane selects its base-3 word and divides it by its static power of 3,
   ``digit = (word // 3**i) % 3``, ``(digit - 1) * a``.

Queries may be several per row (``seq > 1``): query row ``r`` sees slots up to ``last + r //
group`` only, so a query inside the quantized range is causal.

Memory: HBM reads per slot and kv head at ``D = 64``, ``G = 32``, ``key_bits = 1.5``, 3 kv heads:
key codes 12 bytes, value codes 13.3 (10 words per token for 3 heads; a program loads the up to 5
words its head's channels span, neighbours' shared through L2), per-group scales, zero points
and mask 10.3 amortized: about 36 bytes against 256 for float16 K and V (7x less). No
full-precision copy of the cache exists; the results are ``batch * kv_heads * num_splits * rows *
(D + 1)`` float32. Compute per group: two ``[G, D] @ [D, D]`` key matmuls (3xTF32 on tensor cores:
about float32 accuracy; the interpreter uses float32) besides the attention's two ``[rows, D] x
[D, G]`` ones (IEEE float32, as KIVI's kernel), so this kernel may be compute-bound where KIVI's is
bandwidth-bound: not yet timed on a GPU.

Limits: Triton tiles need powers of two, so ``head_dim`` and G must be powers of two >= 16 (else
NotImplementedError, and dispatch falls back to XLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int, UInt32

from pallas_kernels.interpret import gpu_interpret
from pallas_kernels.kv_decode import common
from pallas_kernels.kv_decode.gpu import (
    check_tiles,
    columns,
    flash_decode,
    launch,
    splits_or_default,
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
    num_splits: int | None = None,
    interpret: bool | None = None,
) -> tuple[Float[Array, "batch splits seq heads head_dim"], Float[Array, "batch splits seq heads"]]:
  """Per-split attention of ``q`` over the quantized slots ``[start[b], end)`` (layout: module
  docstring), query ``s`` seeing slots up to ``last + s`` only.

  Args:
    transform: float32 ``blockdiag(I_hot, M)`` with ``M`` the inverse orthonormal real FFT of
      ``D - hot`` points as a matrix (``x = c @ M``): maps a decoded stored-order key to the
      anomalous then the normal channels.
    hot: 2-bit (anomalous) channels per key group.
    num_splits: default :func:`pallas_kernels.kv_decode.gpu.default_num_splits`.
    interpret: run in Pallas' interpreter; None follows ``pallas_kernels.interpret``.

  Returns:
    Each split's float32 normalized output and natural-log LSE (-inf, output 0: saw nothing).

  Raises:
    NotImplementedError: off a GPU and not interpreting, or ``head_dim``/G not a power of two
      >= 16.
    ValueError: the arrays do not have VidKV's layout.
  """
  interpret = gpu_interpret(interpret)
  num_splits = splits_or_default(num_splits, q, k_codes, group_size)
  common.check_vidkv(q, k_codes, k_scale, k_zero, k_hot, v_codes, v_scale, transform, hot=hot,
                     group_size=group_size, num_splits=num_splits)
  check_tiles(q.shape[3], group_size)
  settings = common.VidKVSettings(hot=hot, **common.geometry(
      q, k_codes.shape[2], group_size=group_size, num_splits=num_splits, scale=scale))
  return _decode_jit(settings, interpret, q, k_codes, k_scale, k_zero, k_hot, v_codes, v_scale,
                     transform, start, end, last)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode_jit(settings: common.VidKVSettings, interpret: bool, q, k_codes, k_scale, k_zero,
                k_hot, v_codes, v_scale, transform, start, end, last):
  batch = q.shape[0]
  if not settings.hot:
    k_zero = k_scale  # no 2-bit channel: never read, stands in for the empty array
  bounds = jnp.stack([start.astype(jnp.int32), *(jnp.broadcast_to(x.astype(jnp.int32), (batch,))
                                                 for x in (end, last, end))], axis=1)

  def per_head(array):
    return pl.BlockSpec((None, array.shape[1], None, array.shape[3]),
                        lambda b, h, s: (b, 0, h, 0))

  inputs = (k_codes, k_scale, k_zero, k_hot, v_codes, v_scale, transform)
  specs = [*(per_head(x) for x in inputs[:4]),
           pl.BlockSpec((None, *v_codes.shape[1:]), lambda b, h, s: (b, 0, 0)),
           per_head(v_scale), pl.BlockSpec(transform.shape, lambda b, h, s: (0, 0))]
  # Off the interpreter the key matmuls run on tensor cores as 3xTF32 (about float32 accuracy).
  precision = (lax.Precision.HIGHEST if interpret
               else lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
  return launch(functools.partial(_kernel, settings, precision), settings, interpret, q, inputs,
                specs, bounds, "vidkv_decode")


def _kernel(settings: common.VidKVSettings, precision, q_ref, kc_ref, ks_ref, kz_ref, kh_ref,
            vc_ref, vs_ref, t_ref, bounds_ref, o_ref, lse_ref):
  """One (row, kv head, split): dequantizes each key group in registers (module docstring)."""
  size, hot, head_dim = settings.group_size, settings.hot, settings.head_dim
  lane = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
  key_word, key_shift, key_mask = common.key_code_lanes(lane, hot)
  two_bit = lane < hot
  flat = pl.program_id(1) * head_dim + lane
  value_word, value_digit = common.value_code_lanes(flat)
  value_power = common.power_of_three(value_digit).astype(jnp.uint32)
  first_word = lax.div(pl.program_id(1) * head_dim, common.TERNARY_PER_WORD)
  transform = t_ref[...]
  channel_row = lax.broadcasted_iota(jnp.int32, (head_dim, head_dim), 0)

  def load_group(j):
    slots = pl.ds(j * size, size)
    words = columns(kc_ref, slots, key_word)
    codes = ((words >> key_shift.astype(jnp.uint32)) & key_mask.astype(jnp.uint32))
    a = ks_ref[j, :].astype(jnp.float32)[None, :]
    zero = _row(kz_ref, j, hot, lane).astype(jnp.float32)
    u = codes.astype(jnp.float32) * jnp.where(two_bit, a, 2 * a) + jnp.where(two_bit, zero, -a)
    mask = _row(kh_ref, j, kh_ref.shape[1], lax.div(lane, 32))
    anomalous = ((mask >> lax.rem(lane, 32).astype(jnp.uint32)) & 1).astype(jnp.int32)
    position = common.channel_positions(anomalous, jnp.cumsum(anomalous, axis=1), hot)
    permutation = jnp.where(channel_row == position, 1.0, 0.0)
    k = common.dot(common.dot(u, transform, precision=precision), permutation,
                   precision=precision)
    digits = (_value_words(vc_ref, slots, value_word, first_word) // value_power) % 3
    v = (digits.astype(jnp.float32) - 1) * vs_ref[j, :].astype(jnp.float32)[None, :]
    return k, v

  flash_decode(settings, q_ref, bounds_ref[0], bounds_ref[1], load_group, o_ref, lse_ref,
               last=bounds_ref[2])


def _row(ref, j, width: int, column_of_lane):
  """``[1, head_dim]`` in ``ref``'s dtype: lane ``c`` is ``ref[j, column_of_lane[c]]`` (0 where
  no column matches), from ``width`` scalar loads (any ``width``, a power of two or not)."""
  out = jnp.zeros(column_of_lane.shape, ref.dtype)
  for column in range(width):
    out = jnp.where(column_of_lane == column, ref[j, column], out)
  return out


def _value_words(ref, slots: pl.Slice, word_of_lane, first_word):
  """uint32 ``[G, head_dim]``: each lane's base-3 value word, one column load per word the kv
  head's channels span (not all of the token's words)."""
  span = -(-(common.TERNARY_PER_WORD - 1 + word_of_lane.shape[1]) // common.TERNARY_PER_WORD)
  shape = (slots.size, word_of_lane.shape[1])
  words = jnp.zeros(shape, jnp.uint32)
  for i in range(span):
    column = jnp.minimum(first_word + i, ref.shape[1] - 1)
    words = jnp.where(word_of_lane == first_word + i,
                      jnp.broadcast_to(ref[slots, column][:, None], shape), words)
  return words
