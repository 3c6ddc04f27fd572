"""The two sequence-parallel strategies, as per-device functions run under ``shard_map``.

``ring``: DistAttn (LightSeq, Li et al. 2023; Ring Attention, Liu et al. 2023). Device ``i`` keeps
its queries; the K/V blocks (with their segment ids) travel around the ring with ``ppermute``, so
at step ``s`` it holds device ``(i - s) mod n``'s block. Each step's partial attention is merged
into a running output by log-sum-exp. The next block's transfer is issued before the step's
compute, so the collective can overlap it. Per device memory: the local queries, two K/V blocks
(the one in use and the one arriving) and one float32 output accumulator, whatever ``n``.

Backward (``custom_vjp``): a second ring. The K/V blocks travel again, now with float32 dK/dV
accumulators that collect each device's contribution and arrive home after ``n`` hops; dQ stays
local. Block ``j``'s share of the gradient needs only ``P = exp(S - LSE)`` and
``D = rowsum(dO * O) - dLSE`` of the FULL attention, so FlashAttention-2's backward runs directly
on each block with the saved global ``O`` and LSE (``effjax.ops.attention.xla.
attention_backward``): no forward is recomputed and no per-block statistics are stored. K/V are
never all-gathered. Under a sliding window the ring stops after the last step whose band any
device needs (a window of ``w`` tokens needs about ``w / c + 1`` of the ``n`` steps), and the
dK/dV accumulators return home in one hop.

``all_gather`` (MaxText's context-parallel default): all-gather K/V over the axis and attend the
local queries to every block, merged the same way; differentiated by autodiff (the transpose of
the all-gather is a reduce-scatter). Memory O(S) for K/V per device, cheap when K/V are small
(GQA with few kv heads).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from effjax.ops.attention import xla
from effjax.ops.ring_attention import blocks
from pallas_kernels.flash_attention.residuals import tag_residuals


class RingConfig(NamedTuple):
  """Static per-call configuration of the per-device functions.

  ``num_steps`` is ``n`` except under a sliding window, where the ring stops after the last step
  any device needs; those (few) steps are unrolled, since each step's bands are static.
  """
  axis: str
  num_devices: int
  num_steps: int
  step: blocks.StepOptions

  @property
  def unrolled(self) -> bool:
    return self.step.window is not None


def _loop(config: RingConfig, stop: int, body, carry):
  """``for step in range(stop)``: unrolled under a window (static steps), else ``fori_loop``."""
  if config.unrolled:
    for step in range(stop):
      carry = body(step, carry)
    return carry
  return lax.fori_loop(0, stop, body, carry)


def _shift(config: RingConfig, tree, hops: int = 1):
  """Sends ``tree`` ``hops`` devices along the ring (device d -> d + hops)."""
  n = config.num_devices
  return lax.ppermute(tree, config.axis, [(d, (d + hops) % n) for d in range(n)])


def _attend(config: RingConfig, step, q, block, q_segment_ids):
  k, v, kv_segment_ids = block
  return blocks.step_attention(config.step, lax.axis_index(config.axis), step, q, k, v,
                               q_segment_ids, kv_segment_ids)


# ---------------------------------------------------------------------------------------------
# ring


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring(config: RingConfig, q, k, v, q_segment_ids, kv_segment_ids):
  """Per-device ring attention: ``(out [b, c, h, dv] in q's dtype, lse [b, h, c] float32)``."""
  return _ring_forward(config, q, k, v, q_segment_ids, kv_segment_ids)


def _ring_forward(config: RingConfig, q, k, v, q_segment_ids, kv_segment_ids):
  def step(s, block, acc):
    out_s, lse_s = _attend(config, s, q, block, q_segment_ids)
    return blocks.merge(*acc, out_s.astype(jnp.float32), lse_s)

  def body(s, carry):
    block, acc = carry
    arriving = _shift(config, block)  # issued before this step's compute, to overlap it
    return arriving, step(s, block, acc)

  last = config.num_steps - 1
  block, acc = _loop(config, last, body, ((k, v, kv_segment_ids), blocks.nothing_seen(q, v, jnp.float32)))
  out, lse = step(last, block, acc)
  return out.astype(q.dtype), lse


def _ring_fwd(config: RingConfig, q, k, v, q_segment_ids, kv_segment_ids):
  out, lse = tag_residuals(*_ring_forward(config, q, k, v, q_segment_ids, kv_segment_ids))
  return (out, lse), (q, k, v, q_segment_ids, kv_segment_ids, out, lse)


def _ring_bwd(config: RingConfig, residuals, cotangents):
  q, k, v, q_segment_ids, kv_segment_ids, out, lse = residuals
  d_out, d_lse = cotangents
  me = lax.axis_index(config.axis)
  delta = xla.softmax_delta(out, d_out, d_lse)  # once: the steps need neither out nor d_lse

  def step(s, block, grads):
    k_s, v_s, kv_segment_ids_s = block
    return blocks.step_gradients(config.step, me, s, q, k_s, v_s, q_segment_ids,
                                 kv_segment_ids_s, lse, d_out, delta, grads)

  def body(s, carry):
    block, grads = carry
    arriving = _shift(config, block)  # the next K/V block, overlapping this step
    dq, dk, dv = step(s, block, grads)
    return arriving, (dq, *_shift(config, (dk, dv)))  # the accumulators follow their block

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  last = config.num_steps - 1
  block, grads = _loop(config, last, body,
                       ((k, v, kv_segment_ids), (zeros(q), zeros(k), zeros(v))))
  dq, dk, dv = step(last, block, grads)
  if last:
    dk, dv = _shift(config, (dk, dv), hops=-last)  # home: back over the hops they made
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


ring.defvjp(_ring_fwd, _ring_bwd)


# ---------------------------------------------------------------------------------------------
# all_gather


def all_gather(config: RingConfig, q, k, v, q_segment_ids, kv_segment_ids):
  """Per-device attention of the local queries to the all-gathered K/V, block by block."""
  gather = lambda x: None if x is None else lax.all_gather(x, config.axis, axis=1, tiled=True)
  k_all, v_all, kv_segment_ids_all = gather(k), gather(v), gather(kv_segment_ids)
  length = k.shape[1]
  me = lax.axis_index(config.axis)

  def body(s, acc):
    owner = (me - s) % config.num_devices
    take = lambda x: None if x is None else lax.dynamic_slice_in_dim(
        x, owner * length, length, axis=1)
    block = (take(k_all), take(v_all), take(kv_segment_ids_all))
    out_s, lse_s = _attend(config, s, q, block, q_segment_ids)
    return blocks.merge(*acc, out_s.astype(jnp.float32), lse_s)

  out, lse = _loop(config, config.num_steps, body, blocks.nothing_seen(q, v, jnp.float32))
  return out.astype(q.dtype), lse
