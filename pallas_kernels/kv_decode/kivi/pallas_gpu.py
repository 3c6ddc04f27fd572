"""Flash-decoding over KIVI's packed quantized cache as a Pallas kernel with Triton lowering.

One program per (batch row, kv head, split): it holds all ``seq * group`` query rows of its kv
head (GQA: K/V are read once per kv head, never repeated), walks its share of the filled
quantized prefix one key group (G slots) at a time and keeps float32 online-softmax statistics.
Per group it loads the packed uint32 key and value codes, the group's per-channel key scale/zero
row and the G slots' per-token value scales/zeros, and dequantizes in registers: the word holding
channel ``c`` is selected per lane, shifted by ``bits * (c % (32 // bits))`` and masked. Slots
outside ``[start, end)`` are masked. Each split writes its normalized output and natural-log LSE
(flash-decoding, Dao et al. 2023); the caller combines the splits (and the full-precision
residual) with :func:`pallas_kernels.kv_decode.common.combine`.

Split-K: the ``num_splits`` programs of a (row, kv head) share the traced filled range
``[start // G, ceil(end / G))`` of groups equally, so an empty or short cache does no work past
its length and a long one uses ``batch * kv_heads * num_splits`` programs.

Memory: HBM traffic is the packed codes plus scales of the filled slots (2-bit, G = 32,
head_dim 64: 48 bytes per slot and kv head, vs 256 for float16 K/V); the results are
``batch * kv_heads * num_splits * rows * (head_dim + 1)`` float32. No full-precision copy of the
cache exists. Registers hold one ``[G, head_dim]`` float32 key and value tile; Triton stages the
dots' operands through 15 to 30 KB of shared memory (head_dim 64 to 128, 2 or 4 bits, measured
with Triton and ptxas), under :data:`SHARED_MEMORY_BUDGET`.

Limits: Triton tiles need powers of two, so ``head_dim`` and G must be powers of two >= 16 (else
NotImplementedError, and dispatch falls back to XLA). Float32 dots use IEEE precision.
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

MIN_TILE = 16
# Shared memory a decode kernel may take per program: under the 99 KB an Ada GPU (sm_89: L4,
# L40S, RTX 4090), the smallest of the supported families, gives one block (A100 163 KB,
# H100/H200 227 KB), so every kernel compiles for every card. Triton stages dot operands and
# layout conversions through it: tiles sized to fit, not the card's limit.
SHARED_MEMORY_BUDGET = 96 * 1024
_TARGET_PROGRAMS = 264  # 2 per SM of an H100/H200
_MIN_GROUPS_PER_SPLIT = 8


def check_tiles(head_dim: int, group_size: int) -> None:
  """Raises NotImplementedError unless ``head_dim`` and G are Triton tiles (powers of two >=
  :data:`MIN_TILE`)."""
  for name, value in (("head_dim", head_dim), ("group_size", group_size)):
    if value < MIN_TILE or value & (value - 1):
      raise NotImplementedError(f"Triton decode kernel needs {name} a power of two >= "
                                f"{MIN_TILE}, got {value}")


def splits_or_default(num_splits: int | None, q, k_codes, group_size: int) -> int:
  """``num_splits``, or :func:`default_num_splits` for ``q`` over ``k_codes [batch, slots,
  kv_heads, ...]`` when None."""
  if num_splits is not None:
    return num_splits
  return default_num_splits(q.shape[0], k_codes.shape[2], k_codes.shape[1], group_size)


def default_num_splits(batch: int, kv_heads: int, slots: int, group_size: int) -> int:
  """Splits per (row, kv head): enough programs to fill the GPU (about :data:`_TARGET_PROGRAMS`),
  each over at least :data:`_MIN_GROUPS_PER_SPLIT` key groups of a full cache."""
  wanted = -(-_TARGET_PROGRAMS // (batch * kv_heads))
  return max(1, min(wanted, slots // group_size // _MIN_GROUPS_PER_SPLIT))


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
    interpret: bool | None = None,
) -> tuple[Float[Array, "batch splits seq heads head_dim"], Float[Array, "batch splits seq heads"]]:
  """Per-split attention of ``q`` over the quantized slots ``[start[b], end)`` (layout:
  :mod:`pallas_kernels.kv_decode.common`). Every query sees every one of those slots (the
  caller's causal bound lies past ``end``).

  Args:
    num_splits: default :func:`default_num_splits`.
    interpret: run in Pallas' interpreter; None follows ``pallas_kernels.interpret``.

  Returns:
    Each split's float32 normalized output and natural-log LSE (-inf, output 0: saw nothing).

  Raises:
    NotImplementedError: off a GPU and not interpreting, or ``head_dim``/G not a power of two
      >= 16.
    ValueError: the arrays do not have KIVI's layout.
  """
  interpret = gpu_interpret(interpret)
  num_splits = splits_or_default(num_splits, q, k_codes, group_size)
  common.check(q, k_codes, k_scale, v_codes, v_scale, key_bits=key_bits, value_bits=value_bits,
               group_size=group_size, num_splits=num_splits)
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


def launch(kernel, settings: common.Geometry, interpret: bool, q, inputs, in_specs, bounds,
           name: str):
  """``pallas_call`` of a decode kernel on grid ``(batch, kv_heads, num_splits)``.

  ``kernel(q_ref, *input_refs, bounds_ref, o_ref, lse_ref)`` gets its kv head's grouped queries
  ``[rows, head_dim]`` (:func:`common.group_queries`, rows a power of two >= 16), the ``inputs``
  blocked by ``in_specs`` and its batch row of ``bounds [batch, n]``; returns
  :func:`common.ungroup`'s per-split outputs and LSEs.
  """
  batch, kv_heads = q.shape[0], q.shape[2] // settings.group
  rows = max(MIN_TILE, 1 << (settings.rows - 1).bit_length())
  queries = common.group_queries(q, kv_heads, settings.scale, rows)
  shape = (batch, kv_heads, settings.num_splits, rows)
  out, lse = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, settings.num_splits),
      in_specs=[pl.BlockSpec((None, None, rows, settings.head_dim), lambda b, h, s: (b, h, 0, 0)),
                *in_specs, pl.BlockSpec((None, bounds.shape[1]), lambda b, h, s: (b, 0))],
      out_specs=[pl.BlockSpec((None, None, None, rows, settings.head_dim),
                              lambda b, h, s: (b, h, s, 0, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0))],
      out_shape=[jax.ShapeDtypeStruct((*shape, settings.head_dim), jnp.float32),
                 jax.ShapeDtypeStruct(shape, jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name=name,
  )(queries, *inputs, bounds)
  return common.ungroup(settings, out, lse)


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


def flash_decode(settings: common.Geometry, first, end, load_group, o_ref, lse_ref, *,
                 last=None) -> None:
  """One program's split: float32 online softmax of its query rows over its share of the key
  groups overlapping slots ``[first, end)``, then its normalized output and natural-log LSE.

  Split-K: the ``num_splits`` programs of a (row, kv head) share the traced filled range
  ``[first // G, ceil(end / G))`` of groups equally, so an empty or short cache does no work past
  its length.

  Args:
    load_group: ``j -> (logits, v)``: float32 ``[rows, G]`` logits of the (scaled) query rows
      against group ``j``'s keys, unmasked, and its ``[G, head_dim]`` values.
    last: None (every row sees every slot of the range) or the slot of query 0: query row ``r``
      then sees slots up to ``last + r // group`` only (causal, several queries).
  """
  size, splits = settings.group_size, settings.num_splits
  lo = first // size
  hi = jnp.maximum((end + size - 1) // size, lo)
  per_split = (hi - lo + splits - 1) // splits
  begin = lo + pl.program_id(2) * per_split
  stop = jnp.minimum(begin + per_split, hi)
  rows = o_ref.shape[0]
  row = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)

  def step(j, carry):
    m, l, acc = carry
    logits, v = load_group(j)
    slot = j * size + lax.broadcasted_iota(jnp.int32, (size,), 0)
    in_range = (slot >= first) & (slot < end)
    visible = in_range[None, :] if last is None else common.visible_to_rows(
        slot[None, :], row, first, end, last, settings.group)
    logits = jnp.where(visible, logits, -jnp.inf)
    m_new = jnp.maximum(m, logits.max(axis=1))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen nothing stay at 0
    p = jnp.exp(logits - shift[:, None])
    rescale = jnp.exp(m - shift)
    v = jnp.where(in_range[:, None], v, 0.0)  # 0 * garbage stays 0
    return m_new, rescale * l + p.sum(axis=1), rescale[:, None] * acc + common.dot(p, v)

  init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
          jnp.zeros((rows, settings.head_dim), jnp.float32))
  m, l, acc = lax.fori_loop(begin, stop, step, init)
  seen = l > 0
  l = jnp.where(seen, l, 1.0)
  o_ref[...] = acc / l[:, None]
  lse_ref[...] = jnp.where(seen, m + jnp.log(l), -jnp.inf)


def columns(ref, slots: pl.Slice, column_of_lane):
  """``[G, head_dim]``: lane ``c`` of slot row ``t`` is ``ref[t, column_of_lane[c]]``, one
  column load and select per column of ``ref`` (Triton has no lane gather)."""
  shape = (slots.size, column_of_lane.shape[1])
  out = None
  for column in range(ref.shape[1]):
    values = jnp.broadcast_to(ref[slots, column][:, None], shape)
    out = values if out is None else jnp.where(column_of_lane == column, values, out)
  return out


def _unpack(ref, slots, lane, bits: int):
  """int32 ``[G, head_dim]`` codes of the slots from their packed uint32 words."""
  per_word = 32 // bits
  words = columns(ref, slots, lane // per_word)
  shift = ((lane % per_word) * bits).astype(jnp.uint32)
  return ((words >> shift) & jnp.uint32((1 << bits) - 1)).astype(jnp.int32)

