"""FlashAttention for NVIDIA Hopper (sm_90) in Pallas Mosaic GPU, FlashAttention-3 style.

Why a second GPU kernel: the Triton-lowered kernels (:mod:`.gpu`) reach 0.57-1.08x of cuDNN's
forward on an H200 (benchmarks/gpu/attention_gpu.md): Triton's Hopper code generation cannot
specialize warps. FlashAttention-3 (Shah et al. 2024) reports 1.5-2.0x over FlashAttention-2
on H100 (up to 740 TFLOP/s bf16 forward, 75% of peak) from three ideas, two of them here:

* **warp specialization**: each CTA runs three warpgroups; one producer issues TMA copies of the
  streamed blocks into a ring of ``stages`` shared-memory slots (a "loaded" barrier per slot and
  operand), two consumers (64 rows each, a 128-row tile per CTA) run the matmuls as asynchronous
  ``wgmma`` on the tensor cores and release each slot through a "consumed" barrier (two
  arrivals) for the producer to refill: loads of step ``t + stages`` overlap the math of step
  ``t``. The producer hands its registers to the consumers (``setmaxnreg`` 40 vs 232).
* ping-pong scheduling of the two consumers in the forward (one's softmax under the other's
  GEMMs): ``HopperConfig(ping_pong=True)``, opt-in until timed.
* intra-warpgroup overlap in the forward (FA3 section 3.2): ``HopperConfig(overlap=True)``, opt-in
  until timed, exclusive with ``ping_pong``. Step ``j`` of a consumer issues ``S_j = Q K_j^T``,
  then ``P_{j-1} V_{j-1}``, waits for ``S_j`` alone (``wgmma`` groups retire in order) and runs
  its softmax while the PV GEMM runs (prologue: block ``first``'s softmax; epilogue: the last PV;
  a tile without blocks skips all three). Register cost: ``S_j`` (float32), ``P_{j-1}`` (16-bit, a
  ``wgmma`` operand until the GEMM ends) and two float32 ``[64, dv]`` tiles (O and the fresh PV
  product: O is rescaled and added to as in the plain schedule, which keeps the two schedules
  bitwise equal) live at once per consumer, 64 rows: at ``block_kv = dv = 128``, ~224 of the 232
  registers a thread gets, so spills are possible. The producer refills each operand's slot as
  soon as that operand is released (K early, V late), so 2 stages suffice.

Softmax in base 2 with the scale folded: ``P = exp2(S * scale * log2(e) - m)``, one FMA before
the MUFU ``ex2``; the LSE is returned in natural log.

Three kernels, all deterministic (every output tile written by one CTA, no atomics):

* forward: a query tile streams the K/V blocks of its band; online softmax; O and the LSE.
* dq: a query tile streams the K/V blocks of its band, recomputing ``P = exp2(S - LSE)``,
  ``dP = dO V^T``, ``dS = P (dP - D)``, ``dQ += dS K`` (``D = rowsum(dO O) - dLSE``, from XLA).
* dk/dv: a key tile (two consumers of 64 keys) streams Q, dO, LSE and D blocks of the queries
  that see it, for every query head of its GQA group, accumulating ``dV += P^T dO`` and
  ``dK += dS^T Q`` in registers: GQA needs no per-head partials.

Masks: ``causal`` (bottom-right aligned: query ``i`` sees key ``j <= i + kv_len - q_len``),
sliding ``window`` and the length tails, from the shared :class:`masks.MaskSpec`;
``softcap`` (``c * tanh(s / c)``) before the mask. A tile streams only the blocks its band
intersects (:meth:`~masks.MaskSpec.kv_range`, :meth:`~masks.MaskSpec.q_range`); each consumer
runs the blocks all its rows see whole (``kv_full_range``/``q_full_range``) without building a
mask. Both consumers run every step of their tile, so on the band's edges one may compute a
block fully masked for its rows. Garbage (NaN) in keys and values no query sees, and in queries
and output cotangents that see no key, is zeroed in XLA before the kernels (those positions are
contiguous for a band, and known statically): a zero probability times NaN in ``wgmma`` would
otherwise be NaN.

Segment ids (packed rows): each consumer reads its rows' ids and, per step, the streamed block's
ids (64-128 int32, L2-resident) from global memory straight into registers (no ring operand, no
barrier); every block is then masked (``q_id == kv_id``, with the band). Block skipping as the
Triton kernels: per tile, the ``[min, max]`` id interval is compared in XLA with the other side's
per-block intervals, and the tile streams only the blocks from the first to the last overlapping
one, intersected with its band (for sorted ids, exactly the blocks that share a segment). The
XLA zeroing also covers rows whose segment id the other side lacks (a padding segment): keys of
an id no query has, queries of an id no key has (found by sorting, O(n log n)). Not covered: NaN
in a key that shares an id with some query but lies outside every such query's band.

Head dims above 128 take the Triton backward of :mod:`.gpu` (the backward tiles would overflow
shared memory).

Shapes: any lengths (padded to 128 with zeros in XLA, only when needed), head dims up to 256
(padded to a multiple of 64: the 128-byte swizzle of 16-bit rows), GQA/MQA by index mapping,
bfloat16/float16 only (``wgmma`` operands); float32 raises ``NotImplementedError``.

Memory: O((q_len + kv_len) * head_dim) in HBM. Shared memory per CTA, forward: ``128 d`` (Q, then
O) plus ``2 stages block_kv d`` (K/V ring) 16-bit words: 160 KiB at d=128, 192 KiB at d=256 with
the defaults (H100/H200: 227 KiB); dq: ``128 (d + dv)`` plus the K/V ring of ``block_kv_dq``;
dk/dv: ``128 (d + dv)`` plus the Q/dO ring of ``block_q_dkv``.

Interpret mode (CPU): Pallas' Mosaic GPU interpreter (jax 0.10) accepts neither register nor
transposed ``wgmma`` operands and knows no register layouts, so there (only) those operands are
staged through shared memory and layout hints are skipped; the pipelines, barriers, TMA slices,
masks and arithmetic are the compiled kernels'.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import gpu, masks
from pallas_kernels.interpret import hopper_interpret

ROWS = 64  # rows of one consumer warpgroup's tiles (wgmma's M)
CONSUMERS = 2
TILE = ROWS * CONSUMERS  # rows per CTA: queries (forward, dq) or keys (dk/dv)
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_HEAD_DIM_MULTIPLE = 64  # 128-byte swizzle of 16-bit rows
_MAX_HEAD_DIM = 256
# Above it, two 64-row tiles of Q and dO (dq) or K and V (dk/dv) and a 2-slot ring overflow the
# 227 KiB of shared memory: the backward is then the Triton kernels of :mod:`.gpu`.
_MAX_BACKWARD_HEAD_DIM = 128
_BLOCKS = (64, 128)


@dataclasses.dataclass(frozen=True)
class HopperConfig:
  """Tiles of the Hopper kernels (each block 64 or 128).

  Attributes:
    block_kv: keys per forward step.
    block_kv_dq: keys per step of the dq kernel.
    block_q_dkv: queries per step of the dk/dv kernel.
    stages: ring slots (>= 2): how many steps the producer may load ahead.
    ping_pong: forward only, FlashAttention-3's schedule: the two consumers rendezvous twice per
      step, offset by one, so one's softmax runs while the other's GEMMs hold the tensor cores
      (FA3 reports ~10% at head_dim 128 on H100). Off by default until measured here.
    overlap: forward only, FlashAttention-3's intra-warpgroup pipelining: a consumer issues
      block ``j``'s ``Q K^T`` and block ``j - 1``'s ``P V`` together and runs the softmax of the
      former under the latter. Excludes ``ping_pong``. Any ``stages``: a consumer holds
      ``K_j`` and ``V_{j-1}`` (different slots), and ``K_j``'s slot is refilled once
      ``K_{j-2}`` is released, early in step ``j - 2``. Off by default until measured here.
  """
  block_kv: int = 128
  block_kv_dq: int = 64
  block_q_dkv: int = 64
  stages: int = 2
  ping_pong: bool = False
  overlap: bool = False

  def __post_init__(self):
    for name in ("block_kv", "block_kv_dq", "block_q_dkv"):
      value = getattr(self, name)
      if value not in _BLOCKS or isinstance(value, bool):
        raise ValueError(f"HopperConfig.{name} must be one of {_BLOCKS}, got {value!r}")
    if not isinstance(self.stages, int) or isinstance(self.stages, bool) or self.stages < 2:
      raise ValueError(f"HopperConfig.stages must be an int >= 2, got {self.stages!r}")
    for name in ("ping_pong", "overlap"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"HopperConfig.{name} must be a bool, got {getattr(self, name)!r}")
    if self.ping_pong and self.overlap:
      raise ValueError("HopperConfig.ping_pong and HopperConfig.overlap are exclusive (the "
                       "ping-pong rendezvous are placed for the plain schedule), got both True")


def default_config(head_dim: int) -> HopperConfig:
  """128-key forward blocks up to head_dim 128, 64 above (shared memory, registers)."""
  return HopperConfig(block_kv=128 if head_dim <= 128 else 64)


def attention(q, k, v, *, causal: bool = False, q_segment_ids=None, kv_segment_ids=None,
              window=None, softcap: float | None = None, scale: float, return_lse: bool = False,
              config: HopperConfig | None = None, interpret: bool | None = None):
  """Hopper forward and backward; arguments as validated by effjax's ``flash_attention``
  (``q [b, q_len, h, d]``, ``k [b, kv_len, kv_h, d]``, ``v [b, kv_len, kv_h, dv]``).

  Args:
    config: tiles; default :func:`default_config`.
    interpret: run in the Mosaic GPU interpreter (CPU); None follows
      ``pallas_kernels.interpret.interpret_mode``.

  Returns:
    The output ``[b, q_len, h, dv]`` in q's dtype, and with ``return_lse`` the float32
    natural-log LSE ``[b, h, q_len]`` (-inf for queries that see no key); differentiable.

  Raises:
    NotImplementedError: not on a Hopper GPU (and not interpreting), float32 inputs or head
      dims above 256 (dispatch then tries the next implementation).
  """
  interpret = hopper_interpret(interpret)
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
    raise NotImplementedError(f"the Hopper kernel takes bfloat16/float16 q, k, v, got "
                              f"{q.dtype}, {k.dtype}, {v.dtype}")
  if max(q.shape[-1], v.shape[-1]) > _MAX_HEAD_DIM:
    raise NotImplementedError(f"the Hopper kernel takes head dims up to {_MAX_HEAD_DIM}, got "
                              f"{q.shape[-1]} and {v.shape[-1]}")
  if config is None:
    config = default_config(max(q.shape[-1], v.shape[-1]))
  elif not isinstance(config, HopperConfig):
    raise TypeError(f"config must be a pallas_kernels.flash_attention.hopper.HopperConfig or "
                    f"None, got {config!r}")
  call = _Call(mask=masks.MaskSpec.create(q.shape[1], k.shape[1], causal=causal, window=window),
               scale=float(scale), softcap=softcap, group=q.shape[2] // k.shape[2],
               segments=q_segment_ids is not None, config=config, interpret=interpret)
  ids = _segment_ids(q_segment_ids, kv_segment_ids)
  out, lse = _attention_jit(call, *_zero_unseen(call.mask, q, k, v, ids), ids)
  return (out, lse) if return_lse else out


@dataclasses.dataclass(frozen=True)
class _Call:
  """Everything static about one call (hashable: a ``jit`` static argument)."""
  mask: masks.MaskSpec
  scale: float
  softcap: float | None
  group: int  # query heads per kv head
  segments: bool
  config: HopperConfig
  interpret: Any  # False, or the interpreter's parameters


# ---------------------------------------------------------------------------------------------
# XLA glue: garbage, padding, custom_vjp


def _seen(mask: masks.MaskSpec, side: str) -> tuple[int, int] | None:
  """The static ``[start, stop)`` of the keys (``side="kv"``) or queries (``"q"``) that some
  partner sees, or None when all are."""
  with jax.ensure_compile_time_eval():
    if side == "kv":
      length, (start, stop) = mask.kv_len, mask.kv_range(0, mask.q_len)
    else:
      length, (start, stop) = mask.q_len, mask.q_range(0, mask.kv_len)
    start, stop = int(start), int(stop)
  return None if (start, stop) == (0, length) else (start, max(stop, start))


_SegmentIds = tuple[jax.Array, jax.Array] | None  # (q ids [b, q_len], kv ids [b, kv_len]) int32


def _segment_ids(q_segment_ids, kv_segment_ids) -> _SegmentIds:
  if q_segment_ids is None:
    return None
  return q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)


def _has_partner(ids: jax.Array, other: jax.Array) -> jax.Array:
  """``[b, n]``: whether ``ids[b, i]`` occurs in ``other[b]`` (a sort and a binary search per
  row, no ``[n, m]`` comparison)."""
  def row(ids, other):
    other = jnp.sort(other)
    return other[jnp.clip(jnp.searchsorted(other, ids), 0, other.size - 1)] == ids
  return jax.vmap(row)(ids, other)


def _zero_rows(x, seen: tuple[int, int] | None, partnered: jax.Array | None = None):
  """``x [b, len, h, d]`` with rows outside ``seen`` or not ``partnered [b, len]`` set to zero
  (NaN included)."""
  if seen is None and partnered is None:
    return x
  keep = jnp.ones((1, x.shape[1]), bool) if partnered is None else partnered
  if seen is not None:
    position = jnp.arange(x.shape[1])[None, :]
    keep &= (position >= seen[0]) & (position < seen[1])
  return jnp.where(keep[:, :, None, None], x, jnp.zeros((), x.dtype))


def _zero_unseen(mask: masks.MaskSpec, q, k, v, ids: _SegmentIds):
  """q, k, v with the rows no partner sees zeroed: outside the band, or (segment ids) of an id
  the other side lacks."""
  q_partnered, kv_partnered = (None, None) if ids is None else (
      _has_partner(ids[0], ids[1]), _has_partner(ids[1], ids[0]))
  seen_keys = _seen(mask, "kv")
  return (_zero_rows(q, _seen(mask, "q"), q_partnered), _zero_rows(k, seen_keys, kv_partnered),
          _zero_rows(v, seen_keys, kv_partnered))


def _id_intervals(ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """Per block of ``ids [b, n * block]``: ``(min, max)``, each ``[b, n]``."""
  blocks = ids.reshape(ids.shape[0], -1, block)
  return blocks.min(-1), blocks.max(-1)


def _segment_ranges(tile_ids: jax.Array, streamed_ids: jax.Array, block: int) -> jax.Array:
  """``[b, tiles, 2]`` int32: per ``TILE`` rows of ``tile_ids``, the ``[first, stop)`` blocks of
  ``block`` streamed positions whose id intervals overlap the tile's (``[0, 0)``: none). Memory:
  a ``[b, tiles, blocks]`` boolean."""
  lo, hi = _id_intervals(tile_ids, TILE)
  block_lo, block_hi = _id_intervals(streamed_ids, block)
  overlap = (lo[:, :, None] <= block_hi[:, None, :]) & (block_lo[:, None, :] <= hi[:, :, None])
  found = overlap.any(-1)
  first = jnp.where(found, jnp.argmax(overlap, -1), 0)
  stop = jnp.where(found, overlap.shape[-1] - jnp.argmax(overlap[..., ::-1], -1), 0)
  return jnp.stack([first, stop], -1).astype(jnp.int32)


def _segment_inputs(ids: _SegmentIds, q_pad: int, kv_pad: int, block: int, *,
                    keys_streamed: bool) -> tuple[jax.Array, ...]:
  """A kernel's segment inputs: ``(own ids, streamed ids, ranges)`` (empty without ids), ids
  edge-padded (padding rows are masked by the length bounds anyway)."""
  if ids is None:
    return ()
  q_ids = gpu.pad_axis(ids[0], 1, q_pad, mode="edge")
  kv_ids = gpu.pad_axis(ids[1], 1, kv_pad, mode="edge")
  own, streamed = (q_ids, kv_ids) if keys_streamed else (kv_ids, q_ids)
  return own, streamed, _segment_ranges(own, streamed, block)


def _padded(x, length_multiple: int):
  """``[b, len, h, d] -> [b, len_pad, h, d_pad]`` with zeros (no copy when aligned)."""
  x = gpu.pad_axis(x, 1, gpu.round_up(x.shape[1], length_multiple))
  return gpu.pad_axis(x, 3, gpu.round_up(x.shape[3], _HEAD_DIM_MULTIPLE))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(call: _Call, q, k, v, ids: _SegmentIds):
  return _forward(call, q, k, v, ids)


def _attention_fwd(call: _Call, q, k, v, ids: _SegmentIds):
  out, lse = _forward(call, q, k, v, ids)
  return (out, lse), (q, k, v, ids, out, lse)


def _attention_bwd(call: _Call, residuals, cotangents):
  return (*_backward(call, residuals, cotangents), None)


def _backward(call: _Call, residuals, cotangents):
  q, k, v, ids, out, lse = residuals
  if max(q.shape[3], v.shape[3]) > _MAX_BACKWARD_HEAD_DIM:  # over shared memory: Triton's
    triton = gpu.Call.create(call.mask, scale=call.scale, softcap=call.softcap,
                             heads=q.shape[2], kv_heads=k.shape[2],
                             head_dim=max(q.shape[3], v.shape[3]), dtype=q.dtype,
                             segments=call.segments, block_sizes=None,
                             interpret=bool(call.interpret))
    return gpu.backward(triton, (q, k, v, *(ids or (None, None)), out, lse), cotangents)
  d_out, d_lse = cotangents
  d_out = _zero_rows(d_out, _seen(call.mask, "q"),
                     None if ids is None else _has_partner(ids[0], ids[1]))
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  pad_stats = lambda x: gpu.pad_axis(x, 2, gpu.round_up(x.shape[2], TILE))
  lse2 = pad_stats(jnp.where(lse == -jnp.inf, 0.0, lse * _LOG2E))  # rows that see no key
  delta = pad_stats(delta - d_lse)
  qp, dop, kp, vp = (_padded(x, TILE) for x in (q, d_out, k, v))
  q_pad, kv_pad = qp.shape[1], kp.shape[1]
  dq = _dq_kernel(call, qp, kp, vp, dop, lse2, delta,
                  *_segment_inputs(ids, q_pad, kv_pad, call.config.block_kv_dq,
                                   keys_streamed=True))
  dk, dv = _dkv_kernel(call, qp, kp, vp, dop, lse2, delta,
                       *_segment_inputs(ids, q_pad, kv_pad, call.config.block_q_dkv,
                                        keys_streamed=False))
  unpad = lambda x, like: x[:, :like.shape[1], :, :like.shape[3]]
  return unpad(dq, q), unpad(dk, k), unpad(dv, v)


_attention.defvjp(_attention_fwd, _attention_bwd)
_attention_jit = jax.jit(_attention, static_argnums=0)


def _forward(call: _Call, q, k, v, ids: _SegmentIds):
  """Pads, runs the kernel, unpads: ``([b, q_len, h, dv] in q's dtype, [b, h, q_len])``."""
  qp, kp, vp = (_padded(x, TILE) for x in (q, k, v))
  out, lse2 = _forward_kernel(call, qp, kp, vp,
                              *_segment_inputs(ids, qp.shape[1], kp.shape[1],
                                               call.config.block_kv, keys_streamed=True))
  lse = jnp.where(lse2 == -jnp.inf, -jnp.inf, lse2 * _LN2)
  return out[:, :q.shape[1], :, :v.shape[3]], lse[:, :, :q.shape[1]]


# ---------------------------------------------------------------------------------------------
# Pieces shared by the kernels


@dataclasses.dataclass(frozen=True)
class _Ops:
  """Operations whose compiled form the interpreter lacks: register layouts, register and
  transposed ``wgmma`` operands (staged through ``staging`` shared memory when interpreting)."""
  interpret: bool

  def layout(self, x, new_layout):
    return x if self.interpret else plgpu.layout_cast(x, new_layout)

  def iota(self, shape, dimension):
    if self.interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dimension)
    return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)

  def vector(self, ref, along: int):
    """A 1-D shared- or global-memory vector laid out to broadcast along dimension ``along`` of
    a tile (from global memory: plain per-thread loads, no TMA)."""
    if self.interpret:
      return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(along),
                      optimized=ref.memory_space != plgpu.GMEM)

  def zeros(self, shape):
    return self.layout(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)

  def transposed(self, ref, staging):
    if self.interpret:
      staging[...] = ref[...].T
      return staging
    return plgpu.transpose_ref(ref, (1, 0))

  def operand(self, x, staging):
    if self.interpret:
      staging[...] = x
      return staging
    return x

  def mma(self, a, b, shape, while_running: Callable[[], None] | None = None):
    """``a @ b`` into a fresh float32 accumulator ``shape`` (``a`` a ref or a register tile);
    ``while_running`` runs between issuing the asynchronous ``wgmma`` and waiting for it."""
    def run(acc_ref):
      plgpu.wgmma(acc_ref, a, b)
      if while_running is not None:
        while_running()
      return acc_ref[...]
    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))

  def mma_pair(self, first, second: Callable[[], tuple[Any, Any]], second_shape,
               on_first: Callable[[Any], Any]):
    """Two products into fresh float32 accumulators, both in flight at once: issues ``a @ b``
    of ``first = (a, b, shape)``, then that of ``second()`` (a callable: it may wait for its
    operands while the first runs) into ``second_shape``; ``on_first`` runs on the first product
    (waited for alone: ``wgmma`` groups complete in order) while the second is in flight.

    Returns:
      ``(on_first(first product), second product)``.
    """
    a, b, first_shape = first

    def run(first_ref, second_ref):
      plgpu.wgmma(first_ref, a, b)
      plgpu.wgmma(second_ref, *second())
      return on_first(plgpu.wgmma_accumulator_load(first_ref, wait_n=1)), second_ref[...]
    return pl.run_scoped(run, plgpu.ACC(first_shape, jnp.float32),
                         plgpu.ACC(second_shape, jnp.float32))


def _online_softmax(s, m, l):
  """One online-softmax step on base-2 logits ``s [ROWS, block]`` given the running max ``m``
  and row sums ``l`` (``[ROWS]``): ``(p, alpha, new m, new l)``, ``p = exp2(s - new m)`` (float32)
  and ``alpha = exp2(m - new m)`` the factor for the output so far (0 while a row saw no key)."""
  m_new = jnp.maximum(m, s.max(axis=1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw no key yet
  alpha = jnp.exp2(m - m_safe)
  p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
  return p, alpha, m_new, l * alpha + p.sum(axis=1)


def _rescale(acc, alpha):
  """``acc [ROWS, dv] * alpha [ROWS]`` per row."""
  return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])


def _logits(call: _Call, s):
  """Base-2 logits of ``s = q.k`` (scaled, softcapped), and ``d logits / d (scale q.k)``
  (None without softcap)."""
  if call.softcap is None:
    return s * (call.scale * _LOG2E), None
  t = jnp.tanh(s * (call.scale / call.softcap))
  return t * (call.softcap * _LOG2E), 1.0 - t * t


@dataclasses.dataclass(frozen=True)
class _Ring:
  """A producer -> consumers ring: ``stages`` slots of each streamed operand."""
  buffers: Sequence[Any]  # per operand: shared memory [stages, *block]
  loaded: Sequence[Any]  # per operand: Barrier(num_barriers=stages)
  consumed: Sequence[Any]  # per operand: Barrier(num_arrivals=CONSUMERS, num_barriers=stages)
  stages: int

  def produce(self, steps, max_steps: int, sources: Callable[[Any], Sequence[Any]]):
    """Producer side: loads step ``t``'s blocks (``sources(t)``: one global slice per operand)
    into slot ``t % stages``, each operand once the consumers released its slot, for
    ``t < steps``; then waits for the last releases too (every barrier phase is observed once).
    Per operand: a block released early (K in the forward) is refilled before a later one."""
    def load(t, slot, refill: bool):
      for source, buffer, loaded, consumed in zip(sources(t), self.buffers, self.loaded,
                                                  self.consumed):
        if refill:
          plgpu.barrier_wait(consumed.at[slot])
        plgpu.copy_gmem_to_smem(source, buffer.at[slot], loaded.at[slot])

    def wait_consumed(t):
      for consumed in self.consumed:
        plgpu.barrier_wait(consumed.at[lax.rem(t, self.stages)])

    for slot in range(min(self.stages, max_steps)):  # static slices must stay in bounds
      pl.when(slot < steps)(functools.partial(load, slot, slot, False))

    @pl.loop(self.stages, jnp.maximum(steps, self.stages))
    def _refill(t):
      load(t, lax.rem(t, self.stages), True)

    pl.loop(jnp.maximum(steps - self.stages, 0), steps)(wait_consumed)

  def acquire(self, t, operand: int):
    slot = lax.rem(t, self.stages)
    plgpu.barrier_wait(self.loaded[operand].at[slot])
    return self.buffers[operand].at[slot]

  def release(self, t, operand: int):
    plgpu.barrier_arrive(self.consumed[operand].at[lax.rem(t, self.stages)])


def _ring_scratch(shapes: Sequence[tuple[tuple[int, ...], Any]], stages: int) -> dict[str, Any]:
  return dict(
      ring=[_smem((stages, *shape), dtype) for shape, dtype in shapes],
      ring_loaded=[plgpu.Barrier(num_barriers=stages) for _ in shapes],
      ring_consumed=[plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages) for _ in shapes])


def _ring(scratch: dict[str, Any], stages: int) -> _Ring:
  return _Ring(scratch["ring"], scratch["ring_loaded"], scratch["ring_consumed"], stages)


def _smem(shape, dtype):
  """Shared memory; 2-D+ tiles of 16-bit elements get the 128-byte swizzle ``wgmma`` reads."""
  if len(shape) >= 2 and jnp.dtype(dtype).itemsize == 2:
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                                plgpu.SwizzleTransform(128)))
  return plgpu.SMEM(shape, dtype)


def _blocks(first_last: tuple[Any, Any], block: int):
  """``(first, count)`` of the blocks of size ``block`` meeting the positions ``[start, stop)``."""
  start, stop = (jnp.asarray(x, jnp.int32) for x in first_last)
  first = lax.div(start, block)
  return first, jnp.maximum(lax.div(jnp.maximum(stop, 0) + block - 1, block) - first, 0)


def _whole(full_range: tuple[Any, Any], block: int, first, count):
  """``[lo, hi)`` within ``[first, first + count)``: blocks inside ``full_range`` (no mask)."""
  start, stop = (jnp.asarray(x, jnp.int32) for x in full_range)
  lo = jnp.clip(lax.div(start + block - 1, block), first, first + count)
  return lo, jnp.clip(lax.div(jnp.maximum(stop, 0), block), lo, first + count)


def _band_loop(step: Callable[..., Any], first, count, whole: tuple[Any, Any], carry):
  """Runs ``step(j, carry, masked=...)`` over blocks ``[first, first + count)``, without a mask
  on the ``whole`` ones (a range, clipped to those blocks)."""
  lo = jnp.clip(whole[0], first, first + count)
  hi = jnp.clip(whole[1], lo, first + count)
  masked, unmasked = (functools.partial(step, masked=flag) for flag in (True, False))
  carry = lax.fori_loop(first, lo, masked, carry)
  carry = lax.fori_loop(lo, hi, unmasked, carry)
  return lax.fori_loop(hi, first + count, masked, carry)


def _grid_point(call: _Call, scratch: dict[str, Any], segments: _Segments | None,
                band_range: Callable[[Any, Any], tuple[Any, Any]], block: int):
  """This CTA's ``(batch, head, tile, warpgroup)`` indices, its ring, and ``(first, count)`` of
  the blocks of ``block`` positions its tile streams: those meeting ``band_range`` (a
  :class:`masks.MaskSpec` range of the tile's ``TILE`` positions), cut to the blocks sharing an id
  interval with the tile when there are segment ids."""
  b, h, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("tiles")
  first, count = _blocks(band_range(tile * TILE, tile * TILE + TILE), block)
  if segments:
    first, count = segments.narrow(first, count, b, tile)
  return (b, h, tile, lax.axis_index("wg")), _ring(scratch, call.config.stages), (first, count)


def _unmasked(call: _Call, full_range: tuple[Any, Any], block: int, first, count):
  """:func:`_whole`, or no block at all with segment ids (every block is masked)."""
  if call.segments:
    return first, first
  return _whole(full_range, block, first, count)


def _key_block_mask(call: _Call, ops: _Ops, segments: _Segments | None, own_ids, b, row0,
                    block_kv: int) -> Callable[[Any], Any]:
  """Forward and dq: ``j -> [ROWS, block_kv]`` visibility of key block ``j`` to the consumer's
  rows from ``row0``: the band and, with segment ids, equal ids."""
  shape = (ROWS, block_kv)

  def visible(j):
    ok = call.mask.allowed_broadcast(row0 + ops.iota(shape, 0), j * block_kv + ops.iota(shape, 1))
    return ok if segments is None else ok & segments.same(ops, own_ids, b, j * block_kv, shape)
  return visible


def _launch(call: _Call, body, out_type, scratch: dict[str, Any], grid, grid_names, name: str):
  def entry(*refs, **scratch_refs):
    body(*refs, **scratch_refs)
  entry.__name__ = name
  return plgpu.kernel(
      entry, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
      num_threads=CONSUMERS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True), interpret=call.interpret)


def _load_own_tiles(copies: Sequence[tuple[Any, Any]], loaded, wg):
  """A consumer's own tiles: TMA each ``(global, shared)`` pair, then wait for all of them
  (``loaded``: ``CONSUMERS * len(copies)`` barriers)."""
  barriers = [loaded.at[wg * len(copies) + index] for index in range(len(copies))]
  for (source, destination), barrier in zip(copies, barriers):
    plgpu.copy_gmem_to_smem(source, destination, barrier)
  for barrier in barriers:
    plgpu.barrier_wait(barrier)


def _produce_key_blocks(ring: _Ring, k_ref, v_ref, b, kv_head, first, count, block_kv: int):
  """Producer of the forward and dq kernels: K and V blocks ``first .. first + count - 1``."""
  keys = lambda t: (b, pl.ds((first + t) * block_kv, block_kv), kv_head)
  ring.produce(count, k_ref.shape[1] // block_kv,
               lambda t: (k_ref.at[keys(t)], v_ref.at[keys(t)]))


@dataclasses.dataclass(frozen=True)
class _Segments:
  """A kernel's segment ids in global memory (:func:`_segment_inputs`): ``own [b, pad]``, the
  ids of the CTA's tile side (queries, or keys for dk/dv), ``streamed [b, pad]``, the side the
  ring streams, ``ranges [b, tiles, 2]`` (:func:`_segment_ranges`). The consumers read ids
  straight from global memory into registers (64-128 int32 per step, L2-resident), not through
  the ring: no barriers."""
  own: Any
  streamed: Any
  ranges: Any

  @classmethod
  def split(cls, call: _Call, refs: Sequence[Any]):
    """``(segments or None, the remaining refs)`` of the refs after a kernel's fixed inputs."""
    if not call.segments:
      return None, refs
    return cls(*refs[:3]), refs[3:]

  def narrow(self, first, count, b, tile):
    """The block range ``(first, count)`` cut to the blocks sharing an id interval with the tile."""
    lo = jnp.maximum(first, self.ranges[b, tile, 0])
    return lo, jnp.maximum(jnp.minimum(first + count, self.ranges[b, tile, 1]) - lo, 0)

  def own_ids(self, ops: _Ops, b, start):
    """The ids of the consumer's ``ROWS`` rows from ``start``, a per-row register vector."""
    return ops.vector(self.own.at[b, pl.ds(start, ROWS)], 1)

  def same(self, ops: _Ops, own_ids, b, start, shape):
    """``[ROWS, block]``: own id == the id of streamed position ``start + column``."""
    streamed = ops.vector(self.streamed.at[b, pl.ds(start, shape[1])], 0)
    return (lax.broadcast_in_dim(own_ids, shape, [0])
            == lax.broadcast_in_dim(streamed, shape, [1]))


def _consumer_registers():
  plgpu.set_max_registers(232, action="increase")  # 2 x 128 x 232 + 128 x 40 <= 64K


def _producer_registers():
  plgpu.set_max_registers(40, action="decrease")


def _staging(call: _Call, shapes: dict[str, tuple[int, ...]], dtype) -> dict[str, Any]:
  """Interpret mode only: per-consumer buffers for register and transposed ``wgmma`` operands."""
  if not call.interpret:
    return {}
  return {f"stage_{name}": _smem((CONSUMERS, *shape), dtype) for name, shape in shapes.items()}


def _stage(scratch: dict[str, Any], name: str, wg):
  buffer = scratch.get(f"stage_{name}")
  return None if buffer is None else buffer.at[wg]


# ---------------------------------------------------------------------------------------------
# Kernels (on padded inputs: lengths multiples of 128, head dims of 64)


def _forward_kernel(call: _Call, q, k, v, *segment_inputs):
  """Output ``[b, q_pad, h, dv]`` and base-2 LSE ``[b, h, q_pad]``."""
  batch, q_pad, heads, d = q.shape
  dv = v.shape[-1]
  mask, block_kv, dtype, ops = call.mask, call.config.block_kv, q.dtype, _Ops(bool(call.interpret))
  ping_pong = call.config.ping_pong

  def body(q_ref, k_ref, v_ref, *refs, **scratch):
    segments, (out_ref, lse_ref) = _Segments.split(call, refs)

    def rendezvous():
      if ping_pong:
        plgpu.barrier_arrive(scratch["schedule"])
        plgpu.barrier_wait(scratch["schedule"])

    (b, h, tile, wg), ring, (first, count) = _grid_point(call, scratch, segments, mask.kv_range,
                                                       block_kv)

    @pl.when(wg < CONSUMERS)
    def _consumer():
      _consumer_registers()
      row0 = tile * TILE + wg * ROWS
      rows = pl.ds(row0, ROWS)
      q_smem = scratch["q"].at[wg]
      _load_own_tiles([(q_ref.at[b, rows, h], q_smem)], scratch["own_loaded"], wg)
      own_ids = segments and segments.own_ids(ops, b, row0)

      def scores(j, s, *, masked: bool):
        """Base-2 logits of key block ``j`` from ``s = q.k``, masked if asked."""
        s, _ = _logits(call, s)
        return jnp.where(visible(j), s, -jnp.inf) if masked else s

      def block_scores(j, *, masked: bool, while_running=None):
        """Acquires key block ``j``, ``S = Q K_j^T``, releases it: :func:`scores`."""
        t = j - first
        k_t = ops.transposed(ring.acquire(t, 0), _stage(scratch, "k_t", wg))
        s = ops.mma(q_smem, k_t, (ROWS, block_kv), while_running=while_running)
        ring.release(t, 0)
        return scores(j, s, masked=masked)

      def step(j, carry, *, masked: bool):
        acc, m, l = carry
        t = j - first
        p, alpha, m, l = _online_softmax(
            block_scores(j, masked=masked, while_running=rendezvous), m, l)
        p = ops.operand(p.astype(dtype), _stage(scratch, "p", wg))
        if ping_pong:  # softmax done; take the tensor cores once the other consumer's GEMM is out
          plgpu.barrier_arrive(scratch["schedule"])
        v_smem = ring.acquire(t, 1)
        if ping_pong:
          plgpu.barrier_wait(scratch["schedule"])
        acc = _rescale(acc, alpha) + ops.mma(p, v_smem, (ROWS, dv))
        ring.release(t, 1)
        return acc, m, l

      def overlapped_step(j, carry, *, masked: bool):
        """Issues ``S_j = Q K_j^T`` then ``P_{j-1} V_{j-1}``, runs the softmax of ``S_j`` while
        the latter is in flight. ``carry``: O of the blocks before ``j - 1``, the factor ``alpha``
        that rescales it to the running max, that max, the row sums and ``P_{j-1}`` (O is
        rescaled and added to in one expression, as in :func:`step`: the same rounding)."""
        acc, alpha, m, l, p = carry
        t = j - first
        k_t = ops.transposed(ring.acquire(t, 0), _stage(scratch, "k_t", wg))
        p_operand = ops.operand(p, _stage(scratch, "p", wg))

        def softmax(s):
          ring.release(t, 0)
          return _online_softmax(scores(j, s, masked=masked), m, l)
        (p, alpha_next, m, l), pv = ops.mma_pair(
            (q_smem, k_t, (ROWS, block_kv)), lambda: (p_operand, ring.acquire(t - 1, 1)),
            (ROWS, dv), softmax)
        ring.release(t - 1, 1)
        return _rescale(acc, alpha) + pv, alpha_next, m, l, p.astype(dtype)

      def first_step(j, carry, *, masked: bool):
        """The pipeline's prologue: block ``j``'s softmax, no PV GEMM yet."""
        acc, _, m, l, _ = carry
        p, alpha, m, l = _online_softmax(block_scores(j, masked=masked), m, l)
        return acc, alpha, m, l, p.astype(dtype)

      def overlapped(carry):
        """The pipelined loop (needs ``count >= 1``): block ``first``'s softmax, the overlapped
        steps, the last block's PV GEMM. Each block masked or not as in the plain schedule."""
        acc, m, l = carry
        placeholders = (ops.layout(jnp.ones((ROWS,), jnp.float32), reduced),
                        ops.zeros((ROWS, block_kv)).astype(dtype))  # alpha, P: replaced
        acc, alpha, m, l, p = _band_loop(first_step, first, 1, whole,
                                         (acc, placeholders[0], m, l, placeholders[1]))
        acc, alpha, m, l, p = _band_loop(overlapped_step, first + 1, count - 1, whole,
                                         (acc, alpha, m, l, p))
        last = count - 1
        pv = ops.mma(ops.operand(p, _stage(scratch, "p", wg)), ring.acquire(last, 1), (ROWS, dv))
        ring.release(last, 1)
        return _rescale(acc, alpha) + pv, m, l

      visible = _key_block_mask(call, ops, segments, own_ids, b, row0, block_kv)
      reduced = plgpu.Layout.WGMMA.reduce(1)
      carry = (ops.zeros((ROWS, dv)),
               ops.layout(jnp.full((ROWS,), -jnp.inf, jnp.float32), reduced),
               ops.layout(jnp.zeros((ROWS,), jnp.float32), reduced))
      whole = _unmasked(call, mask.kv_full_range(row0, row0 + ROWS), block_kv, first, count)
      pl.when(wg == 1)(rendezvous)  # the second consumer starts half a step behind
      if call.config.overlap:
        acc, m, l = lax.cond(count > 0, overlapped, lambda carry: carry, carry)
      else:
        acc, m, l = _band_loop(step, first, count, whole, carry)
      pl.when(wg == 0)(rendezvous)  # ... and the first meets its last one
      seen = l > 0
      inverse = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
      o_smem = q_smem if d == dv else scratch["o"].at[wg]
      o_smem[...] = (acc * lax.broadcast_in_dim(inverse, acc.shape, [0])).astype(dtype)
      scratch["lse"][wg] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, out_ref.at[b, rows, h])
      plgpu.copy_smem_to_gmem(scratch["lse"].at[wg], lse_ref.at[b, h, rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
      _producer_registers()
      _produce_key_blocks(ring, k_ref, v_ref, b, lax.div(h, call.group), first, count, block_kv)

  scratch = dict(
      q=_smem((CONSUMERS, ROWS, d), dtype), own_loaded=plgpu.Barrier(num_barriers=CONSUMERS),
      lse=_smem((CONSUMERS, ROWS), jnp.float32),
      **(dict(schedule=plgpu.Barrier(num_arrivals=CONSUMERS)) if ping_pong else {}),
      **({} if d == dv else dict(o=_smem((CONSUMERS, ROWS, dv), dtype))),  # else O reuses Q's
      **_ring_scratch([((block_kv, d), dtype), ((block_kv, dv), dtype)], call.config.stages),
      **_staging(call, dict(k_t=(d, block_kv), p=(ROWS, block_kv)), dtype))
  out_type = [jax.ShapeDtypeStruct((batch, q_pad, heads, dv), dtype),
              jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32)]
  return _launch(call, body, out_type, scratch, (q_pad // TILE, heads, batch),
                 ("tiles", "heads", "batch"), "flash_attention_hopper_forward")(
                     q, k, v, *segment_inputs)


def _dq_kernel(call: _Call, q, k, v, d_out, lse2, delta, *segment_inputs):
  """``dq [b, q_pad, h, d]`` in q's dtype."""
  batch, q_pad, heads, d = q.shape
  dv = v.shape[-1]
  mask, block_kv, dtype = call.mask, call.config.block_kv_dq, q.dtype
  ops = _Ops(bool(call.interpret))

  def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, **scratch):
    segments, (dq_ref,) = _Segments.split(call, refs)
    (b, h, tile, wg), ring, (first, count) = _grid_point(call, scratch, segments, mask.kv_range,
                                                       block_kv)

    @pl.when(wg < CONSUMERS)
    def _consumer():
      _consumer_registers()
      row0 = tile * TILE + wg * ROWS
      rows = pl.ds(row0, ROWS)
      own = [(q_ref.at[b, rows, h], scratch["q"].at[wg]),
             (do_ref.at[b, rows, h], scratch["do"].at[wg]),
             (lse_ref.at[b, h, rows], scratch["lse"].at[wg]),
             (delta_ref.at[b, h, rows], scratch["delta"].at[wg])]
      _load_own_tiles(own, scratch["own_loaded"], wg)
      own_ids = segments and segments.own_ids(ops, b, row0)
      visible = _key_block_mask(call, ops, segments, own_ids, b, row0, block_kv)
      q_smem, do_smem = scratch["q"].at[wg], scratch["do"].at[wg]
      lse = ops.vector(scratch["lse"].at[wg], 1)
      delta = ops.vector(scratch["delta"].at[wg], 1)

      def step(j, dq, *, masked: bool):
        t = j - first
        k_smem = ring.acquire(t, 0)
        k_t = ops.transposed(k_smem, _stage(scratch, "k_t", wg))
        s, d_cap = _logits(call, ops.mma(q_smem, k_t, (ROWS, block_kv)))
        if masked:
          s = jnp.where(visible(j), s, -jnp.inf)
        p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
        v_t = ops.transposed(ring.acquire(t, 1), _stage(scratch, "v_t", wg))
        dp = ops.mma(do_smem, v_t, (ROWS, block_kv))
        ring.release(t, 1)
        ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
        if d_cap is not None:
          ds = ds * d_cap
        ds = ops.operand(ds.astype(dtype), _stage(scratch, "ds", wg))
        dq = dq + ops.mma(ds, k_smem, (ROWS, d))
        ring.release(t, 0)
        return dq

      whole = _unmasked(call, mask.kv_full_range(row0, row0 + ROWS), block_kv, first, count)
      dq = _band_loop(step, first, count, whole, ops.zeros((ROWS, d)))
      q_smem[...] = (dq * call.scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, rows, h])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
      _producer_registers()
      _produce_key_blocks(ring, k_ref, v_ref, b, lax.div(h, call.group), first, count, block_kv)

  scratch = dict(
      q=_smem((CONSUMERS, ROWS, d), dtype), do=_smem((CONSUMERS, ROWS, dv), dtype),
      lse=_smem((CONSUMERS, ROWS), jnp.float32), delta=_smem((CONSUMERS, ROWS), jnp.float32),
      own_loaded=plgpu.Barrier(num_barriers=CONSUMERS * 4),
      **_ring_scratch([((block_kv, d), dtype), ((block_kv, dv), dtype)], call.config.stages),
      **_staging(call, dict(k_t=(d, block_kv), v_t=(dv, block_kv), ds=(ROWS, block_kv)), dtype))
  out_type = jax.ShapeDtypeStruct(q.shape, dtype)
  return _launch(call, body, out_type, scratch, (q_pad // TILE, heads, batch),
                 ("tiles", "heads", "batch"), "flash_attention_hopper_dq")(
                     q, k, v, d_out, lse2, delta, *segment_inputs)


def _dkv_kernel(call: _Call, q, k, v, d_out, lse2, delta, *segment_inputs):
  """``dk [b, kv_pad, kv_h, d]`` and ``dv [b, kv_pad, kv_h, dv]`` in k's dtype."""
  batch, q_pad, heads, d = q.shape
  kv_pad, kv_heads, dv = k.shape[1], k.shape[2], v.shape[-1]
  mask, block_q, dtype = call.mask, call.config.block_q_dkv, q.dtype
  ops = _Ops(bool(call.interpret))
  group = call.group

  def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, **scratch):
    segments, (dk_ref, dv_ref) = _Segments.split(call, refs)
    (b, kv_head, tile, wg), ring, (first, count) = _grid_point(call, scratch, segments,
                                                             mask.q_range, block_q)

    @pl.when(wg < CONSUMERS)
    def _consumer():
      _consumer_registers()
      key0 = tile * TILE + wg * ROWS
      keys = pl.ds(key0, ROWS)
      k_smem, v_smem = scratch["k"].at[wg], scratch["v"].at[wg]
      _load_own_tiles([(k_ref.at[b, keys, kv_head], k_smem), (v_ref.at[b, keys, kv_head], v_smem)],
                      scratch["own_loaded"], wg)
      own_ids = segments and segments.own_ids(ops, b, key0)
      whole = _unmasked(call, mask.q_full_range(key0, key0 + ROWS), block_q, first, count)

      def step(i, carry, *, g, masked: bool):
        dk, dv_acc = carry
        t = g * count + (i - first)
        q_smem = ring.acquire(t, 0)
        q_t = ops.transposed(q_smem, _stage(scratch, "q_t", wg))
        s_t, d_cap = _logits(call, ops.mma(k_smem, q_t, (ROWS, block_q)))
        if masked:
          shape = (ROWS, block_q)
          visible = mask.allowed_broadcast(i * block_q + ops.iota(shape, 1),
                                           key0 + ops.iota(shape, 0))
          if segments:
            visible &= segments.same(ops, own_ids, b, i * block_q, shape)
          s_t = jnp.where(visible, s_t, -jnp.inf)
        lse = ops.vector(ring.acquire(t, 2), 0)
        p_t = jnp.exp2(s_t - lax.broadcast_in_dim(lse, s_t.shape, [1]))
        ring.release(t, 2)
        do_smem = ring.acquire(t, 1)
        p_operand = ops.operand(p_t.astype(dtype), _stage(scratch, "p_t", wg))
        dv_acc = dv_acc + ops.mma(p_operand, do_smem, (ROWS, dv))
        dp_t = ops.mma(v_smem, ops.transposed(do_smem, _stage(scratch, "do_t", wg)),
                       (ROWS, block_q))
        ring.release(t, 1)
        delta = ops.vector(ring.acquire(t, 3), 0)
        ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
        ring.release(t, 3)
        if d_cap is not None:
          ds_t = ds_t * d_cap
        ds_t = ops.operand(ds_t.astype(dtype), _stage(scratch, "ds_t", wg))
        dk = dk + ops.mma(ds_t, q_smem, (ROWS, d))
        ring.release(t, 0)
        return dk, dv_acc

      def head(g, carry):
        return _band_loop(functools.partial(step, g=g), first, count, whole, carry)

      dk, dv_acc = lax.fori_loop(0, group, head, (ops.zeros((ROWS, d)), ops.zeros((ROWS, dv))))
      k_smem[...] = (dk * call.scale).astype(dtype)
      v_smem[...] = dv_acc.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, keys, kv_head])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, keys, kv_head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
      _producer_registers()

      def sources(t):
        head = kv_head * group + lax.div(t, jnp.maximum(count, 1))
        queries = pl.ds((first + lax.rem(t, jnp.maximum(count, 1))) * block_q, block_q)
        return (q_ref.at[b, queries, head], do_ref.at[b, queries, head],
                lse_ref.at[b, head, queries], delta_ref.at[b, head, queries])
      ring.produce(group * count, group * (q_pad // block_q), sources)

  scratch = dict(
      k=_smem((CONSUMERS, ROWS, d), dtype), v=_smem((CONSUMERS, ROWS, dv), dtype),
      own_loaded=plgpu.Barrier(num_barriers=2 * CONSUMERS),
      **_ring_scratch([((block_q, d), dtype), ((block_q, dv), dtype), ((block_q,), jnp.float32),
                       ((block_q,), jnp.float32)], call.config.stages),
      **_staging(call, dict(q_t=(d, block_q), do_t=(dv, block_q), p_t=(ROWS, block_q),
                            ds_t=(ROWS, block_q)), dtype))
  out_type = [jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)]
  return _launch(call, body, out_type, scratch, (kv_pad // TILE, kv_heads, batch),
                 ("tiles", "heads", "batch"), "flash_attention_hopper_dkv")(
                     q, k, v, d_out, lse2, delta, *segment_inputs)
