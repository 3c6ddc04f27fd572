"""Reversible decoder blocks: gradients equal plain autodiff, memory flat in depth."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import benchmarking, sharding
from effjax import nn as enn
from effjax.nn import reversible
from experiments import run, train_lm


def _plain_layers(f, g, params, x1, x2, context):
  """The same coupling, differentiated by ordinary autodiff (every activation kept)."""
  for f_params, g_params in params:
    x1 = x1 + f(f_params, x2, context)
    x2 = x2 + g(g_params, x1, context)
  return x1, x2


def _model(**overrides):
  config = dict(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, d_ff=48)
  config.update(overrides)
  return enn.ReversibleDecoderLM(enn.TransformerConfig(**config))


def _split_attention(devices):
  mesh = sharding.make_mesh(sharding.MeshConfig(("data", "seq"), (1, devices)),
                            jax.devices()[:devices])
  return enn.SequenceParallel(mesh, layout="zigzag")


def test_reversible_layers_match_autodiff_of_the_same_coupling():
  keys = jax.random.split(jax.random.key(0), 8)
  f = lambda p, h, scale: jnp.tanh(h @ p) * scale
  g = lambda p, h, scale: jax.nn.silu(h @ p["w"]) + p["b"]
  params = [(jax.random.normal(keys[i], (6, 6)) / 2,
             {"w": jax.random.normal(keys[i + 4], (6, 6)) / 2, "b": jnp.full((6,), 0.1 * i)})
            for i in range(4)]
  x1, x2 = jax.random.normal(keys[0], (2, 5, 6)), jax.random.normal(keys[1], (2, 5, 6))
  loss = lambda layers: lambda p, a, b: sum(
      (weight * out).sum() for weight, out in zip((1.0, -2.0), layers(f, g, p, a, b, 0.5)))
  ours = jax.grad(loss(reversible.reversible_layers), argnums=(0, 1, 2))(params, x1, x2)
  plain = jax.grad(loss(_plain_layers), argnums=(0, 1, 2))(params, x1, x2)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), ours, plain)
  np.testing.assert_allclose(reversible.reversible_layers(f, g, params, x1, x2, 0.5),
                             _plain_layers(f, g, params, x1, x2, 0.5), rtol=1e-5, atol=1e-6)
  assert reversible.reconstruction_error(f, g, params, x1, x2, 0.5) < 1e-6


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["flash", "ring"])
def test_reversible_lm_gradients_equal_autodiff(monkeypatch, sequence_parallel):
  model = _model()
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  segments = jnp.array([[1] * 9 + [2] * 7, [1] * 16])
  params = model.init(jax.random.key(1), tokens)
  # Laid out as a DecoderBlock's parameters, so optimizers' label functions see the same names.
  assert params["params"]["layer_0"].keys() == {"attention", "attention_norm", "mlp", "mlp_norm"}
  if sequence_parallel:
    split = _split_attention(4)
    model = model.clone(attention_fn=split.attention_fn())
    loss = lambda p: jnp.mean(model.apply(p, **split.inputs(tokens, segments)) ** 2)
  else:
    loss = lambda p: jnp.mean(model.apply(p, tokens, segment_ids=segments) ** 2)
  ours = jax.jit(jax.grad(loss))(params)
  monkeypatch.setattr(reversible, "reversible_layers", _plain_layers)
  plain = jax.jit(jax.grad(loss))(params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), ours, plain)
  assert enn.count_attention_forwards(jax.grad(loss), params) == 3  # autodiff: one per layer


def test_reversible_lm_logits_are_the_coupled_blocks(monkeypatch):
  model = _model(num_layers=2)
  tokens = jax.random.randint(jax.random.key(0), (1, 8), 0, 64)
  params = model.init(jax.random.key(1), tokens)["params"]
  attention = reversible.AttentionBranch(model.config, model.attention_fn)
  mlp = reversible.MlpBranch(model.config)
  x1 = x2 = params["embed"]["embedding"][tokens]
  for layer in ("layer_0", "layer_1"):
    block = params[layer]
    x1 = x1 + attention.apply({"params": {name: block[name] for name in
                                          ("attention", "attention_norm")}},
                              x2, jnp.arange(8)[None])
    x2 = x2 + mlp.apply({"params": {name: block[name] for name in ("mlp", "mlp_norm")}}, x1)
  h = (x1 + x2) / 2
  h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + model.config.norm_eps)
  expected = (h * params["final_norm"]["scale"]) @ params["embed"]["embedding"].T
  logits = model.apply({"params": params}, tokens)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  monkeypatch.setattr(reversible, "reversible_layers", _plain_layers)
  np.testing.assert_allclose(model.apply({"params": params}, tokens), logits, rtol=1e-5, atol=1e-5)


def test_reversible_memory_is_flat_in_depth():
  tokens = jax.ShapeDtypeStruct((4, 1024), jnp.int32)

  def temp_bytes(model):
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)
    grad = jax.grad(lambda p, t: jnp.mean(model.apply(p, t) ** 2))
    return benchmarking.compiled_memory(grad, params, tokens).temp_bytes

  reversible_growth = temp_bytes(_model(num_layers=12)) / temp_bytes(_model(num_layers=3))
  plain_growth = (temp_bytes(enn.DecoderLM(_model(num_layers=12).config)) /
                  temp_bytes(enn.DecoderLM(_model(num_layers=3).config)))
  assert reversible_growth <= 1.1 < 2.0 < plain_growth


def test_reversible_lm_refuses_remat():
  with pytest.raises(ValueError, match="ReversibleDecoderLM.remat is 'full'; expected 'none'"):
    _model().clone(remat="full").init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_train_lm_trains_reversible_blocks(tmp_path):
  tiny = [*train_lm.smoke_overrides(train_lm.Config()), "--data.source=news",
          "--sample_tokens=0"]
  summary = run.run("configs/quickstart.yaml", [
      *tiny, "--model.reversible=true", "--steps=12", "--optim.warmup_steps=2",
      "--optim.learning_rate=1e-2", f"--output_dir={tmp_path}"])
  losses = [json.loads(line)["loss"] for line in
            (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in line]
  assert len(losses) == 12 and losses[-1] < losses[0] - 0.3
  assert np.isfinite(summary["heldout_perplexity"])
