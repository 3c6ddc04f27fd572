"""Per-example norms without per-example gradients, per-layer clipping in one backward, noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.privacy import clipping

B, T, D, P = 3, 7, 5, 6


def _inputs(seed=0, dtype=jnp.float32):
  ka, kg, kw = jax.random.split(jax.random.key(seed), 3)
  lengths = jnp.array([7, 4, 1])  # different lengths, padded to T
  mask = (jnp.arange(T)[None] < lengths[:, None]).astype(jnp.float32)
  return (jax.random.normal(ka, (B, T, D), dtype), jax.random.normal(kg, (B, T, P), dtype),
          jax.random.normal(kw, (D, P), dtype), mask)


def _per_example_kernel_grads(a, g, mask):
  """The reference: each example's dW by autodiff of its own masked loss <a W, g>."""
  def one(a_i, g_i, m_i):
    return jax.grad(lambda w: jnp.sum((a_i @ w) * g_i * m_i[:, None]))(jnp.zeros((D, P)))
  return jax.vmap(one)(a, g, mask)


@pytest.mark.parametrize("method", ["ghost", "explicit", "auto"])
def test_example_norms_equal_the_norms_of_explicit_per_example_gradients(method):
  a, g, _, mask = _inputs()
  expected = jnp.linalg.norm(_per_example_kernel_grads(a, g, mask).reshape(B, -1), axis=1)
  got = clipping.dense_example_norms(a, g, mask, method)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Padding is ignored whatever it holds.
  noisy_pad = jnp.where(mask[..., None] > 0, a, 1e3)
  np.testing.assert_allclose(clipping.dense_example_norms(noisy_pad, g, mask, method), expected,
                             rtol=1e-5)


def test_book_keeping_rule():
  assert clipping.ghost_norm_is_cheaper(seq_len=16, in_features=64, out_features=64)
  assert not clipping.ghost_norm_is_cheaper(seq_len=2048, in_features=576, out_features=576)


def test_clipped_dense_sums_clipped_per_example_gradients_in_one_backward():
  a, g, w, mask = _inputs(1)
  threshold = 2.0
  grads = _per_example_kernel_grads(a, g, mask)
  norms = jnp.linalg.norm(grads.reshape(B, -1), axis=1)
  assert (norms > threshold).any() and (norms < threshold * 10).all()
  expected = jnp.sum(grads * jnp.minimum(1, threshold / norms)[:, None, None], axis=0)
  loss = lambda a, w: jnp.sum(clipping.clipped_dense(a, w, mask, threshold) * g)
  d_a, d_w = jax.grad(loss, argnums=(0, 1))(a, w)
  np.testing.assert_allclose(d_w, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(d_a, g @ w.T, rtol=1e-6)  # the input gradient is not clipped
  np.testing.assert_allclose(clipping.clipped_dense(a, w, mask, threshold), a @ w)


def test_per_layer_thresholds_bound_every_examples_total_norm():
  counts = {"attention": 40, "mlp": 90, "norm": 10}
  for split in ("equal", "sqrt_params"):
    limits = clipping.layer_thresholds(counts, 3.0, split)
    assert sum(c**2 for c in limits.values()) == pytest.approx(9.0)
  limits = clipping.layer_thresholds(counts, 3.0, "sqrt_params")
  assert limits["mlp"] / limits["norm"] == pytest.approx(3.0)
  # Two layers clipped separately: every example's whole clipped gradient has norm <= C.
  a, g, _, mask = _inputs(2)
  a2, g2, _, _ = _inputs(3)
  limits = clipping.layer_thresholds({"first": D * P, "second": D * P}, 1.0)
  squared = 0.0
  for x, y, limit in ((a, g, limits["first"]), (10 * a2, g2, limits["second"])):
    grads = _per_example_kernel_grads(x, y, mask)
    norms = jnp.linalg.norm(grads.reshape(B, -1), axis=1)
    squared = squared + (norms * clipping.clip_factors(norms, limit)) ** 2
  assert (jnp.sqrt(squared) <= 1.0 + 1e-6).all()


def test_noise_std_is_sigma_c_over_the_expected_batch():
  released = clipping.noised_mean(jnp.zeros((200_000,)), jax.random.key(0), noise_multiplier=1.5,
                                  clip_norm=2.0, expected_batch_size=8.0)
  assert float(jnp.std(released)) == pytest.approx(1.5 * 2.0 / 8.0, rel=0.01)
  assert abs(float(jnp.mean(released))) < 0.01


@pytest.mark.parametrize("call, message", [
    (lambda: clipping.layer_thresholds({"a": 1}, 0.0), "clip_norm is 0.0; expected > 0"),
    (lambda: clipping.layer_thresholds({"a": 1}, 1.0, "params"), "split is 'params'"),
    (lambda: clipping.layer_thresholds({}, 1.0), "parameter_counts is empty"),
    (lambda: clipping.dense_example_norms(jnp.zeros((2, 3)), jnp.zeros((2, 3)), None),
     "inputs and output_grads must be"),
    (lambda: clipping.dense_example_norms(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 3)), None,
                                          "fast"), "method is 'fast'"),
    (lambda: clipping.noised_mean(jnp.zeros(3), jax.random.key(0), 1.0, 1.0, 0.0),
     "expected_batch_size is 0.0; expected > 0"),
])
def test_bad_input_names_the_argument(call, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
    call()


def test_embedding_norms_and_clipping_match_per_example_autodiff():
  vocab, threshold = 5, 1.5
  _, g, _, mask = _inputs(4)
  g = g[..., :4]
  tokens = jax.random.randint(jax.random.key(5), (B, T), 0, vocab)  # repeats within examples
  table = jax.random.normal(jax.random.key(6), (vocab, 4))

  def one(tokens_i, g_i, m_i):
    return jax.grad(lambda t: jnp.sum(t[tokens_i] * g_i * m_i[:, None]))(jnp.zeros_like(table))
  grads = jax.vmap(one)(tokens, g, mask)
  norms = jnp.linalg.norm(grads.reshape(B, -1), axis=1)
  np.testing.assert_allclose(clipping.embedding_example_norms(tokens, g, mask), norms, rtol=1e-5)
  assert (norms > threshold).any()
  expected = jnp.sum(grads * clipping.clip_factors(norms, threshold)[:, None, None], axis=0)
  got = jax.grad(lambda t: jnp.sum(clipping.clipped_embedding(t, tokens, mask, threshold) * g))(
      table)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_scale_norms_and_clipping_match_per_example_autodiff():
  threshold = 0.5
  x, g, _, mask = _inputs(7)
  g = g[..., :D]
  scale = jnp.linspace(0.5, 1.5, D)

  def one(x_i, g_i, m_i):
    return jax.grad(lambda s: jnp.sum(x_i * s * g_i * m_i[:, None]))(jnp.zeros(D))
  grads = jax.vmap(one)(x, g, mask)
  norms = jnp.linalg.norm(grads, axis=1)
  np.testing.assert_allclose(clipping.scale_example_norms(x, g, mask), norms, rtol=1e-5)
  assert (norms > threshold).any()
  loss = lambda x, s: jnp.sum(clipping.clipped_scale(x, s, mask, threshold) * g)
  d_x, d_scale = jax.grad(loss, argnums=(0, 1))(x, scale)
  expected = jnp.sum(grads * clipping.clip_factors(norms, threshold)[:, None], axis=0)
  np.testing.assert_allclose(d_scale, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(d_x, g * scale, rtol=1e-6)


def test_noised_mean_of_a_pytree_draws_independent_noise_per_leaf():
  tree = {"a": jnp.zeros((1000,)), "b": jnp.zeros((1000,))}
  released = clipping.noised_mean(tree, jax.random.key(1), 1.0, 1.0, 1.0)
  assert abs(float(jnp.corrcoef(released["a"], released["b"])[0, 1])) < 0.1
