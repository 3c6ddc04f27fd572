"""FlashAttention forward for NVIDIA Hopper (sm_90) in Pallas Mosaic GPU, FlashAttention-3 style.

Why a second GPU kernel: the Triton-lowered kernels (:mod:`.gpu`) reach 0.57-1.08x of cuDNN's
forward on an H200 (benchmarks/gpu/attention_gpu.md): Triton's Hopper code generation cannot
specialize warps. FlashAttention-3 (Shah et al. 2024) reports 1.5-2.0x over FlashAttention-2
on H100 (up to 740 TFLOP/s bf16 forward, 75% of peak) from three ideas, the first two used here:

* **warp specialization**: each CTA runs three warpgroups; one producer issues TMA copies of
  K/V blocks into a ring of ``stages`` shared-memory slots (one "loaded" barrier per slot), two
  consumers (64 query rows each, a 128-row query tile per CTA) run ``S = Q K^T`` and ``O += P V``
  as asynchronous ``wgmma`` on the tensor cores and release each slot through a "consumed"
  barrier (two arrivals) for the producer to refill. Loads of block ``j + stages`` overlap the
  math of block ``j``.
* **exp2 with the scale folded**: ``P = exp2(S * scale * log2(e) - m)``, one FMA per element
  before the MUFU ``ex2``; statistics are kept in base 2 and the LSE converted back to natural
  log at the end.
* the producer gives registers to the consumers (``setmaxnreg``: 40 vs 232 per thread).

Not yet done (FlashAttention-3's other two ideas): ping-pong scheduling of the two consumers (one
runs its softmax while the other's GEMMs use the tensor cores) and the intra-warpgroup overlap of
a block's softmax with the next block's ``Q K^T``; and a Hopper backward.

Masks: ``causal`` (bottom-right aligned: query ``i`` sees key ``j <= i + kv_len - q_len``),
sliding ``window`` (the shared :class:`masks.MaskSpec` band) and the key tail of a length that is
not a whole number of blocks; ``softcap`` (``c * tanh(s / c)``) before the mask. A CTA loads
only the key blocks its 128 queries' band intersects (:meth:`masks.MaskSpec.kv_range`); each
consumer runs the blocks all its rows see whole (:meth:`masks.MaskSpec.kv_full_range`) without a
mask and masks the rest. Both consumers run every step of their CTA, so on the band's edges one
consumer may compute a block fully masked for its rows. Segment ids are not supported here:
:func:`attention` raises ``NotImplementedError`` and dispatch falls through to the Triton kernels.

Shapes: any lengths (queries padded to 128 rows, keys to ``block_kv``, with zeros, in XLA,
only when needed), head dims up to 256 (padded to a multiple of 64: the 128-byte swizzle of
bfloat16 rows), GQA/MQA by index mapping (query head ``h`` reads kv head ``h // group``),
bfloat16/float16 only (``wgmma`` operands); float32 raises ``NotImplementedError``.

Memory: O((q_len + kv_len) * head_dim) in HBM; shared memory per CTA ``128 * d * 2`` bytes (Q,
then O in the same buffer when ``dv == d``) plus ``2 * stages * block_kv * d * 2`` (K and V
rings): 160 KiB at d=128 with the defaults, 192 KiB at d=256 (H100/H200: 227 KiB).
The backward pass is the Triton dq and dk/dv kernels of :mod:`.gpu`, fed this forward's output
and natural-log LSE (the residuals both forwards share).

Interpret mode (CPU): Pallas' Mosaic GPU interpreter (jax 0.10) accepts neither register nor
transposed ``wgmma`` operands and knows no register layouts, so there (only) ``K^T`` and ``P``
are staged through shared memory and layout casts are skipped; the pipeline, barriers, TMA
slices, masks and arithmetic are the compiled kernel's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import gpu, masks
from pallas_kernels.interpret import hopper_interpret

ROWS_PER_WARPGROUP = 64  # wgmma's M
CONSUMERS = 2
BLOCK_Q = ROWS_PER_WARPGROUP * CONSUMERS
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_HEAD_DIM_MULTIPLE = 64  # 128-byte swizzle of 16-bit rows
_MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class HopperConfig:
  """Tiles of the Hopper forward kernel.

  Attributes:
    block_kv: keys per step (a multiple of 64).
    stages: K/V ring slots (>= 2): how many key blocks the producer may load ahead.
    backward: block sizes of the Triton backward kernels (None: their default).
  """
  block_kv: int = 128
  stages: int = 2
  backward: gpu.BlockSizes | None = None

  def __post_init__(self):
    if not isinstance(self.block_kv, int) or self.block_kv < 64 or self.block_kv % 64:
      raise ValueError(f"HopperConfig.block_kv must be a positive multiple of 64, got "
                       f"{self.block_kv!r}")
    if not isinstance(self.stages, int) or self.stages < 2:
      raise ValueError(f"HopperConfig.stages must be an int >= 2, got {self.stages!r}")


def default_config(head_dim: int) -> HopperConfig:
  """128-key blocks up to head_dim 128, 64 above (shared memory and registers); 2 stages."""
  return HopperConfig(block_kv=128 if head_dim <= 128 else 64)


def attention(q, k, v, *, causal: bool = False, q_segment_ids=None, kv_segment_ids=None,
              window=None, softcap: float | None = None, scale: float, return_lse: bool = False,
              config: HopperConfig | None = None, interpret: bool | None = None):
  """Hopper forward (this module) + Triton backward; arguments as validated by effjax's
  ``flash_attention`` (``q [b, q_len, h, d]``, ``k [b, kv_len, kv_h, d]``, ``v [b, kv_len,
  kv_h, dv]``).

  Args:
    config: tiles; default :func:`default_config`.
    interpret: run in the Mosaic GPU interpreter (CPU); None follows
      ``pallas_kernels.interpret.interpret_mode``.

  Returns:
    The output ``[b, q_len, h, dv]`` in q's dtype, and with ``return_lse`` the float32
    natural-log LSE ``[b, h, q_len]`` (-inf for queries that see no key); differentiable.

  Raises:
    NotImplementedError: not on a Hopper GPU (and not interpreting), float32 inputs, head dims
      above 256, or segment ids (dispatch then tries the next implementation).
  """
  interpret = hopper_interpret(interpret)
  if q_segment_ids is not None or kv_segment_ids is not None:
    raise NotImplementedError("the Hopper kernel does not support segment ids")
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
               scale=float(scale), softcap=softcap, heads=q.shape[2], kv_heads=k.shape[2], head_dim=q.shape[-1],
               config=config,
               interpret=interpret)
  out, lse = _attention_jit(call, q, k, v)
  return (out, lse) if return_lse else out


@dataclasses.dataclass(frozen=True)
class _Call:
  """Everything static about one call (hashable: a ``jit`` static argument)."""
  mask: masks.MaskSpec
  scale: float
  softcap: float | None
  heads: int
  kv_heads: int

  @property
  def group(self) -> int:
    return self.heads // self.kv_heads

  head_dim: int
  config: HopperConfig
  interpret: Any  # False, or the interpreter's parameters

  def backward_call(self) -> gpu.Call:
    return gpu.Call.create(self.mask, scale=self.scale, softcap=self.softcap, heads=self.heads,
                           kv_heads=self.kv_heads, head_dim=self.head_dim, segments=False,
                           block_sizes=self.config.backward, interpret=bool(self.interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(call: _Call, q, k, v):
  return _forward(call, q, k, v)


def _attention_fwd(call: _Call, q, k, v):
  out, lse = _forward(call, q, k, v)
  return (out, lse), (q, k, v, out, lse)


def _attention_bwd(call: _Call, residuals, cotangents):
  q, k, v, out, lse = residuals
  return gpu.backward(call.backward_call(), (q, k, v, None, None, out, lse), cotangents)


_attention.defvjp(_attention_fwd, _attention_bwd)
_attention_jit = jax.jit(_attention, static_argnums=0)


def _forward(call: _Call, q, k, v):
  """Pads, runs the kernel, unpads: ``([b, q_len, h, dv] in q's dtype, [b, h, q_len])``."""
  q_len, kv_len, v_dim = q.shape[1], k.shape[1], v.shape[-1]
  block_kv = call.config.block_kv
  q_pad, kv_pad = gpu.round_up(q_len, BLOCK_Q), gpu.round_up(kv_len, block_kv)
  d_pad, dv_pad = (gpu.round_up(x.shape[-1], _HEAD_DIM_MULTIPLE) for x in (q, v))
  qp = gpu.pad_axis(gpu.pad_axis(q, 1, q_pad), 3, d_pad)
  kp = gpu.pad_axis(gpu.pad_axis(k, 1, kv_pad), 3, d_pad)
  vp = gpu.pad_axis(gpu.pad_axis(v, 1, kv_pad), 3, dv_pad)
  out, lse2 = _pallas_forward(call, qp, kp, vp)
  lse = jnp.where(jnp.isfinite(lse2), lse2 * _LN2, -jnp.inf)
  return out[:, :q_len, :, :v_dim], lse[:, :, :q_len]


def _pallas_forward(call: _Call, q, k, v):
  """The kernel on padded inputs: output ``[b, q_pad, h, dv_pad]``, base-2 LSE ``[b, h, q_pad]``."""
  batch, q_pad, heads, d = q.shape
  kv_pad, dv = k.shape[1], v.shape[-1]
  config = call.config
  block_kv, stages = config.block_kv, config.stages
  kv_blocks = kv_pad // block_kv
  mask = call.mask
  dtype = q.dtype
  share_qo = d == dv

  # Register layouts are compile-time hints the interpreter does not know (no numerical effect).
  def layout(x, new_layout):
    return x if call.interpret else plgpu.layout_cast(x, new_layout)

  def iota(shape, dimension):
    if call.interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dimension)
    return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)

  def key_blocks(tile):
    """``(first, count)``: the key blocks some query of the tile sees (causal/window band)."""
    start, stop = mask.kv_range(tile * BLOCK_Q, tile * BLOCK_Q + BLOCK_Q)
    first = lax.div(jnp.int32(start), block_kv)
    stop = lax.div(jnp.maximum(jnp.int32(stop), 0) + block_kv - 1, block_kv)
    return first, jnp.maximum(stop - first, 0)

  def whole_blocks(row0, first, count):
    """``[lo, hi)`` within ``[first, first + count)``: key blocks all of a consumer's rows see
    (inside the band and the key length), which need no mask."""
    start, stop = mask.kv_full_range(row0, row0 + ROWS_PER_WARPGROUP)
    lo = jnp.clip(lax.div(jnp.int32(start) + block_kv - 1, block_kv), first, first + count)
    hi = jnp.clip(lax.div(jnp.maximum(jnp.int32(stop), 0), block_kv), lo, first + count)
    return lo, hi

  def body(q_ref, k_ref, v_ref, out_ref, lse_ref, q_smem, lse_smem, k_smem, v_smem, q_loaded,
           k_loaded, v_loaded, k_consumed, v_consumed, *extra):
    o_smem, staging = (q_smem, extra) if share_qo else (extra[0], extra[1:])
    b, h, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tiles")
    wg = lax.axis_index("wg")
    first, steps = key_blocks(tile)

    @pl.when(wg < CONSUMERS)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")  # 2 x 128 x 232 + 128 x 40 <= 64K
      row0 = tile * BLOCK_Q + wg * ROWS_PER_WARPGROUP
      rows = pl.ds(row0, ROWS_PER_WARPGROUP)
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[wg], q_loaded.at[wg])
      plgpu.barrier_wait(q_loaded.at[wg])
      reduced = plgpu.Layout.WGMMA.reduce(1)
      m = layout(jnp.full((ROWS_PER_WARPGROUP,), -jnp.inf, jnp.float32), reduced)
      l = layout(jnp.zeros((ROWS_PER_WARPGROUP,), jnp.float32), reduced)
      acc = layout(jnp.zeros((ROWS_PER_WARPGROUP, dv), jnp.float32), plgpu.Layout.WGMMA)

      def step(j, carry, *, masked: bool):
        acc, m, l = carry
        slot = lax.rem(j - first, stages)
        plgpu.barrier_wait(k_loaded.at[slot])

        if staging:  # interpreting: no transposed wgmma operands
          staging[0][wg] = k_smem[slot].T
          k_t = staging[0].at[wg]
        else:
          k_t = plgpu.transpose_ref(k_smem.at[slot], (1, 0))

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem.at[wg], k_t)
          return acc_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((ROWS_PER_WARPGROUP, block_kv), jnp.float32))
        plgpu.barrier_arrive(k_consumed.at[slot])
        if call.softcap is None:
          s = s * (call.scale * _LOG2E)
        else:
          s = jnp.tanh(s * (call.scale / call.softcap)) * (call.softcap * _LOG2E)
        if masked:
          shape = (ROWS_PER_WARPGROUP, block_kv)
          visible = mask.allowed_broadcast(row0 + iota(shape, 0), j * block_kv + iota(shape, 1))
          s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw no key yet
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        p = p.astype(dtype)
        if staging:  # interpreting: no register wgmma operands
          staging[1][wg] = p
          p = staging[1].at[wg]
        plgpu.barrier_wait(v_loaded.at[slot])

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p, v_smem.at[slot])
          return acc_ref[...]
        acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS_PER_WARPGROUP, dv), jnp.float32))
        plgpu.barrier_arrive(v_consumed.at[slot])
        return acc, m_new, l

      lo, hi = whole_blocks(row0, first, steps)
      masked_step, whole_step = (functools.partial(step, masked=flag) for flag in (True, False))
      carry = lax.fori_loop(first, lo, masked_step, (acc, m, l))
      carry = lax.fori_loop(lo, hi, whole_step, carry)
      carry = lax.fori_loop(hi, first + steps, masked_step, carry)
      acc, m, l = carry
      seen = l > 0
      inverse = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
      o_smem[wg] = (acc * lax.broadcast_in_dim(inverse, acc.shape, [0])).astype(dtype)
      lse_smem[wg] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[wg], out_ref.at[b, rows, h])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      kv_head = lax.div(h, call.group)

      def load(t, slot):  # step t: key block first + t
        keys = (b, pl.ds((first + t) * block_kv, block_kv), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_loaded.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_loaded.at[slot])

      for slot in range(min(stages, kv_blocks)):
        pl.when(slot < steps)(functools.partial(load, slot, slot))

      def wait_consumed(j):
        plgpu.barrier_wait(k_consumed.at[lax.rem(j, stages)])
        plgpu.barrier_wait(v_consumed.at[lax.rem(j, stages)])

      @pl.loop(stages, jnp.maximum(steps, stages))
      def _refill(j):
        wait_consumed(j - stages)
        load(j, lax.rem(j, stages))

      # Observe the last blocks' release too: every barrier phase is waited on once.
      pl.loop(jnp.maximum(steps - stages, 0), steps)(wait_consumed)

  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  smem = lambda shape, dt=dtype: plgpu.SMEM(shape, dt, transforms=swizzled)
  rows = ROWS_PER_WARPGROUP
  scratch = [
      smem((CONSUMERS, rows, d)), plgpu.SMEM((CONSUMERS, rows), jnp.float32),
      smem((stages, block_kv, d)), smem((stages, block_kv, dv)),
      plgpu.Barrier(num_barriers=CONSUMERS),
      plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
      *([] if share_qo else [smem((CONSUMERS, rows, dv))]),  # else O reuses Q's buffer
      *([smem((CONSUMERS, d, block_kv)), smem((CONSUMERS, rows, block_kv))]
        if call.interpret else []),
  ]
  kernel = plgpu.kernel(
      body,
      out_type=[jax.ShapeDtypeStruct((batch, q_pad, heads, dv), dtype),
                jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32)],
      scratch_types=scratch,
      grid=(q_pad // BLOCK_Q, heads, batch),
      grid_names=("q_tiles", "heads", "batch"),
      num_threads=CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=call.interpret,
  )
  return kernel(q, k, v)
