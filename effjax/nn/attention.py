"""Multi-head attention layer (Flax Linen): projections, RoPE, GQA, optional qk-norm.

The attention computation itself is a callable argument, ``attention_fn`` (default:
:func:`effjax.ops.attention.flash_attention`, O(N) memory), with the signature of
``flash_attention`` restricted to what the layer passes::

    attention_fn(q, k, v, *, causal, q_segment_ids, kv_segment_ids) -> out

q ``[batch, seq, heads, head_dim]``, k/v ``[batch, seq, kv_heads, head_dim]``. The layer never
repeats K/V for grouped-query attention; the attention function handles ``heads % kv_heads == 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from effjax.nn.rope import apply_rope
from effjax.ops.attention import flash_attention

AttentionFn = Callable[..., jax.Array]


class MultiHeadAttention(nn.Module):
  """Causal self-attention with rotary positions and grouped-query heads.

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads; must divide ``num_heads`` (1 = MQA, num_heads = MHA).
    head_dim: per-head width.
    rope_theta: RoPE base.
    qk_norm: RMS-normalize q and k per head before RoPE (as in Gemma 3 / OLMo 2).
    attention_fn: the attention computation (see module docstring).
    dtype: compute dtype; params are stored in ``param_dtype``.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  qk_norm: bool = False
  norm_eps: float = 1e-6
  attention_fn: AttentionFn = flash_attention
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "batch seq d_model"], positions: Int[Array, "batch seq"],
               segment_ids: Int[Array, "batch seq"] | None = None
               ) -> Float[Array, "batch seq d_model"]:
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    dense = lambda heads, name: nn.DenseGeneral(
        (heads, self.head_dim), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    q = dense(self.num_heads, "query")(x)
    k = dense(self.num_kv_heads, "key")(x)
    v = dense(self.num_kv_heads, "value")(x)
    if self.qk_norm:
      q = nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="query_norm")(q)
      k = nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="key_norm")(k)
    q = apply_rope(q, positions, self.rope_theta)
    k = apply_rope(k, positions, self.rope_theta)
    out = self.attention_fn(q, k, v, causal=True, q_segment_ids=segment_ids,
                            kv_segment_ids=segment_ids)
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), use_bias=False, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="out")(out)
