"""Flax building blocks: RoPE, restartable positions, GQA attention layer, decoder LM."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import nn as enn
from effjax import sharding, testing
from effjax.ops.attention import flash_attention


def test_rope_preserves_norm_and_is_relative():
  x = jax.random.normal(jax.random.key(0), (1, 6, 2, 16))
  positions = jnp.arange(6)[None]
  rotated = enn.apply_rope(x, positions, theta=100.0)
  np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  # <R(p)q, R(p')k> depends only on p - p'.
  q, k = x[:, :1], x[:, 1:2]
  dot = lambda pq, pk: jnp.sum(enn.apply_rope(q, jnp.array([[pq]]), 100.0) *
                               enn.apply_rope(k, jnp.array([[pk]]), 100.0))
  np.testing.assert_allclose(dot(3, 1), dot(10, 8), rtol=1e-4)
  assert not np.allclose(dot(3, 1), dot(3, 2), rtol=1e-3)
  np.testing.assert_array_equal(enn.apply_rope(x, jnp.zeros((1, 6), jnp.int32), 100.0), x)


def test_rope_errors():
  with pytest.raises(ValueError, match="even head_dim, got head_dim=15"):
    enn.rope_frequencies(15, 1e4)
  with pytest.raises(ValueError, match=r"positions must have shape \[batch, seq\]"):
    enn.apply_rope(jnp.zeros((1, 4, 1, 8)), jnp.zeros((1, 5), jnp.int32), 1e4)


def test_segment_positions_restart():
  segments = jnp.array([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
  np.testing.assert_array_equal(enn.segment_positions(segments),
                                [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_attention_layer_flash_default_matches_reference_attention(heads, kv_heads):
  layer = enn.MultiHeadAttention(num_heads=heads, num_kv_heads=kv_heads, head_dim=16)
  x = jax.random.normal(jax.random.key(0), (2, 37, 24))
  positions = jnp.broadcast_to(jnp.arange(37), (2, 37))
  segments = jnp.array([[0] * 12 + [1] * 25, [0] * 37])
  params = layer.init(jax.random.key(1), x, positions)
  reference = layer.clone(attention_fn=functools.partial(flash_attention,
                                                         implementation="reference"))
  for segment_ids in (None, segments):
    testing.check_against_reference(
        lambda p, x: layer.apply(p, x, positions, segment_ids),
        lambda p, x: reference.apply(p, x, positions, segment_ids), params, x, argnums=(0, 1))


def _tiny_lm(**overrides):
  config = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48)
  config.update(overrides)
  return enn.DecoderLM(enn.TransformerConfig(**config))


def test_decoder_is_causal_and_packed_segments_are_independent():
  model = _tiny_lm()
  tokens = jax.random.randint(jax.random.key(0), (1, 10), 0, 64)
  params = model.init(jax.random.key(1), tokens)
  logits = model.apply(params, tokens)
  assert logits.shape == (1, 10, 64) and logits.dtype == jnp.float32
  changed = tokens.at[0, 7].set((tokens[0, 7] + 1) % 64)
  np.testing.assert_array_equal(model.apply(params, changed)[:, :7], logits[:, :7])
  assert not np.allclose(model.apply(params, changed)[:, 7:], logits[:, 7:])
  # Two documents packed in one row give the same logits as each document alone.
  segments = jnp.array([[0] * 4 + [1] * 6])
  packed = model.apply(params, tokens, segment_ids=segments)
  np.testing.assert_allclose(packed[:, :4], model.apply(params, tokens[:, :4]), atol=1e-5)
  np.testing.assert_allclose(packed[:, 4:], model.apply(params, tokens[:, 4:]), atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_logits_at_returns_the_selected_positions_logits(tie):
  model = _tiny_lm(tie_embeddings=tie)
  tokens = jax.random.randint(jax.random.key(0), (3, 7), 0, 64)
  params = model.init(jax.random.key(1), tokens)
  segments = jnp.array([[1, 1, 1, 2, 2, 2, 2]] * 3)
  rows, cols = jnp.array([2, 0, 0, 1]), jnp.array([6, 2, 6, 0])
  full = model.apply(params, tokens, segment_ids=segments)
  selected = model.apply(params, tokens, segment_ids=segments, logits_at=(rows, cols))
  assert selected.shape == (4, 64) and selected.dtype == jnp.float32
  np.testing.assert_allclose(selected, full[rows, cols], atol=1e-6)


def test_decoder_takes_its_attention_fn():
  calls = []

  def recording_attention(q, k, v, **kwargs):
    calls.append((q.shape, k.shape))
    return flash_attention(q, k, v, **kwargs)

  model = enn.DecoderLM(_tiny_lm().config, attention_fn=recording_attention)
  model.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
  assert calls == [((1, 5, 4, 8), (1, 5, 2, 8))] * 2


def _split_attention(devices):
  mesh = sharding.make_mesh(sharding.MeshConfig(("data", "seq"), (1, devices)),
                            jax.devices()[:devices])
  return enn.SequenceParallel(mesh, layout="contiguous")


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["flash", "ring"])
def test_remat_policies_keep_gradients_and_save_attention_never_reruns_its_forward(
    sequence_parallel):
  base = _tiny_lm(num_layers=3)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  segments = jnp.array([[1] * 9 + [2] * 7, [1] * 16])
  params = base.init(jax.random.key(1), tokens)
  split = _split_attention(4) if sequence_parallel else None
  forwards, grads = {}, {}
  for remat in enn.REMAT_POLICIES:
    model = base.clone(remat=remat)
    if split is None:
      loss = lambda p, m=model: jnp.mean(m.apply(p, tokens, segment_ids=segments) ** 2)
    else:
      model = model.clone(attention_fn=split.attention_fn())
      loss = lambda p, m=model: jnp.mean(
          m.apply(p, **split.inputs(tokens, segments)) ** 2)
    forwards[remat] = enn.count_attention_forwards(jax.grad(loss), params)
    grads[remat] = jax.jit(jax.grad(loss))(params)
  # One attention forward per layer; "full" reruns each in the backward, LightSeq's does not.
  assert forwards == {"none": 3, "full": 6, "dots": 6, "save_attention": 3,
                      "offload_attention": 3}
  for remat in ("full", "dots", "save_attention", "offload_attention"):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
                 grads[remat], grads["none"])


def test_offload_attention_keeps_the_attention_residuals_in_host_memory():
  model = _tiny_lm().clone(remat="offload_attention")
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  params = model.init(jax.random.key(1), tokens)
  grad = jax.grad(lambda p, m=model: m.apply(p, tokens).mean())
  # Per layer: the output [2, 16, 4 heads, 8] and the LSE [2, 4, 16], float32, on the host.
  assert enn.host_residual_bytes(grad, params) == 2 * (2 * 16 * 4 * 8 + 2 * 4 * 16) * 4
  saved = jax.grad(lambda p, m=model.clone(remat="save_attention"): m.apply(p, tokens).mean())
  assert enn.host_residual_bytes(saved, params) == 0


def test_bad_model_config_and_inputs():
  with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
    enn.TransformerConfig(vocab_size=8, d_model=24, num_layers=1, num_heads=6, num_kv_heads=4,
                          d_ff=8)
  with pytest.raises(ValueError, match="vocab_size must be > 0"):
    enn.TransformerConfig(vocab_size=0, d_model=8, num_layers=1, num_heads=1, num_kv_heads=1,
                          d_ff=8)
  with pytest.raises(ValueError, match="remat is 'attention'; expected one of"):
    _tiny_lm().clone(remat="attention").init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
  model = _tiny_lm()
  with pytest.raises(ValueError, match=r"tokens must be integer \[batch, seq\]"):
    model.init(jax.random.key(0), jnp.zeros((1, 5), jnp.float32))
