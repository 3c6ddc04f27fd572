"""The fused XQuant decode kernels (``pallas_kernels.kv_decode.xquant_gpu`` / ``xquant_tpu``: keys
rematerialized and rotated in-kernel) against the XLA path (``blockwise_decode_attention``),
through ``xquant_decode_attention``.

On CPU the GPU kernel runs in Pallas' interpreter and the TPU kernel in the TPU interpreter, at
small shapes: filled prefixes not a multiple of G, of the kernel block or of the split count,
left-padded rows, no window and a partly filled one, GQA groups 1 and 3, one and several queries
(causal inside the kernel), latent and X streams, 2, 3 and 4 bits. Both kernels are also lowered
for their hardware (Triton for CUDA, Mosaic for TPU). ``-m gpu`` runs the compiled Triton kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aot_compile import (
    ALL_GENERATIONS,
    EVERY_TRITON_GPU,
    compile_for_gpu,
    compile_for_tpu,
    kernel_calls,
)

from effjax import dispatch
from effjax.kv_cache import LayerInputs, XQuant, XQuantCL
from effjax.kv_cache.xquant import xquant_decode_attention
from effjax.models import extend, init_caches, prefill
from effjax.nn import DecoderLM, TransformerConfig
from pallas_kernels.interpret import interpret_mode
from pallas_kernels.kv_decode import xquant_gpu, xquant_tpu

KV_HEADS, HEAD_DIM = 2, 32


def _cache(bits, *, latent, residual, max_len, prompt, appended, d_model=96, group_size=16,
           block_size=64, start=(0, 5), kv_heads=KV_HEADS, head_dim=HEAD_DIM, cache_type=XQuant,
           seed=0):
  """``(cache, inputs)``: an XQuant cache of one layer after a left-padded prefill of ``prompt``
  random inputs and an append of ``appended``; ``inputs`` (the last token's) carries the layer's
  random weights and RoPE settings."""
  rng = np.random.default_rng(seed)
  kernels = [jnp.asarray(rng.standard_normal((d_model, kv_heads, head_dim)) * d_model**-0.5,
                         jnp.float32) for _ in range(2)]
  x = jnp.asarray(rng.standard_normal((len(start), prompt + appended, d_model)), jnp.float32)
  x = x.at[..., 3].mul(6.0)  # an outlier channel
  config = TransformerConfig(vocab_size=1, d_model=d_model, num_layers=1, num_heads=kv_heads,
                             num_kv_heads=kv_heads, d_ff=1, head_dim=head_dim)
  settings = (cache_type(bits, group_size=group_size, latent=latent, residual=residual,
                         block_size=block_size) if cache_type is XQuant else
              cache_type(bits, bits, group_size=group_size, residual=residual,
                         block_size=block_size))
  cache = settings.for_layer(0, config).init(len(start), max_len, num_kv_heads=kv_heads,
                                             head_dim=head_dim).with_weights(*kernels)
  inputs = lambda x: LayerInputs(x=x, residual=x, key_kernel=kernels[0], value_kernel=kernels[1],
                                 norm_scale=jnp.linspace(0.5, 1.5, d_model), norm_eps=1e-5,
                                 rope_theta=1e4)

  @jax.jit
  def fill(cache, x):
    cache, _ = cache.prefill_inputs(inputs(x[:, :prompt]), jnp.asarray(start, jnp.int32), None)
    return cache.append_inputs(inputs(x[:, prompt:]), None)[0] if appended else cache

  return fill(cache, x), inputs(x[:, -1:])


def _attend(cache, q, inputs, implementation, num_splits=None):
  """``xquant_decode_attention`` under ``jit`` (the interpreters trace once); the weights are
  closed over (RoPE's theta is static)."""
  return jax.jit(lambda cache, q: xquant_decode_attention(
      cache, q, inputs, implementation=implementation, num_splits=num_splits))(cache, q)


def _queries(seq, group, batch=2, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, seq, KV_HEADS * group, HEAD_DIM))


# (bits, latent, R, GQA group, queries, max_len, prompt, appended, splits): quantized prefixes
# length - R = 103 (of 128 slots), 0 (the window is not full: the kernel sees nothing), 93, 70
# (the last 3 quantized slots are the queries': causal in the kernel), 108 (3 bits: 10 codes a
# word, so words straddle the latents and G).
GPU_CASES = [
    (4, True, 0, 3, 1, 120, 100, 3, 3),
    (2, True, 8, 1, 1, 120, 3, 2, 2),
    (4, False, 6, 1, 2, 120, 95, 4, 5),
    (2, False, 0, 3, 3, 100, 67, 3, None),
    (3, True, 4, 3, 1, 150, 110, 2, 2),
]


@pytest.mark.parametrize("bits, latent, residual, group, seq, max_len, prompt, appended, splits",
                         GPU_CASES)
def test_gpu_kernel_matches_xla(bits, latent, residual, group, seq, max_len, prompt, appended,
                                splits):
  cache, inputs = _cache(bits, latent=latent, residual=residual, max_len=max_len, prompt=prompt,
                         appended=appended, d_model=96 if latent else 80)
  q = _queries(seq, group)
  expected = _attend(cache, q, inputs, "xla")
  with interpret_mode():
    out = _attend(cache, q, inputs, "pallas_gpu", splits)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
  assert np.abs(expected).max() > 0.1  # not a trivially zero attention


@pytest.mark.parametrize("bits, latent, residual, group, seq, prompt, appended, splits", [
    (2, True, 0, 3, 1, 150, 3, 3),  # 5 blocks of 32 slots, 3 splits: steps past a split's share
    (4, False, 5, 1, 2, 90, 1, None),
])
def test_tpu_kernel_matches_xla(monkeypatch, bits, latent, residual, group, seq, prompt, appended,
                                splits):
  monkeypatch.setattr(xquant_tpu, "_TARGET_BLOCK", 32)  # several blocks at a small size
  cache, inputs = _cache(bits, latent=latent, residual=residual, max_len=160, prompt=prompt,
                         appended=appended, d_model=96 if latent else 80, block_size=160)
  assert xquant_tpu.block_slots(cache.codes.shape[1]) == 32
  q = _queries(seq, group)
  expected = _attend(cache, q, inputs, "xla")
  with interpret_mode():
    out = _attend(cache, q, inputs, "pallas_tpu", splits)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


def test_model_decode_uses_the_kernel(monkeypatch):
  """``extend`` (the model's decode step) attends through op ``"xquant_decode"``: with the TPU
  kernel as the only CPU implementation, decoding matches the XLA path."""
  config = TransformerConfig(vocab_size=64, d_model=64, num_layers=1, num_heads=4,
                             num_kv_heads=2, d_ff=64, head_dim=16)
  model = DecoderLM(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
  start = jnp.asarray([0, 3], jnp.int32)

  def decode(tokens):
    caches = init_caches(model, 2, 16, cache_type=XQuant(4, 16, residual=2, block_size=8),
                         params=params)
    _, caches = prefill(model, params, tokens[:, :10], start, caches)
    logits = []
    for i in (10, 11):
      step, caches = extend(model, params, tokens[:, i:i + 1], (i - start)[:, None], caches)
      logits.append(step)
    return jnp.concatenate(logits, axis=1)

  expected = jax.jit(lambda tokens: decode(tokens))(tokens)  # a fresh trace each time
  monkeypatch.setitem(dispatch.DEFAULT_ORDER, "xquant_decode", {"cpu": ("pallas_tpu",)})
  with interpret_mode():
    out = jax.jit(lambda tokens: decode(tokens))(tokens)
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_fallbacks():
  """Off its hardware a kernel defers to the next implementation; XQuant-CL (accumulator rebuilt
  from earlier layers) and 16 bits are XLA only; every platform's default is XLA."""
  for platform in ("cpu", "gpu", "tpu"):  # the kernels are opt-in until timed on hardware
    assert dispatch.default_order("xquant_decode", platform) == ("xla",)
  cache, inputs = _cache(4, latent=True, residual=0, max_len=64, prompt=20, appended=0)
  q = _queries(1, 1)
  with pytest.raises(dispatch.NoImplementationError, match="needs a GPU"):
    _attend(cache, q, inputs, "pallas_gpu")
  np.testing.assert_array_equal(_attend(cache, q, inputs, ("pallas_gpu", "xla")),
                                _attend(cache, q, inputs, "xla"))
  for bits, cache_type in ((16, XQuant), (2, XQuantCL)):
    other, inputs = _cache(bits, latent=False, residual=0, max_len=64, prompt=20, appended=0,
                           cache_type=cache_type)
    with interpret_mode(), pytest.raises(dispatch.NoImplementationError, match="XLA only"):
      _attend(other, q, inputs, ("pallas_gpu", "pallas_tpu"))


def test_gpu_kernel_needs_power_of_two_half_heads():
  cache, inputs = _cache(4, latent=False, residual=0, max_len=64, prompt=20, appended=0,
                         head_dim=24)
  q = jnp.zeros((2, 1, KV_HEADS, 24))
  with interpret_mode(), pytest.raises(dispatch.NoImplementationError, match="head_dim / 2"):
    _attend(cache, q, inputs, "pallas_gpu")


def test_kernel_rejects_a_wrong_layout():
  cache, inputs = _cache(4, latent=True, residual=0, max_len=64, prompt=20, appended=0)
  with pytest.raises(ValueError, match="codes"):
    xquant_gpu.decode_partials(
        _queries(1, 1), cache.codes[..., :-1], cache.scale, cache.zero, cache.factors.up[0],
        jnp.ones((HEAD_DIM // 2,)), cache.start, jnp.int32(20), jnp.int32(20), bits=4,
        group_size=16, key_channels=(0, 64), value_channels=(64, 128), scale=1.0, interpret=True)


def _abstract_arguments(bits, latent, *, batch=2, slots=4096, dtype=jnp.bfloat16):
  """SmolLM2's geometry: 9 heads, 3 kv heads, head_dim 64, stream 384 (latents) or 576 (X)."""
  sd = jax.ShapeDtypeStruct
  width = 384 if latent else 576
  groups = (batch, slots, width // 64)
  return (sd((batch, 1, 9, 64), dtype), sd((batch, slots, -(-width // (32 // bits))), jnp.uint32),
          sd(groups, jnp.float16), sd(groups, jnp.float16),
          sd((192 if latent else 576, 3, 64), jnp.float32), sd((32,), jnp.float32),
          sd((batch,), jnp.int32), sd((), jnp.int32), sd((), jnp.int32))


def _channels(latent):
  return {"key_channels": (0, 192), "value_channels": (192, 384)} if latent else {
      "key_channels": (0, 576), "value_channels": (0, 576)}


@pytest.mark.parametrize("bits, latent", [(2, True), (4, False), (3, False)])
@EVERY_TRITON_GPU
def test_gpu_kernel_compiles(gpu_name, bits, latent):
  """The kernel compiles for an H100 (and an A100 and an L4, slow) on this CPU machine (Triton
  and ptxas, :mod:`pallas_kernels.aot`): masked tile loads past the words, uint32 shifts, the
  per-code-position matmuls (a loop: unrolled, the 576-wide X stream's weight tiles took 408 KB
  of shared memory), sin/cos and dynamic-bound loops lower, and the tiles fit the card."""
  compiled = compile_for_gpu(gpu_name, lambda *a: xquant_gpu.decode_partials(
      *a, bits=bits, group_size=64, scale=0.125, **_channels(latent)),
                             *_abstract_arguments(bits, latent))
  assert 'name = "xquant_decode' in compiled.as_text()


@pytest.mark.parametrize("bits, latent", [(2, True), (4, False)])
@ALL_GENERATIONS
def test_tpu_kernel_compiles(generation, bits, latent):
  """Mosaic's own compiler takes the kernel (libtpu, no TPU) at SmolLM2's geometry, latent and
  X streams: float16 scales as bits, the dequantized tiles in VMEM scratch, looped kv heads."""
  compiled = compile_for_tpu(generation, lambda *a: xquant_tpu.decode_partials(
      *a, bits=bits, group_size=64, scale=0.125, **_channels(latent)),
                             *_abstract_arguments(bits, latent))
  assert kernel_calls(compiled) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("bits, latent", [(4, True), (2, True), (4, False)])
def test_gpu_kernel_compiled(bits, latent):
  """The compiled Triton kernel (default splits) against XLA, SmolLM2's geometry (latents of
  width 384 or the 576-wide X, 3 kv heads of 64, G = 64)."""
  cache, inputs = _cache(bits, latent=latent, residual=16, max_len=4096, prompt=3000,
                         appended=5, d_model=576, group_size=64, block_size=256, kv_heads=3,
                         head_dim=64)
  q = jax.random.normal(jax.random.PRNGKey(1), (2, 1, 9, 64))
  expected = _attend(cache, q, inputs, "xla")
  out = _attend(cache, q, inputs, "pallas_gpu")
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_bytes_read_per_slot():
  """What the docstrings claim the kernels read per slot (codes + float16 scales/zeros): 216 and
  120 bytes for SmolLM2's latent stream at 4 and 2 bits, G = 64, vs 768 for float16 K/V."""
  config = TransformerConfig(vocab_size=1, d_model=576, num_layers=1, num_heads=9, num_kv_heads=3,
                             d_ff=1, head_dim=64)
  for bits, expected in ((4, 216), (2, 120)):
    cache = XQuant(bits, 64).for_layer(0, config).init(1, 256, num_kv_heads=3, head_dim=64)
    assert cache.latent
    read = sum(x.nbytes for x in (cache.codes, cache.scale, cache.zero))
    assert read / cache.codes.shape[1] == expected
