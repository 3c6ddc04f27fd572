"""What the three Triton decode kernels (``kivi``, ``vidkv``, ``xquant`` ``.pallas_gpu``) share:
the tile rules, the split heuristic, the ``pallas_call`` on grid ``(batch, kv_heads, splits)`` and
the flash-decoding loop of the kernels that step one key group at a time (KIVI, VidKV).

One program per (batch row, kv head, split) holds all ``seq * group`` query rows of its kv head
(GQA: the cache is read once per kv head, never repeated), walks its share of the filled
quantized slots and keeps float32 online-softmax statistics; each split writes its normalized
output and natural-log LSE (flash-decoding, Dao et al. 2023), which the caller combines with
:func:`pallas_kernels.kv_decode.common.combine`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kv_decode import common
from pallas_kernels.shapes import cdiv, next_power_of_two

MIN_TILE = 16
# Shared memory a decode kernel may take per program: under the 99 KB an Ada GPU (sm_89: L4,
# L40S, RTX 4090), the smallest of the supported families, gives one block (A100 163 KB,
# H100/H200 227 KB), so every kernel compiles for every card. Triton stages dot operands and
# layout conversions through it: tiles sized to fit, not the card's limit.
SHARED_MEMORY_BUDGET = 96 * 1024
_TARGET_PROGRAMS = 264  # 2 per SM of an H100/H200
_MIN_BLOCKS_PER_SPLIT = 8


def check_tiles(head_dim: int, group_size: int) -> None:
  """Raises NotImplementedError unless ``head_dim`` and G are Triton tiles (powers of two >=
  :data:`MIN_TILE`)."""
  for name, value in (("head_dim", head_dim), ("group_size", group_size)):
    if value < MIN_TILE or value & (value - 1):
      raise NotImplementedError(f"Triton decode kernel needs {name} a power of two >= "
                                f"{MIN_TILE}, got {value}")


def default_num_splits(batch: int, kv_heads: int, slots: int, block: int) -> int:
  """Splits per (row, kv head): enough programs to fill the GPU (about :data:`_TARGET_PROGRAMS`),
  each over at least :data:`_MIN_BLOCKS_PER_SPLIT` steps of ``block`` slots of a full cache."""
  wanted = cdiv(_TARGET_PROGRAMS, batch * kv_heads)
  return max(1, min(wanted, slots // block // _MIN_BLOCKS_PER_SPLIT))


def key_group_splits(block_sizes: common.DecodeBlockSizes | None, q, k_codes, group_size: int
                     ) -> int:
  """``num_splits`` of a kernel that steps one key group (G slots) at a time over ``k_codes
  [batch, slots, kv_heads, ...]``: the given one or :func:`default_num_splits`.

  Raises:
    ValueError: ``block_sizes.block_slots`` is neither None nor G.
  """
  sizes = common.block_sizes_or_default(block_sizes)
  if sizes.block_slots not in (None, group_size):
    raise ValueError(f"block_slots is {sizes.block_slots}; the KIVI and VidKV GPU kernels step "
                     f"one key group at a time: expected None or group_size={group_size}")
  if sizes.num_splits is not None:
    return sizes.num_splits
  return default_num_splits(q.shape[0], k_codes.shape[2], k_codes.shape[1], group_size)


def launch(kernel, settings: common.Geometry, interpret: bool, q, inputs, in_specs, bounds,
           name: str):
  """``pallas_call`` of a decode kernel on grid ``(batch, kv_heads, num_splits)``.

  ``kernel(q_ref, *input_refs, bounds_ref, o_ref, lse_ref)`` gets its kv head's grouped queries
  ``[rows, head_dim]`` (:func:`common.group_queries`, rows a power of two >= 16), the ``inputs``
  blocked by ``in_specs`` and its batch row of ``bounds [batch, n]``; returns
  :func:`common.ungroup`'s per-split outputs and LSEs.
  """
  batch, kv_heads = q.shape[0], q.shape[2] // settings.group
  rows = next_power_of_two(settings.rows, MIN_TILE)
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
