"""The full-precision KV cache: the baseline every other cache is measured against.

Memory: ``2 * batch * max_len * kv_heads * head_dim * itemsize`` bytes per layer, plus ``4 *
(batch + 1)`` bytes of bookkeeping. :meth:`FullKVCache.attend` materializes float32 logits of
``batch * heads * seq * max_len`` elements (``seq = 1`` when decoding).
"""

from __future__ import annotations

from typing import Any, Self

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from effjax.kv_cache.base import (
    KVCache,
    check_floating_dtype,
    check_kv,
    check_positive_int,
    check_query,
    check_room,
    check_start,
)


class FullKVCache(KVCache):
  """Keys and values stored as given, in ``dtype``.

  Attributes:
    k: keys after RoPE, ``[batch, max_len, kv_heads, head_dim]``.
    v: values, ``[batch, max_len, kv_heads, head_dim]``.
    start: int32 ``[batch]``, slot of each row's first real token.
    length: int32 scalar, number of filled slots (the same for every row). If appends push it past
      ``max_len`` under ``jit`` (where it cannot be checked), :meth:`attend` returns NaN.
  """
  k: jax.Array
  v: jax.Array
  start: jax.Array
  length: jax.Array

  @classmethod
  def init(cls, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int,
           dtype: Any = jnp.float32) -> Self:
    for name, value in (("batch", batch), ("max_len", max_len), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
      check_positive_int(name, value)
    check_floating_dtype("dtype", dtype)
    zeros = jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype)
    return cls(k=zeros, v=zeros, start=jnp.zeros((batch,), jnp.int32),
               length=jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k.shape[1]

  def _check_kv(self, k: jax.Array, v: jax.Array) -> None:
    batch, max_len, kv_heads, head_dim = self.k.shape
    check_kv(k, v, batch=batch, kv_heads=kv_heads, head_dim=head_dim, max_len=max_len)

  def prefill(self, k: Float[Array, "batch seq kv_heads head_dim"],
              v: Float[Array, "batch seq kv_heads head_dim"],
              start: Int[Array, "batch"]) -> Self:
    self._check_kv(k, v)
    start = check_start(start, self.k.shape[0], k.shape[1])
    return self.replace(
        k=lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), (0, 0, 0, 0)),
        v=lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), (0, 0, 0, 0)),
        start=start,
        length=jnp.asarray(k.shape[1], jnp.int32))

  def append(self, k: Float[Array, "batch seq kv_heads head_dim"],
             v: Float[Array, "batch seq kv_heads head_dim"]) -> Self:
    self._check_kv(k, v)
    check_room(self.length, k.shape[1], self.max_len)
    new_length = self.length + k.shape[1]
    index = (0, self.length, 0, 0)
    return self.replace(
        k=lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), index),
        v=lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), index),
        length=new_length)

  def attend(self, q: Float[Array, "batch seq heads head_dim"], *,
             scale: float | None = None) -> Float[Array, "batch seq heads head_dim"]:
    cache_batch, max_len, kv_heads, cache_head_dim = self.k.shape
    check_query(q, batch=cache_batch, kv_heads=kv_heads, head_dim=cache_head_dim)
    batch, seq, heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    grouped = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("bskgd,btkd->bkgst", grouped, self.k,
                        preferred_element_type=jnp.float32) * scale
    slot = jnp.arange(max_len)
    last_visible = self.length - seq + jnp.arange(seq)
    visible = ((slot[None, None, :] >= self.start[:, None, None])
               & (slot[None, None, :] <= last_visible[None, :, None]))  # [batch, seq, max_len]
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    # A query that sees no slot gets 0 (never NaN): shift by 0 instead of -inf, divide by 1.
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bkgst,btkd->bskgd", weights, self.v, preferred_element_type=jnp.float32)
    out = jnp.where(self.length <= max_len, out, jnp.nan)
    return out.reshape(batch, seq, heads, head_dim).astype(q.dtype)
