"""The Mosaic GPU backward kernels, on padded inputs (lengths multiples of 128, head dims of 64).

* dq: a tile of 128 queries streams the K/V blocks of its band, recomputing
  ``P = exp2(S - LSE)``, ``dP = dO V^T``, ``dS = P (dP - D)`` and accumulating ``dQ += dS K``.
* dk/dv: a tile of 128 keys streams the Q, dO, LSE and D blocks of the queries that see it, for
  every query head of its GQA group, accumulating ``dV += P^T dO`` and ``dK += dS^T Q`` in
  registers (no per-head partials).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention.mosaic_gpu.config import CONSUMERS, ROWS, TILE, Call
from pallas_kernels.flash_attention.mosaic_gpu.pipeline import (
    Ops, Segments, band_loop, consumer_registers, grid_point, key_block_mask, launch,
    load_own_tiles, logits, produce_key_blocks, producer_registers, ring_scratch, smem,
    staging_buffer, staging_scratch, unmasked_blocks)


def dq_kernel(call: Call, q, k, v, d_out, lse2, delta, *segment_inputs):
  """``dq [b, q_pad, h, d]`` in q's dtype."""
  batch, q_pad, heads, d = q.shape
  dv = v.shape[-1]
  mask, block_kv, dtype = call.mask, call.blocks.block_kv_dq, q.dtype
  ops = Ops(bool(call.interpret))

  def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, **scratch):
    segments, (dq_ref,) = Segments.split(call, refs)
    (b, h, tile, wg), ring, (first, count) = grid_point(call, scratch, segments, mask.kv_range,
                                                      block_kv)

    @pl.when(wg < CONSUMERS)
    def _consumer():
      consumer_registers()
      row0 = tile * TILE + wg * ROWS
      rows = pl.ds(row0, ROWS)
      own = [(q_ref.at[b, rows, h], scratch["q"].at[wg]),
             (do_ref.at[b, rows, h], scratch["do"].at[wg]),
             (lse_ref.at[b, h, rows], scratch["lse"].at[wg]),
             (delta_ref.at[b, h, rows], scratch["delta"].at[wg])]
      load_own_tiles(own, scratch["own_loaded"], wg)
      own_ids = segments and segments.own_ids(ops, b, row0)
      visible = key_block_mask(call, ops, segments, own_ids, b, row0, block_kv)
      q_smem, do_smem = scratch["q"].at[wg], scratch["do"].at[wg]
      lse = ops.vector(scratch["lse"].at[wg], 1)
      delta = ops.vector(scratch["delta"].at[wg], 1)

      def step(j, dq, *, masked: bool):
        t = j - first
        k_smem = ring.acquire(t, 0)
        k_t = ops.transposed(k_smem, staging_buffer(scratch, "k_t", wg))
        s, d_cap = logits(call, ops.mma(q_smem, k_t, (ROWS, block_kv)))
        if masked:
          s = jnp.where(visible(j), s, -jnp.inf)
        p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
        v_t = ops.transposed(ring.acquire(t, 1), staging_buffer(scratch, "v_t", wg))
        dp = ops.mma(do_smem, v_t, (ROWS, block_kv))
        ring.release(t, 1)
        ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
        if d_cap is not None:
          ds = ds * d_cap
        ds = ops.operand(ds.astype(dtype), staging_buffer(scratch, "ds", wg))
        dq = dq + ops.mma(ds, k_smem, (ROWS, d))
        ring.release(t, 0)
        return dq

      whole = unmasked_blocks(call, mask.kv_full_range(row0, row0 + ROWS), block_kv, first, count)
      dq = band_loop(step, first, count, whole, ops.zeros((ROWS, d)))
      q_smem[...] = (dq * call.scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, rows, h])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
      producer_registers()
      produce_key_blocks(ring, k_ref, v_ref, b, lax.div(h, call.group), first, count, block_kv)

  scratch = dict(
      q=smem((CONSUMERS, ROWS, d), dtype), do=smem((CONSUMERS, ROWS, dv), dtype),
      lse=smem((CONSUMERS, ROWS), jnp.float32), delta=smem((CONSUMERS, ROWS), jnp.float32),
      own_loaded=plgpu.Barrier(num_barriers=CONSUMERS * 4),
      **ring_scratch([((block_kv, d), dtype), ((block_kv, dv), dtype)], call.blocks.stages),
      **staging_scratch(call, dict(k_t=(d, block_kv), v_t=(dv, block_kv), ds=(ROWS, block_kv)),
                        dtype))
  out_type = jax.ShapeDtypeStruct(q.shape, dtype)
  return launch(call, body, out_type, scratch, (q_pad // TILE, heads, batch),
                ("tiles", "heads", "batch"), "flash_attention_hopper_dq")(
                    q, k, v, d_out, lse2, delta, *segment_inputs)



def dkv_kernel(call: Call, q, k, v, d_out, lse2, delta, *segment_inputs):
  """``dk [b, kv_pad, kv_h, d]`` and ``dv [b, kv_pad, kv_h, dv]`` in k's dtype."""
  batch, q_pad, heads, d = q.shape
  kv_pad, kv_heads, dv = k.shape[1], k.shape[2], v.shape[-1]
  mask, block_q, dtype = call.mask, call.blocks.block_q_dkv, q.dtype
  ops = Ops(bool(call.interpret))
  group = call.group

  def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, **scratch):
    segments, (dk_ref, dv_ref) = Segments.split(call, refs)
    (b, kv_head, tile, wg), ring, (first, count) = grid_point(call, scratch, segments,
                                                            mask.q_range, block_q)

    @pl.when(wg < CONSUMERS)
    def _consumer():
      consumer_registers()
      key0 = tile * TILE + wg * ROWS
      keys = pl.ds(key0, ROWS)
      k_smem, v_smem = scratch["k"].at[wg], scratch["v"].at[wg]
      load_own_tiles([(k_ref.at[b, keys, kv_head], k_smem), (v_ref.at[b, keys, kv_head], v_smem)],
                     scratch["own_loaded"], wg)
      own_ids = segments and segments.own_ids(ops, b, key0)
      whole = unmasked_blocks(call, mask.q_full_range(key0, key0 + ROWS), block_q, first, count)

      def step(i, carry, *, g, masked: bool):
        dk, dv_acc = carry
        t = g * count + (i - first)
        q_smem = ring.acquire(t, 0)
        q_t = ops.transposed(q_smem, staging_buffer(scratch, "q_t", wg))
        s_t, d_cap = logits(call, ops.mma(k_smem, q_t, (ROWS, block_q)))
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
        p_operand = ops.operand(p_t.astype(dtype), staging_buffer(scratch, "p_t", wg))
        dv_acc = dv_acc + ops.mma(p_operand, do_smem, (ROWS, dv))
        dp_t = ops.mma(v_smem, ops.transposed(do_smem, staging_buffer(scratch, "do_t", wg)),
                       (ROWS, block_q))
        ring.release(t, 1)
        delta = ops.vector(ring.acquire(t, 3), 0)
        ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
        ring.release(t, 3)
        if d_cap is not None:
          ds_t = ds_t * d_cap
        ds_t = ops.operand(ds_t.astype(dtype), staging_buffer(scratch, "ds_t", wg))
        dk = dk + ops.mma(ds_t, q_smem, (ROWS, d))
        ring.release(t, 0)
        return dk, dv_acc

      def head(g, carry):
        return band_loop(functools.partial(step, g=g), first, count, whole, carry)

      dk, dv_acc = lax.fori_loop(0, group, head, (ops.zeros((ROWS, d)), ops.zeros((ROWS, dv))))
      k_smem[...] = (dk * call.scale).astype(dtype)
      v_smem[...] = dv_acc.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, keys, kv_head])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, keys, kv_head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
      producer_registers()

      def sources(t):
        head = kv_head * group + lax.div(t, jnp.maximum(count, 1))
        queries = pl.ds((first + lax.rem(t, jnp.maximum(count, 1))) * block_q, block_q)
        return (q_ref.at[b, queries, head], do_ref.at[b, queries, head],
                lse_ref.at[b, head, queries], delta_ref.at[b, head, queries])
      ring.produce(group * count, group * (q_pad // block_q), sources)

  scratch = dict(
      k=smem((CONSUMERS, ROWS, d), dtype), v=smem((CONSUMERS, ROWS, dv), dtype),
      own_loaded=plgpu.Barrier(num_barriers=2 * CONSUMERS),
      **ring_scratch([((block_q, d), dtype), ((block_q, dv), dtype), ((block_q,), jnp.float32),
                      ((block_q,), jnp.float32)], call.blocks.stages),
      **staging_scratch(call, dict(q_t=(d, block_q), do_t=(dv, block_q), p_t=(ROWS, block_q),
                                   ds_t=(ROWS, block_q)), dtype))
  out_type = [jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)]
  return launch(call, body, out_type, scratch, (kv_pad // TILE, kv_heads, batch),
                ("tiles", "heads", "batch"), "flash_attention_hopper_dkv")(
                    q, k, v, d_out, lse2, delta, *segment_inputs)
