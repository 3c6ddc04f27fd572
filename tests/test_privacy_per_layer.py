"""Per-layer clipping of a whole DecoderLM through the interceptor == the explicit reference."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import nn as enn
from effjax.privacy import per_layer

CONFIG = dict(vocab_size=32, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=24)


def _setup(tie_embeddings):
  model = enn.DecoderLM(enn.TransformerConfig(**CONFIG, tie_embeddings=tie_embeddings))
  tokens = jax.random.randint(jax.random.key(0), (4, 9), 0, 32)
  params = model.init(jax.random.key(1), tokens[:, :-1])
  example_mask = jnp.array([True, True, False, True])  # row 2: Poisson padding

  def example_losses(p):
    logits = model.apply(p, tokens[:, :-1])
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, tokens[:, 1:, None], -1)[..., 0].mean(-1)

  return model, tokens, params, example_mask, example_losses


def _module_of(key_path):
  names = tuple(str(getattr(k, "key", k)) for k in key_path)
  return names[1:-1]


def test_decoder_lm_clipped_gradient_equals_per_example_reference():
  model, tokens, params, example_mask, example_losses = _setup(tie_embeddings=False)
  uses = per_layer.layer_uses(model.apply, params, tokens[:, :-1])
  assert set(uses.uses[("layer_0", "attention", "query")]) == {"__call__"}
  thresholds = uses.thresholds(clip_norm=1.0, split="sqrt_params")

  def summed(p):
    with per_layer.per_layer_clipping(thresholds, example_mask):
      return jnp.sum(jnp.where(example_mask, example_losses(p), 0.0))
  ours = jax.jit(jax.grad(summed))(params)

  # Reference: every example's gradient by vmap, clipped module by module, summed.
  one = lambda p, i: example_losses(p)[i]
  per_example = jax.vmap(jax.grad(one), in_axes=(None, 0))(params, jnp.arange(4))
  leaves = jax.tree_util.tree_flatten_with_path(per_example)[0]
  squared = {}
  for key_path, leaf in leaves:
    squared[_module_of(key_path)] = squared.get(_module_of(key_path), 0.0) + jnp.sum(
        leaf.reshape(4, -1) ** 2, axis=1)
  factors = {m: jnp.minimum(1.0, thresholds[(m, "__call__")] / jnp.sqrt(s)) * example_mask
             for m, s in squared.items()}
  assert any((factors[m] < 0.999).any() for m in factors)  # clipping is active
  expected = jax.tree_util.tree_map_with_path(
      lambda kp, leaf: jnp.tensordot(factors[_module_of(kp)], leaf, axes=1), per_example)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=1e-6), ours, expected)
  # The forward is unchanged.
  plain = model.apply(params, tokens[:, :-1])
  with per_layer.per_layer_clipping(thresholds, example_mask):
    np.testing.assert_allclose(model.apply(params, tokens[:, :-1]), plain, rtol=1e-5, atol=1e-6)


def test_tied_embedding_two_uses_and_every_example_bounded_by_c():
  model, tokens, params, _, example_losses = _setup(tie_embeddings=True)
  uses = per_layer.layer_uses(model.apply, params, tokens[:, :-1])
  assert uses.uses[("embed",)] == ("__call__", "attend")
  thresholds = uses.thresholds(clip_norm=0.5)
  for i in range(4):  # one example at a time: its clipped gradient is the whole sum
    only = jnp.arange(4) == i

    def summed(p):
      with per_layer.per_layer_clipping(thresholds, only):
        return jnp.sum(jnp.where(only, example_losses(p), 0.0))
    grads = jax.grad(summed)(params)
    norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    assert 0.1 < norm <= 0.5 + 1e-5


def test_a_parameter_without_a_rule_is_refused():
  class WithConv(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, use_bias=False)(nn.Conv(4, (3,))(x))

  x = jnp.ones((2, 5, 3))
  params = WithConv().init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="parameters without a per-example norm rule: "
                                       "Conv_0/bias, Conv_0/kernel"):
    per_layer.layer_uses(WithConv().apply, params, x)


def test_a_use_without_a_threshold_is_a_key_error():
  model, tokens, params, example_mask, _ = _setup(tie_embeddings=True)
  with pytest.raises(KeyError, match="no threshold for embed.__call__"):
    with per_layer.per_layer_clipping({}, example_mask):
      model.apply(params, tokens)
