"""XQuant / XQuant-CL: unquantized remat equals the fp cache, latent path equals the direct
projection, the closed-loop accumulator does not drift, exact nbytes, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cache_test_utils import decode_logits

from effjax import nn, testing
from effjax.kv_cache import (
    FullKVCache,
    LayerInputs,
    XQuant,
    XQuantCache,
    XQuantCL,
    quant,
    xquant,
)
from effjax.models import init_caches, prefill

# GQA: X (64) is wider than K+V (2 * 16), so XQuant caches latents; MHA: X (32) is narrower.
GQA = nn.TransformerConfig(vocab_size=64, d_model=64, num_layers=3, num_heads=4, num_kv_heads=1,
                           d_ff=64, head_dim=16)
MHA = dataclasses.replace(GQA, d_model=32, num_heads=2, num_kv_heads=2)
G = 8


def _model(config):
  model = nn.DecoderLM(config)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize("config, cache_type, quantized", [
    (GQA, XQuant(16, G), XQuant(2, G)),  # latents (auto)
    (GQA, XQuant(16, G, latent=False), XQuant(2, G, latent=False)),
    (MHA, XQuant(16, G), XQuant(2, G)),  # X
    (GQA, XQuantCL(16, 16, group_size=G), XQuantCL(2, 2, group_size=G)),
], ids=["gqa-latent", "gqa-x", "mha-x", "cl"])
def test_unquantized_remat_reproduces_the_full_caches_logits(config, cache_type, quantized):
  model, params = _model(config)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 14)), jnp.int32)
  start = jnp.asarray([0, 3], jnp.int32)
  expected = decode_logits(model, params, tokens, start, 6, FullKVCache)
  testing.assert_close(decode_logits(model, params, tokens, start, 6, cache_type), expected,
                       atol=1e-4, rtol=1e-4)
  # Quantized, the logits really differ (the test can fail).
  assert not np.allclose(decode_logits(model, params, tokens, start, 6, quantized), expected,
                         atol=1e-3)


def test_auto_latent_follows_the_widths():
  assert XQuant().for_layer(0, GQA).latent and not XQuant().for_layer(0, MHA).latent
  layers = [XQuantCL(2, 4, first_layers=2).for_layer(i, GQA) for i in range(3)]
  assert [layer.bits for layer in layers] == [4, 4, 2]


def test_latent_path_equals_direct_projection():
  rng = np.random.default_rng(1)
  kernel = jnp.asarray(rng.standard_normal((64, 2, 16)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((3, 5, 64)), jnp.float32)
  basis, up = xquant.latent_factors(kernel)
  assert basis.shape == (64, 32) and up.shape == (32, 2, 16)
  testing.assert_close(jnp.einsum("bsr,rkd->bskd", x @ basis, up),
                       jnp.einsum("bsw,wkd->bskd", x, kernel), atol=1e-4, rtol=1e-4)


def _layer_inputs(residual):
  d_model = residual.shape[-1]
  kernel = jnp.zeros((d_model, 1, 16))
  return LayerInputs(x=residual, residual=residual, key_kernel=kernel, value_kernel=kernel,
                     norm_scale=jnp.ones((d_model,)), norm_eps=1e-5, rope_theta=1e4)


def test_cross_layer_accumulator_does_not_drift():
  layers, d_model, seq = 12, 64, 10
  rng = np.random.default_rng(2)
  # A residual stream that moves a little at each layer, as in a pre-norm transformer.
  steps = rng.standard_normal((layers, 2, seq, d_model)).astype(np.float32)
  steps[1:] *= 0.3
  residual = jnp.asarray(np.cumsum(steps, axis=0))
  config = dataclasses.replace(GQA, d_model=d_model, num_layers=layers)
  settings = XQuantCL(bits=2, first_bits=2, group_size=G)
  start = jnp.zeros((2,), jnp.int32)
  previous, open_loop = None, 0.0
  for layer in range(layers):
    cache = settings.for_layer(layer, config).init(2, seq, num_kv_heads=1, head_dim=16)
    cache = cache.prefill_inputs(_layer_inputs(residual[layer]), start, previous)
    previous = cache.stream(previous)
    # Closed loop: the accumulator is within half a step of this layer's delta quantization.
    half_step = jnp.repeat(cache.scale.astype(jnp.float32), G, axis=-1) / 2
    assert jnp.all(jnp.abs(previous - residual[layer]) <= half_step + 1e-5)
    # Open loop (deltas between the true streams) sums every layer's quantization error.
    delta = residual[layer] - (residual[layer - 1] if layer else 0.0)
    codes, scale, zero = quant.quantize_groups(delta, 2, axis=-1, group_size=G)
    open_loop = open_loop + quant.dequantize_groups(codes, scale, zero, axis=-1, group_size=G)
  closed_error = float(jnp.mean(jnp.abs(previous - residual[-1])))
  open_error = float(jnp.mean(jnp.abs(open_loop - residual[-1])))
  assert closed_error < open_error / 2, (closed_error, open_error)


@pytest.mark.parametrize("bits", [2, 3, 4, 16])
def test_nbytes_is_exact(bits):
  batch, max_len = 2, 40
  cache = XQuant(bits, G).for_layer(0, GQA).init(batch, max_len, num_kv_heads=1, head_dim=16,
                                                  dtype=jnp.float16)
  width = 32  # latents: 2 * kv_heads * head_dim
  per_token = (width * 2 if bits == 16
               else -(-width // (32 // bits)) * 4 + 2 * (width // G) * 2)
  assert cache.nbytes() == batch * max_len * per_token + 4 * batch + 4
  model = nn.DecoderLM(GQA)
  shapes = jax.eval_shape(lambda: init_caches(model, 1, 64, cache_type=XQuantCL(2, 4, 1, G),
                                              dtype=jnp.float16))
  x_bytes = lambda bits: 64 * (64 // (32 // bits) * 4 + 2 * (64 // G) * 2) + 8
  assert [c.nbytes() for c in shapes] == [x_bytes(4), x_bytes(2), x_bytes(2)]


def test_errors():
  with pytest.raises(ValueError, match=r"bits is 5"):
    XQuant(5)
  with pytest.raises(ValueError, match=r"first_layers is -1"):
    XQuantCL(first_layers=-1)
  with pytest.raises(ValueError, match=r"group_size is 12; expected a divisor"):
    XQuant(4, 12).for_layer(0, GQA).init(1, 8, num_kv_heads=1, head_dim=16)
  with pytest.raises(ValueError, match=r"latent is True .* > d_model"):
    XQuant(4, G, latent=True).for_layer(0, MHA).init(1, 8, num_kv_heads=4, head_dim=16)
  cache = XQuant(4, G).for_layer(0, GQA).init(1, 8, num_kv_heads=1, head_dim=16)
  with pytest.raises(TypeError, match=r"stores layer inputs"):
    cache.append(jnp.zeros((1, 1, 1, 16)), jnp.zeros((1, 1, 1, 16)))
  inputs = _layer_inputs(jnp.zeros((1, 6, 64)))
  cache = cache.prefill_inputs(inputs, jnp.zeros((1,), jnp.int32), None)
  with pytest.raises(ValueError, match=r"exceeds its max_len=8"):
    cache.append_inputs(inputs, None)
  with pytest.raises(ValueError, match=r"inputs.x has shape \(2, 6, 64\)"):
    cache.append_inputs(_layer_inputs(jnp.zeros((2, 6, 64))), None)
  model, params = _model(dataclasses.replace(GQA, qk_norm=True))
  caches = init_caches(model, 1, 8, cache_type=XQuant(4, G))
  with pytest.raises(ValueError, match=r"qk_norm"):
    prefill(model, params, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1,), jnp.int32), caches)
  assert isinstance(caches[0], XQuantCache)


def test_cache_config_selects_xquant():
  from experiments.cache_config import CacheConfig
  from experiments.config import ConfigError
  assert CacheConfig("xquant", bits=3, group_size=64).cache_type() == XQuant(3, 64)
  config = CacheConfig("xquant_cl", bits=2, first_bits=4, first_layers=2, group_size=64)
  assert config.cache_type() == XQuantCL(2, 4, 2, 64)
  assert config.label == "XQuant-CL-2 (first 2 @4, G=64)"
  with pytest.raises(ConfigError, match=r"invalid XQuant-CL settings.*first_bits is 5"):
    CacheConfig("xquant_cl", first_bits=5)
