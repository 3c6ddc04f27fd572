"""FlashAttention-2 as Pallas kernels for TPU (Mosaic lowering).

Three kernels, each a grid of (query block, key block) steps with float32 accumulators in VMEM
scratch; every output block is written by one sequence of steps on one core, so all three are
deterministic:

* forward (Dao 2023, Algorithm 1), grid ``(batch, heads, q_blocks, kv_blocks)``: the key axis is
  "arbitrary" (sequential) and carries the running row max ``m``, row sum ``l`` and unnormalized
  output ``acc`` of the online softmax; the last step writes the output and the natural-log LSE.
* dq, same grid: recomputes ``P = exp(S - LSE)`` and accumulates ``dQ += dS K`` with
  ``dS = P * (dP - D)``, ``dP = dO V^T`` and ``D = rowsum(dO * O) - dLSE`` (the LSE cotangent
  folds into ``D``, since ``d LSE / d S = P``).
* dk/dv, grid ``(batch, kv_heads, kv_blocks, group, q_blocks)``: ``dV += P^T dO`` and
  ``dK += dS^T Q``. The GQA group and the query blocks are both "arbitrary" axes accumulating into
  the same dk/dv block, so a kv head's gradient sums its query heads in a fixed order in float32.

GQA/MQA by index mapping: query head ``h`` reads kv head ``h // group`` through the K/V
BlockSpecs; K/V are never repeated in memory.

Block skipping: the causal/window band (``masks.MaskSpec``) gives each block the contiguous range
of blocks on the other side that intersect it; with segment ids, the range is narrowed to the
blocks whose ``[min, max]`` id interval overlaps the block's own (computed once in XLA), and a
block inside the range is also skipped when the two intervals do not overlap. For sorted (packed)
ids that skips every block pair that shares no id; unsorted ids are still correct, with less
skipping. These small per-block tables reach the kernels through scalar prefetch (SMEM). A
skipped step does no compute (``pl.when``) and no DMA: its BlockSpec
index is clamped into the visible range, so it names the block just fetched (or the next one to
fetch) and the pipeline does not fetch again. Blocks entirely inside the band and one segment
("full" blocks) skip the mask arithmetic too.

Garbage (NaN) in masked positions: the logits and ``dS`` are masked with selects, never with
products, and before a matmul whose product with a zero probability would be ``0 * NaN``, key
rows that no query of the block sees (V in the forward, K in dq) and query rows that see no key of
the block (Q and dO in dk/dv) are zeroed.

Memory: O((q_len + kv_len) * head_dim) per (batch, head) in HBM, no ``[q_len, kv_len]`` buffer
(FlashAttention, Dao et al. 2022, with FlashAttention-2's sequence-parallel grid). The wrapper
makes heads-major ``[batch, heads, length, head_dim]`` copies of q, k, v (and dO), zero-padded to
whole blocks and head dims to a multiple of 128 lanes, and copies the results back: its
temporary HBM, O(length * head_dim) like the inputs. Per-query statistics (LSE,
``D = rowsum(dO * O)``) live in HBM as sublane-broadcast rows ``[batch, heads, 8, q_pad]``
float32 (32 bytes per query and head instead of the 512 of a lane-broadcast
``[..., q_pad, 128]`` column) and become lane-broadcast columns in VMEM by one transpose per
block; only ``[batch, heads, q_len]`` is kept between the forward and the backward pass. VMEM
holds a few ``[block_q, block_kv]`` float32 tiles, the double-buffered input blocks and the
accumulators (about 3 MiB at the default 512 x 512 blocks, head_dim 128).

Mosaic constraints: the last two dims of every block are multiples of (8, 128) or the whole
(padded) dim; :func:`default_block_sizes` picks multiples of 128, or one block per (8-padded)
length. Float32 inputs use ``precision=HIGHEST`` dots; bfloat16/float16 dots accumulate in
float32.

Limits: head dims below 128 are padded to 128 in heads-major copies (d = 64 moves twice the bytes).
With segment ids the skip tables take ``4 * batch * (4 * major + 2 * minor)`` bytes of SMEM
(major/minor: the block counts of the tiled and the looped side). Forward-mode autodiff is not
supported (``custom_vjp``); segment ids are not differentiable.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from pallas_kernels import shapes
from pallas_kernels.flash_attention import masks
from pallas_kernels.flash_attention.residuals import tag_residuals
from pallas_kernels.interpret import require_tpu_or_interpret

_LANES = 128
_SUBLANES = 8
# Default block target (positions per block) for head dims up to _WIDE_HEAD_DIM, halved above it.
_TARGET_BLOCK = 512
_WIDE_HEAD_DIM = 128
_PARALLEL, _ARBITRARY = pltpu.PARALLEL, pltpu.ARBITRARY


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """The ``[block_q, block_kv]`` tile of all three kernels.

  Attributes:
    block_q, block_kv: positive multiples of 8; each is capped at its length rounded up to 8. On
      a TPU, Mosaic also needs each to be a multiple of 128 unless it covers the whole length
      (the TPU interpreter does not).
  """
  block_q: int = _TARGET_BLOCK
  block_kv: int = _TARGET_BLOCK

  def __post_init__(self):
    for name in ("block_q", "block_kv"):
      value = getattr(self, name)
      if (not isinstance(value, int) or isinstance(value, bool) or value < 1
          or value % _SUBLANES):
        raise ValueError(f"BlockSizes.{name} must be a positive multiple of {_SUBLANES}, got "
                         f"{value!r}")

  def fit(self, q_len: int, kv_len: int, *, tpu: bool) -> BlockSizes:
    """Each block capped at its length rounded up to 8; with ``tpu``, checked for Mosaic.

    Raises:
      ValueError: with ``tpu``, a block that is neither a multiple of 128 nor the whole length.
    """
    fitted = BlockSizes(min(self.block_q, shapes.round_up(q_len, _SUBLANES)),
                        min(self.block_kv, shapes.round_up(kv_len, _SUBLANES)))
    if tpu:
      for name, length in (("block_q", q_len), ("block_kv", kv_len)):
        size = getattr(fitted, name)
        if size % _LANES and size != shapes.round_up(length, _SUBLANES):
          raise ValueError(f"block_sizes: {name} must be a multiple of {_LANES} on a TPU unless "
                           f"it covers the whole length {length}, got {self!r}")
    return fitted


def default_block_sizes(q_len: int, kv_len: int, head_dim: int) -> BlockSizes:
  """The block-size heuristic: the tile of all three kernels.

  The target is 512 positions per block (256 for head dims above 128, whose tiles are wider).
  A length that fits in the target is one block of the length rounded up to 8 (a whole dim, so
  Mosaic accepts it); a longer one is cut into ``ceil(length / target)`` near-equal blocks rounded
  up to a multiple of 128, so padding stays under 128 positions per block.
  """
  target = _TARGET_BLOCK if head_dim <= _WIDE_HEAD_DIM else _TARGET_BLOCK // 2
  return BlockSizes(_fit_block(q_len, target), _fit_block(kv_len, target))


def attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads v_head_dim"],
    *,
    causal: bool = False,
    q_segment_ids: Int[Array, "batch q_len"] | None = None,
    kv_segment_ids: Int[Array, "batch kv_len"] | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    scale: float,
    return_lse: bool = False,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> (Float[Array, "batch q_len heads v_head_dim"]
      | tuple[Float[Array, "batch q_len heads v_head_dim"], Float[Array, "batch heads q_len"]]):
  """FlashAttention-2 forward/backward Mosaic kernels; arguments as validated by effjax's
  ``flash_attention`` (``q [b, q_len, h, d]``, ``k [b, kv_len, kv_h, d]``, ``v [b, kv_len, kv_h,
  dv]``, ``h % kv_h == 0``, ``scale`` resolved to a float; causal is bottom-right aligned).

  Args:
    block_sizes: the tile, capped at the lengths (:meth:`BlockSizes.fit`); default
      :func:`default_block_sizes`.
    interpret: run in the TPU interpreter (CPU); None follows
      ``pallas_kernels.interpret.interpret_mode``.

  Returns:
    The output ``[b, q_len, h, dv]`` in q's dtype, and with ``return_lse`` the float32 LSE
    ``[b, h, q_len]`` (-inf for queries that see no key); both differentiable. float16 inputs
    are computed as float32 (Mosaic has no float16 vector loads on TPU v4 to v6e: the compiler
    rejects them), through a float32 copy of q, k, v and the output in HBM.

  Raises:
    NotImplementedError: not on a TPU and not interpreting (so dispatch tries the next
      implementation).
    TypeError: ``block_sizes`` is not a :class:`BlockSizes`.
    ValueError: on a TPU, a block that Mosaic's tiling rejects (:meth:`BlockSizes.fit`).
  """
  interpret = require_tpu_or_interpret(interpret)
  q_len, heads, head_dim = q.shape[1:]
  kv_len, kv_heads = k.shape[1:3]
  blocks = _block_sizes(block_sizes, q_len, kv_len, max(head_dim, v.shape[-1]),
                        tpu=not interpret)
  config = _Config(mask=masks.MaskSpec.create(q_len, kv_len, causal=causal, window=window),
                   scale=float(scale), softcap=softcap, block_q=blocks.block_q,
                   block_kv=blocks.block_kv,
                   group=heads // kv_heads, segments=q_segment_ids is not None,
                   interpret=interpret)
  dtype = q.dtype
  if dtype == jnp.float16:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  out, lse = _attention_jit(config, q, k, v, q_segment_ids, kv_segment_ids)
  out = out.astype(dtype)
  return (out, lse) if return_lse else out


def schedule_counts(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    q_segment_ids: Int[Array, "batch q_len"] | None = None,
    kv_segment_ids: Int[Array, "batch kv_len"] | None = None,
    block_sizes: BlockSizes | None = None,
    head_dim: int = 128,
) -> dict[str, int]:
  """What the kernels' grids do for one (batch row, query head), summed over the batch rows.

  Computed from the same schedule tables and index maps as the kernels (no kernel runs), so a
  TPU is not needed: how many grid steps the forward (query-major) and dk/dv (key-major)
  kernels have, how many compute (``computed``), how many of those skip the mask arithmetic
  (``unmasked``) and how many fetch a new K/V (forward; dq is the same) or Q/dO (dk/dv) block
  (``fetched``). Without skipping, each kernel computes and fetches on every grid step.

  Returns:
    ``{"<kernel>_<count>": int}`` for kernel in (forward, dkv), count in (steps, computed,
    unmasked, fetched).
  """
  blocks = _block_sizes(block_sizes, q_len, kv_len, head_dim, tpu=False)
  config = _Config(mask=masks.MaskSpec.create(q_len, kv_len, causal=causal, window=window),
                   scale=1.0, softcap=None, block_q=blocks.block_q, block_kv=blocks.block_kv,
                   group=1,
                   segments=q_segment_ids is not None, interpret=False)
  batch = 1 if q_segment_ids is None else q_segment_ids.shape[0]
  counts = {}
  for kernel, queries_major in (("forward", True), ("dkv", False)):
    schedule = _Schedule.create(config, q_segment_ids, kv_segment_ids,
                                queries_major=queries_major)
    major_count, minor_count = ((config.q_blocks, config.kv_blocks) if queries_major
                                else (config.kv_blocks, config.q_blocks))
    b, major, minor = jnp.meshgrid(jnp.arange(batch), jnp.arange(major_count),
                                   jnp.arange(minor_count), indexing="ij")
    visible, full = _block_kind(config, schedule.tables, b, major, minor,
                                queries_major=queries_major)
    row = _row(config, b, major, major_count)
    named = _clamp(minor, schedule.first[row], schedule.stop[row], minor_count)
    # Grid order: the forward walks (i, j) per head, dk/dv walks i per (key block, query head);
    # each walk fetches at its start and wherever the named block changes.
    sequences = named.reshape(batch, -1) if queries_major else named
    fetched = sequences[..., :1].size + jnp.sum(sequences[..., 1:] != sequences[..., :-1])
    counts.update({f"{kernel}_steps": int(visible.size), f"{kernel}_computed": int(visible.sum()),
                   f"{kernel}_unmasked": int((visible & full).sum()),
                   f"{kernel}_fetched": int(fetched)})
  return counts


def _block_sizes(block_sizes: BlockSizes | None, q_len: int, kv_len: int, head_dim: int, *,
                 tpu: bool) -> BlockSizes:
  """The given blocks or the default ones, fitted to the lengths."""
  block_sizes = shapes.resolve_block_sizes(
      block_sizes, BlockSizes, lambda: default_block_sizes(q_len, kv_len, head_dim))
  return block_sizes.fit(q_len, kv_len, tpu=tpu)


def _fit_block(length: int, target: int) -> int:
  """``length`` rounded up to 8 if that fits in ``target``, else near-equal 128-multiples."""
  if shapes.round_up(length, _SUBLANES) <= target:
    return shapes.round_up(length, _SUBLANES)
  return shapes.balanced_block(length, target, _LANES)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call (hashable: a ``jit`` static argument)."""
  mask: masks.MaskSpec
  scale: float
  softcap: float | None
  block_q: int
  block_kv: int
  group: int
  segments: bool
  interpret: Any  # pallas_call's interpret: pltpu.InterpretParams (TPU interpreter) or False

  @property
  def q_pad(self) -> int:
    return shapes.round_up(self.mask.q_len, self.block_q)

  @property
  def kv_pad(self) -> int:
    return shapes.round_up(self.mask.kv_len, self.block_kv)

  @property
  def q_blocks(self) -> int:
    return self.q_pad // self.block_q

  @property
  def kv_blocks(self) -> int:
    return self.kv_pad // self.block_kv


# ---------------------------------------------------------------------------------------------
# custom_vjp and the XLA glue around the kernels


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config: _Config, q, k, v, q_segment_ids, kv_segment_ids):
  return _forward(config, q, k, v, q_segment_ids, kv_segment_ids)


def _attention_fwd(config: _Config, q, k, v, q_segment_ids, kv_segment_ids):
  out, lse = tag_residuals(*_forward(config, q, k, v, q_segment_ids, kv_segment_ids))
  return (out, lse), (q, k, v, q_segment_ids, kv_segment_ids, out, lse)


def _attention_bwd(config: _Config, residuals, cotangents):
  return (*_backward(config, residuals, cotangents), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)
_attention_jit = jax.jit(_attention, static_argnums=0)


def _forward(config: _Config, q, k, v, q_segment_ids, kv_segment_ids):
  """Pads, runs the forward kernel, unpads: ``([b, q_len, h, dv] in q's dtype, [b, h, q_len])``."""
  batch, heads, v_dim = q.shape[0], q.shape[2], v.shape[-1]
  qp, kp, vp = (_heads_major(x, length)
                for x, length in ((q, config.q_pad), (k, config.kv_pad), (v, config.kv_pad)))
  q_width, v_width = _lane_width(q.shape[-1]), _lane_width(v_dim)
  schedule = _Schedule.create(config, q_segment_ids, kv_segment_ids, queries_major=True)
  specs = _Specs(config, queries_major=True)
  ids, id_specs = _segment_inputs(config, specs, q_segment_ids, kv_segment_ids, transposed=True)
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, config),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(schedule.tables),
          grid=(batch, heads, config.q_blocks, config.kv_blocks),
          in_specs=[specs.queries(q_width), specs.keys(q_width), specs.keys(v_width), *id_specs],
          out_specs=[specs.queries(v_width), specs.statistic()],
          scratch_shapes=[pltpu.VMEM((config.block_q, _LANES), jnp.float32),
                          pltpu.VMEM((config.block_q, _LANES), jnp.float32),
                          pltpu.VMEM((config.block_q, v_width), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((batch, heads, config.q_pad, v_width), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, _SUBLANES, config.q_pad), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY)),
      interpret=config.interpret,
      name="flash_attention_forward",
  )(*schedule.tables, qp, kp, vp, *ids)
  return _from_heads_major(out, q.shape[1], v_dim), lse[:, :, 0, :q.shape[1]]


def _backward(config: _Config, residuals, cotangents):
  """``(dq, dk, dv)`` in the dtypes of ``(q, k, v)``."""
  q, k, v, q_segment_ids, kv_segment_ids, out, lse = residuals
  d_out, d_lse = cotangents
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1:3]
  qp, dop = _heads_major(q, config.q_pad), _heads_major(d_out, config.q_pad)
  kp, vp = _heads_major(k, config.kv_pad), _heads_major(v, config.kv_pad)
  q_width, v_width = _lane_width(head_dim), _lane_width(v.shape[-1])
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [b, q, h]
  stats = [_sublane_broadcast(x, config.q_pad) for x in (
      jnp.where(lse == -jnp.inf, 0.0, lse),  # those rows are masked everywhere: p = 0 anyway
      delta.transpose(0, 2, 1) - d_lse)]

  schedule = _Schedule.create(config, q_segment_ids, kv_segment_ids, queries_major=True)
  specs = _Specs(config, queries_major=True)
  ids, id_specs = _segment_inputs(config, specs, q_segment_ids, kv_segment_ids, transposed=True)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, config),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(schedule.tables),
          grid=(batch, heads, config.q_blocks, config.kv_blocks),
          in_specs=[specs.queries(q_width), specs.keys(q_width), specs.keys(v_width),
                    specs.queries(v_width), specs.statistic(), specs.statistic(), *id_specs],
          out_specs=specs.queries(q_width),
          scratch_shapes=[pltpu.VMEM((config.block_q, q_width), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((batch, heads, config.q_pad, q_width), q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY)),
      interpret=config.interpret,
      name="flash_attention_dq",
  )(*schedule.tables, qp, kp, vp, dop, *stats, *ids)

  schedule = _Schedule.create(config, q_segment_ids, kv_segment_ids, queries_major=False)
  specs = _Specs(config, queries_major=False)
  ids, id_specs = _segment_inputs(config, specs, q_segment_ids, kv_segment_ids, transposed=False)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, config),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(schedule.tables),
          grid=(batch, kv_heads, config.kv_blocks, config.group, config.q_blocks),
          in_specs=[specs.queries(q_width), specs.keys(q_width), specs.keys(v_width),
                    specs.queries(v_width), specs.statistic(), specs.statistic(), *id_specs],
          out_specs=[specs.keys(q_width), specs.keys(v_width)],
          scratch_shapes=[pltpu.VMEM((config.block_kv, q_width), jnp.float32),
                          pltpu.VMEM((config.block_kv, v_width), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((batch, kv_heads, config.kv_pad, q_width), k.dtype),
                 jax.ShapeDtypeStruct((batch, kv_heads, config.kv_pad, v_width), v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY, _ARBITRARY)),
      interpret=config.interpret,
      name="flash_attention_dkv",
  )(*schedule.tables, qp, kp, vp, dop, *stats, *ids)
  return (_from_heads_major(dq, q_len, head_dim), _from_heads_major(dk, kv_len, head_dim),
          _from_heads_major(dv, kv_len, v.shape[-1]))


# ---------------------------------------------------------------------------------------------
# Block schedule: which (major, minor) block pairs run, and which blocks the skipped steps name


@dataclasses.dataclass(frozen=True)
class _Schedule:
  """Per-block tables (flat int32, scalar-prefetched to SMEM) that drive skipping.

  "Major" blocks are those a kernel's output is tiled by (query blocks in the forward and dq
  kernels, key blocks in dk/dv); "minor" blocks are those it loops over.

  Attributes:
    first, stop: ``[batch * major_blocks]`` half-open range of minor blocks each major block
      interacts with (band and segment intervals); ``stop <= first`` when it sees none.
    major_min, major_max: ``[batch * major_blocks]`` segment id interval of each major block.
    minor_min, minor_max: ``[batch * minor_blocks]`` the same for minor blocks. All four are 0
      without segment ids (one segment).
  """
  first: jax.Array
  stop: jax.Array
  major_min: jax.Array
  major_max: jax.Array
  minor_min: jax.Array
  minor_max: jax.Array

  @property
  def tables(self) -> tuple[jax.Array, ...]:
    return tuple(getattr(self, field.name) for field in dataclasses.fields(self))

  @classmethod
  def create(cls, config: _Config, q_segment_ids, kv_segment_ids, *,
             queries_major: bool) -> _Schedule:
    spec = config.mask
    if queries_major:
      positions_seen, major_block, minor_block = spec.kv_range, config.block_q, config.block_kv
      major_count, minor_count = config.q_blocks, config.kv_blocks
    else:
      positions_seen, major_block, minor_block = spec.q_range, config.block_kv, config.block_q
      major_count, minor_count = config.kv_blocks, config.q_blocks
    starts = jnp.arange(major_count) * major_block
    lo, hi = positions_seen(starts, starts + major_block)
    first = jnp.broadcast_to(lo // minor_block, (1, major_count))
    stop = jnp.broadcast_to(shapes.cdiv(hi, minor_block), (1, major_count))
    if config.segments:
      q_bounds = _segment_bounds(q_segment_ids, config.block_q, config.q_pad)
      kv_bounds = _segment_bounds(kv_segment_ids, config.block_kv, config.kv_pad)
      (major_min, major_max), (minor_min, minor_max) = (
          (q_bounds, kv_bounds) if queries_major else (kv_bounds, q_bounds))
      overlap = ((minor_max[:, None, :] >= major_min[:, :, None])
                 & (minor_min[:, None, :] <= major_max[:, :, None]))  # [b, major, minor]
      index = jnp.arange(minor_count)
      first = jnp.maximum(first, jnp.where(overlap, index, minor_count).min(-1))
      stop = jnp.minimum(stop, jnp.where(overlap, index + 1, 0).max(-1))
    else:  # one table row, shared by the batch: every position in segment 0
      major_min = major_max = jnp.zeros((1, major_count), jnp.int32)
      minor_min = minor_max = jnp.zeros((1, minor_count), jnp.int32)
    batch = major_min.shape[0]
    flat = lambda x, count: jnp.broadcast_to(x, (batch, count)).astype(jnp.int32).reshape(-1)
    return cls(flat(first, major_count), flat(stop, major_count),
               flat(major_min, major_count), flat(major_max, major_count),
               flat(minor_min, minor_count), flat(minor_max, minor_count))


def _row(config: _Config, b, index, count: int):
  """Where block ``index`` of batch row ``b`` sits in a flat table (one row without segments)."""
  return b * count + index if config.segments else index


def _segment_bounds(ids, block: int, padded: int) -> tuple[jax.Array, jax.Array]:
  """Per-block ``(min, max)`` of ``[b, length]`` ids padded (edge values) to ``padded``."""
  ids = shapes.pad_axis(ids.astype(jnp.int32), 1, padded, mode="edge")
  tiles = ids.reshape(ids.shape[0], padded // block, block)
  return tiles.min(-1), tiles.max(-1)


def _clamp(index, first, stop, count: int):
  """``index`` clamped into ``[first, stop - 1]`` (and the array), naming a block to fetch.

  Steps before the visible range name its first block (fetched once, used when the range
  starts); steps after it name its last (already resident), so skipped steps start no DMA.
  """
  return jnp.clip(jnp.clip(index, first, jnp.maximum(stop - 1, first)), 0, count - 1)


class _Specs:
  """BlockSpecs of one kernel's grid: ``(b, h, i, j)`` when queries are major, else
  ``(b, kv_h, j, g, i)`` (the dk/dv kernel); each index map clamps the minor block index."""

  def __init__(self, config: _Config, *, queries_major: bool):
    self.config = config
    self.queries_major = queries_major
    self.q_blocks, self.kv_blocks = config.q_blocks, config.kv_blocks

  def _indices(self, *grid_and_tables):
    """``(batch, q head, kv head, q block, kv block)`` a grid step reads."""
    *grid, first, stop, _, _, _, _ = grid_and_tables
    group = self.config.group
    if self.queries_major:
      b, h, i, j = grid
      row = _row(self.config, b, i, self.q_blocks)
      return b, h, lax.div(h, group), i, _clamp(j, first[row], stop[row], self.kv_blocks)
    b, kv_h, j, g, i = grid
    row = _row(self.config, b, j, self.kv_blocks)
    return b, kv_h * group + g, kv_h, _clamp(i, first[row], stop[row], self.q_blocks), j

  def queries(self, width: int) -> pl.BlockSpec:
    """``[block_q, width]`` tiles of a ``[b, h, q_pad, width]`` array."""
    def index_map(*args):
      b, h, _, i, _ = self._indices(*args)
      return b, h, i, 0
    return pl.BlockSpec((None, None, self.config.block_q, width), index_map)

  def keys(self, width: int) -> pl.BlockSpec:
    """``[block_kv, width]`` tiles of a ``[b, kv_h, kv_pad, width]`` array."""
    def index_map(*args):
      b, _, kv_h, _, j = self._indices(*args)
      return b, kv_h, j, 0
    return pl.BlockSpec((None, None, self.config.block_kv, width), index_map)

  def statistic(self) -> pl.BlockSpec:
    """``[8, block_q]`` rows of a per-query ``[b, h, 8, q_pad]`` statistic (LSE, D)."""
    def index_map(*args):
      b, h, _, i, _ = self._indices(*args)
      return b, h, 0, i
    return pl.BlockSpec((None, None, _SUBLANES, self.config.block_q), index_map)

  def ids(self, *, queries: bool, column: bool) -> pl.BlockSpec:
    """Segment ids of the block: a column ``[block, 128]`` (lane-broadcast) or a row
    ``[8, block]`` (sublane-broadcast) of the query or key ids."""
    block = self.config.block_q if queries else self.config.block_kv

    def index_map(*args):
      b, _, _, i, j = self._indices(*args)
      index = i if queries else j
      return (b, index, 0) if column else (b, 0, index)
    shape = (None, block, _LANES) if column else (None, _SUBLANES, block)
    return pl.BlockSpec(shape, index_map)


def _segment_inputs(config: _Config, specs: _Specs, q_segment_ids, kv_segment_ids, *,
                    transposed: bool) -> tuple[list[jax.Array], list[pl.BlockSpec]]:
  """Segment-id inputs of a kernel and their specs: query ids as a column and key ids as a row
  (for the ``[block_q, block_kv]`` mask), plus, if ``transposed``, key ids as a column and query
  ids as a row (for the ``[block_kv, block_q]`` mask that says which keys the block sees)."""
  if not config.segments:
    return [], []
  q_ids = shapes.pad_axis(q_segment_ids.astype(jnp.int32), 1, config.q_pad)
  kv_ids = shapes.pad_axis(kv_segment_ids.astype(jnp.int32), 1, config.kv_pad)
  pairs = [(q_ids, True), (kv_ids, False)]
  if transposed:
    pairs += [(kv_ids, False), (q_ids, True)]
  arrays, specs_ = [], []
  for index, (ids, queries) in enumerate(pairs):
    column = index % 2 == 0
    shape = (*ids.shape, _LANES) if column else (ids.shape[0], _SUBLANES, ids.shape[1])
    arrays.append(jnp.broadcast_to(ids[:, :, None] if column else ids[:, None, :], shape))
    specs_.append(specs.ids(queries=queries, column=column))
  return arrays, specs_


# ---------------------------------------------------------------------------------------------
# Kernels


def _forward_kernel(config: _Config, *refs):
  """One (query block, key block) step of the online softmax; the last step writes out, LSE."""
  tables, (q_ref, k_ref, v_ref, *id_refs, o_ref, lse_ref, m_ref, l_ref, acc_ref) = (
      refs[:6], refs[6:])
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked: bool):
    v = v_ref[...]
    logits, _ = _logits(config, q_ref[...], k_ref[...])
    if masked:
      mask, kv_seen = _mask(config, i, j, id_refs), _keys_seen(config, i, j, id_refs)
      logits = jnp.where(mask, logits, -jnp.inf)
      v = jnp.where(kv_seen, v, jnp.zeros_like(v))
    m_prev, l_prev = m_ref[...], l_ref[...]  # lane-broadcast [block_q, 128]
    m_new = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row that has seen nothing stays at 0
    p = jnp.exp(logits - _lanes(shift, logits.shape[1]))
    rescale = jnp.exp(m_prev - shift)
    m_ref[...] = m_new
    l_ref[...] = rescale * l_prev + p.sum(axis=1, keepdims=True)
    acc_ref[...] = (_lanes(rescale, acc_ref.shape[1]) * acc_ref[...]
                    + _dot(p.astype(v.dtype), v))

  _visit(config, tables, b, i, j, step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    l = l_ref[...]
    seen = l > 0
    l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_ref[...] / _lanes(l, acc_ref.shape[1])).astype(o_ref.dtype)
    lse_ref[...] = _statistic_row(jnp.where(seen, m_ref[...] + jnp.log(l), -jnp.inf))


def _dq_kernel(config: _Config, *refs):
  """One (query block, key block) step of ``dQ += dS K``; the last step writes dq."""
  tables, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *id_refs, dq_ref, acc_ref) = (
      refs[:6], refs[6:])
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked: bool):
    k = k_ref[...]
    mask = _mask(config, i, j, id_refs) if masked else None
    ds, _ = _logit_gradient(config, q_ref[...], k, v_ref[...], do_ref[...],
                            _statistic_column(lse_ref[...]), _statistic_column(delta_ref[...]),
                            mask)
    if masked:
      k = jnp.where(_keys_seen(config, i, j, id_refs), k, jnp.zeros_like(k))
    acc_ref[...] += _dot(ds.astype(k.dtype), k)

  _visit(config, tables, b, i, j, step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(config: _Config, *refs):
  """One (key block, query head of the group, query block) step of ``dV += P^T dO``,
  ``dK += dS^T Q``; the last step of the group writes dk, dv."""
  tables, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *id_refs, dk_ref, dv_ref,
           dk_acc_ref, dv_acc_ref) = refs[:6], refs[6:]
  b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  first_step = (g == 0) & (i == 0)
  last_step = (g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1)

  @pl.when(first_step)
  def _():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  def step(masked: bool):
    q, d_out = q_ref[...], do_ref[...]
    mask = _mask(config, i, j, id_refs) if masked else None
    if masked:
      q_seen = mask.astype(jnp.float32).max(axis=1, keepdims=True) > 0
      q, d_out = (jnp.where(q_seen, x, jnp.zeros_like(x)) for x in (q, d_out))
    ds, p = _logit_gradient(config, q, k_ref[...], v_ref[...], d_out,
                            _statistic_column(lse_ref[...]), _statistic_column(delta_ref[...]),
                            mask)
    dv_acc_ref[...] += _dot(p.astype(d_out.dtype), d_out, trans_a=True)
    dk_acc_ref[...] += _dot(ds.astype(q.dtype), q, trans_a=True)

  _visit(config, tables, b, j, i, step, queries_major=False)

  @pl.when(last_step)
  def _():
    dk_ref[...] = dk_acc_ref[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------
# Pieces shared by the kernels


def _visit(config: _Config, tables, b, major, minor, step: Callable[[bool], None], *,
           queries_major: bool = True) -> None:
  """Runs ``step(masked)`` for a visible block pair, with ``masked=False`` for a full one."""
  visible, full = _block_kind(config, tables, b, major, minor, queries_major=queries_major)
  pl.when(visible & full)(lambda: step(False))
  pl.when(visible & jnp.logical_not(full))(lambda: step(True))


def _block_kind(config: _Config, tables, b, major, minor, *, queries_major: bool = True):
  """``(visible, full)`` of the pair (major block, minor block) of batch row ``b``.

  Visible: ``minor`` lies in the major block's range and the two segment intervals overlap.
  Full: the pair lies inside the band, holds no padding and one segment id, so no mask is needed.
  ``tables`` are the :class:`_Schedule` tables (SMEM refs in a kernel, or arrays).
  """
  first, stop, major_min, major_max, minor_min, minor_max = tables
  major_blocks, minor_blocks = ((config.q_blocks, config.kv_blocks) if queries_major
                                else (config.kv_blocks, config.q_blocks))
  row, column = _row(config, b, major, major_blocks), _row(config, b, minor, minor_blocks)
  lo, hi = major_min[row], major_max[row]
  other_lo, other_hi = minor_min[column], minor_max[column]
  visible = (first[row] <= minor) & (minor < stop[row]) & (other_hi >= lo) & (other_lo <= hi)
  i, j = (major, minor) if queries_major else (minor, major)
  full = _band_full(config, i, j) & (lo == hi) & (other_lo == other_hi) & (lo == other_lo)
  return visible, full


def _band_full(config: _Config, i, j):
  """Whether every (query, key) pair of blocks ``(i, j)`` is a real pair inside the band."""
  q_first, kv_first = i * config.block_q, j * config.block_kv
  start, stop = config.mask.kv_full_range(q_first, q_first + config.block_q)
  return (kv_first >= start) & (kv_first + config.block_kv <= stop)


def _mask(config: _Config, i, j, id_refs):
  """``[block_q, block_kv]``: True where query row ``a`` of block ``i`` may see key ``b`` of
  block ``j``."""
  shape = (config.block_q, config.block_kv)
  mask = config.mask.allowed_broadcast(
      i * config.block_q + lax.broadcasted_iota(jnp.int32, shape, 0),
      j * config.block_kv + lax.broadcasted_iota(jnp.int32, shape, 1))
  if config.segments:
    q_ids, kv_ids = id_refs[0][...], id_refs[1][...]  # [block_q, 128], [8, block_kv]
    mask &= _lanes(q_ids, config.block_kv) == kv_ids[:1, :]
  return mask


def _keys_seen(config: _Config, i, j, id_refs):
  """``[block_kv, 1]``: whether some query of block ``i`` sees key row ``b`` of block ``j``,
  from the transposed ``[block_kv, block_q]`` mask (a column, to zero rows of K or V)."""
  shape = (config.block_kv, config.block_q)
  mask = config.mask.allowed_broadcast(
      i * config.block_q + lax.broadcasted_iota(jnp.int32, shape, 1),
      j * config.block_kv + lax.broadcasted_iota(jnp.int32, shape, 0))
  if config.segments:
    kv_ids, q_ids = id_refs[2][...], id_refs[3][...]  # [block_kv, 128], [8, block_q]
    mask &= _lanes(kv_ids, config.block_q) == q_ids[:1, :]
  return mask.astype(jnp.float32).max(axis=1, keepdims=True) > 0


def _logits(config: _Config, q, k):
  """Scaled, soft-capped float32 logits ``[block_q, block_kv]``; also ``tanh`` (softcap) or None."""
  logits = _dot(q, k, trans_b=True) * config.scale
  if config.softcap is None:
    return logits, None
  tanh = jnp.tanh(logits / config.softcap)
  return config.softcap * tanh, tanh


def _logit_gradient(config: _Config, q, k, v, d_out, lse, delta, mask):
  """``(dS * scale, P)`` of a block (``dS`` w.r.t. the unscaled ``q k^T``); both 0 where masked.

  ``lse`` and ``delta`` are lane-broadcast ``[block_q, 128]``; ``mask`` None for a full block.
  """
  logits, tanh = _logits(config, q, k)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  width = logits.shape[1]
  p = jnp.exp(logits - _lanes(lse, width))  # masked logits are -inf: p is 0 there
  ds = p * (_dot(d_out, v, trans_b=True) - _lanes(delta, width))
  if tanh is not None:
    ds *= 1.0 - tanh * tanh
  ds *= config.scale
  if mask is not None:
    ds = jnp.where(mask, ds, 0.0)  # dP is NaN where v holds garbage
  return ds, p


def _statistic_column(row):
  """A ``[8, block_q]`` statistic row (every sublane equal) as the lane-broadcast column
  ``[block_q, 128]`` the kernels compute with: one XLU transpose per block."""
  return jnp.transpose(jnp.broadcast_to(row[:1, :], (_LANES, row.shape[1])))


def _statistic_row(column):
  """A lane-broadcast ``[block_q, 128]`` column as the ``[8, block_q]`` row kept in HBM."""
  return jnp.transpose(column)[:_SUBLANES, :]


def _lanes(x, width: int):
  """A lane-broadcast ``[rows, 128]`` array as ``[rows, width]`` (tiled, then cut)."""
  return jnp.tile(x, (1, shapes.cdiv(width, _LANES)))[:, :width]


def _dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
  """2-D matmul with float32 accumulation; full precision for float32 operands."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------
# Layout and padding


def _heads_major(x, length: int):
  """``[b, s, h, d] -> [b, h, length, lane_width(d)]``, zero-padded."""
  x = shapes.pad_axes(x, {1: length, 3: _lane_width(x.shape[3])})
  return x.transpose(0, 2, 1, 3)


def _from_heads_major(x, length: int, dim: int):
  """A kernel result ``[b, h, padded, d_pad]`` as ``[b, length, h, dim]``."""
  return x[:, :, :length, :dim].transpose(0, 2, 1, 3)


def _lane_width(dim: int) -> int:
  """A head dim padded to whole 128-lane vregs."""
  return shapes.round_up(dim, _LANES)


def _sublane_broadcast(x, length: int):
  """A per-query ``[b, h, q_len]`` statistic as ``[b, h, 8, length]`` float32 rows."""
  x = shapes.pad_axis(x.astype(jnp.float32), 2, length)
  return jnp.broadcast_to(x[:, :, None, :], (*x.shape[:2], _SUBLANES, x.shape[2]))
