"""Helpers shared by the quantized-cache tests: a tiny random decoder and token-by-token decoding
through a cache, and test data with an outlier channel (as real keys have)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from effjax import nn
from effjax.models import extend, init_caches, prefill

TINY = nn.TransformerConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2,
                            d_ff=64, head_dim=16)


def tiny_model(config: nn.TransformerConfig = TINY):
  """``(model, params)`` of a randomly initialized decoder."""
  model = nn.DecoderLM(config)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def decode_logits(model, params, tokens, start, prompt_len, cache_type):
  """Logits ``[batch, 1 + len - prompt_len, vocab]``: prefill ``prompt_len`` tokens, then decode
  the rest one at a time through ``cache_type`` caches (so every streaming rule runs)."""
  caches = init_caches(model, tokens.shape[0], tokens.shape[1], cache_type=cache_type,
                       params=params)
  logits, caches = jax.jit(prefill, static_argnums=0)(model, params, tokens[:, :prompt_len],
                                                      start, caches)
  step = jax.jit(extend, static_argnums=0)
  out = [logits[:, -1]]
  for t in range(prompt_len, tokens.shape[1]):
    logits, caches = step(model, params, tokens[:, t:t + 1], t - start[:, None], caches)
    out.append(logits[:, 0])
  return jnp.stack(out, axis=1)


def outlier_normal(seed: int, *shape: int) -> jax.Array:
  """Standard-normal float32 data whose channel 1 (last axis) is scaled by 10 and shifted by 5."""
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  x[..., 1] = x[..., 1] * 10 + 5
  return jnp.asarray(x)


def filled_cache(cache_type, *, max_len: int, prompt: int, appended: int, start=(0, 5),
                 kv_heads: int = 2, head_dim: int = 32, dtype=jnp.float32, seed: int = 0):
  """A ``cache_type`` cache (KIVI(...), VidKV(...)) after a left-padded prefill of ``prompt``
  random tokens and one append of ``appended`` more; key channel 3 is an outlier (x8)."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  shape = (len(start), prompt + appended, kv_heads, head_dim)
  k, v = (jax.random.normal(key, shape, dtype) for key in keys)
  k = k.at[..., 3].mul(8.0)
  cache = cache_type.init(len(start), max_len, num_kv_heads=kv_heads, head_dim=head_dim,
                          dtype=dtype)

  @jax.jit
  def fill(cache, k, v):
    cache = cache.prefill(k[:, :prompt], v[:, :prompt], jnp.asarray(start, jnp.int32))
    return cache.append(k[:, prompt:], v[:, prompt:]) if appended else cache

  return fill(cache, k, v)


def cache_queries(cache, seq: int, group: int, seed: int = 1) -> jax.Array:
  """Random queries ``[batch, seq, kv_heads * group, head_dim]`` for ``cache`` (its residual's
  geometry and dtype)."""
  batch, _, kv_heads, head_dim = cache.k_residual.shape
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, seq, kv_heads * group, head_dim),
                           cache.k_residual.dtype)
