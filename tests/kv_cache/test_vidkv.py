"""VidKV: the paper's 1-bit and ternary quantizers (with their scales), provable error bounds,
streaming against a plain-Python model of the rules, attention against attention over the
dequantized cache, equality with the fp cache before the first flush, exact nbytes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cache_test_utils import decode_logits, outlier_normal, tiny_model

from effjax import testing
from effjax.kv_cache import FullKVCache, KVCache, VidKV, VidKVCache, kivi, quant
from effjax.kv_cache.vidkv import inverse_real_fft, real_fft
from experiments.cache_config import VidKVConfig
from experiments.config import ConfigError

BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 6, 2, 16
G, R = 4, 8
MAX_LEN = 48

_append = jax.jit(lambda cache, k, v: cache.append(k, v))
_attend = jax.jit(lambda cache, q: cache.attend(q))
_dequantize = jax.jit(lambda cache: cache.dequantize())


@pytest.fixture(autouse=True)
def small_decode_blocks(monkeypatch):
  # Blocks of 8 slots, so the blockwise loop of attend runs several iterations at test sizes.
  monkeypatch.setattr(kivi, "DECODE_BLOCK_TOKENS", 8)


def test_one_bit_codes_decode_to_plus_minus_the_mean_absolute_value():
  x = outlier_normal(0, 3, 8 * G, 5)
  codes, scale = quant.quantize_sign_groups(x, axis=1, group_size=G)
  decoded = np.asarray(quant.dequantize_sign_groups(codes, scale, axis=1, group_size=G))
  a = np.repeat(np.asarray(scale, np.float32), G, axis=1)
  np.testing.assert_array_equal(decoded, np.where(np.asarray(x) >= 0, a, -a))  # +-a, never 0
  mean_abs = np.abs(np.asarray(x)).reshape(3, 8, G, 5).mean(axis=2)
  np.testing.assert_allclose(np.asarray(scale, np.float32), mean_abs, rtol=1e-3)
  # mean |x| is the L2-optimal scale for sign codes: a group's squared error is its energy minus
  # G a^2 (up to the float16 rounding of a).
  error = ((decoded - np.asarray(x)) ** 2).reshape(3, 8, G, 5).sum(axis=2)
  energy = (np.asarray(x) ** 2).reshape(3, 8, G, 5).sum(axis=2)
  np.testing.assert_allclose(error, energy - G * mean_abs**2, rtol=1e-3, atol=1e-4)


def test_ternary_codes_round_trip_with_their_scale():
  rng = np.random.default_rng(1)
  t = rng.integers(-1, 2, (2, 6 * G, 3))
  t[:, ::G] = 1  # no all-zero group
  x = jnp.asarray(2.5 * t, jnp.float32)
  codes, scale = quant.quantize_ternary_groups(x, axis=1, group_size=G)
  np.testing.assert_array_equal(np.asarray(codes).astype(int) - 1, t)
  words = quant.pack_ternary(codes)
  assert words.shape[-1] == 1 and np.array_equal(quant.unpack_ternary(words, 3), codes)
  decoded = quant.dequantize_ternary_groups(codes, scale, axis=1, group_size=G)
  expected = np.abs(2.5 * t).reshape(2, 6, G, 3).mean(axis=2)  # the scale is mean |x|
  np.testing.assert_allclose(np.asarray(scale, np.float32), expected, rtol=1e-3)
  np.testing.assert_array_equal(decoded, np.repeat(np.asarray(scale, np.float32), G, 1) * t)


def test_ternary_error_bound():
  x = outlier_normal(2, 2, 10 * G, 7)
  codes, scale = quant.quantize_ternary_groups(x, axis=1, group_size=G)
  decoded = quant.dequantize_ternary_groups(codes, scale, axis=1, group_size=G)
  a = np.repeat(np.asarray(scale, np.float32), G, axis=1)
  error, size = np.abs(np.asarray(decoded - x)), np.abs(np.asarray(x))
  assert np.all(error <= np.maximum(a / 2, size - a) * (1 + 1e-6) + 1e-6)
  assert set(np.unique(np.asarray(codes))) == {0, 1, 2}


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9])
def test_real_fft_is_orthogonal_and_inverted(n):
  x = jnp.asarray(np.random.default_rng(3).standard_normal((4, n)), jnp.float32)
  c = real_fft(x)
  assert c.shape == x.shape
  np.testing.assert_allclose(np.linalg.norm(c, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  testing.assert_close(inverse_real_fft(c), x, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(c[:, 0], np.asarray(x).sum(-1) / np.sqrt(n), rtol=1e-5)  # DC


def _paper_residuals(prompt_len, steps, residual):
  """The streaming rules as plain Python: prefill quantizes the largest multiple of R tokens; an
  append first quantizes the residual if it holds R tokens, then adds the token. Returns the
  residual size after each append."""
  size, sizes = prompt_len % residual, []
  for _ in range(steps):
    size = 1 if size == residual else size + 1
    sizes.append(size)
  return sizes


def _run(prompt_len, steps, *, key_bits=1.5, start=(0, 3), seed=0):
  total = prompt_len + steps
  k, v = (outlier_normal(s, BATCH, total, KV_HEADS, HEAD_DIM) for s in (seed, seed + 1))
  cache = VidKV(key_bits, G, R).init(BATCH, MAX_LEN, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
  cache = cache.prefill(k[:, :prompt_len], v[:, :prompt_len], jnp.asarray(start, jnp.int32))
  sizes = []
  for t in range(prompt_len, total):
    cache = _append(cache, k[:, t:t + 1], v[:, t:t + 1])
    sizes.append(int(cache.length - cache.quantized))
  return cache, np.asarray(k), np.asarray(v), sizes


def test_vidkv_implements_the_interface():
  assert issubclass(VidKVCache, KVCache)
  assert isinstance(VidKV().init(1, 8, num_kv_heads=1, head_dim=64), VidKVCache)


@pytest.mark.parametrize("prompt_len", [3, 13, 16])
def test_streaming_follows_the_rules(prompt_len):
  steps = 3 * R + 2
  cache, _, _, sizes = _run(prompt_len, steps)
  assert sizes == _paper_residuals(prompt_len, steps, R)
  assert int(cache.quantized) % R == 0 and int(cache.length) == prompt_len + steps


def test_appending_several_tokens_equals_appending_them_one_by_one():
  cache, k, v, _ = _run(13, 0)
  at_once = _append(cache, k[:, :12], v[:, :12])
  one_by_one = cache
  for t in range(12):
    one_by_one = _append(one_by_one, k[:, t:t + 1], v[:, t:t + 1])
  jax.tree.map(np.testing.assert_array_equal, at_once, one_by_one)


@pytest.mark.parametrize("key_bits", [1.5, 1.0, 2.0, 1.25])
def test_quantized_slots_obey_the_provable_bounds(key_bits):
  cache, k, v, _ = _run(13, 2 * R + 3, key_bits=key_bits)
  hot, n = cache.hot_channels, HEAD_DIM - cache.hot_channels
  assert hot == round((key_bits - 1) * HEAD_DIM)
  k_hat, v_hat = map(np.asarray, _dequantize(cache))
  nq, length = int(cache.quantized), int(cache.length)
  start = np.asarray(cache.start)
  scale = np.asarray(cache.k_scale, np.float32)
  anomalous = np.asarray(quant.unpack(cache.k_hot, 1, HEAD_DIM)).astype(bool)
  v_scale = np.asarray(cache.v_scale, np.float32)
  for b in range(BATCH):
    for g in range(nq // G):
      tokens = np.arange(g * G, (g + 1) * G)
      tokens = tokens[tokens >= start[b]]
      if not tokens.size:
        continue
      for h in range(KV_HEADS):
        x, x_hat = k[b, tokens, h], k_hat[b, tokens, h]
        spread = np.ptp(x, axis=0)
        mask = anomalous[b, g, h]
        assert mask.sum() == hot
        assert spread[mask].min(initial=np.inf) >= spread[~mask].max(initial=-1)
        # 2-bit channels: within half a step of their own min/max grid.
        steps = scale[b, g, h, :hot]
        assert np.all(np.abs(x_hat[:, mask] - x[:, mask]) <= steps / 2 * (1 + 1e-5) + 1e-6)
        # 1-bit FFT channels (Parseval): squared error = energy - G * sum(a^2) of the coefficients.
        a = scale[b, g, h, hot:]
        error = ((x_hat[:, ~mask] - x[:, ~mask]) ** 2).sum()
        bound = (x[:, ~mask] ** 2).sum() - tokens.size * (a**2).sum()
        assert error <= bound + 1e-3 * (x[:, ~mask] ** 2).sum() + 1e-4 and n == a.size
        # Ternary values.
        gamma = v_scale[b, g, h]
        err_v = np.abs(v_hat[b, tokens, h] - v[b, tokens, h])
        assert np.all(err_v <= np.maximum(gamma / 2, np.abs(v[b, tokens, h]) - gamma)
                      * (1 + 1e-5) + 1e-6)
  np.testing.assert_array_equal(k_hat[:, nq:length], k[:, nq:length])
  np.testing.assert_array_equal(v_hat[:, nq:length], v[:, nq:length])
  assert np.abs(k_hat[1, 3:nq] - k[1, 3:nq]).max() > 0.1  # really quantized


@pytest.mark.parametrize("seq, prompt_len, steps, key_bits", [
    (1, 5, 2, 1.5), (3, 13, 30, 1.5), (1, 13, 30, 1.0), (1, 16, 12, 2.0)])
def test_attend_equals_attention_over_the_dequantized_cache(seq, prompt_len, steps, key_bits):
  cache, _, _, _ = _run(prompt_len, steps, key_bits=key_bits)
  new = outlier_normal(9, BATCH, seq, KV_HEADS, HEAD_DIM)
  cache = _append(cache, new, new)
  q = outlier_normal(7, BATCH, seq, HEADS, HEAD_DIM)
  k_hat, v_hat = _dequantize(cache)
  full = FullKVCache.init(BATCH, MAX_LEN, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
  dense = full.replace(k=k_hat, v=v_hat, start=cache.start, length=cache.length).attend(q)
  testing.assert_close(_attend(cache, q), dense)


def test_decoding_equals_the_full_cache_until_the_first_flush_then_differs():
  model, params = tiny_model()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 3 * R)), jnp.int32)
  start = jnp.asarray([0, 5], jnp.int32)
  expected = decode_logits(model, params, tokens, start, 5, FullKVCache)
  got = decode_logits(model, params, tokens, start, 5, VidKV(1.5, G, R))
  # Up to R tokens everything is in the full-precision residual.
  testing.assert_close(got[:, :R - 5 + 1], expected[:, :R - 5 + 1], atol=1e-4, rtol=1e-4)
  assert not np.allclose(got[:, -1], expected[:, -1], atol=1e-2)


def test_nbytes_is_exact():
  batch, slots, hot = 3, 40, 8  # 40: a multiple of the (patched) 8-slot decode block
  cache = VidKV(1.5, G, R).init(batch, slots, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                dtype=jnp.bfloat16)
  groups = batch * (slots // G) * KV_HEADS
  key_codes = batch * slots * KV_HEADS * (1 + 1) * 4  # 8 2-bit codes: 1 word; 8 1-bit: 1 word
  key_scales = groups * (HEAD_DIM + hot) * 2 + groups * 1 * 4  # steps/scales, zeros; 16-bit mask
  values = batch * slots * 2 * 4 + groups * HEAD_DIM * 2  # 32 ternary codes: 2 words; scales
  residual = 2 * batch * R * KV_HEADS * HEAD_DIM * 2
  assert cache.nbytes() == key_codes + key_scales + values + residual + 4 * (batch + 2)


def test_append_past_max_len_is_an_error_or_nan_under_jit():
  cache, k, v, _ = _run(MAX_LEN - 2, 0)
  with pytest.raises(ValueError, match="appending 3 tokens to a cache holding 46 exceeds its "
                     f"max_len={MAX_LEN}"):
    cache.append(k[:, :3], v[:, :3])
  overflowed = _append(cache, k[:, :3], v[:, :3])
  assert np.isnan(_attend(overflowed, outlier_normal(1, BATCH, 3, HEADS, HEAD_DIM))).all()


@pytest.mark.parametrize("make, match", [
    (lambda: VidKV(2.5), r"key_bits is 2.5; expected a number in \[1, 2\]"),
    (lambda: VidKV(True), r"key_bits is True; expected a number in \[1, 2\]"),
    (lambda: VidKV(1.5, 32, 100), r"residual is 100; expected a multiple of group_size=32"),
    (lambda: VidKV(1.5, 0), r"group_size is 0; expected a positive int"),
    (lambda: VidKVCache.init(1, 0, num_kv_heads=1, head_dim=32), r"max_len is 0"),
    (lambda: VidKV().init(1, 8, num_kv_heads=1, head_dim=32).attend(jnp.zeros((1, 1, 2, 16))),
     r"q has shape \(1, 1, 2, 16\); expected \[batch=1, seq, heads, head_dim=32\]"),
    (lambda: VidKV().init(1, 8, num_kv_heads=1, head_dim=32).prefill(
        jnp.zeros((1, 4, 2, 32)), jnp.zeros((1, 4, 2, 32)), jnp.zeros((1,), jnp.int32)),
     r"k has shape \(1, 4, 2, 32\); expected \[batch, seq, kv_heads, head_dim\]"),
])
def test_bad_arguments_are_clear_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_cache_config_selects_vidkv():
  assert VidKVConfig().cache_type() == VidKV(1.5, 32, 128)
  assert VidKVConfig().label == "VidKV K1.5V1.58"
  assert VidKVConfig(key_bits=1.25, residual=64).label == "VidKV K1.25V1.58 (G=32, R=64)"
  with pytest.raises(ConfigError, match=r"invalid VidKV settings in cache config "
                     r"\{type: vidkv, key_bits: 3, .*\}: key_bits is 3"):
    VidKVConfig(key_bits=3)
