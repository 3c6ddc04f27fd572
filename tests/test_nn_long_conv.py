"""Flax long-convolution pieces: kernel regularizers, layers, the LM, optimizer labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax.nn import long_conv as lc
from effjax.ops.long_conv import long_conv


def test_kernel_squash_and_smooth_follow_the_paper():
  module = lc.LongConvKernel(3, 20, squash=0.1, smooth_window=5)
  params = module.init(jax.random.key(0))
  raw = jax.random.normal(jax.random.key(1), (3, 20))
  params = {"params": {lc.KERNEL_PARAM: raw}}
  padded = np.pad(np.asarray(raw), ((0, 0), (2, 2)))
  smooth = np.stack([padded[:, t:t + 5].mean(1) for t in range(20)], axis=1)
  expected = np.sign(smooth) * np.maximum(np.abs(smooth) - 0.1, 0)
  np.testing.assert_allclose(module.apply(params), expected, atol=1e-6)
  assert (np.asarray(module.apply(params)) == 0).any()  # squash sparsifies


def test_kernel_dropout_only_in_training():
  module = lc.LongConvKernel(4, 50, squash=0.0, dropout=0.5)
  params = module.init(jax.random.key(0))
  np.testing.assert_array_equal(module.apply(params), params["params"][lc.KERNEL_PARAM])
  dropped = module.apply(params, False, rngs={"dropout": jax.random.key(1)})
  assert 0.3 < float((dropped == 0).mean()) < 0.7


def test_geometric_init_decays_with_channel_time_scales():
  kernel = np.abs(np.asarray(lc.geometric_decay_init(jax.random.key(0), (8, 256))))
  assert kernel[0, 10:].max() < 1e-3  # tau = 1: gone after a few lags
  assert kernel[-1, 128:].max() > 1e-3  # tau = 256: still there


@pytest.mark.parametrize("mode", ["causal", "bidirectional", "circular"])
def test_long_conv_layer_shapes_and_kernel_cut(mode):
  x = jax.random.normal(jax.random.key(0), (2, 16, 6))
  layer = lc.LongConv(kernel_len=None, mode=mode, num_kernels=2)
  params = jax.jit(layer.init)(jax.random.key(1), x)
  expected_len = 31 if mode == "bidirectional" else 16
  assert params["params"]["kernel"][lc.KERNEL_PARAM].shape == (12, expected_len)
  assert jax.eval_shape(layer.apply, params, x).shape == x.shape
  long_layer = lc.LongConv(kernel_len=40 if mode != "bidirectional" else 41, mode=mode)
  long_params = jax.eval_shape(long_layer.init, jax.random.key(1), x)
  assert jax.eval_shape(long_layer.apply, long_params, x).shape == x.shape  # kernel cut to 16


def test_learned_butterfly_at_init_equals_the_fft_layer():
  x = jax.random.normal(jax.random.key(0), (2, 24, 4))
  learned = lc.LongConv(learned_butterfly=True, kernel=dict(initializer="geometric"))
  params = jax.jit(learned.init)(jax.random.key(1), x)
  assert lc.BUTTERFLY_PARAM in params["params"]
  plain = {"params": {k: v for k, v in params["params"].items() if k != lc.BUTTERFLY_PARAM}}
  np.testing.assert_allclose(jax.jit(learned.apply)(params, x), jax.jit(lc.LongConv(
      kernel=dict(initializer="geometric")).apply)(plain, x), atol=1e-5)


@pytest.mark.parametrize("mixer", ["long_conv", "h3"])
def test_lm_is_causal_and_trains(mixer):
  config = lc.LongConvLMConfig(vocab_size=50, d_model=16, num_layers=2, d_ff=32, kernel_len=32,
                               mixer=mixer)
  model = lc.LongConvLM(config)
  tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, 50)
  params = jax.jit(model.init)(jax.random.key(1), tokens)
  apply = jax.jit(model.apply)
  logits = apply(params, tokens)
  assert logits.shape == (2, 20, 50) and logits.dtype == jnp.float32
  changed = tokens.at[:, 12].set((tokens[:, 12] + 1) % 50)
  delta = np.abs(np.asarray(apply(params, changed) - logits)).max(axis=(0, 2))
  assert delta[:12].max() < 1e-5 and delta[12:].min() > 0  # the past never sees the future

  tx = lc.long_conv_optimizer(optax.adamw(1e-2, weight_decay=0.1), kernel_learning_rate=1e-2)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply(p, tokens[:, :-1]), tokens[:, 1:]).mean()

  @jax.jit
  def step(params, opt_state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state, losses = tx.init(params), []
  for _ in range(20):
    params, opt_state, value = step(params, opt_state)
    losses.append(float(value))
  assert losses[-1] < losses[0] - 0.5


def test_labels_separate_kernels_and_blocks():
  x = jnp.ones((1, 8, 4))
  params = jax.eval_shape(lc.LongConv(learned_butterfly=True).init, jax.random.key(0), x)
  labels = jax.tree_util.tree_leaves_with_path(lc.label_params(params))
  by_name = {jax.tree_util.keystr(path): label for path, label in labels}
  assert {label for label in by_name.values()} == {"default", "long_conv_kernel", "butterfly"}
  assert all(label == "long_conv_kernel" for name, label in by_name.items()
             if lc.KERNEL_PARAM in name)


def test_lm_serves_inputs_longer_than_its_kernels():
  model = lc.LongConvLM(lc.LongConvLMConfig(vocab_size=10, d_model=8, num_layers=1, d_ff=8,
                                            kernel_len=8))
  tokens = jnp.zeros((1, 20), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)
  assert jax.eval_shape(model.apply, params, tokens).shape == (1, 20, 10)


def test_h3_uses_the_fused_gates():
  calls = []

  def conv_fn(u, kernel, **options):
    calls.append(sorted(k for k, v in options.items() if v is not None))
    return long_conv(u, kernel, **options)

  x = jnp.ones((1, 8, 4))
  jax.eval_shape(lc.H3LongConv(conv_fn=conv_fn).init, jax.random.key(0), x)
  assert ["mode", "post_gate", "pre_gate", "skip"] in calls
