"""The Mosaic GPU forward kernel: per CTA a tile of 128 queries (two consumer warpgroups of 64
rows) streams the K/V blocks of its band through the shared-memory ring, with the online
softmax in base 2; writes O and the base-2 LSE. Inputs are padded (lengths to multiples of 128,
head dims to multiples of 64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention.mosaic_gpu.config import CONSUMERS, ROWS, TILE, Call
from pallas_kernels.flash_attention.mosaic_gpu.pipeline import (
    Ops, Segments, band_loop, consumer_registers, grid_point, key_block_mask, launch,
    load_own_tiles, logits, online_softmax, produce_key_blocks, producer_registers, rescale,
    ring_scratch, smem, staging_buffer, staging_scratch, unmasked_blocks)


def forward_kernel(call: Call, q, k, v, *segment_inputs):
  """Output ``[b, q_pad, h, dv]`` and base-2 LSE ``[b, h, q_pad]``."""
  batch, q_pad, heads, d = q.shape
  dv = v.shape[-1]
  mask, block_kv, dtype, ops = call.mask, call.blocks.block_kv, q.dtype, Ops(bool(call.interpret))
  ping_pong = call.blocks.ping_pong

  def body(q_ref, k_ref, v_ref, *refs, **scratch):
    segments, (out_ref, lse_ref) = Segments.split(call, refs)

    def rendezvous():
      if ping_pong:
        plgpu.barrier_arrive(scratch["schedule"])
        plgpu.barrier_wait(scratch["schedule"])

    (b, h, tile, wg), ring, (first, count) = grid_point(call, scratch, segments, mask.kv_range,
                                                      block_kv)

    @pl.when(wg < CONSUMERS)
    def _consumer():
      consumer_registers()
      row0 = tile * TILE + wg * ROWS
      rows = pl.ds(row0, ROWS)
      q_smem = scratch["q"].at[wg]
      load_own_tiles([(q_ref.at[b, rows, h], q_smem)], scratch["own_loaded"], wg)
      own_ids = segments and segments.own_ids(ops, b, row0)

      def scores(j, s, *, masked: bool):
        """Base-2 logits of key block ``j`` from ``s = q.k``, masked if asked."""
        s, _ = logits(call, s)
        return jnp.where(visible(j), s, -jnp.inf) if masked else s

      def block_scores(j, *, masked: bool, while_running=None):
        """Acquires key block ``j``, ``S = Q K_j^T``, releases it: :func:`scores`."""
        t = j - first
        k_t = ops.transposed(ring.acquire(t, 0), staging_buffer(scratch, "k_t", wg))
        s = ops.mma(q_smem, k_t, (ROWS, block_kv), while_running=while_running)
        ring.release(t, 0)
        return scores(j, s, masked=masked)

      def step(j, carry, *, masked: bool):
        acc, m, l = carry
        t = j - first
        p, alpha, m, l = online_softmax(
            block_scores(j, masked=masked, while_running=rendezvous), m, l)
        p = ops.operand(p.astype(dtype), staging_buffer(scratch, "p", wg))
        if ping_pong:  # softmax done; take the tensor cores once the other consumer's GEMM is out
          plgpu.barrier_arrive(scratch["schedule"])
        v_smem = ring.acquire(t, 1)
        if ping_pong:
          plgpu.barrier_wait(scratch["schedule"])
        acc = rescale(acc, alpha) + ops.mma(p, v_smem, (ROWS, dv))
        ring.release(t, 1)
        return acc, m, l

      def overlapped_step(j, carry, *, masked: bool):
        """Issues ``S_j = Q K_j^T`` then ``P_{j-1} V_{j-1}``, runs the softmax of ``S_j`` while
        the latter is in flight. ``carry``: O of the blocks before ``j - 1``, the factor ``alpha``
        that rescales it to the running max, that max, the row sums and ``P_{j-1}`` (O is
        rescaled and added to in one expression, as in :func:`step`: the same rounding)."""
        acc, alpha, m, l, p = carry
        t = j - first
        k_t = ops.transposed(ring.acquire(t, 0), staging_buffer(scratch, "k_t", wg))
        p_operand = ops.operand(p, staging_buffer(scratch, "p", wg))

        def softmax(s):
          ring.release(t, 0)
          return online_softmax(scores(j, s, masked=masked), m, l)
        (p, alpha_next, m, l), pv = ops.mma_pair(
            (q_smem, k_t, (ROWS, block_kv)), lambda: (p_operand, ring.acquire(t - 1, 1)),
            (ROWS, dv), softmax)
        ring.release(t - 1, 1)
        return rescale(acc, alpha) + pv, alpha_next, m, l, p.astype(dtype)

      def first_step(j, carry, *, masked: bool):
        """The pipeline's prologue: block ``j``'s softmax, no PV GEMM yet."""
        acc, _, m, l, _ = carry
        p, alpha, m, l = online_softmax(block_scores(j, masked=masked), m, l)
        return acc, alpha, m, l, p.astype(dtype)

      def overlapped(carry):
        """The pipelined loop (needs ``count >= 1``): block ``first``'s softmax, the overlapped
        steps, the last block's PV GEMM. Each block masked or not as in the plain schedule."""
        acc, m, l = carry
        placeholders = (ops.layout(jnp.ones((ROWS,), jnp.float32), reduced),
                        ops.zeros((ROWS, block_kv)).astype(dtype))  # alpha, P: replaced
        acc, alpha, m, l, p = band_loop(first_step, first, 1, whole,
                                        (acc, placeholders[0], m, l, placeholders[1]))
        acc, alpha, m, l, p = band_loop(overlapped_step, first + 1, count - 1, whole,
                                        (acc, alpha, m, l, p))
        last = count - 1
        pv = ops.mma(ops.operand(p, staging_buffer(scratch, "p", wg)), ring.acquire(last, 1),
                     (ROWS, dv))
        ring.release(last, 1)
        return rescale(acc, alpha) + pv, m, l

      visible = key_block_mask(call, ops, segments, own_ids, b, row0, block_kv)
      reduced = plgpu.Layout.WGMMA.reduce(1)
      carry = (ops.zeros((ROWS, dv)),
               ops.layout(jnp.full((ROWS,), -jnp.inf, jnp.float32), reduced),
               ops.layout(jnp.zeros((ROWS,), jnp.float32), reduced))
      whole = unmasked_blocks(call, mask.kv_full_range(row0, row0 + ROWS), block_kv, first, count)
      pl.when(wg == 1)(rendezvous)  # the second consumer starts half a step behind
      if call.blocks.overlap:
        acc, m, l = lax.cond(count > 0, overlapped, lambda carry: carry, carry)
      else:
        acc, m, l = band_loop(step, first, count, whole, carry)
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
      producer_registers()
      produce_key_blocks(ring, k_ref, v_ref, b, lax.div(h, call.group), first, count, block_kv)

  scratch = dict(
      q=smem((CONSUMERS, ROWS, d), dtype), own_loaded=plgpu.Barrier(num_barriers=CONSUMERS),
      lse=smem((CONSUMERS, ROWS), jnp.float32),
      **(dict(schedule=plgpu.Barrier(num_arrivals=CONSUMERS)) if ping_pong else {}),
      **({} if d == dv else dict(o=smem((CONSUMERS, ROWS, dv), dtype))),  # else O reuses Q's
      **ring_scratch([((block_kv, d), dtype), ((block_kv, dv), dtype)], call.blocks.stages),
      **staging_scratch(call, dict(k_t=(d, block_kv), p=(ROWS, block_kv)), dtype))
  out_type = [jax.ShapeDtypeStruct((batch, q_pad, heads, dv), dtype),
              jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32)]
  return launch(call, body, out_type, scratch, (q_pad // TILE, heads, batch),
                ("tiles", "heads", "batch"), "flash_attention_hopper_forward")(
                    q, k, v, *segment_inputs)

