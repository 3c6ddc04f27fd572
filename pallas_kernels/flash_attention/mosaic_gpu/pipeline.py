"""Pieces the Mosaic GPU attention kernels share: operations the interpreter lacks (:class:`Ops`),
the online softmax in base 2, the producer -> consumers shared-memory ring (:class:`Ring`),
the loop over a tile's band of blocks, segment ids read from global memory (:class:`Segments`)
and the launch of a warp-specialized kernel (two consumer warpgroups and one producer)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention.mosaic_gpu.config import CONSUMERS, LOG2E, ROWS, TILE, Call

@dataclasses.dataclass(frozen=True)
class Ops:
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


def online_softmax(s, m, l):
  """One online-softmax step on base-2 logits ``s [ROWS, block]`` given the running max ``m``
  and row sums ``l`` (``[ROWS]``): ``(p, alpha, new m, new l)``, ``p = exp2(s - new m)`` (float32)
  and ``alpha = exp2(m - new m)`` the factor for the output so far (0 while a row saw no key)."""
  m_new = jnp.maximum(m, s.max(axis=1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw no key yet
  alpha = jnp.exp2(m - m_safe)
  p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
  return p, alpha, m_new, l * alpha + p.sum(axis=1)


def rescale(acc, alpha):
  """``acc [ROWS, dv] * alpha [ROWS]`` per row."""
  return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])


def logits(call: Call, s):
  """Base-2 logits of ``s = q.k`` (scaled, softcapped), and ``d logits / d (scale q.k)``
  (None without softcap)."""
  if call.softcap is None:
    return s * (call.scale * LOG2E), None
  t = jnp.tanh(s * (call.scale / call.softcap))
  return t * (call.softcap * LOG2E), 1.0 - t * t


@dataclasses.dataclass(frozen=True)
class Ring:
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


def ring_scratch(shapes: Sequence[tuple[tuple[int, ...], Any]], stages: int) -> dict[str, Any]:
  return dict(
      ring=[smem((stages, *shape), dtype) for shape, dtype in shapes],
      ring_loaded=[plgpu.Barrier(num_barriers=stages) for _ in shapes],
      ring_consumed=[plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages) for _ in shapes])


def _ring(scratch: dict[str, Any], stages: int) -> Ring:
  return Ring(scratch["ring"], scratch["ring_loaded"], scratch["ring_consumed"], stages)


def smem(shape, dtype):
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


def band_loop(step: Callable[..., Any], first, count, whole: tuple[Any, Any], carry):
  """Runs ``step(j, carry, masked=...)`` over blocks ``[first, first + count)``, without a mask
  on the ``whole`` ones (a range, clipped to those blocks)."""
  lo = jnp.clip(whole[0], first, first + count)
  hi = jnp.clip(whole[1], lo, first + count)
  masked, unmasked = (functools.partial(step, masked=flag) for flag in (True, False))
  carry = lax.fori_loop(first, lo, masked, carry)
  carry = lax.fori_loop(lo, hi, unmasked, carry)
  return lax.fori_loop(hi, first + count, masked, carry)


def grid_point(call: Call, scratch: dict[str, Any], segments: Segments | None,
               band_range: Callable[[Any, Any], tuple[Any, Any]], block: int):
  """This CTA's ``(batch, head, tile, warpgroup)`` indices, its ring, and ``(first, count)`` of
  the blocks of ``block`` positions its tile streams: those meeting ``band_range`` (a
  :class:`masks.MaskSpec` range of the tile's ``TILE`` positions), cut to the blocks sharing an id
  interval with the tile when there are segment ids."""
  b, h, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("tiles")
  first, count = _blocks(band_range(tile * TILE, tile * TILE + TILE), block)
  if segments:
    first, count = segments.narrow(first, count, b, tile)
  return (b, h, tile, lax.axis_index("wg")), _ring(scratch, call.blocks.stages), (first, count)


def unmasked_blocks(call: Call, full_range: tuple[Any, Any], block: int, first, count):
  """:func:`_whole`, or no block at all with segment ids (every block is masked)."""
  if call.segments:
    return first, first
  return _whole(full_range, block, first, count)


def key_block_mask(call: Call, ops: Ops, segments: Segments | None, own_ids, b, row0,
                   block_kv: int) -> Callable[[Any], Any]:
  """Forward and dq: ``j -> [ROWS, block_kv]`` visibility of key block ``j`` to the consumer's
  rows from ``row0``: the band and, with segment ids, equal ids."""
  shape = (ROWS, block_kv)

  def visible(j):
    ok = call.mask.allowed_broadcast(row0 + ops.iota(shape, 0), j * block_kv + ops.iota(shape, 1))
    return ok if segments is None else ok & segments.same(ops, own_ids, b, j * block_kv, shape)
  return visible


def launch(call: Call, body, out_type, scratch: dict[str, Any], grid, grid_names, name: str):
  def entry(*refs, **scratch_refs):
    body(*refs, **scratch_refs)
  entry.__name__ = name
  return plgpu.kernel(
      entry, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
      num_threads=CONSUMERS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True), interpret=call.interpret)


def load_own_tiles(copies: Sequence[tuple[Any, Any]], loaded, wg):
  """A consumer's own tiles: TMA each ``(global, shared)`` pair, then wait for all of them
  (``loaded``: ``CONSUMERS * len(copies)`` barriers)."""
  barriers = [loaded.at[wg * len(copies) + index] for index in range(len(copies))]
  for (source, destination), barrier in zip(copies, barriers):
    plgpu.copy_gmem_to_smem(source, destination, barrier)
  for barrier in barriers:
    plgpu.barrier_wait(barrier)


def produce_key_blocks(ring: Ring, k_ref, v_ref, b, kv_head, first, count, block_kv: int):
  """Producer of the forward and dq kernels: K and V blocks ``first .. first + count - 1``."""
  keys = lambda t: (b, pl.ds((first + t) * block_kv, block_kv), kv_head)
  ring.produce(count, k_ref.shape[1] // block_kv,
               lambda t: (k_ref.at[keys(t)], v_ref.at[keys(t)]))


@dataclasses.dataclass(frozen=True)
class Segments:
  """A kernel's segment ids in global memory (:func:`_segment_inputs`): ``own [b, pad]``, the
  ids of the CTA's tile side (queries, or keys for dk/dv), ``streamed [b, pad]``, the side the
  ring streams, ``ranges [b, tiles, 2]`` (:func:`_segment_ranges`). The consumers read ids
  straight from global memory into registers (64-128 int32 per step, L2-resident), not through
  the ring: no barriers."""
  own: Any
  streamed: Any
  ranges: Any

  @classmethod
  def split(cls, call: Call, refs: Sequence[Any]):
    """``(segments or None, the remaining refs)`` of the refs after a kernel's fixed inputs."""
    if not call.segments:
      return None, refs
    return cls(*refs[:3]), refs[3:]

  def narrow(self, first, count, b, tile):
    """The block range ``(first, count)`` cut to the blocks sharing an id interval with the tile."""
    lo = jnp.maximum(first, self.ranges[b, tile, 0])
    return lo, jnp.maximum(jnp.minimum(first + count, self.ranges[b, tile, 1]) - lo, 0)

  def own_ids(self, ops: Ops, b, start):
    """The ids of the consumer's ``ROWS`` rows from ``start``, a per-row register vector."""
    return ops.vector(self.own.at[b, pl.ds(start, ROWS)], 1)

  def same(self, ops: Ops, own_ids, b, start, shape):
    """``[ROWS, block]``: own id == the id of streamed position ``start + column``."""
    streamed = ops.vector(self.streamed.at[b, pl.ds(start, shape[1])], 0)
    return (lax.broadcast_in_dim(own_ids, shape, [0])
            == lax.broadcast_in_dim(streamed, shape, [1]))


def consumer_registers():
  plgpu.set_max_registers(232, action="increase")  # 2 x 128 x 232 + 128 x 40 <= 64K


def producer_registers():
  plgpu.set_max_registers(40, action="decrease")


def staging_scratch(call: Call, shapes: dict[str, tuple[int, ...]], dtype) -> dict[str, Any]:
  """Interpret mode only: per-consumer buffers for register and transposed ``wgmma`` operands."""
  if not call.interpret:
    return {}
  return {f"stage_{name}": smem((CONSUMERS, *shape), dtype) for name, shape in shapes.items()}


def staging_buffer(scratch: dict[str, Any], name: str, wg):
  buffer = scratch.get(f"stage_{name}")
  return None if buffer is None else buffer.at[wg]

