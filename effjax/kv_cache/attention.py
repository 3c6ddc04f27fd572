"""Decode attention over a cache that is read block by block (quantized caches' XLA path).

A quantized cache cannot hand ``attend`` one full-precision K/V array without materializing a
float32 copy of the whole cache (what HF's QuantizedCache does every step). Instead the caller
supplies a ``load_block`` that dequantizes ``block_size`` slots at a time, plus a short
full-precision "tail" (KIVI's residual window); softmax is accumulated online over the blocks and
the tail (FlashAttention's running max / sum / output, combined in float32), GQA-aware: query head
``h`` reads kv head ``h // (heads // kv_heads)`` and K/V are never repeated.

Memory: one dequantized block (``2 * batch * block_size * kv_heads * head_dim`` float32), its
logits (``batch * heads * seq * block_size`` float32) and the tail; never O(cache) in float32.
Work: the number of blocks is a traced count (a ``while`` loop), so only filled blocks are read.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

_Carry = tuple[jax.Array, jax.Array, jax.Array]  # running max, sum, output (unnormalized)


def _visible(slots: jax.Array, start: jax.Array, last_visible: jax.Array) -> jax.Array:
  """``[batch, seq, T]``: slot is a real token (>= start) no later than the query's own slot."""
  return ((slots[None, None, :] >= start[:, None, None])
          & (slots[None, None, :] <= last_visible[None, :, None]))


def _update(carry: _Carry, q: jax.Array, k: jax.Array, v: jax.Array,
            visible: Bool[Array, "batch seq T"]) -> _Carry:
  """Folds one block of keys/values ``[batch, T, kv_heads, head_dim]`` into the online softmax."""
  m, l, acc = carry
  logits = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
  shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row that saw nothing yet stays at 0
  p = jnp.exp(logits - shift[..., None])
  correction = jnp.exp(m - shift)
  l = l * correction + jnp.sum(p, axis=-1)
  v = jnp.where(jnp.any(visible, axis=1)[:, :, None, None], v, 0.0)  # 0 * garbage stays 0
  acc = acc * correction[..., None] + jnp.einsum("bkgst,btkd->bkgsd", p, v,
                                                 preferred_element_type=jnp.float32)
  return m_new, l, acc


def blockwise_decode_attention(
    q: Float[Array, "batch seq heads head_dim"], *,
    load_block: Callable[[jax.Array], tuple[jax.Array, jax.Array]], block_size: int,
    prefix_end: Int[Array, ""], tail_slots: Int[Array, "tail"],
    tail_k: Float[Array, "batch tail kv_heads head_dim"],
    tail_v: Float[Array, "batch tail kv_heads head_dim"],
    start: Int[Array, "batch"], length: Int[Array, ""], scale: float,
) -> Float[Array, "batch seq heads head_dim"]:
  """Attention of the last ``seq`` tokens' queries over slots ``[0, prefix_end)`` + the tail.

  Args:
    q: queries of the last ``seq`` stored tokens (query ``i`` sits at slot ``length - seq + i``).
    load_block: ``j0 -> (k, v)``, each float32 ``[batch, block_size, kv_heads, head_dim]``, the
      (dequantized) slots ``[j0, j0 + block_size)``; called for ``j0 = 0, block_size, ...`` below
      ``prefix_end`` only. Slots at or past ``prefix_end`` are masked out.
    block_size: slots per block.
    prefix_end: traced end of the block-read region.
    tail_slots: the slots of the tail rows (``>= prefix_end``; slots ``>= length`` are masked).
    tail_k, tail_v: keys/values of those slots.
    start: each row's first real slot; earlier slots are never attended to.
    length: number of filled slots.
    scale: logit scale.

  Returns:
    float32 ``softmax(q k^T * scale) v`` with the causal, bottom-right aligned mask of
    :meth:`effjax.kv_cache.KVCache.attend`; a query that sees no slot gets 0.
  """
  batch, seq, heads, head_dim = q.shape
  kv_heads = tail_k.shape[2]
  grouped = (q.astype(jnp.float32) * scale).reshape(batch, seq, kv_heads, heads // kv_heads,
                                                    head_dim)
  last_visible = length - seq + jnp.arange(seq)
  shape = (batch, kv_heads, heads // kv_heads, seq)
  carry = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros((*shape, head_dim)))

  def body(index, carry):
    j0 = index * block_size
    k, v = load_block(j0)
    slots = j0 + jnp.arange(block_size)
    visible = _visible(slots, start, last_visible) & (slots < prefix_end)[None, None, :]
    return _update(carry, grouped, k, v, visible)

  num_blocks = (prefix_end + block_size - 1) // block_size
  carry = lax.fori_loop(0, num_blocks, body, carry)
  m, l, acc = _update(carry, grouped, tail_k.astype(jnp.float32), tail_v.astype(jnp.float32),
                      _visible(tail_slots, start, last_visible))
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [batch, kv_heads, group, seq, head_dim]
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads, head_dim)
