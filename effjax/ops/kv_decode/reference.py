"""The float32 test oracle of the decode ops: every slot dequantized at once, then plain masked
softmax attention. Never a default: it materializes the cache in float32
(``batch * max_len * kv_heads * head_dim`` per K and V) and the logits of every slot
(``batch * heads * seq * max_len``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from effjax.ops.kv_decode import xla

if TYPE_CHECKING:
  from effjax.kv_cache import KIVICache, LayerInputs, VidKVCache, XQuantCache
  from effjax.kv_cache.xquant import CrossLayerCarry


def attention(q: Float[Array, "batch seq heads head_dim"],
              k: Float[Array, "batch slots kv_heads head_dim"],
              v: Float[Array, "batch slots kv_heads dim"], *, start: Int[Array, "batch"],
              length: Int[Array, ""], scale: float) -> Float[Array, "batch seq heads dim"]:
  """float32 softmax attention of the queries of the last ``seq`` stored tokens: query ``i`` sees
  slots ``start[b] <= j <= length - seq + i`` (0 if none); GQA by repeating K/V."""
  batch, seq, heads, _ = q.shape
  group = heads // k.shape[2]
  k, v = (jnp.repeat(x.astype(jnp.float32), group, axis=2) for x in (k, v))
  logits = jnp.einsum("bshd,bthd->bhst", q.astype(jnp.float32) * scale, k)
  slots = jnp.arange(k.shape[1])
  visible = ((slots[None, None, :] >= start[:, None, None])
             & (slots[None, None, :] <= (length - seq + jnp.arange(seq))[None, :, None]))
  logits = jnp.where(visible[:, None], logits, -jnp.inf)
  top = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  return jnp.einsum("bhst,bthd->bshd", weights / jnp.where(total > 0, total, 1.0), v)


def _dequantized(cache: Any, q: jax.Array, scale: float) -> jax.Array:
  """:func:`attention` over a KIVI or VidKV cache's ``dequantize()``, as the op returns it."""
  k, v = cache.dequantize()
  out = attention(q, k, v, start=cache.start, length=cache.length, scale=scale)
  return xla.finish(out, cache, q.dtype)


def kivi(cache: KIVICache, q: Float[Array, "batch seq heads head_dim"], *, scale: float,
         block_sizes: Any = None) -> Float[Array, "batch seq heads head_dim"]:
  """:func:`attention` over :meth:`effjax.kv_cache.KIVICache.dequantize`."""
  del block_sizes
  return _dequantized(cache, q, scale)


def vidkv(cache: VidKVCache, q: Float[Array, "batch seq heads head_dim"], *, scale: float,
          block_sizes: Any = None) -> Float[Array, "batch seq heads head_dim"]:
  """:func:`attention` over :meth:`effjax.kv_cache.VidKVCache.dequantize`."""
  del block_sizes
  return _dequantized(cache, q, scale)


def xquant(cache: XQuantCache, q: Float[Array, "batch seq heads head_dim"], inputs: LayerInputs,
           previous: CrossLayerCarry | None, *, scale: float, block_sizes: Any = None
           ) -> Float[Array, "batch seq heads head_dim"]:
  """:func:`attention` with K and V of every slot rematerialized from
  :meth:`effjax.kv_cache.XQuantCache.dequantize` (keys rotated at their positions, values
  projected per kv head)."""
  del block_sizes
  key_up, value_up = cache.projections(inputs)
  z = cache.dequantize(previous)
  keys, stream = cache.keys_and_values(z, jnp.arange(z.shape[1]), key_up, inputs)
  values = jnp.einsum("btw,wkd->btkd", stream, value_up)
  out = attention(q, keys, values, start=cache.start, length=cache.length, scale=scale)
  return xla.finish(out, cache, q.dtype)
