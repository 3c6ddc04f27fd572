"""FlashAttention-2 as Pallas kernels with Triton lowering (NVIDIA and AMD GPUs).

Three kernels, each one program per (query or key block, batch, head), all deterministic (no
atomics; every output block is written by exactly one program):

* forward (Dao 2023, Algorithm 1): a query block stays in registers while a loop over the key
  blocks it can see keeps float32 running statistics (row max ``m``, row sum ``l``, unnormalized
  output ``acc``); writes the output and the natural-log LSE.
* dq: a query block loops over its key blocks, recomputing ``P = exp(S - LSE)`` and accumulating
  ``dQ += dS K`` with ``dS = P * (dP - D)``, ``dP = dO V^T``, ``D = rowsum(dO * O) - dLSE`` (the
  LSE cotangent folds into ``D`` since ``d LSE / d S = P``).
* dk/dv: a key block loops over the query blocks that can see it, accumulating ``dV += P^T dO``
  and ``dK += dS^T Q``. With GQA each query head writes its own float32 partial, summed over the
  group afterwards in XLA (deterministic; the partials cost ``heads / kv_heads`` times dk/dv).

GQA/MQA by index mapping: query head ``h`` reads kv head ``h // group`` through its BlockSpec;
K/V are never repeated in memory.

Block skipping: the causal/window band (``masks.MaskSpec``) gives each block the contiguous range
of blocks on the other side that intersect it; loops run over that range only. With segment ids,
each block's ``[min, max]`` id interval is compared with the other side's per-block intervals
(computed once in XLA); blocks whose intervals do not overlap cannot share an id and are skipped,
and the loop runs from the first to the last overlapping block. For sorted ids (packed rows) that
is exactly the set of blocks that share a segment; for unsorted ids it is still correct, with
less skipping.

Memory: O((q_len + kv_len) * head_dim) per (batch, head): no ``[q_len, kv_len]`` buffer exists
in either pass. Lengths are padded to whole blocks and head dims to a power of two >= 16 (Triton
needs power-of-two tiles), with zeros, in XLA, only when they are not already.

Garbage (NaN) in masked positions: before a matmul whose product with a zero probability would
be ``0 * NaN``, key rows no query of the block sees (forward, dq) and query rows that see no key
of the block (dk/dv) are zeroed, and ``dS`` is zeroed wherever the mask is False.

Float32 inputs use IEEE-precision dots (``precision=HIGHEST``), not TF32; bfloat16/float16 dots
accumulate in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import shapes
from pallas_kernels.flash_attention import masks
from pallas_kernels.flash_attention.residuals import tag_residuals
from pallas_kernels.interpret import gpu_compute_capability, gpu_interpret

# Triton tiles must be powers of two and a dot needs every dimension >= 16.
_MIN_TILE = 16
_INT_MAX = jnp.iinfo(jnp.int32).max
_INT_MIN = jnp.iinfo(jnp.int32).min


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and launch parameters of the three kernels (each block a power of two >= 16).

  Attributes:
    block_q, block_kv: forward tile ``[block_q, block_kv]``.
    block_q_dq, block_kv_dq: dq kernel tile.
    block_q_dkv, block_kv_dkv: dk/dv kernel tile.
    num_warps, num_stages: Triton launch parameters of the forward kernel.
    num_warps_bwd, num_stages_bwd: those of the two backward kernels.
  """
  block_q: int = 128
  block_kv: int = 64
  block_q_dq: int = 64
  block_kv_dq: int = 64
  block_q_dkv: int = 64
  block_kv_dkv: int = 64
  num_warps: int = 4
  num_stages: int = 2
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"BlockSizes.{field.name} must be a positive int, got {value!r}")
      if field.name.startswith("block_") and (value < _MIN_TILE or value & (value - 1)):
        raise ValueError(f"BlockSizes.{field.name} must be a power of two >= {_MIN_TILE} "
                         f"(Triton tiles), got {value}")

  def fit(self, q_len: int, kv_len: int) -> BlockSizes:
    """Caps each block at its (power-of-two rounded) length, so short inputs pad little."""
    q_cap, kv_cap = _tile(q_len), _tile(kv_len)
    return dataclasses.replace(
        self, **{name: min(getattr(self, name), q_cap if "_q" in name else kv_cap)
                 for name in ("block_q", "block_kv", "block_q_dq", "block_kv_dq", "block_q_dkv",
                              "block_kv_dkv")})

  @property
  def q_multiple(self) -> int:
    return max(self.block_q, self.block_q_dq, self.block_q_dkv)

  @property
  def kv_multiple(self) -> int:
    return max(self.block_kv, self.block_kv_dq, self.block_kv_dkv)


def default_block_sizes(q_len: int, kv_len: int, head_dim: int, dtype: Any = jnp.bfloat16,
                        compute_capability: tuple[int, int] | None = None) -> BlockSizes:
  """The block-size heuristic for a GPU of ``compute_capability`` (None: unknown, taken as
  Hopper), capped to the lengths.

  16-bit inputs up to head_dim 128: forward 128 x 64 tiles, backward 64 x 64, 4 warps
  everywhere; 3 pipeline stages in the forward up to head_dim 64, else 2. Above head_dim 128:
  8 warps and 32 x 64 dk/dv tiles, which keep the kernels' registers from spilling. float32
  inputs take half the tiles (64 x 32 forward, 32 x 32 backward; above head dim 128 one stage and
  8 warps): with the 16-bit tiles the float32 kernels need more shared memory than an A100 (at
  head_dim 128) or an H100 (at 256) has. Before Hopper (``mma.sync`` takes both operands in
  registers), 16-bit forward tiles above head_dim 64 are 64 x 64, which do not spill there.
  """
  if jnp.dtype(dtype) == jnp.float32:
    warps, stages = (8, 1) if head_dim > 128 else (4, 2)
    return BlockSizes(64, 32, 32, 32, 32, 32, num_warps=warps, num_stages=stages,
                      num_warps_bwd=warps, num_stages_bwd=stages).fit(q_len, kv_len)
  if head_dim > 128:
    blocks = BlockSizes(block_q_dkv=32, num_warps=8, num_warps_bwd=8)
  else:
    blocks = BlockSizes(num_stages=3 if head_dim <= 64 else 2)
  if compute_capability is not None and compute_capability[0] < 9 and head_dim > 64:
    blocks = dataclasses.replace(blocks, block_q=64)
  return blocks.fit(q_len, kv_len)


def attention(q, k, v, *, causal: bool = False, q_segment_ids=None, kv_segment_ids=None,
              window: tuple[int | None, int | None] | None = None, softcap: float | None = None,
              scale: float, return_lse: bool = False, block_sizes: BlockSizes | None = None,
              interpret: bool | None = None):
  """FlashAttention-2 forward/backward kernels; arguments as validated by effjax's
  ``flash_attention`` (``q [b, q_len, h, d]``, ``k [b, kv_len, kv_h, d]``, ``v [b, kv_len, kv_h,
  dv]``, ``scale`` resolved to a float).

  Args:
    block_sizes: tiles and launch parameters; default :func:`default_block_sizes`.
    interpret: run the kernels in Pallas' interpreter (CPU); None follows
      ``pallas_kernels.interpret.interpret_mode``. Off a GPU and not interpreting, raises
      NotImplementedError (so dispatch tries the next implementation).

  Returns:
    The output ``[b, q_len, h, dv]`` in q's dtype, and with ``return_lse`` the float32 LSE
    ``[b, h, q_len]`` (-inf for queries that see no key); both differentiable.
  """
  interpret = gpu_interpret(interpret)
  config = Call.create(
      masks.MaskSpec.create(q.shape[1], k.shape[1], causal=causal, window=window),
      scale=scale, softcap=softcap, heads=q.shape[2], kv_heads=k.shape[2],
      head_dim=max(q.shape[-1], v.shape[-1]), dtype=q.dtype, segments=q_segment_ids is not None,
      block_sizes=block_sizes, interpret=interpret)
  out, lse = _attention_jit(config, q, k, v, q_segment_ids, kv_segment_ids)
  return (out, lse) if return_lse else out


@dataclasses.dataclass(frozen=True)
class Call:
  """Everything static about one call (hashable: a ``jit`` static argument)."""
  mask: masks.MaskSpec
  scale: float
  softcap: float | None
  blocks: BlockSizes
  heads: int
  kv_heads: int
  segments: bool
  interpret: bool

  @classmethod
  def create(cls, mask: masks.MaskSpec, *, scale: float, softcap: float | None, heads: int,
             kv_heads: int, head_dim: int, dtype: Any, segments: bool,
             block_sizes: BlockSizes | None, interpret: bool) -> Call:
    """Checks ``block_sizes`` (None: :func:`default_block_sizes` for the larger of the query and
    value head dims and the inputs' ``dtype``) and fits them to the lengths."""
    block_sizes = shapes.resolve_block_sizes(block_sizes, BlockSizes, lambda: default_block_sizes(
        mask.q_len, mask.kv_len, head_dim, dtype, None if interpret else gpu_compute_capability()))
    return cls(mask=mask, scale=float(scale), softcap=softcap,
               blocks=block_sizes.fit(mask.q_len, mask.kv_len), heads=heads, kv_heads=kv_heads,
               segments=segments, interpret=bool(interpret))

  @property
  def group(self) -> int:
    return self.heads // self.kv_heads

  @property
  def q_pad(self) -> int:
    return shapes.round_up(self.mask.q_len, self.blocks.q_multiple)

  @property
  def kv_pad(self) -> int:
    return shapes.round_up(self.mask.kv_len, self.blocks.kv_multiple)


# ---------------------------------------------------------------------------------------------
# custom_vjp and the XLA glue around the kernels


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config: Call, q, k, v, q_segment_ids, kv_segment_ids):
  return _forward(config, q, k, v, q_segment_ids, kv_segment_ids)


def _attention_fwd(config: Call, q, k, v, q_segment_ids, kv_segment_ids):
  out, lse = tag_residuals(*_forward(config, q, k, v, q_segment_ids, kv_segment_ids))
  return (out, lse), (q, k, v, q_segment_ids, kv_segment_ids, out, lse)


def _attention_bwd(config: Call, residuals, cotangents):
  return (*backward(config, residuals, cotangents), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)
_attention_jit = jax.jit(_attention, static_argnums=0)


def _forward(config: Call, q, k, v, q_segment_ids, kv_segment_ids):
  """Pads, runs the forward kernel, unpads: ``([b, q_len, h, dv] in q's dtype, [b, h, q_len])``."""
  blocks = config.blocks
  batch, q_len, heads, v_dim = *q.shape[:3], v.shape[-1]
  qp, kp, vp = _padded(q, config.q_pad), _padded(k, config.kv_pad), _padded(v, config.kv_pad)
  segment_args, segment_specs = _segment_inputs(
      config, q_segment_ids, kv_segment_ids, blocks.block_q, blocks.block_kv, queries_tiled=True)
  q_blocks = config.q_pad // blocks.block_q
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, config, q_blocks),
      grid=(q_blocks, batch, heads),
      in_specs=[_query_spec(config, blocks.block_q, qp.shape[-1], _reversed(q_blocks)),
                _kv_spec(config, config.kv_pad, kp.shape[-1], full=True),
                _kv_spec(config, config.kv_pad, vp.shape[-1], full=True),
                *segment_specs(_reversed(q_blocks))],
      out_specs=[_query_spec(config, blocks.block_q, vp.shape[-1], _reversed(q_blocks)),
                 _stats_spec(blocks.block_q, _reversed(q_blocks))],
      out_shape=[jax.ShapeDtypeStruct((batch, config.q_pad, heads, vp.shape[-1]), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, config.q_pad), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                           num_stages=blocks.num_stages),
      interpret=config.interpret,
      name="flash_attention_forward",
  )(qp, kp, vp, *segment_args)
  return out[:, :q_len, :, :v_dim], lse[:, :, :q_len]


def backward(config: Call, residuals, cotangents):
  """``(dq, dk, dv)`` in the dtypes of ``(q, k, v)``.

  Args:
    config: the call's static description.
    residuals: ``(q, k, v, q_segment_ids, kv_segment_ids, out, lse)``, ``lse`` the float32
      natural-log LSE ``[b, h, q_len]`` of any forward (this module's or the Hopper one's).
    cotangents: ``(d_out, d_lse)``.
  """
  q, k, v, q_segment_ids, kv_segment_ids, out, lse = residuals
  d_out, d_lse = cotangents
  blocks = config.blocks
  batch, heads = q.shape[0], q.shape[2]
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  stats = [shapes.pad_axis(jnp.where(lse == -jnp.inf, 0.0, lse), 2, config.q_pad),  # all-masked
           shapes.pad_axis(delta - d_lse, 2, config.q_pad)]
  qp, dop = _padded(q, config.q_pad), _padded(d_out, config.q_pad)
  kp, vp = _padded(k, config.kv_pad), _padded(v, config.kv_pad)
  compiler_params = plgpu.CompilerParams(num_warps=blocks.num_warps_bwd,
                                         num_stages=blocks.num_stages_bwd)

  q_blocks = config.q_pad // blocks.block_q_dq
  segment_args, segment_specs = _segment_inputs(
      config, q_segment_ids, kv_segment_ids, blocks.block_q_dq, blocks.block_kv_dq,
      queries_tiled=True)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, config),
      grid=(q_blocks, batch, heads),
      in_specs=[_query_spec(config, blocks.block_q_dq, qp.shape[-1]),
                _kv_spec(config, config.kv_pad, kp.shape[-1], full=True),
                _kv_spec(config, config.kv_pad, vp.shape[-1], full=True),
                _query_spec(config, blocks.block_q_dq, dop.shape[-1]),
                _stats_spec(blocks.block_q_dq), _stats_spec(blocks.block_q_dq),
                *segment_specs(lambda i: i)],
      out_specs=_query_spec(config, blocks.block_q_dq, qp.shape[-1]),
      out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
      compiler_params=compiler_params,
      interpret=config.interpret,
      name="flash_attention_dq",
  )(qp, kp, vp, dop, *stats, *segment_args)

  kv_blocks = config.kv_pad // blocks.block_kv_dkv
  segment_args, segment_specs = _segment_inputs(
      config, q_segment_ids, kv_segment_ids, blocks.block_q_dkv, blocks.block_kv_dkv,
      queries_tiled=False)
  # One dk/dv per query head: float32 partials summed over the GQA group below.
  partial_heads, partial_dtype = ((heads, jnp.float32) if config.group > 1
                                  else (config.kv_heads, k.dtype))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, config),
      grid=(kv_blocks, batch, heads),
      in_specs=[_query_spec(config, config.q_pad, qp.shape[-1], full=True),
                _kv_spec(config, blocks.block_kv_dkv, kp.shape[-1]),
                _kv_spec(config, blocks.block_kv_dkv, vp.shape[-1]),
                _query_spec(config, config.q_pad, dop.shape[-1], full=True),
                _stats_spec(config.q_pad, full=True), _stats_spec(config.q_pad, full=True),
                *segment_specs(lambda j: j)],
      out_specs=[_partial_spec(config, blocks.block_kv_dkv, kp.shape[-1]),
                 _partial_spec(config, blocks.block_kv_dkv, vp.shape[-1])],
      out_shape=[jax.ShapeDtypeStruct((batch, config.kv_pad, partial_heads, kp.shape[-1]),
                                      partial_dtype),
                 jax.ShapeDtypeStruct((batch, config.kv_pad, partial_heads, vp.shape[-1]),
                                      partial_dtype)],
      compiler_params=compiler_params,
      interpret=config.interpret,
      name="flash_attention_dkv",
  )(qp, kp, vp, dop, *stats, *segment_args)
  if config.group > 1:
    dk, dv = (x.reshape(batch, config.kv_pad, config.kv_heads, config.group, x.shape[-1])
              .sum(3).astype(k.dtype) for x in (dk, dv))
  kv_len = k.shape[1]
  return (dq[:, :q.shape[1], :, :q.shape[-1]], dk[:, :kv_len, :, :k.shape[-1]],
          dv[:, :kv_len, :, :v.shape[-1]])


# ---------------------------------------------------------------------------------------------
# Kernels


def _forward_kernel(config: Call, q_blocks: int, q_ref, k_ref, v_ref, *refs):
  """One query block against every key block it can see: writes ``out`` and ``lse``."""
  *segment_refs, o_ref, lse_ref = refs
  block_q, block_kv = config.blocks.block_q, config.blocks.block_kv
  q_start = (q_blocks - 1 - pl.program_id(0)) * block_q  # heaviest causal blocks first
  q = q_ref[...]
  loop = _Loop.over_keys(config, q_start, block_q, block_kv, segment_refs)

  def step(j, carry, *, masked: bool):
    m, l, acc = carry
    keys = pl.ds(j * block_kv, block_kv)
    k, v = k_ref[keys, :], v_ref[keys, :]
    mask = loop.mask(j) if masked else None
    logits, _ = _logits(config, q, k, mask)
    m_new = jnp.maximum(m, logits.max(axis=1))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen nothing stay at 0
    p = jnp.exp(logits - shift[:, None])
    rescale = jnp.exp(m - shift)
    if masked:
      v = jnp.where(_any(mask, 0)[:, None], v, jnp.zeros_like(v))
    acc = rescale[:, None] * acc + _dot(p.astype(v.dtype), v)
    return m_new, rescale * l + p.sum(axis=1), acc

  init = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros((block_q, o_ref.shape[-1]), jnp.float32))
  m, l, acc = loop.run(step, init)
  seen = l > 0
  l = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(l), -jnp.inf)


def _dq_kernel(config: Call, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
  """dq of one query block, looping over the key blocks it can see."""
  *segment_refs, dq_ref = refs
  block_q, block_kv = config.blocks.block_q_dq, config.blocks.block_kv_dq
  q, d_out, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  loop = _Loop.over_keys(config, pl.program_id(0) * block_q, block_q, block_kv, segment_refs)

  def step(j, dq, *, masked: bool):
    keys = pl.ds(j * block_kv, block_kv)
    k, v = k_ref[keys, :], v_ref[keys, :]
    mask = loop.mask(j) if masked else None
    ds = _logit_gradient(config, q, k, v, d_out, lse, delta, mask)
    if masked:
      k = jnp.where(_any(mask, 0)[:, None], k, jnp.zeros_like(k))
    return dq + _dot(ds.astype(k.dtype), k)

  dq_ref[...] = loop.run(step, jnp.zeros(q.shape, jnp.float32)).astype(dq_ref.dtype)


def _dkv_kernel(config: Call, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
  """dk, dv of one key block for one query head, looping over the query blocks that see it."""
  *segment_refs, dk_ref, dv_ref = refs
  block_q, block_kv = config.blocks.block_q_dkv, config.blocks.block_kv_dkv
  k, v = k_ref[...], v_ref[...]
  loop = _Loop.over_queries(config, pl.program_id(0) * block_kv, block_kv, block_q, segment_refs)

  def step(i, carry, *, masked: bool):
    dk, dv = carry
    rows = pl.ds(i * block_q, block_q)
    q, d_out, lse, delta = q_ref[rows, :], do_ref[rows, :], lse_ref[rows], delta_ref[rows]
    mask = loop.mask(i) if masked else None
    ds, p = _logit_gradient(config, q, k, v, d_out, lse, delta, mask, return_p=True)
    dv = dv + _dot(p.astype(d_out.dtype), d_out, trans_a=True)
    if masked:
      q = jnp.where(_any(mask, 1)[:, None], q, jnp.zeros_like(q))
    return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv

  dk, dv = loop.run(step, (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Loop:
  """A kernel's loop over the blocks on the other side that its own block interacts with.

  ``[first, stop)`` is the band's block range (narrowed by segment-id intervals); inside it,
  ``[full_first, full_stop)`` holds the blocks every pair of which the band allows (none with
  segment ids), which run without building a mask.
  """
  config: Call
  transposed: bool  # False: own block = queries, loop over keys; True: the reverse
  own_pos: Any
  other_block: int
  first: Any
  stop: Any
  full: tuple[Any, Any] | None
  own_ids: Any
  other_ids_ref: Any

  @classmethod
  def over_keys(cls, config: Call, q_start, block_q: int, block_kv: int, segment_refs):
    return cls._create(config, False, q_start, block_q, block_kv, segment_refs)

  @classmethod
  def over_queries(cls, config: Call, kv_start, block_kv: int, block_q: int, segment_refs):
    return cls._create(config, True, kv_start, block_kv, block_q, segment_refs)

  @classmethod
  def _create(cls, config, transposed, start, block, other_block, segment_refs):
    spec = config.mask
    seen, full = ((spec.q_range, spec.q_full_range) if transposed
                  else (spec.kv_range, spec.kv_full_range))
    first, stop = _block_range(seen, start, block, other_block)
    own_ids = other_ids_ref = None
    if config.segments:
      q_ids_ref, kv_ids_ref, other_min_ref, other_max_ref = segment_refs
      own_ids_ref, other_ids_ref = ((kv_ids_ref, q_ids_ref) if transposed
                                    else (q_ids_ref, kv_ids_ref))
      own_ids = own_ids_ref[...]
      first, stop = _overlapping(first, stop, own_ids, other_min_ref[...], other_max_ref[...])
      full_blocks = None
    else:
      lo, hi = full(start, start + block)
      full_blocks = ((lo + other_block - 1) // other_block, hi // other_block)
    own_pos = start + lax.broadcasted_iota(jnp.int32, (block,), 0)
    return cls(config, transposed, own_pos, other_block, first, stop, full_blocks, own_ids,
               other_ids_ref)

  def mask(self, index):
    """``[block_q, block_kv]`` mask of the own block against block ``index`` of the other side."""
    other = pl.ds(index * self.other_block, self.other_block)
    other_pos = index * self.other_block + lax.broadcasted_iota(
        jnp.int32, (self.other_block,), 0)
    other_ids = None if self.other_ids_ref is None else self.other_ids_ref[other]
    if self.transposed:
      return _mask(self.config, other_pos, self.own_pos, other_ids, self.own_ids)
    return _mask(self.config, self.own_pos, other_pos, self.own_ids, other_ids)

  def run(self, step, carry):
    """``step(index, carry, masked=...)`` over the range: masked outside the full blocks."""
    masked, unmasked = (functools.partial(step, masked=flag) for flag in (True, False))
    if self.full is None:
      return lax.fori_loop(self.first, self.stop, masked, carry)
    lo = jnp.minimum(jnp.maximum(self.full[0], self.first), self.stop)
    hi = jnp.minimum(jnp.maximum(self.full[1], lo), self.stop)
    carry = lax.fori_loop(self.first, lo, masked, carry)
    carry = lax.fori_loop(lo, hi, unmasked, carry)
    return lax.fori_loop(hi, self.stop, masked, carry)


# ---------------------------------------------------------------------------------------------
# Pieces shared by the kernels


def _mask(config: Call, q_pos, kv_pos, q_ids, kv_ids):
  """``[block_q, block_kv]`` True where query ``q_pos[a]`` may attend key ``kv_pos[b]``."""
  mask = config.mask.allowed(q_pos, kv_pos)
  if q_ids is not None:
    mask &= q_ids[:, None] == kv_ids[None, :]
  return mask


def _any(mask, axis: int):
  """``mask.any(axis)``, written as an int32 max (Triton lowering has no boolean reductions)."""
  return jnp.max(mask.astype(jnp.int32), axis=axis) > 0


def _logits(config: Call, q, k, mask):
  """Scaled, soft-capped float32 logits, -inf where masked (mask None: nothing is); also
  ``tanh`` (softcap) or None."""
  logits = _dot(q, k, trans_b=True) * config.scale
  tanh = None
  if config.softcap is not None:
    tanh = jnp.tanh(logits / config.softcap)
    logits = config.softcap * tanh
  return (logits if mask is None else jnp.where(mask, logits, -jnp.inf)), tanh


def _logit_gradient(config: Call, q, k, v, d_out, lse, delta, mask, *, return_p=False):
  """``dS * scale`` (w.r.t. the unscaled ``q k^T``) of a block, and ``P`` if asked; 0 if masked."""
  logits, tanh = _logits(config, q, k, mask)
  p = jnp.exp(logits - lse[:, None])  # masked logits are -inf: p is 0 there
  dp = _dot(d_out, v, trans_b=True)
  ds = p * (dp - delta[:, None])
  if tanh is not None:
    ds *= 1.0 - tanh * tanh
  ds = ds * config.scale
  if mask is not None:
    ds = jnp.where(mask, ds, 0.0)  # dp is NaN where v holds garbage
  return (ds, p) if return_p else ds


def _dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
  """2-D matmul with float32 accumulation; IEEE precision for float32 operands (not TF32)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def _block_range(positions_seen, start, block: int, other_block: int):
  """Half-open range of ``other_block``-sized blocks that the block at ``start`` interacts with."""
  lo, hi = positions_seen(start, start + block)
  first = lo // other_block
  return first, jnp.maximum((hi + other_block - 1) // other_block, first)


def _overlapping(first, stop, ids, other_min, other_max):
  """Narrows ``[first, stop)`` to the blocks whose ``[min, max]`` id interval meets ``ids``'."""
  lo, hi = jnp.min(ids), jnp.max(ids)
  index = lax.broadcasted_iota(jnp.int32, other_min.shape, 0)
  meets = (other_min <= hi) & (other_max >= lo)
  first = jnp.maximum(first, jnp.min(jnp.where(meets, index, other_min.shape[0])))
  return first, jnp.minimum(stop, jnp.max(jnp.where(meets, index + 1, 0)))


# ---------------------------------------------------------------------------------------------
# BlockSpecs and padding (grid: (block index, batch, head))


def _reversed(count: int):
  return lambda i: count - 1 - i


def _query_spec(config: Call, rows: int, width: int, block_index=lambda i: i, *, full=False):
  """``[rows, width]`` tiles of a ``[b, q_pad, h, width]`` array (all rows if ``full``)."""
  if full:
    return pl.BlockSpec((None, rows, None, width), lambda _, b, h: (b, 0, h, 0))
  return pl.BlockSpec((None, rows, None, width), lambda i, b, h: (b, block_index(i), h, 0))


def _kv_spec(config: Call, rows: int, width: int, *, full=False):
  """``[rows, width]`` tiles of a ``[b, kv_pad, kv_h, width]`` array, for query head ``h``."""
  group = config.group
  if full:
    return pl.BlockSpec((None, rows, None, width), lambda _, b, h: (b, 0, h // group, 0))
  return pl.BlockSpec((None, rows, None, width), lambda j, b, h: (b, j, h // group, 0))


def _partial_spec(config: Call, rows: int, width: int):
  """dk/dv output tiles: one per query head (GQA partials) or per kv head (group 1)."""
  return pl.BlockSpec((None, rows, None, width), lambda j, b, h: (b, j, h, 0))


def _stats_spec(rows: int, block_index=lambda i: i, *, full=False):
  """Tiles of a per-query ``[b, h, q_pad]`` statistic (LSE, D)."""
  if full:
    return pl.BlockSpec((None, None, rows), lambda _, b, h: (b, h, 0))
  return pl.BlockSpec((None, None, rows), lambda i, b, h: (b, h, block_index(i)))


def _segment_inputs(config: Call, q_segment_ids, kv_segment_ids, block_q: int, block_kv: int,
                    *, queries_tiled: bool):
  """Segment-id arrays and a ``block_index -> specs`` function for one kernel.

  ``queries_tiled``: the grid walks query blocks (forward, dq): inputs are the block's query ids,
  every key id, and the per-key-block ``[min, max]``. Otherwise (dk/dv) the transpose.
  """
  if not config.segments:
    return [], lambda block_index: []
  q_ids = shapes.pad_axis(q_segment_ids.astype(jnp.int32), 1, config.q_pad, mode="edge")
  kv_ids = shapes.pad_axis(kv_segment_ids.astype(jnp.int32), 1, config.kv_pad, mode="edge")
  if queries_tiled:
    bounds = _block_bounds(kv_ids, block_kv)
    tiled, tile = (lambda index: pl.BlockSpec((None, block_q), lambda i, b, h: (b, index(i)))), 0
  else:
    bounds = _block_bounds(q_ids, block_q)
    tiled, tile = (lambda index: pl.BlockSpec((None, block_kv), lambda j, b, h: (b, index(j)))), 1
  whole = [pl.BlockSpec((None, x.shape[1]), lambda _, b, h: (b, 0)) for x in (q_ids, kv_ids)]
  bound_specs = [pl.BlockSpec((None, x.shape[1]), lambda _, b, h: (b, 0)) for x in bounds]

  def specs(block_index):
    ids_specs = list(whole)
    ids_specs[tile] = tiled(block_index)
    return [*ids_specs, *bound_specs]

  return [q_ids, kv_ids, *bounds], specs


def _block_bounds(ids, block: int):
  """Per-block ``(min, max)`` of ``[b, n * block]`` ids, padded to a power-of-two block count
  with empty intervals (min > max) that overlap nothing."""
  batch, length = ids.shape
  count = length // block
  tiles = ids.reshape(batch, count, block)
  lo, hi = tiles.min(-1), tiles.max(-1)
  extra = _tile(count) - count
  return (jnp.pad(lo, ((0, 0), (0, extra)), constant_values=_INT_MAX),
          jnp.pad(hi, ((0, 0), (0, extra)), constant_values=_INT_MIN))


def _padded(x, length: int):
  """``[b, len, h, d] -> [b, length, h, _tile(d)]`` with zeros (no copy when already aligned)."""
  return shapes.pad_axes(x, {1: length, 3: _tile(x.shape[3])})


def _tile(n: int) -> int:
  """The power of two >= max(n, 16)."""
  return shapes.next_power_of_two(n, _MIN_TILE)
