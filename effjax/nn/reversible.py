"""Reversible decoder blocks: activation memory that does not grow with depth.

A reversible block (RevNet, Gomez et al. 2017; Reformer, Kitaev et al. 2020) keeps two residual
streams and couples them so that its input can be recomputed from its output::

    y1 = x1 + F(x2)        F = Attention(RMSNorm(.))
    y2 = x2 + G(y1)        G = SwiGLU(RMSNorm(.))

    x2 = y2 - G(y1)        (the backward, layer by layer from the top)
    x1 = y1 - F(x2)

:func:`reversible_layers` runs a stack of such blocks under a ``custom_vjp`` whose forward keeps
only the top outputs ``(y1, y2)``, and whose backward walks down the stack reconstructing each
block's inputs and pulling the cotangents through ``F`` and ``G`` (one recompute of each, as with
full rematerialization). Stored activations: two ``[batch, seq, d_model]`` streams plus one
block's recompute working set, whatever the depth; a plain stack keeps every block's
activations, a fully rematerialized one every block's input.

The reconstruction is exact in real arithmetic only: each layer's ``x = y - F(.)`` rounds, and
the rounding error is carried down the stack. It grows with depth and with a narrower dtype
(:func:`reconstruction_error` measures it); the streams therefore stay in float32 whatever the
compute dtype of ``F`` and ``G``, as in the Reformer's practice of full-precision residuals.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from effjax.nn.transformer import DecoderLM, attention_branch, mlp_branch

Branch = Callable[[Any, Array, Any], Array]  # (layer params, stream, context) -> update


def reversible_layers(f: Branch, g: Branch, params: Sequence[tuple[Any, Any]],
                      x1: Float[Array, "... d"], x2: Float[Array, "... d"], context: Any
                      ) -> tuple[Float[Array, "... d"], Float[Array, "... d"]]:
  """``(y1, y2)`` of the coupled blocks ``params = [(f_params, g_params), ...]``, bottom first.

  ``f(p, x, context)`` and ``g(p, x, context)`` are pure; ``context`` (positions, segment ids)
  is passed to both and gets no gradient. Differentiating keeps only ``(y1, y2)`` and
  reconstructs every block's inputs in the backward. Both passes are a ``lax.scan`` over the
  layers' parameters, stacked once here (one copy of the weights, kept for the backward), so one
  block's buffers serve every layer: an unrolled stack lets XLA hoist each layer's
  parameter-only work (and its buffers) to the start of the program, which made the memory grow
  with depth again.
  """
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)
  return _scan_layers(f, g, stacked, x1, x2, context)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan_layers(f, g, stacked, x1, x2, context):
  def layer(streams, layer_params):
    return _couple(f, g, *layer_params, *streams, context), None

  (y1, y2), _ = lax.scan(layer, (x1, x2), stacked)
  return y1, y2


def _couple(f, g, f_params, g_params, x1, x2, context):
  y1 = x1 + f(f_params, x2, context).astype(x1.dtype)
  return y1, x2 + g(g_params, y1, context).astype(x2.dtype)


def _scan_layers_fwd(f, g, stacked, x1, x2, context):
  y1, y2 = _scan_layers(f, g, stacked, x1, x2, context)
  return (y1, y2), (stacked, y1, y2, context)


def _scan_layers_bwd(f, g, residuals, cotangents):
  stacked, y1, y2, context = residuals

  def layer(carry, layer_params):
    y1, y2, d_y1, d_y2 = carry
    f_params, g_params = layer_params
    g_out, g_vjp = jax.vjp(lambda p, h: g(p, h, context).astype(y2.dtype), g_params, y1)
    x2 = y2 - g_out
    d_g_params, d_from_g = g_vjp(d_y2)
    d_y1 = d_y1 + d_from_g  # = d x1
    f_out, f_vjp = jax.vjp(lambda p, h: f(p, h, context).astype(y1.dtype), f_params, x2)
    x1 = y1 - f_out
    d_f_params, d_from_f = f_vjp(d_y1)
    return (x1, x2, d_y1, d_y2 + d_from_f), (d_f_params, d_g_params)

  (_, _, d_x1, d_x2), d_stacked = lax.scan(layer, (y1, y2, *cotangents), stacked, reverse=True)
  return d_stacked, d_x1, d_x2, None


_scan_layers.defvjp(_scan_layers_fwd, _scan_layers_bwd)


def reconstruction_error(f: Branch, g: Branch, params: Sequence[tuple[Any, Any]],
                         x1: Array, x2: Array, context: Any) -> Array:
  """Largest ``|x - x_reconstructed|`` at the bottom of the stack, relative to ``max |x|``: what
  the backward's walk down from ``(y1, y2)`` recovers of the inputs, in the streams' dtype."""
  y1, y2 = reversible_layers(f, g, params, x1, x2, context)
  for f_params, g_params in reversed(params):
    y2 = y2 - g(g_params, y1, context).astype(y2.dtype)
    y1 = y1 - f(f_params, y2, context).astype(y1.dtype)
  error = jnp.maximum(jnp.abs(y1 - x1).max(), jnp.abs(y2 - x2).max())
  return error / jnp.maximum(jnp.abs(x1).max(), jnp.abs(x2).max())


class AttentionBranch(nn.Module):
  """``F``: ``Attention(RMSNorm(x))`` (the attention half of a :class:`DecoderBlock`)."""
  config: Any
  attention_fn: Callable[..., Array]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, segment_ids=None):
    return attention_branch(self, x.astype(self.dtype), positions, segment_ids)


class MlpBranch(nn.Module):
  """``G``: ``SwiGLU(RMSNorm(x))`` (the MLP half of a :class:`DecoderBlock`)."""
  config: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return mlp_branch(self, x.astype(self.dtype))


class ReversibleDecoderLM(DecoderLM):
  """:class:`DecoderLM` with reversible blocks: token ids ``[batch, seq]`` -> float32 logits.

  Both streams start as the token embedding; each ``layer_i`` holds the parameters of a
  :class:`DecoderBlock` (``attention``/``attention_norm`` and ``mlp``/``mlp_norm``, same shapes)
  applied as the coupling above; the final norm reads the mean of the two streams. Arguments,
  ``logits_at`` and ``attention_fn`` (ring attention included) as :class:`DecoderLM`; ``remat``
  must stay ``"none"`` (the backward already recomputes each block once).

  Activation memory: two float32 ``[batch, seq, d_model]`` streams and one block's working set,
  independent of ``num_layers`` (a :class:`DecoderLM` without remat keeps every block's); compute:
  one extra forward of every block in the backward, as ``remat="full"``.
  """

  def layers(self, x: Float[Array, "batch seq d_model"], positions: Int[Array, "batch seq"],
             segment_ids: Int[Array, "batch seq"] | None) -> Float[Array, "batch seq d_model"]:
    if self.remat != "none":
      raise ValueError(f"ReversibleDecoderLM.remat is {self.remat!r}; expected 'none' (reversible "
                       "blocks recompute their inputs in the backward already)")
    f_def = AttentionBranch(self.config, self.attention_fn, self.dtype, self.param_dtype)
    g_def = MlpBranch(self.config, self.dtype, self.param_dtype)
    f = lambda p, h, context: f_def.apply({"params": p}, h, *context)
    g = lambda p, h, context: g_def.apply({"params": p}, h)
    stream = x.astype(jnp.float32)
    context = (positions, segment_ids)

    def init_layer(key):  # one dict, laid out as a DecoderBlock's parameters
      f_key, g_key = jax.random.split(key)
      return {**f_def.init(f_key, stream, *context)["params"],
              **g_def.init(g_key, stream)["params"]}

    params = []
    for layer in range(self.config.num_layers):
      block = self.param(f"layer_{layer}", init_layer)
      params.append(({name: block[name] for name in ("attention", "attention_norm")},
                     {name: block[name] for name in ("mlp", "mlp_norm")}))
    y1, y2 = reversible_layers(f, g, params, stream, stream, context)
    return ((y1 + y2) / 2).astype(x.dtype)
