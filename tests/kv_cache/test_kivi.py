"""KIVI: streaming rules vs a plain-Python model of the paper, error bounds, blockwise attention
against attention over the dequantized cache, the unquantized mode against FullKVCache, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cache_test_utils import decode_logits, outlier_normal, tiny_model

from effjax import testing
from effjax.kv_cache import KIVI, FullKVCache, KIVICache, KVCache, kivi

BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 6, 2, 16
G, R = 4, 8
MAX_LEN = 48  # one cache size for most tests, so their jitted functions compile once

_append = jax.jit(lambda cache, k, v: cache.append(k, v))
_attend = jax.jit(lambda cache, q: cache.attend(q))
_dequantize = jax.jit(lambda cache: cache.dequantize())


@pytest.fixture(autouse=True)
def small_decode_blocks(monkeypatch):
  # Blocks of 8 slots, so the blockwise loop of attend runs several iterations at test sizes.
  monkeypatch.setattr(kivi, "DECODE_BLOCK_TOKENS", 8)


def _paper_counts(prompt_len, steps, residual):
  """KIVI's rules (models/llama_kivi.py), as plain Python: after prefill, keys of the largest
  multiple of R tokens and values of all but the last R are quantized; each decoding step adds
  the token to both full-precision buffers, attends, then quantizes the key residual if it holds
  R keys and the oldest value if the window holds more than R. Returns, per step, the number of
  full-precision keys and values the step's attention sees."""
  keys_fp, values_fp = prompt_len % residual, min(prompt_len, residual)
  seen = []
  for _ in range(steps):
    keys_fp, values_fp = keys_fp + 1, values_fp + 1
    seen.append((keys_fp, values_fp))
    if keys_fp == residual:
      keys_fp = 0
    if values_fp > residual:
      values_fp -= 1
  return seen


def _run(bits, prompt_len, steps, *, start=(0, 3), max_len=MAX_LEN, seed=0, value_bits=None):
  total = prompt_len + steps
  k, v = (outlier_normal(s, BATCH, total, KV_HEADS, HEAD_DIM) for s in (seed, seed + 1))
  cache = KIVI(bits, G, R, value_bits).init(BATCH, max_len, num_kv_heads=KV_HEADS,
                                            head_dim=HEAD_DIM)
  cache = cache.prefill(k[:, :prompt_len], v[:, :prompt_len], jnp.asarray(start, jnp.int32))
  counts = []
  for t in range(prompt_len, total):
    cache = _append(cache, k[:, t:t + 1], v[:, t:t + 1])
    counts.append((int(cache.length - cache.k_quantized), int(cache.length - cache.v_quantized)))
  return cache, k, v, counts


def test_kivi_implements_the_interface():
  assert issubclass(KIVICache, KVCache)
  assert isinstance(KIVI().init(1, 8, num_kv_heads=1, head_dim=32), KIVICache)


@pytest.mark.parametrize("prompt_len", [3, 13, 16])
def test_streaming_follows_the_papers_rules(prompt_len):
  steps = 3 * R + 2
  cache, _, _, counts = _run(2, prompt_len, steps)
  assert counts == _paper_counts(prompt_len, steps, R)
  # Flush boundaries: the quantized key prefix is always whole R-blocks.
  assert int(cache.k_quantized) % R == 0 and int(cache.length) == prompt_len + steps


def test_prefill_quantizes_all_but_the_residual():
  cache, _, _, _ = _run(2, 21, 0)
  assert (int(cache.k_quantized), int(cache.v_quantized)) == (16, 13)


@pytest.mark.parametrize("bits, value_bits", [(2, None), (3, None), (4, 2)])
def test_quantized_slots_within_half_a_step_and_residual_exact(bits, value_bits):
  cache, k, v, _ = _run(bits, 13, 2 * R + 3, value_bits=value_bits)
  assert (cache.key_bits, cache.value_bits) == (bits, value_bits or bits)
  k_hat, v_hat = map(np.asarray, _dequantize(cache))
  k, v = np.asarray(k), np.asarray(v)
  nk, nv, length = int(cache.k_quantized), int(cache.v_quantized), int(cache.length)
  real = np.arange(length)[None, :] >= np.asarray(cache.start)[:, None]  # [batch, slots]
  k_half = np.repeat(np.asarray(cache.k_scale, np.float32), G, axis=1)[:, :nk] / 2
  v_half = np.repeat(np.asarray(cache.v_scale, np.float32), G, axis=-1)[:, :nv] / 2
  k_err, v_err = np.abs(k_hat[:, :nk] - k[:, :nk]), np.abs(v_hat[:, :nv] - v[:, :nv])
  assert np.all((k_err <= k_half * (1 + 1e-5) + 1e-6)[real[:, :nk]])
  assert np.all(v_err <= v_half * (1 + 1e-5) + 1e-6)
  assert k_err[real[:, :nk]].max() > 0.1 * k_half.max()  # really quantized
  np.testing.assert_array_equal(k_hat[:, nk:length], k[:, nk:length])
  np.testing.assert_array_equal(v_hat[:, nv:length], v[:, nv:length])


def test_appending_several_tokens_equals_appending_them_one_by_one():
  cache, k, v, _ = _run(2, 13, 0)
  at_once = _append(cache, k[:, :12], v[:, :12])
  one_by_one = cache
  for t in range(12):
    one_by_one = _append(one_by_one, k[:, t:t + 1], v[:, t:t + 1])
  jax.tree.map(np.testing.assert_array_equal, at_once, one_by_one)


def _dense_attention(q, k, v, start, length):
  """Attention over explicit K/V (FullKVCache's, itself tested against jax.nn)."""
  full = FullKVCache.init(BATCH, k.shape[1], num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
  return full.replace(k=k, v=v, start=start, length=length).attend(q)


@pytest.mark.parametrize("bits, value_bits, seq, prompt_len, steps", [
    (2, None, 1, 5, 2), (2, None, 3, 13, 30), (4, 2, 1, 13, 30), (16, 4, 3, 5, 2)])
def test_attend_equals_attention_over_the_dequantized_cache(bits, value_bits, seq, prompt_len,
                                                            steps):
  cache, _, _, _ = _run(bits, prompt_len, steps, value_bits=value_bits)
  cache = _append(cache, *(outlier_normal(9, BATCH, seq, KV_HEADS, HEAD_DIM),) * 2)
  q = outlier_normal(7, BATCH, seq, HEADS, HEAD_DIM)
  k_hat, v_hat = _dequantize(cache)
  testing.assert_close(_attend(cache, q),
                       _dense_attention(q, k_hat, v_hat, cache.start, cache.length))


def test_padding_and_stale_slots_are_never_read():
  cache, _, _, _ = _run(2, 13, 20)
  q = outlier_normal(7, BATCH, 1, HEADS, HEAD_DIM)
  slot = jnp.arange(cache.k_codes.shape[1])[None, :, None, None]
  unread = (slot >= 33) | ((slot < 3) & (jnp.arange(BATCH) == 1)[:, None, None, None])
  garbage = jnp.uint32(0xFFFFFFFF)  # every code at its maximum
  poisoned = cache.replace(
      k_codes=jnp.where(unread, garbage, cache.k_codes),
      v_codes=jnp.where(unread, garbage, cache.v_codes),
      k_residual=cache.k_residual.at[:, 33 - int(cache.k_quantized):].set(1e9))
  testing.assert_close(_attend(poisoned, q), _attend(cache, q))


def test_unquantized_kivi_reproduces_the_full_caches_logits():
  model, params = tiny_model()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 30)), jnp.int32)
  start = jnp.asarray([0, 5], jnp.int32)
  expected = decode_logits(model, params, tokens, start, 11, FullKVCache)
  testing.assert_close(decode_logits(model, params, tokens, start, 11, KIVI(16, G, R)),
                       expected, atol=1e-4, rtol=1e-4)  # blockwise vs one-shot softmax sums
  # The same run quantized really differs (the test can fail).
  assert not np.allclose(decode_logits(model, params, tokens, start, 11, KIVI(2, G, R)),
                         expected, atol=1e-2)


def test_nbytes_is_exact():
  cache = KIVI(2, G, R).init(3, 40, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=jnp.bfloat16)
  slots = 40  # 40 is a multiple of the (patched) 8-slot decode block
  codes = 2 * 3 * slots * KV_HEADS * 1 * 4  # 16 channels of 2 bits: one uint32 word
  key_scales = 2 * 3 * (slots // G) * KV_HEADS * HEAD_DIM * 2
  value_scales = 2 * 3 * slots * KV_HEADS * (HEAD_DIM // G) * 2
  residual = 3 * (R + R + 1) * KV_HEADS * HEAD_DIM * 2
  assert cache.nbytes() == codes + key_scales + value_scales + residual + 4 * (3 + 3)
  unquantized = KIVI(16, G, R).init(3, 40, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
  assert unquantized.nbytes() == 2 * 3 * slots * KV_HEADS * HEAD_DIM * 4 + 3 * (2 * R + 1) * \
      KV_HEADS * HEAD_DIM * 4 + 4 * 6


def test_append_past_max_len_is_an_error_or_nan_under_jit():
  cache, k, v, _ = _run(2, MAX_LEN - 2, 0)
  with pytest.raises(ValueError, match="appending 3 tokens to a cache holding 46 exceeds its "
                     f"max_len={MAX_LEN}"):
    cache.append(k[:, :3], v[:, :3])
  overflowed = _append(cache, k[:, :3], v[:, :3])
  assert np.isnan(_attend(overflowed, outlier_normal(1, BATCH, 3, HEADS, HEAD_DIM))).all()


@pytest.mark.parametrize("make, match", [
    (lambda: KIVI(2, 32, 128).init(1, 8, num_kv_heads=1, head_dim=48),
     r"head_dim is 48; expected a multiple of group_size=32"),
    (lambda: KIVI(2, 32, 100), r"residual is 100; expected a multiple of group_size=32"),
    (lambda: KIVI(5), r"bits is 5; expected one of \(1, 2, 3, 4, 8, 16\)"),
    (lambda: KIVI(2, value_bits=6), r"value_bits is 6; expected one of"),
    (lambda: KIVI(2, 0), r"group_size is 0; expected a positive int"),
    (lambda: KIVICache.init(1, 0, num_kv_heads=1, head_dim=32), r"max_len is 0"),
    (lambda: KIVI().init(1, 8, num_kv_heads=1, head_dim=32).attend(jnp.zeros((1, 1, 2, 16))),
     r"q has shape \(1, 1, 2, 16\); expected \[batch=1, seq, heads, head_dim=32\]"),
])
def test_bad_arguments_are_clear_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()
