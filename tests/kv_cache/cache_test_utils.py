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
