"""Multi-head attention layer (Flax Linen): projections, RoPE, GQA, optional qk-norm.

The attention computation itself is a callable argument, ``attention_fn`` (default:
:func:`effjax.ops.attention.flash_attention`, O(N) memory), with the signature of
``flash_attention`` restricted to what the layer passes::

    attention_fn(q, k, v, *, causal, q_segment_ids, kv_segment_ids) -> out

q ``[batch, seq, heads, head_dim]``, k/v ``[batch, seq, kv_heads, head_dim]``. The layer never
repeats K/V for grouped-query attention; the attention function handles ``heads % kv_heads == 0``.
"""

from __future__ import annotations

import fractions
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from effjax.nn.remat import over_tokens, tag
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
    tokenwise: run the token-local work (projections) separately on the kept and recomputed
      positions of ``remat="tokenwise(alpha)"`` (:func:`effjax.nn.remat.over_tokens`); None: at
      once. Activations are tagged for :mod:`effjax.nn.remat`: ``attention_norm`` (the input),
      ``query``, ``key``, ``value`` (projections before qk-norm and RoPE),
      ``attention_projection`` (the output).
    dtype: compute dtype; params are stored in ``param_dtype``.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  qk_norm: bool = False
  norm_eps: float = 1e-6
  attention_fn: AttentionFn = flash_attention
  tokenwise: fractions.Fraction | None = None
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
    project_q, project_k, project_v = (dense(self.num_heads, "query"),
                                       dense(self.num_kv_heads, "key"),
                                       dense(self.num_kv_heads, "value"))
    norm = lambda name: nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=name)
    norm_q, norm_k = (norm("query_norm"), norm("key_norm")) if self.qk_norm else (None, None)

    def project(h, positions):
      h = tag(h, "attention_norm")
      q, k = tag(project_q(h), "query"), tag(project_k(h), "key")
      if self.qk_norm:
        q, k = norm_q(q), norm_k(k)
      return (apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta),
              tag(project_v(h), "value"))

    q, k, v = over_tokens(project, self.tokenwise, x, positions)
    out = self.attention_fn(q, k, v, causal=True, q_segment_ids=segment_ids,
                            kv_segment_ids=segment_ids)
    project_out = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name="out")
    return over_tokens(lambda o: tag(project_out(o), "attention_projection"), self.tokenwise, out)
