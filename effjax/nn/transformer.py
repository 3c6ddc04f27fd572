"""A Llama-style decoder-only language model in Flax Linen.

Pre-norm blocks: ``x + Attention(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``; rotary positions;
grouped-query attention through a pluggable ``attention_fn``; optionally tied input/output
embeddings. Logits are returned in float32 whatever the compute dtype.

Memory: parameters ``vocab*d (x2 untied) + layers * (d*(heads + 2*kv_heads)*head_dim +
heads*head_dim*d + 3*d*d_ff + 2d)``; activations per layer ``O(batch * seq * d)`` plus whatever
``attention_fn`` needs (O(seq) for flash attention, O(seq^2) for naive attention).
"""

from __future__ import annotations

import dataclasses
import fractions
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from effjax.nn.attention import AttentionFn, MultiHeadAttention
from effjax.nn.remat import DECODER_ACTIVATIONS, over_tokens, parse_remat, tag
from effjax.ops.attention import flash_attention
from effjax.nn.rope import segment_positions


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shape of a decoder LM. ``head_dim`` defaults to ``d_model // num_heads``."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  d_ff: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  qk_norm: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff"):
      if getattr(self, name) <= 0:
        raise ValueError(f"TransformerConfig.{name} must be > 0, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"TransformerConfig.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"TransformerConfig.d_model={self.d_model} is not divisible by "
                       f"num_heads={self.num_heads}; set head_dim explicitly")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads


class SwiGLU(nn.Module):
  """``down(silu(gate(x)) * up(x))`` (Shazeer 2020), as in Llama; tags ``mlp_gate``,
  ``mlp_up`` and ``mlp_hidden`` for :mod:`effjax.nn.remat`."""
  d_ff: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "... d_model"]) -> Float[Array, "... d_model"]:
    dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    gate = tag(dense(self.d_ff, "gate")(x), "mlp_gate")
    hidden = tag(nn.silu(gate) * tag(dense(self.d_ff, "up")(x), "mlp_up"), "mlp_hidden")
    return dense(x.shape[-1], "down")(hidden)


def _norm(module: nn.Module, name: str) -> nn.RMSNorm:
  return nn.RMSNorm(epsilon=module.config.norm_eps, dtype=module.dtype,
                    param_dtype=module.param_dtype, name=name)


def attention_branch(module: nn.Module, x: Float[Array, "batch seq d_model"],
                     positions: Int[Array, "batch seq"],
                     segment_ids: Int[Array, "batch seq"] | None,
                     tokenwise: fractions.Fraction | None = None
                     ) -> Float[Array, "batch seq d_model"]:
  """``Attention(RMSNorm(x))`` as submodules ``attention_norm`` / ``attention`` of ``module``
  (called inside its compact method; ``module`` has config, attention_fn, dtype, param_dtype).
  ``tokenwise``: the kept fraction of ``remat="tokenwise(alpha)"``
  (:func:`effjax.nn.remat.over_tokens`)."""
  config = module.config
  return MultiHeadAttention(
      num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
      head_dim=config.resolved_head_dim, rope_theta=config.rope_theta, qk_norm=config.qk_norm,
      norm_eps=config.norm_eps, attention_fn=module.attention_fn, tokenwise=tokenwise,
      dtype=module.dtype, param_dtype=module.param_dtype, name="attention")(_norm(module, "attention_norm")(x),
                                                        positions, segment_ids)


def mlp_branch(module: nn.Module, x: Float[Array, "batch seq d_model"],
               tokenwise: fractions.Fraction | None = None) -> Float[Array, "batch seq d_model"]:
  """``SwiGLU(RMSNorm(x))`` as submodules ``mlp_norm`` / ``mlp`` of ``module`` (the norm output
  tagged ``mlp_norm``; ``tokenwise`` as in :func:`attention_branch`)."""
  norm = _norm(module, "mlp_norm")
  mlp = SwiGLU(module.config.d_ff, dtype=module.dtype, param_dtype=module.param_dtype, name="mlp")
  return over_tokens(lambda h: mlp(tag(norm(h), "mlp_norm")), tokenwise, x)


class DecoderBlock(nn.Module):
  """``x + Attention(RMSNorm(x))``, then ``x + SwiGLU(RMSNorm(x))``; ``tokenwise`` as in
  :func:`attention_branch`."""
  config: TransformerConfig
  attention_fn: AttentionFn = flash_attention
  tokenwise: fractions.Fraction | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, segment_ids=None):
    x = x + attention_branch(self, x, positions, segment_ids, self.tokenwise)
    return x + mlp_branch(self, x, self.tokenwise)


class DecoderLM(nn.Module):
  """Token ids ``[batch, seq]`` -> float32 logits ``[batch, seq, vocab]``.

  ``positions`` default to ``0..seq-1`` per row, or restart per segment when ``segment_ids`` are
  given (packed rows: tokens attend only within their segment). ``logits_at = (rows, cols)``, int
  ``[n]`` each, returns only the logits of those positions, ``[n, vocab]``: the final norm and
  the vocabulary projection then run on ``n`` tokens instead of ``batch * seq`` (a prefill needs
  one per prompt; at SmolLM2's 49k vocabulary the full projection is ~20% of the forward FLOPs
  and its float32 logits the largest activation).

  ``remat`` checkpoints every block with a policy of :mod:`effjax.nn.remat` (e.g. ``"none"``,
  ``"full"``, ``"save_attention"``: LightSeq, the backward never reruns the attention forward;
  ``"tokenwise(0.25)"``: MEMO; ``"save_names(...)"`` of :data:`~effjax.nn.remat.DECODER_ACTIVATIONS`).
  """
  config: TransformerConfig
  attention_fn: AttentionFn = flash_attention
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, tokens: Int[Array, "batch seq"],
               positions: Int[Array, "batch seq"] | None = None,
               segment_ids: Int[Array, "batch seq"] | None = None,
               logits_at: tuple[Int[Array, "n"], Int[Array, "n"]] | None = None
               ) -> Float[Array, "batch seq vocab"] | Float[Array, "n vocab"]:
    config = self.config
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integer [batch, seq], got {tokens.dtype}{list(tokens.shape)}")
    if positions is None:
      positions = (segment_positions(segment_ids) if segment_ids is not None else
                   jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape))
    embed = nn.Embed(config.vocab_size, config.d_model, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="embed",
                     embedding_init=nn.initializers.normal(stddev=config.d_model**-0.5))
    x = self.layers(embed(tokens), positions, segment_ids)
    if logits_at is not None:
      rows, cols = logits_at
      x = x[rows, cols]
    x = nn.RMSNorm(epsilon=config.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="final_norm")(x)
    if config.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(config.vocab_size, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="lm_head")(x)
    return logits.astype(jnp.float32)

  def layers(self, x: Float[Array, "batch seq d_model"], positions: Int[Array, "batch seq"],
             segment_ids: Int[Array, "batch seq"] | None) -> Float[Array, "batch seq d_model"]:
    """The decoder blocks, ``layer_0 .. layer_{L-1}`` (called inside ``__call__``)."""
    remat = parse_remat(self.remat, f"{type(self).__name__}.remat")
    remat.check_emitted(DECODER_ACTIVATIONS, type(self).__name__)
    policy = remat.policy()
    block = DecoderBlock if policy is None else nn.remat(DecoderBlock, policy=policy)
    for layer in range(self.config.num_layers):
      x = block(self.config, attention_fn=self.attention_fn, tokenwise=remat.tokenwise,
                dtype=self.dtype, param_dtype=self.param_dtype,
                name=f"layer_{layer}")(x, positions, segment_ids)
    return x
