"""Flash-decoding over KIVI's packed quantized cache as a Pallas kernel with Triton lowering.

One program per (batch row, kv head, split) (:func:`pallas_kernels.kv_decode.common_gpu.launch`)
holds all ``seq * group`` query rows of its kv head, walks its share of the filled quantized
prefix one key group (G slots) at a time and keeps float32 online-softmax statistics
(:func:`pallas_kernels.kv_decode.common_gpu.flash_decode`). Per group it loads the packed uint32
key and value codes, the group's per-channel key scale/zero row and the G slots' per-token value
scales/zeros, and dequantizes in registers: the word holding channel ``c`` is selected per lane,
shifted by ``bits * (c % (32 // bits))`` and masked. Slots outside ``[start, end)`` are masked.
Each split writes its normalized output and natural-log LSE; the caller combines the splits (and
the full-precision residual) with :func:`pallas_kernels.kv_decode.common.combine`.

Split-K: the ``num_splits`` programs of a (row, kv head) share the traced filled range
``[start // G, ceil(end / G))`` of groups equally, so an empty or short cache does no work past
its length and a long one uses ``batch * kv_heads * num_splits`` programs.

Memory: HBM traffic is the packed codes plus scales of the filled slots (2-bit, G = 32,
head_dim 64: 48 bytes per slot and kv head, vs 256 for float16 K/V); the results are
``batch * kv_heads * num_splits * rows * (head_dim + 1)`` float32. No full-precision copy of the
cache exists. Registers hold one ``[G, head_dim]`` float32 key and value tile; Triton stages the
dots' operands through shared memory, under
:data:`pallas_kernels.kv_decode.common_gpu.SHARED_MEMORY_BUDGET`.

Limits: Triton tiles need powers of two, so ``head_dim`` and G must be powers of two >= 16 (else
NotImplementedError, and dispatch falls back to XLA). Float32 dots use IEEE precision.
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
from pallas_kernels.kv_decode.common_gpu import (
    check_tiles,
    columns,
    flash_decode,
    key_group_splits,
    launch,
)


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
  """Per-split attention of ``q`` over the quantized slots ``[start[b], end)`` (layout:
  :mod:`pallas_kernels.kv_decode.common`). Every query sees every one of those slots (the
  caller's causal bound lies past ``end``).

  Args:
    block_sizes: ``num_splits`` (None:
      :func:`pallas_kernels.kv_decode.common_gpu.default_num_splits`); ``block_slots`` None or G
      (the kernel steps one key group at a time). None: both heuristic.
    interpret: run in Pallas' interpreter; None follows ``pallas_kernels.interpret``.

  Returns:
    Each split's float32 normalized output and natural-log LSE (-inf, output 0: saw nothing).

  Raises:
    NotImplementedError: off a GPU and not interpreting, or ``head_dim``/G not a power of two
      >= 16.
    ValueError: the arrays do not have KIVI's layout, or ``block_slots`` is not G.
  """
  interpret = gpu_interpret(interpret)
  num_splits = key_group_splits(block_sizes, q, k_codes, group_size)
  common.check(q, k_codes, k_scale, v_codes, v_scale, key_bits=key_bits, value_bits=value_bits,
               group_size=group_size)
  check_tiles(q.shape[3], group_size)
  settings = common.Settings(key_bits=key_bits, value_bits=value_bits, **common.geometry(
      q, k_codes.shape[2], group_size=group_size, num_splits=num_splits, scale=scale))
  return _decode_jit(settings, interpret, q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                     start, end)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode_jit(settings: common.Settings, interpret: bool, q, k_codes, k_scale, k_zero, v_codes,
                v_scale, v_zero, start, end):
  batch = q.shape[0]
  bounds = jnp.stack([start.astype(jnp.int32),
                      jnp.broadcast_to(end.astype(jnp.int32), (batch,))], axis=1)

  def cache_spec(array):
    return pl.BlockSpec((None, array.shape[1], None, array.shape[3]),
                        lambda b, h, s: (b, 0, h, 0))

  cache = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
  return launch(functools.partial(_kernel, settings), settings, interpret, q, cache,
                [cache_spec(x) for x in cache], bounds, "kivi_decode")


def _kernel(settings: common.Settings, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref,
            bounds_ref, o_ref, lse_ref):
  """One (row, kv head, split): online softmax over its share of the filled key groups."""
  size = settings.group_size
  lane = lax.broadcasted_iota(jnp.int32, (1, settings.head_dim), 1)
  group_of_lane = lane // size  # value scales: one per G channels
  q = q_ref[...]

  def load_group(j):
    slots = pl.ds(j * size, size)
    k = (_unpack(kc_ref, slots, lane, settings.key_bits).astype(jnp.float32)
         * ks_ref[j, :].astype(jnp.float32)[None, :] + kz_ref[j, :].astype(jnp.float32)[None, :])
    v = (_unpack(vc_ref, slots, lane, settings.value_bits).astype(jnp.float32)
         * columns(vs_ref, slots, group_of_lane).astype(jnp.float32)
         + columns(vz_ref, slots, group_of_lane).astype(jnp.float32))
    return common.dot(q, k, trans_b=True), v

  flash_decode(settings, bounds_ref[0], bounds_ref[1], load_group, o_ref, lse_ref)


def _unpack(ref, slots, lane, bits: int):
  """int32 ``[G, head_dim]`` codes of the slots from their packed uint32 words."""
  per_word = 32 // bits
  words = columns(ref, slots, lane // per_word)
  shift = ((lane % per_word) * bits).astype(jnp.uint32)
  return ((words >> shift) & jnp.uint32((1 << bits) - 1)).astype(jnp.int32)

