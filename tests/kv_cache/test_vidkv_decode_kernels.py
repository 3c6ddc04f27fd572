"""The Pallas decode kernels over VidKV's packed cache (``pallas_kernels.kv_decode.vidkv_gpu`` and
``vidkv_tpu``) against the XLA decode path (``VidKVCache.attend``), through
``vidkv_decode_attention``.

On CPU the GPU kernel runs in Pallas' interpreter and the TPU kernel in the TPU interpreter, at
small shapes: left-padded rows (the read range starts inside a key group), splits that do not
divide the groups, a partly filled or empty residual, queries inside the quantized range (a flush
during a multi-token append: the kernels' per-row causal mask), GQA groups 1 and 3, and every key
split (``hot`` = half, a quarter, all or none of the channels, so the 1-bit FFT size is 16, 24, 0
or 32). Both kernels are also lowered for their hardware (Triton for CUDA, Mosaic for TPU) to
prove every primitive lowers; ``-m gpu`` runs the compiled Triton kernel.
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
from effjax.kv_cache import VidKV
from effjax.kv_cache.attention import vidkv_decode_attention
from pallas_kernels.interpret import interpret_mode
from pallas_kernels.kv_decode import common, tpu, vidkv_gpu, vidkv_tpu

KV_HEADS, HEAD_DIM, GROUP_SIZE, RESIDUAL = 2, 32, 16, 32


def _cache(key_bits, *, head_dim=HEAD_DIM, group_size=GROUP_SIZE, residual=RESIDUAL, **fill):
  """A VidKV cache after a left-padded prefill and one append (a flush can happen inside it)."""
  return filled_cache(VidKV(key_bits=key_bits, group_size=group_size, residual=residual),
                      kv_heads=KV_HEADS, head_dim=head_dim, **fill)


def _attend(cache, q, implementation, num_splits=None):
  """``vidkv_decode_attention`` under ``jit`` (the interpreters trace once)."""
  return jax.jit(lambda cache, q: vidkv_decode_attention(
      cache, q, implementation=implementation, num_splits=num_splits))(cache, q)


# (key_bits, GQA group, queries, max_len, prompt, appended, num_splits) -> (quantized, length):
CASES = [
    (1.5, 3, 1, 200, 150, 3, 3),  # (128, 153): 8 groups over 3 splits, residual 25 of 32
    (1.25, 1, 3, 200, 62, 3, 2),  # (64, 65): flush inside the append, queries at 62..64
    (2, 1, 2, 200, 64, 0, None),  # (64, 64): empty residual, both queries inside the prefix
    (1, 3, 1, 200, 70, 1, 2),  # (64, 71): all channels 1-bit (hot = 0)
    (1.5, 1, 2, 200, 20, 2, 2),  # (0, 22): residual only, every split sees nothing
]


def _check_kernel(implementation, key_bits, group, seq, max_len, prompt, appended, splits):
  cache = _cache(key_bits, max_len=max_len, prompt=prompt, appended=appended)
  q = cache_queries(cache, seq, group)
  expected = _attend(cache, q, "xla")
  with interpret_mode():
    out = _attend(cache, q, implementation, splits)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("key_bits, group, seq, max_len, prompt, appended, splits", CASES)
def test_gpu_kernel_matches_xla(key_bits, group, seq, max_len, prompt, appended, splits):
  _check_kernel("pallas_gpu", key_bits, group, seq, max_len, prompt, appended, splits)


@pytest.mark.parametrize("head_dim, key_bits", [(64, 1.75), (128, 1.2)])  # hot = 48, 26
def test_gpu_kernel_matches_xla_in_chunks(head_dim, key_bits):
  """The Triton kernel maps the queries 32 lanes at a time: 2 and 4 chunks, 2-bit channels
  ending inside a chunk (the zero points' masked loads) and a mask word per chunk."""
  cache = _cache(key_bits, head_dim=head_dim, max_len=120, prompt=90, appended=2)
  assert cache.k_zero.shape[-1] == round((key_bits - 1) * head_dim)
  q = cache_queries(cache, 2, 3)
  expected = _attend(cache, q, "xla")
  with interpret_mode():
    out = _attend(cache, q, "pallas_gpu", 2)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("key_bits, group, seq, max_len, prompt, appended, splits",
                         [CASES[0], CASES[1], CASES[3]])
def test_tpu_kernel_matches_xla(monkeypatch, key_bits, group, seq, max_len, prompt, appended,
                                splits):
  monkeypatch.setattr(tpu, "_TARGET_BLOCK", 8 * GROUP_SIZE)  # several blocks at a small size
  assert tpu.block_slots(256, GROUP_SIZE) == 128
  _check_kernel("pallas_tpu", key_bits, group, seq, 256, prompt, appended, splits)


def test_splits_do_not_change_the_result():
  """The log-sum-exp combination is exact: 1 split and 7 splits (some empty) agree."""
  cache = _cache(1.5, max_len=200, prompt=150, appended=3)
  q = cache_queries(cache, 2, 3)
  with interpret_mode():
    one, many = (_attend(cache, q, "pallas_gpu", n) for n in (1, 7))
  np.testing.assert_allclose(one, many, atol=1e-6, rtol=1e-6)


def test_ternary_digit_matches_base_3():
  """int32-only digit extraction, at the word range's ends (3**20 - 1 > 2**31) and inside."""
  rng = np.random.default_rng(0)
  words = np.concatenate([[0, 1, 2, 3**9, 3**10 - 1, 2**31, 3**20 - 1],
                          rng.integers(0, 3**20, 57)]).astype(np.uint64)
  digit = np.arange(common.TERNARY_PER_WORD)
  expected = (words[:, None] // 3 ** digit.astype(np.uint64)) % 3
  lo, hi = (jnp.asarray(np.broadcast_to(half[:, None], expected.shape), jnp.int32)
            for half in (words % 2**16, words // 2**16))
  np.testing.assert_array_equal(common.ternary_digit(lo, hi, jnp.asarray(digit)[None]), expected)


def test_fallbacks():
  """Off its hardware a kernel defers to the next implementation; more than R + 1 queries and a
  head_dim Triton cannot tile are XLA only; every platform's default is XLA."""
  for platform in ("cpu", "gpu", "tpu"):  # the kernels are opt-in until timed on hardware
    assert dispatch.default_order("vidkv_decode", platform) == ("xla",)
  cache = _cache(1.5, max_len=200, prompt=60, appended=0)
  q = cache_queries(cache, 1, 1)
  with pytest.raises(dispatch.NoImplementationError, match="needs a GPU"):
    _attend(cache, q, "pallas_gpu")
  np.testing.assert_array_equal(_attend(cache, q, ("pallas_gpu", "xla")), _attend(cache, q, "xla"))
  with interpret_mode(), pytest.raises(dispatch.NoImplementationError, match="R \\+ 1"):
    _attend(cache, cache_queries(cache, RESIDUAL + 2, 1), ("pallas_gpu", "pallas_tpu"))
  odd = _cache(1.5, max_len=200, prompt=60, appended=0, head_dim=24)
  with interpret_mode(), pytest.raises(dispatch.NoImplementationError, match="power of two"):
    _attend(odd, cache_queries(odd, 1, 1), "pallas_gpu")


def test_kernel_rejects_a_wrong_layout():
  cache = _cache(1.5, max_len=200, prompt=60, appended=0)
  q = cache_queries(cache, 1, 1)
  with pytest.raises(ValueError, match="k_hot"):
    vidkv_gpu.decode_partials(q, cache.k_codes, cache.k_scale, cache.k_zero, cache.k_codes,
                              cache.v_codes, cache.v_scale, cache.key_transform(), cache.start,
                              cache.quantized, cache.length - 1, hot=cache.hot_channels,
                              group_size=GROUP_SIZE, scale=1.0, interpret=True)


def _abstract_arguments(key_bits, *, batch=2, slots=4096, heads=9, head_dim=64,
                        dtype=jnp.bfloat16):
  sd = jax.ShapeDtypeStruct
  hot, kv_heads = round((key_bits - 1) * head_dim), 3
  groups = (batch, slots // 32, kv_heads)
  return (sd((batch, 1, heads, head_dim), dtype),
          sd((batch, slots, kv_heads, -(-hot // 16) + -(-(head_dim - hot) // 32)), jnp.uint32),
          sd((*groups, head_dim), jnp.float16), sd((*groups, hot), jnp.float16),
          sd((*groups, head_dim // 32), jnp.uint32),
          sd((batch, slots, -(-kv_heads * head_dim // 20)), jnp.uint32),
          sd((*groups, head_dim), jnp.float16), sd((head_dim, head_dim), jnp.float32),
          sd((batch,), jnp.int32), sd((), jnp.int32), sd((), jnp.int32)), hot


LOWERING_CASES = [(1.5, 64), (1.25, 64), (1.5, 128), (1, 64), (2, 64)]  # hot = 32, 16, 64, 0, 64


@pytest.mark.parametrize("key_bits, head_dim", LOWERING_CASES)
@EVERY_TRITON_GPU
def test_gpu_kernel_compiles(gpu_name, key_bits, head_dim):
  """The kernel compiles for an H100 (and an A100 and an L4, slow) on this CPU machine (Triton
  and ptxas, :mod:`pallas_kernels.aot`): every primitive it uses (column and scalar loads, uint32
  shifts, int32 division, float32 dots) has a Triton lowering and its tiles fit the card's
  shared memory (head_dim 128 took 218 KB before the queries were mapped in 32-lane chunks)."""
  args, hot = _abstract_arguments(key_bits, head_dim=head_dim)
  compiled = compile_for_gpu(gpu_name, lambda *a: vidkv_gpu.decode_partials(
      *a, hot=hot, group_size=32, scale=0.125), *args)
  assert 'name = "vidkv_decode' in compiled.as_text()


@pytest.mark.parametrize("key_bits, head_dim", LOWERING_CASES)
@ALL_GENERATIONS
def test_tpu_kernel_compiles(generation, key_bits, head_dim):
  """The kernel compiles for a TPU (Mosaic's own compiler from libtpu, no TPU needed): block
  shapes fit the (8, 128) tiling, every op of the body and index maps, its vector layouts and
  dtypes on that generation, and the VMEM it takes."""
  args, hot = _abstract_arguments(key_bits, head_dim=head_dim)
  compiled = compile_for_tpu(generation, lambda *a: vidkv_tpu.decode_partials(
      *a, hot=hot, group_size=32, scale=0.125), *args)
  assert kernel_calls(compiled) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("key_bits", [1.5, 2])
def test_gpu_kernel_compiled(key_bits):
  """The compiled Triton kernel (default splits) against XLA, SmolLM2's head geometry and the
  paper's G = 32, R = 128."""
  cache = _cache(key_bits, max_len=4096, prompt=3000, appended=5, head_dim=64, group_size=32,
                 residual=128)
  q = cache_queries(cache, 1, 3)
  expected = _attend(cache, q, "xla")
  out = _attend(cache, q, "pallas_gpu")
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)
