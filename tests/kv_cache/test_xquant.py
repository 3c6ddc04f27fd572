"""XQuant / XQuant-CL: unquantized remat equals the fp cache, latent path equals the direct
projection, block-wise attention equals a dense remat (and its scratch does not grow like the
cache), the full-precision window follows its streaming rule, the closed-loop accumulator does not
drift, SVD factors are computed once, exact nbytes, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cache_test_utils import decode_logits

from effjax import benchmarking, nn, testing
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
from effjax.nn.rope import apply_rope

# GQA: X (64) is wider than K+V (2 * 16), so XQuant caches latents; MHA: X (32) is narrower.
GQA = nn.TransformerConfig(vocab_size=64, d_model=64, num_layers=3, num_heads=4, num_kv_heads=1,
                           d_ff=64, head_dim=16)
MHA = dataclasses.replace(GQA, d_model=32, num_heads=2, num_kv_heads=2)
G = 8


def _model(config):
  model = nn.DecoderLM(config)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize("config, cache_type, quantized", [
    # latents (auto), a 4-token window and 4-slot attention blocks
    (GQA, XQuant(16, G, residual=4, block_size=4), XQuant(2, G, residual=4, block_size=4)),
    (GQA, XQuant(16, G, latent=False), XQuant(2, G, latent=False)),
    (MHA, XQuant(16, G, block_size=4), XQuant(2, G, block_size=4)),  # X
    (GQA, XQuantCL(16, 16, group_size=G, residual=3, block_size=4),
     XQuantCL(2, 2, group_size=G, residual=3, block_size=4)),
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


def _layer_inputs(residual, kv_heads=1, head_dim=16, seed=None):
  """LayerInputs with ``x = residual`` (zero kernels, or random ones when ``seed`` is given)."""
  d_model = residual.shape[-1]
  shape = (d_model, kv_heads, head_dim)
  kernels = ([jnp.zeros(shape)] * 2 if seed is None else
             [jnp.asarray(np.random.default_rng(seed + i).standard_normal(shape) * 0.3,
                          jnp.float32) for i in range(2)])
  return LayerInputs(x=residual, residual=residual, key_kernel=kernels[0],
                     value_kernel=kernels[1], norm_scale=jnp.linspace(0.5, 1.5, d_model),
                     norm_eps=1e-5, rope_theta=1e4)


def _write_layers(caches, inputs, start, prompt_len, appends):
  """Yields ``(caches, previous, length)`` after prefilling ``prompt_len`` tokens of ``inputs``
  (one LayerInputs per layer) and after each append of ``appends[i]`` tokens, writing layer by
  layer and threading the carry as the router does (``previous[l]``: what layer l got)."""
  bounds = np.cumsum([0, prompt_len, *appends])
  cut = lambda x, a, b: x._replace(x=x.x[:, a:b], residual=x.residual[:, a:b])
  for step, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
    carry, previous = None, []
    for layer, cache in enumerate(caches):
      previous.append(carry)
      layer_inputs = cut(inputs[layer], a, b)
      caches[layer], carry = (cache.prefill_inputs(layer_inputs, start, carry) if step == 0
                              else cache.append_inputs(layer_inputs, carry))
    yield caches, previous, int(b)


def _dense_attention(cache, q, inputs, previous):
  """Unjitted reference: K and V of every slot rematerialized at once from the dequantized
  stream, then the full cache's attention."""
  z = cache.dequantize(previous)
  if cache.latent:
    (key_in, value_in), (key_up, value_up) = jnp.split(z, 2, axis=-1), cache.factors.up
  else:
    if cache.cross_layer:
      z = z * jax.lax.rsqrt(jnp.mean(z * z, -1, keepdims=True) + inputs.norm_eps)
      z = z * inputs.norm_scale
    key_in = value_in = z
    key_up, value_up = inputs.key_kernel, inputs.value_kernel
  positions = jnp.maximum(jnp.arange(cache.max_len)[None, :] - cache.start[:, None], 0)
  keys = apply_rope(jnp.einsum("btw,wkd->btkd", key_in, key_up), positions, inputs.rope_theta)
  full = FullKVCache(k=keys, v=jnp.einsum("btw,wkd->btkd", value_in, value_up),
                     start=cache.start, length=cache.length)
  return full.attend(q)


@pytest.mark.parametrize("settings, d_model, kv_heads", [
    (XQuant(4, G, block_size=8), 32, 2),  # X (MHA-like)
    (XQuant(3, G, block_size=8, residual=5), 64, 1),  # latents + window
    (XQuantCL(2, 4, first_layers=1, group_size=G, block_size=8), 32, 2),
    (XQuantCL(2, 4, first_layers=1, group_size=G, block_size=8, residual=4), 32, 2),
], ids=["x", "latent-window", "cl", "cl-window"])
def test_blockwise_attention_equals_the_dense_remat(settings, d_model, kv_heads):
  batch, max_len, appends, heads, head_dim = 2, 45, (1, 1, 3, 1), 4, 16
  config = dataclasses.replace(GQA, d_model=d_model, num_kv_heads=kv_heads, num_heads=heads)
  rng = np.random.default_rng(3)
  total = max_len - 2  # 43 tokens: 37 prefilled, 4 appends; not a multiple of the 8-slot block
  residual = jnp.asarray(np.cumsum(rng.standard_normal((2, batch, total, d_model)), 0),
                         jnp.float32)
  inputs = [_layer_inputs(residual[i], kv_heads, head_dim, seed=10 * i) for i in range(2)]
  caches = [settings.for_layer(i, config).init(batch, max_len, num_kv_heads=kv_heads,
                                               head_dim=head_dim) for i in range(2)]
  caches = [c.with_weights(x.key_kernel, x.value_kernel) for c, x in zip(caches, inputs)]
  start = jnp.asarray([0, 5], jnp.int32)  # row 1 left-padded
  *_, (caches, previous, _) = _write_layers(caches, inputs, start, total - sum(appends), appends)
  q = jnp.asarray(rng.standard_normal((batch, 3, heads, head_dim)), jnp.float32)
  for cache, x, carry in zip(caches, inputs, previous):
    assert cache.block_size == 8 and int(cache.quantized) > 8  # several blocks are read
    out = jax.jit(lambda c, q, p, x=x: c.attend_inputs(q, x, p))(cache, q, carry)
    testing.assert_close(out, _dense_attention(cache, q, x, carry), atol=2e-5, rtol=2e-5)


def test_blockwise_attention_scratch_does_not_grow_like_the_cache():
  d_model, kv_heads, heads, head_dim = 256, 2, 4, 32
  inputs = _layer_inputs(jnp.zeros((1, 1, d_model)), kv_heads, head_dim, seed=0)
  q = jnp.zeros((1, 1, heads, head_dim))

  def temp_bytes(max_len):
    cache = XQuant(4, 64, latent=False, residual=16).for_layer(0, dataclasses.replace(
        GQA, d_model=d_model, num_kv_heads=kv_heads, num_heads=heads, head_dim=head_dim)).init(
            1, max_len, num_kv_heads=kv_heads, head_dim=head_dim)
    cache = cache.replace(length=jnp.asarray(max_len, jnp.int32))
    return benchmarking.compiled_memory(lambda c, q: c.attend_inputs(q, inputs, None),
                                        cache, q).temp_bytes

  short, long = temp_bytes(1024), temp_bytes(8192)
  dense_growth = (8192 - 1024) * d_model * 4  # one float32 copy of the stream
  assert long - short < dense_growth / 16, (short, long, dense_growth)
  assert long < 8192 * d_model * 4 / 4, long


def _round_trip(z, bits):
  """Per-token quantize-dequantize of ``z [..., width]`` (what a slot leaving the window gets)."""
  codes, scale, zero = quant.quantize_groups(z, bits, axis=-1, group_size=G)
  return quant.dequantize_groups(codes, scale, zero, axis=-1, group_size=G)


@pytest.mark.parametrize("cross_layer", [False, True], ids=["x", "cl"])
def test_window_follows_the_streaming_rule(cross_layer):
  """A plain-Python model of the rule: after every write, slot j < length - R holds its value
  quantized once (XQuant-CL: the delta against the previous layer's accumulator), the last R
  slots are exact."""
  residual, bits, d_model, batch = 3, 4, 16, 2
  appends = (1, 2, 1, 4, 1)  # a 4-token append crosses the whole 3-token window
  total = 5 + sum(appends)
  rng = np.random.default_rng(4)
  h = jnp.asarray(rng.standard_normal((2, batch, total, d_model)), jnp.float32)
  config = dataclasses.replace(MHA, d_model=d_model)
  settings = (XQuantCL(bits, bits, group_size=G, residual=residual) if cross_layer
              else XQuant(bits, G, residual=residual))
  layers = 2 if cross_layer else 1
  caches = [settings.for_layer(i, config).init(batch, total + 2, num_kv_heads=1, head_dim=16)
            for i in range(layers)]
  inputs = [_layer_inputs(h[i]) for i in range(layers)]
  start = jnp.asarray([0, 2], jnp.int32)
  for stepped, previous, length in _write_layers(caches, inputs, start, 5, appends):
    # The plain model: each slot's stored value, per layer.
    quantized = max(0, length - residual)
    acc = _round_trip(h[0, :, :quantized], bits)
    if cross_layer:
      acc = acc + _round_trip(h[1, :, :quantized] - acc, bits)
    expected = jnp.concatenate([acc, h[layers - 1, :, quantized:length]], axis=1)
    got = stepped[-1].dequantize(previous[-1])[:, :length]
    testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert not np.allclose(got[:, :quantized], h[layers - 1, :, :quantized], atol=1e-3)


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
  carry, open_loop = None, 0.0
  for layer in range(layers):
    cache = settings.for_layer(layer, config).init(2, seq, num_kv_heads=1, head_dim=16)
    previous = carry
    cache, carry = cache.prefill_inputs(_layer_inputs(residual[layer]), start, previous)
    accumulator = cache.dequantize(previous)
    testing.assert_close(carry.acc, accumulator, atol=1e-6, rtol=1e-6)  # what is passed on
    # Closed loop: the accumulator is within half a step of this layer's delta quantization.
    half_step = jnp.repeat(cache.scale.astype(jnp.float32), G, axis=-1) / 2
    assert jnp.all(jnp.abs(accumulator - residual[layer]) <= half_step + 1e-5)
    # Open loop (deltas between the true streams) sums every layer's quantization error.
    delta = residual[layer] - (residual[layer - 1] if layer else 0.0)
    open_loop = open_loop + _round_trip(delta, 2)
  closed_error = float(jnp.mean(jnp.abs(accumulator - residual[-1])))
  open_error = float(jnp.mean(jnp.abs(open_loop - residual[-1])))
  assert closed_error < open_error / 2, (closed_error, open_error)


def test_latent_factors_are_computed_once_per_model_and_required():
  model, params = _model(GQA)
  first = init_caches(model, 1, 8, cache_type=XQuant(4, G), params=params)
  again = init_caches(model, 2, 16, cache_type=XQuant(2, G), params=params)
  for a, b, layer in zip(first, again, range(GQA.num_layers)):
    assert a.factors is b.factors  # memoized per weight arrays, shared by every cache
    kernel = params["params"][f"layer_{layer}"]["attention"]["key"]["kernel"]
    basis, up = xquant.latent_factors(kernel)
    testing.assert_close(a.factors.down[:, :16], basis)
    testing.assert_close(a.factors.up[0], up)
  # The factor bytes are exact (and what factor_nbytes reports before they are attached).
  bare = init_caches(model, 1, 8, cache_type=XQuant(4, G))
  assert bare[0].factors is None
  assert bare[0].factor_nbytes() == sum(x.nbytes for x in first[0].factors) == (
      64 * 32 + 2 * 16 * 16) * 4
  with pytest.raises(ValueError, match=r"no SVD factors.*params=params"):
    prefill(model, params, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1,), jnp.int32), bare)


@pytest.mark.parametrize("bits", [2, 3, 4, 16])
@pytest.mark.parametrize("residual", [0, 7])
def test_nbytes_is_exact(bits, residual):
  batch, max_len = 2, 40
  cache = XQuant(bits, G, residual=residual).for_layer(0, GQA).init(
      batch, max_len, num_kv_heads=1, head_dim=16, dtype=jnp.float16)
  width = 32  # latents: 2 * kv_heads * head_dim
  per_token = (width * 2 if bits == 16
               else -(-width // (32 // bits)) * 4 + 2 * (width // G) * 2)
  assert cache.nbytes() == batch * (max_len * per_token + residual * width * 2) + 4 * batch + 4
  assert cache.factor_nbytes() == (64 * 32 + 2 * 16 * 16) * 4
  # Slots are rounded up to a multiple of the attention block (and counted).
  padded = XQuant(bits, G, block_size=16).for_layer(0, GQA).init(
      batch, max_len, num_kv_heads=1, head_dim=16, dtype=jnp.float16)
  assert padded.nbytes() == batch * 48 * per_token + 4 * batch + 4
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
  with pytest.raises(ValueError, match=r"residual is -1"):
    XQuant(residual=-1)
  with pytest.raises(ValueError, match=r"block_size is 0"):
    XQuantCL(block_size=0)
  cache = XQuant(4, G, latent=False).for_layer(0, GQA).init(1, 8, num_kv_heads=1, head_dim=16)
  with pytest.raises(TypeError, match=r"stores layer inputs"):
    cache.append(jnp.zeros((1, 1, 1, 16)), jnp.zeros((1, 1, 1, 16)))
  inputs = _layer_inputs(jnp.zeros((1, 6, 64)))
  cache, _ = cache.prefill_inputs(inputs, jnp.zeros((1,), jnp.int32), None)
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
  from experiments.cache_config import XQuantCLConfig, XQuantConfig
  from experiments.config import ConfigError
  assert XQuantConfig(bits=3, group_size=64).cache_type() == XQuant(3, 64)
  assert XQuantConfig().cache_type() == XQuant()  # the library's defaults
  config = XQuantCLConfig(bits=2, first_bits=4, first_layers=2, group_size=64)
  assert config.cache_type() == XQuantCL(2, 4, 2, 64)
  assert config.label == "XQuant-CL-2 (first 2 @4, G=64)"
  with pytest.raises(ConfigError, match=r"invalid XQuant-CL settings.*first_bits is 5"):
    XQuantCLConfig(first_bits=5)
