"""The float32 reference of ``flash_attention``: the test oracle, never a default.

It materializes the whole ``[batch, heads, q_len, kv_len]`` logits in float32 with HIGHEST matmul
precision, so its memory is O(q_len * kv_len): use it only to check the other implementations.
Gradients come from plain autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from pallas_kernels.flash_attention import masks

_HIGHEST = lax.Precision.HIGHEST


def attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads v_head_dim"],
    *,
    causal: bool = False,
    q_segment_ids: Int[Array, "batch q_len"] | None = None,
    kv_segment_ids: Int[Array, "batch kv_len"] | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    scale: float,
    return_lse: bool = False,
) -> (Float[Array, "batch q_len heads v_head_dim"]
      | tuple[Float[Array, "batch q_len heads v_head_dim"], Float[Array, "batch heads q_len"]]):
  """Naive attention in float32; arguments as validated by ``effjax.ops.attention.flash_attention``.

  Queries that see no key output 0 with LSE -inf. Q rows that see no key and K/V rows that no
  query sees are zeroed first, so garbage there reaches neither the output nor the gradients.
  GQA reshapes q to ``[batch, q_len, kv_heads, group, head_dim]``; K/V are never repeated.
  """
  batch, q_len, heads, head_dim = q.shape
  dtype = q.dtype
  kv_len, kv_heads = k.shape[1:3]
  spec = masks.MaskSpec.create(q_len, kv_len, causal=causal, window=window)
  mask = masks.attention_mask(spec, jnp.arange(q_len), jnp.arange(kv_len),
                              q_segment_ids, kv_segment_ids)  # [batch or 1, q, kv]
  q = jnp.where(mask.any(2)[:, :, None, None], q.astype(jnp.float32), 0.0)
  k = jnp.where(mask.any(1)[:, :, None, None], k.astype(jnp.float32), 0.0)
  v = jnp.where(mask.any(1)[:, :, None, None], v.astype(jnp.float32), 0.0)
  q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, precision=_HIGHEST) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  probabilities, lse = _masked_softmax(logits, mask[:, None, None])
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probabilities, v, precision=_HIGHEST)
  out = out.reshape(batch, q_len, heads, v.shape[-1]).astype(dtype)
  return (out, lse.reshape(batch, heads, q_len)) if return_lse else out


def _masked_softmax(logits: Float[Array, "*batch k"], mask: jax.Array) -> tuple[Array, Array]:
  """Softmax over the last axis and its natural-log LSE; fully masked rows give 0 and -inf.

  Every ``where`` guards both branches, so no NaN appears in the values or in their gradients.
  """
  logits = jnp.where(mask, logits, -jnp.inf)
  shift = lax.stop_gradient(logits.max(-1, keepdims=True))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  unnormalized = jnp.exp(logits - shift)
  total = unnormalized.sum(-1, keepdims=True)
  nonempty = total > 0
  total = jnp.where(nonempty, total, 1.0)
  lse = jnp.where(nonempty, jnp.log(total) + shift, -jnp.inf)
  return unnormalized / total, lse[..., 0]
