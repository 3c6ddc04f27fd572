"""``xquant_decode_attention`` over XQuant's quantized stream through the shared decode test base:
the kernels of ``pallas_kernels.kv_decode.xquant`` (keys rematerialized and rotated in-kernel)
against the XLA path and the float32 reference, latent and X streams at 2, 3 and 4 bits, with and
without a full-precision window; the model's decode step through the kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from kv_decode_test_base import KVDecodeTestBase, Problem, case

from effjax import dispatch
from effjax.kv_cache import LayerInputs, XQuant, XQuantCL
from effjax.models import extend, init_caches, prefill
from effjax.nn import DecoderLM, TransformerConfig
from effjax.ops.kv_decode import xquant_decode_attention
from pallas_kernels.interpret import interpret_mode
from pallas_kernels.kv_decode.xquant import pallas_gpu, pallas_tpu

KV_HEADS = 2


class TestXQuant(KVDecodeTestBase):
  op = staticmethod(xquant_decode_attention)
  op_name = kernel_name = "xquant_decode"
  # Quantized prefixes length - R: 103 of 128 slots (3 splits), 0 (the window is not full: the
  # kernel sees nothing), 93 (slots of 16), 70 (the last 3 quantized slots are the queries':
  # causal in the kernel), 108 (3 bits: 10 codes a word, so words straddle the latents and G).
  gpu_cases = [
      case(120, 100, 3, group=3, num_splits=3, bits=4, latent=True, residual=0),
      case(120, 3, 2, num_splits=2, dtype="bfloat16", bits=2, latent=True, residual=8),
      case(120, 95, 4, seq=2, num_splits=5, block_slots=16, bits=4, latent=False, residual=6),
      case(100, 67, 3, seq=3, group=3, dtype="float16", bits=2, latent=False, residual=0),
      case(150, 110, 2, group=3, num_splits=2, bits=3, latent=True, residual=4),
  ]
  # 5 blocks of 32 slots over 3 splits (steps past a split's share); an X stream with a window.
  tpu_cases = [
      case(160, 150, 3, group=3, num_splits=3, block_slots=32, bits=2, latent=True, residual=0,
           block_size=160),
      case(160, 90, 1, seq=2, block_slots=32, dtype="bfloat16", bits=4, latent=False,
           residual=5, block_size=160),
  ]
  splits_case = gpu_cases[0]
  gpu_lowerings = [(2, True), (4, False), (3, False)]  # (bits, latent)
  tpu_lowerings = [(2, True), (4, False)]
  compiled_cases = [case(4096, 3000, 5, group=3, head_dim=64, bits=bits, latent=latent,
                         residual=16, d_model=576, group_size=64, block_size=256, kv_heads=3)
                    for bits, latent in ((4, True), (2, True), (4, False))]

  def problem(self, case, cache_type=XQuant, seed=0):
    """An XQuant cache of one layer after a left-padded prefill of ``prompt`` random inputs (an
    outlier channel) and an append of ``appended``; the extra argument is the last token's
    :class:`LayerInputs`, carrying the layer's random weights and RoPE settings."""
    latent, kv_heads = case.get("latent"), case.get("kv_heads", KV_HEADS)
    d_model = case.get("d_model", 96 if latent else 80)
    rng = np.random.default_rng(seed)
    kernels = [jnp.asarray(rng.standard_normal((d_model, kv_heads, case.head_dim)) * d_model**-0.5,
                           jnp.float32) for _ in range(2)]
    start = (0, 5)
    x = jnp.asarray(rng.standard_normal((len(start), case.prompt + case.appended, d_model)),
                    jnp.float32).at[..., 3].mul(6.0)
    config = TransformerConfig(vocab_size=1, d_model=d_model, num_layers=1, num_heads=kv_heads,
                               num_kv_heads=kv_heads, d_ff=1, head_dim=case.head_dim)
    options = {"group_size": case.get("group_size", 16), "residual": case.get("residual"),
               "block_size": case.get("block_size", 64)}
    settings = (XQuant(case.get("bits"), latent=latent, **options) if cache_type is XQuant
                else cache_type(case.get("bits"), case.get("bits"), **options))
    cache = settings.for_layer(0, config).init(
        len(start), case.max_len, num_kv_heads=kv_heads, head_dim=case.head_dim,
        dtype=jnp.dtype(case.dtype)).with_weights(*kernels)

    def inputs(x):
      return LayerInputs(x=x, residual=x, key_kernel=kernels[0], value_kernel=kernels[1],
                         norm_scale=jnp.linspace(0.5, 1.5, d_model), norm_eps=1e-5,
                         rope_theta=1e4)

    @jax.jit
    def fill(cache, x):
      cache, _ = cache.prefill_inputs(inputs(x[:, :case.prompt]), jnp.asarray(start, jnp.int32),
                                      None)
      return cache.append_inputs(inputs(x[:, case.prompt:]), None)[0] if case.appended else cache

    q = jax.random.normal(jax.random.PRNGKey(1),
                          (len(start), case.seq, kv_heads * case.group, case.head_dim),
                          jnp.dtype(case.dtype))
    return Problem(fill(cache, x), q, (inputs(x[:, -1:]),))

  def unserved(self):
    kernels = ("pallas_gpu", "pallas_tpu")
    unquantized = self.problem(case(64, 20, 0, bits=16, latent=False, residual=0))
    cross_layer = self.problem(case(64, 20, 0, bits=2, latent=False, residual=0), XQuantCL)
    odd = self.problem(case(64, 20, 0, head_dim=24, bits=4, latent=False, residual=0))
    return [(unquantized, kernels, "XLA only"), (cross_layer, kernels, "XLA only"),
            (odd, "pallas_gpu", "head_dim / 2")]

  def wrong_layout(self):
    cache, q, _ = self.problem(case(64, 20, 0, bits=4, latent=True, residual=0))
    return (lambda: pallas_gpu.decode_partials(
        q, cache.codes[..., :-1], cache.scale, cache.zero, cache.factors.up[0],
        jnp.ones((q.shape[-1] // 2,)), cache.start, jnp.int32(20), jnp.int32(20), bits=4,
        group_size=16, key_channels=(0, 64), value_channels=(64, 128), scale=1.0,
        interpret=True)), "codes"

  def abstract_call(self, lowering, platform):
    """SmolLM2's geometry: 9 heads, 3 kv heads, head_dim 64, stream 384 (latents) or 576 (X)."""
    bits, latent = lowering
    batch, slots, sd = 2, 4096, jax.ShapeDtypeStruct
    width = 384 if latent else 576
    groups = (batch, slots, width // 64)
    channels = ({"key_channels": (0, 192), "value_channels": (192, 384)} if latent else
                {"key_channels": (0, 576), "value_channels": (0, 576)})
    kernel = {"gpu": pallas_gpu, "tpu": pallas_tpu}[platform]
    return (lambda *a: kernel.decode_partials(*a, bits=bits, group_size=64, scale=0.125,
                                              **channels),
            (sd((batch, 1, 9, 64), jnp.bfloat16),
             sd((batch, slots, -(-width // (32 // bits))), jnp.uint32), sd(groups, jnp.float16),
             sd(groups, jnp.float16), sd((192 if latent else 576, 3, 64), jnp.float32),
             sd((32,), jnp.float32), sd((batch,), jnp.int32), sd((), jnp.int32),
             sd((), jnp.int32)))

  def test_model_decode_uses_the_kernel(self, monkeypatch):
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
