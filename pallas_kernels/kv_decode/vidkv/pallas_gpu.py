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
group (G slots) at a time (:func:`pallas_kernels.kv_decode.common_gpu.flash_decode`: float32 online
softmax, per-split normalized output and natural-log LSE, combined by the caller with
:func:`pallas_kernels.kv_decode.common.combine`). The keys are ``k = u T P``: ``u`` the decoded
stored-order key, ``T = transform`` (the constant ``blockdiag(I_hot, inverse real FFT)``: the
coefficients back to the normal channels) and ``P [D, D]`` one-hot at ``(position[c], c)`` (the
channels back in place; ``position`` from the group's mask and its prefix sum, a Triton scan).
The kernel never forms ``k``: the logits are ``q k^T = (q P^T T^T) u^T``, the queries mapped
into stored order instead. Per group, in registers, ``_CHUNK`` lanes at a time:

1. ``q P^T`` from ``[rows, 32] x [D, 32]`` products with the one-hot columns of 32 channels
   (one word of the mask each);
2. a loop over 32-lane chunks: ``(q P^T) @ T[chunk]^T`` (``[rows, D] x [32, D]``), and the keys'
   chunk in stored order (each lane selects its code word, a 2-bit or a 1-bit one, shifts and
   masks, and decodes ``code * step + zero`` on 2-bit lanes, ``(2 code - 1) * a`` on 1-bit ones)
   for the chunk's share of the logits;
3. values: each lane selects its base-3 word and divides it by its static power of 3,
   ``digit = (word // 3**i) % 3``, ``(digit - 1) * a``.

Queries may be several per row (``seq > 1``): query row ``r`` sees slots up to ``last + r //
group`` only, so a query inside the quantized range is causal.

Memory: HBM reads per slot and kv head at ``D = 64``, ``G = 32``, ``key_bits = 1.5``, 3 kv heads:
key codes 12 bytes, value codes 13.3 (10 words per token for 3 heads; a program loads the up to 5
words its head's channels span, neighbours' shared through L2), per-group scales, zero points
and mask 10.3 amortized: about 36 bytes against 256 for float16 K and V (7x less). No
full-precision copy of the cache exists; the results are ``batch * kv_heads * num_splits * rows *
(D + 1)`` float32. Compute per group: the two ``[rows, D] x [D, D]`` query maps (3xTF32 on
tensor cores: about float32 accuracy; the interpreter uses float32), half the work of mapping
the keys (``[G, D] @ [D, D]``) while ``rows <= G``, besides the attention's two ``[rows, D] x
[D, G]`` matmuls (IEEE float32, as KIVI's kernel), so this kernel may be compute-bound where
KIVI's is bandwidth-bound.

Shared memory (Triton stages dot operands through it, 3xTF32 ones split in two): only
``[D, 32]`` one-hot and transform tiles, and the transform's chunk loop is a loop, not unrolled,
because Triton hoists loop-invariant loads and their shared-memory copies out of the group loop;
``[D, D]`` tiles would not fit :data:`pallas_kernels.kv_decode.common_gpu.SHARED_MEMORY_BUDGET` at
``D = 128``.

Limits: Triton tiles need powers of two, so ``head_dim`` and G must be powers of two >= 16 (else
NotImplementedError, and dispatch falls back to XLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int, UInt32

from pallas_kernels.interpret import gpu_interpret
from pallas_kernels.kv_decode import common
from pallas_kernels.kv_decode.common_gpu import (
    check_tiles,
    columns,
    flash_decode,
    key_group_splits,
    launch,
)
from pallas_kernels.shapes import cdiv

# Lanes per step of the key path: one word of the anomalous-channel mask, and [head_dim, 32]
# one-hot and transform tiles (16 KB at head_dim 128) instead of [head_dim, head_dim] ones
# (chunk = head_dim when head_dim is 16).
_CHUNK = 32


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
  """Per-split attention of ``q`` over the quantized slots ``[start[b], end)`` (layout: module
  docstring), query ``s`` seeing slots up to ``last + s`` only.

  Args:
    transform: float32 ``blockdiag(I_hot, M)`` with ``M`` the inverse orthonormal real FFT of
      ``D - hot`` points as a matrix (``x = c @ M``): maps a decoded stored-order key to the
      anomalous then the normal channels.
    hot: 2-bit (anomalous) channels per key group.
    block_sizes: ``num_splits`` (None:
      :func:`pallas_kernels.kv_decode.common_gpu.default_num_splits`); ``block_slots`` None or G
      (the kernel steps one key group at a time). None: both heuristic.
    interpret: run in Pallas' interpreter; None follows ``pallas_kernels.interpret``.

  Returns:
    Each split's float32 normalized output and natural-log LSE (-inf, output 0: saw nothing).

  Raises:
    NotImplementedError: off a GPU and not interpreting, or ``head_dim``/G not a power of two
      >= 16.
    ValueError: the arrays do not have VidKV's layout, or ``block_slots`` is not G.
  """
  interpret = gpu_interpret(interpret)
  num_splits = key_group_splits(block_sizes, q, k_codes, group_size)
  common.check_vidkv(q, k_codes, k_scale, k_zero, k_hot, v_codes, v_scale, transform, hot=hot,
                     group_size=group_size)
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
  """One (row, kv head, split): the logits of each key group from its codes and the queries
  mapped into stored order, ``chunk`` lanes at a time (module docstring)."""
  size, hot, head_dim = settings.group_size, settings.hot, settings.head_dim
  chunk = min(_CHUNK, head_dim)
  lane = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
  flat = pl.program_id(1) * head_dim + lane
  value_word, value_digit = common.value_code_lanes(flat)
  value_power = common.power_of_three(value_digit).astype(jnp.uint32)
  first_word = lax.div(pl.program_id(1) * head_dim, common.TERNARY_PER_WORD)
  channel = lax.broadcasted_iota(jnp.int32, (head_dim, chunk), 0)
  starts = range(0, head_dim, chunk)
  queries = [q_ref[:, pl.ds(c0, chunk)] for c0 in starts]

  def stored_order_keys(j, slots, c0):
    """float32 ``[G, chunk]``: lanes ``[c0, c0 + chunk)`` of the group's decoded stored-order
    keys (``code * step + zero`` on 2-bit lanes, ``(2 code - 1) * a`` on 1-bit ones)."""
    lanes = c0 + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    key_word, key_shift, key_mask = common.key_code_lanes(lanes, hot)
    words = columns(kc_ref, slots, key_word)
    codes = (words >> key_shift.astype(jnp.uint32)) & key_mask.astype(jnp.uint32)
    a = ks_ref[j, pl.ds(c0, chunk)].astype(jnp.float32)[None, :]
    two_bit = lanes < hot
    zero = plgpu.load(kz_ref.at[j, pl.ds(c0, chunk)], mask=two_bit[0], other=0)
    zero = zero.astype(jnp.float32)[None, :]
    return codes.astype(jnp.float32) * jnp.where(two_bit, a, 2 * a) + jnp.where(two_bit, zero, -a)

  def load_group(j):
    slots = pl.ds(j * size, size)
    # q P^T (P one-hot at (position[c], c)): the queries in the transform's output order.
    mapped, before = None, 0
    for c0, q in zip(starts, queries, strict=True):
      lanes = c0 + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
      anomalous = ((kh_ref[j, c0 // 32] >> lax.rem(lanes, 32).astype(jnp.uint32)) & 1
                   ).astype(jnp.int32)
      counted = jnp.cumsum(anomalous, axis=1) + before
      before = before + anomalous.sum()
      # channel_positions counts chunk-local lanes: hot + c0 puts normal channel c0 + l at
      # hot + c0 + l - counted.
      one_hot = jnp.where(channel == common.channel_positions(anomalous, counted, hot + c0),
                          1.0, 0.0)
      part = common.dot(q, one_hot, trans_b=True, precision=precision)
      mapped = part if mapped is None else mapped + part

    def project(i, logits):  # a loop, not unrolled: one transform tile in shared memory
      c0 = pl.multiple_of(i * chunk, chunk)
      stored = common.dot(mapped, t_ref[pl.ds(c0, chunk), :], trans_b=True, precision=precision)
      return logits + common.dot(stored, stored_order_keys(j, slots, c0), trans_b=True)

    # (q P^T T^T)[:, chunk] . u[:, chunk], summed over the chunks: q . (u T P) without forming k.
    logits = lax.fori_loop(0, head_dim // chunk, project,
                           jnp.zeros((q_ref.shape[0], size), jnp.float32))
    digits = (_value_words(vc_ref, slots, value_word, first_word) // value_power) % 3
    v = (digits.astype(jnp.float32) - 1) * vs_ref[j, :].astype(jnp.float32)[None, :]
    return logits, v

  flash_decode(settings, bounds_ref[0], bounds_ref[1], load_group, o_ref, lse_ref,
               last=bounds_ref[2])


def _value_words(ref, slots: pl.Slice, word_of_lane, first_word):
  """uint32 ``[G, head_dim]``: each lane's base-3 value word, one column load per word the kv
  head's channels span (not all of the token's words)."""
  span = cdiv(common.TERNARY_PER_WORD - 1 + word_of_lane.shape[1], common.TERNARY_PER_WORD)
  shape = (slots.size, word_of_lane.shape[1])
  words = jnp.zeros(shape, jnp.uint32)
  for i in range(span):
    column = jnp.minimum(first_word + i, ref.shape[1] - 1)
    words = jnp.where(word_of_lane == first_word + i,
                      jnp.broadcast_to(ref[slots, column][:, None], shape), words)
  return words
