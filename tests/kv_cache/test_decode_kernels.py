"""The Pallas decode kernels over KIVI's packed cache (``pallas_kernels.kv_decode``) against the
XLA decode path (``KIVICache.attend``), through ``kivi_decode_attention``.

On CPU the GPU kernel runs in Pallas' interpreter and the TPU kernel in the TPU interpreter, at
small shapes where the filled prefix is not a multiple of the key group, the block or the split
count, rows are left-padded and the residual window is partly filled; both kernels are also
lowered for their hardware (Triton for CUDA, Mosaic for TPU) to prove every primitive lowers.
``-m gpu`` runs the compiled Triton kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cache_test_utils import cache_queries, filled_cache
from aot_compile import (
    ALL_GENERATIONS,
    EVERY_TRITON_GPU,
    compile_for_gpu,
    compile_for_tpu,
    kernel_calls,
)

from effjax import dispatch
from effjax.kv_cache import KIVI
from effjax.kv_cache.attention import kivi_decode_attention
from pallas_kernels.interpret import interpret_mode
from pallas_kernels.kv_decode import common, gpu, tpu

KV_HEADS, HEAD_DIM, GROUP_SIZE, RESIDUAL = 2, 32, 16, 32


def _cache(bits, value_bits, *, head_dim=HEAD_DIM, group_size=GROUP_SIZE, **fill):
  """A KIVI cache after a left-padded prefill of ``prompt`` tokens and ``appended`` decode steps."""
  return filled_cache(KIVI(bits=bits, value_bits=value_bits, group_size=group_size,
                           residual=RESIDUAL), kv_heads=KV_HEADS, head_dim=head_dim, **fill)


def _attend(cache, q, implementation, num_splits=None):
  """``kivi_decode_attention`` under ``jit`` (the interpreters trace once)."""
  return jax.jit(lambda cache, q: kivi_decode_attention(
      cache, q, implementation=implementation, num_splits=num_splits))(cache, q)


# (bits, value_bits, GQA group, queries, max_len, prompt, appended, num_splits): filled prefix
# lengths length - R - 1 = 120, 0 (residual only), 143, 369.
GPU_CASES = [
    (2, 2, 3, 1, 200, 150, 3, 3),
    (4, 4, 1, 1, 200, 20, 2, 2),
    (4, 2, 1, 2, 200, 170, 6, 5),
    (2, 4, 3, 1, 500, 400, 2, None),
]


@pytest.mark.parametrize("bits, value_bits, group, seq, max_len, prompt, appended, splits",
                         GPU_CASES)
def test_gpu_kernel_matches_xla(bits, value_bits, group, seq, max_len, prompt, appended, splits):
  cache = _cache(bits, value_bits, max_len=max_len, prompt=prompt, appended=appended)
  q = cache_queries(cache, seq, group)
  expected = _attend(cache, q, "xla")
  with interpret_mode():
    out = _attend(cache, q, "pallas_gpu", splits)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bits, value_bits, group, seq, prompt, appended, splits", [
    (2, 2, 3, 1, 420, 3, 3),  # 4 blocks of 128 slots, 3 splits: steps past a split's share
    (4, 2, 1, 2, 30, 1, None),  # residual only: every split sees nothing
])
def test_tpu_kernel_matches_xla(monkeypatch, bits, value_bits, group, seq, prompt, appended,
                                splits):
  monkeypatch.setattr(tpu, "_TARGET_BLOCK", 8 * GROUP_SIZE)  # several blocks at a small size
  cache = _cache(bits, value_bits, max_len=512, prompt=prompt, appended=appended)
  assert tpu.block_slots(cache.k_codes.shape[1], GROUP_SIZE) == 128
  q = cache_queries(cache, seq, group)
  expected = _attend(cache, q, "xla")
  with interpret_mode():
    out = _attend(cache, q, "pallas_tpu", splits)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


def test_float16_bits_decode_exactly():
  """The TPU kernels' float16 decoding (integer ops on the uint16 bits) equals numpy's float16 ->
  float32 bit for bit on all 65536 patterns: subnormals, +-0, +-inf and NaN payloads included."""
  bits = np.arange(1 << 16, dtype=np.uint16)
  decoded = jax.jit(tpu.float16_to_float32)(tpu.float16_bits(jnp.asarray(bits.view(np.float16))))
  np.testing.assert_array_equal(np.asarray(decoded).view(np.uint32),
                                bits.view(np.float16).astype(np.float32).view(np.uint32))
  assert tpu.as_float32(jnp.ones(2, jnp.bfloat16)).dtype == jnp.float32


def test_splits_do_not_change_the_result():
  """The log-sum-exp combination is exact: 1 split and 7 splits (some empty) agree."""
  cache = _cache(2, 2, max_len=200, prompt=150, appended=3)
  q = cache_queries(cache, 1, 3)
  with interpret_mode():
    one, many = (_attend(cache, q, "pallas_gpu", n) for n in (1, 7))
  np.testing.assert_allclose(one, many, atol=1e-6, rtol=1e-6)


def test_combine_of_parts_is_attention_over_their_union():
  rng = np.random.default_rng(0)
  logits, values = rng.normal(size=(2, 12)), rng.normal(size=(2, 12, 4))
  parts = np.split(np.arange(12), [5, 5, 9])  # one empty part
  outs, lses = [], []
  for part in parts:
    weights = np.exp(logits[:, part])
    outs.append((weights[..., None] * values[:, part]).sum(1)
                / np.maximum(weights.sum(1), 1e-30)[:, None])
    lses.append(np.log(weights.sum(1)) if len(part) else np.full(2, -np.inf))
  combined = common.combine(jnp.stack(outs, 1), jnp.stack(lses, 1))
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  np.testing.assert_allclose(combined, (probs[..., None] * values).sum(1), rtol=1e-5)


def test_fallbacks():
  """Off its hardware a kernel defers to the next implementation; 16-bit (unquantized) caches
  and more than R + 1 queries are XLA only; every platform's default is XLA."""
  for platform in ("cpu", "gpu", "tpu"):  # the kernels are opt-in until timed on hardware
    assert dispatch.default_order("kivi_decode", platform) == ("xla",)
  cache = _cache(2, 2, max_len=200, prompt=60, appended=0)
  q = cache_queries(cache, 1, 1)
  with pytest.raises(dispatch.NoImplementationError, match="needs a GPU"):
    _attend(cache, q, "pallas_gpu")
  np.testing.assert_array_equal(_attend(cache, q, ("pallas_gpu", "xla")), _attend(cache, q, "xla"))
  full = _cache(16, 16, max_len=200, prompt=60, appended=0)
  with interpret_mode(), pytest.raises(dispatch.NoImplementationError, match="quantized"):
    _attend(full, q, ("pallas_gpu", "pallas_tpu"))


def test_kernel_rejects_a_wrong_layout():
  cache = _cache(2, 2, max_len=200, prompt=60, appended=0)
  q = cache_queries(cache, 1, 1)
  with pytest.raises(ValueError, match="k_codes"):
    gpu.decode_partials(q, cache.v_codes[..., :1], cache.k_scale, cache.k_zero, cache.v_codes,
                        cache.v_scale, cache.v_zero, cache.start, jnp.int32(0), key_bits=2,
                        value_bits=2, group_size=GROUP_SIZE, scale=1.0, interpret=True)


def _abstract_arguments(bits, *, batch=2, slots=4096, heads=9, head_dim=64, dtype=jnp.bfloat16):
  sd = jax.ShapeDtypeStruct
  words, groups = head_dim // (32 // bits), head_dim // 32
  return (sd((batch, 1, heads, head_dim), dtype), sd((batch, slots, 3, words), jnp.uint32),
          sd((batch, slots // 32, 3, head_dim), jnp.float16),
          sd((batch, slots // 32, 3, head_dim), jnp.float16),
          sd((batch, slots, 3, words), jnp.uint32), sd((batch, slots, 3, groups), jnp.float16),
          sd((batch, slots, 3, groups), jnp.float16), sd((batch,), jnp.int32),
          sd((), jnp.int32))


@pytest.mark.parametrize("bits, head_dim", [(2, 64), (4, 128)])
@EVERY_TRITON_GPU
def test_gpu_kernel_compiles(gpu_name, bits, head_dim):
  """The kernel compiles for an H100 (and an A100 and an L4, slow) on this CPU machine (Triton
  and ptxas, :mod:`pallas_kernels.aot`): every primitive it uses (strided column loads, uint32
  shifts, dynamic-bound loops) has a Triton lowering and its tiles fit the card."""
  compiled = compile_for_gpu(gpu_name, lambda *a: gpu.decode_partials(
      *a, key_bits=bits, value_bits=bits, group_size=32, scale=0.125),
                             *_abstract_arguments(bits, head_dim=head_dim))
  assert 'name = "kivi_decode' in compiled.as_text()


@pytest.mark.parametrize("bits, head_dim", [(2, 64), (4, 128)])
@ALL_GENERATIONS
def test_tpu_kernel_compiles(generation, bits, head_dim):
  """The kernel compiles for a TPU (Mosaic's own compiler from libtpu, no TPU needed): block
  shapes fit the (8, 128) tiling, every op of the body and index maps, its vector layouts and
  dtypes on that generation, and the VMEM it takes."""
  compiled = compile_for_tpu(generation, lambda *a: tpu.decode_partials(
      *a, key_bits=bits, value_bits=bits, group_size=32, scale=0.125),
                             *_abstract_arguments(bits, head_dim=head_dim))
  assert kernel_calls(compiled) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4])
def test_gpu_kernel_compiled(bits):
  """The compiled Triton kernel (default splits) against XLA, SmolLM2's head geometry."""
  cache = _cache(bits, bits, max_len=4096, prompt=3000, appended=5, head_dim=64, group_size=32)
  q = cache_queries(cache, 1, 3)
  expected = _attend(cache, q, "xla")
  out = _attend(cache, q, "pallas_gpu")
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)
