"""FullKVCache: GQA attention over left-padded slots, bookkeeping, nbytes, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import testing
from effjax.kv_cache import FullKVCache, KVCache

BATCH, MAX_LEN, HEADS, KV_HEADS, HEAD_DIM = 3, 16, 6, 2, 8


def _normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _reference(q, k, v, start, length):
  """jax.nn.dot_product_attention over slots [0, length) with an explicit causal + padding mask."""
  seq = q.shape[1]
  slot = np.arange(length)
  query_slot = length - seq + np.arange(seq)
  mask = (slot[None, None, :] >= np.asarray(start)[:, None, None]) & (
      slot[None, None, :] <= query_slot[None, :, None])
  return jax.nn.dot_product_attention(q, k[:, :length], v[:, :length], mask=mask[:, None],
                                      implementation="xla")


def test_full_cache_implements_the_interface():
  assert issubclass(FullKVCache, KVCache)
  with pytest.raises(TypeError, match="abstract"):
    KVCache()  # pylint: disable=abstract-class-instantiated


@pytest.mark.parametrize("seq", [1, 3])
def test_attend_matches_reference_after_prefill_and_appends(seq):
  start = jnp.array([0, 2, 4], jnp.int32)
  k, v = _normal(0, BATCH, MAX_LEN, KV_HEADS, HEAD_DIM), _normal(1, BATCH, MAX_LEN, KV_HEADS,
                                                                 HEAD_DIM)
  cache = FullKVCache.init(BATCH, MAX_LEN, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
  q = _normal(2, BATCH, seq, HEADS, HEAD_DIM)
  run = jax.jit(lambda cache: cache.prefill(k[:, :5], v[:, :5], start)
                .append(k[:, 5:5 + seq], v[:, 5:5 + seq]))
  cache = run(cache)
  length = 5 + seq
  assert int(cache.length) == length
  testing.assert_close(jax.jit(lambda c, q: c.attend(q))(cache, q),
                       _reference(q, k, v, start, length))


def test_attend_never_reads_padding_or_unwritten_slots():
  cache = FullKVCache.init(2, MAX_LEN, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
  k, v = _normal(0, 2, 4, KV_HEADS, HEAD_DIM), _normal(1, 2, 4, KV_HEADS, HEAD_DIM)
  q = _normal(2, 2, 1, HEADS, HEAD_DIM)
  start = jnp.array([0, 3], jnp.int32)
  run = jax.jit(lambda cache, k, v: cache.prefill(k, v, start).attend(q))
  garbage = 1e9  # finite, as what padding and unwritten slots hold; a leak would dominate
  poisoned = cache.replace(k=jnp.full_like(cache.k, garbage), v=jnp.full_like(cache.v, garbage))
  testing.assert_close(run(poisoned, k.at[1, :3].set(garbage), v.at[1, :3].set(garbage)),
                       run(cache, k, v))


def test_nbytes_is_exact():
  cache = FullKVCache.init(BATCH, MAX_LEN, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                           dtype=jnp.bfloat16)
  assert cache.nbytes() == 2 * BATCH * MAX_LEN * KV_HEADS * HEAD_DIM * 2 + 4 * (BATCH + 1)
  assert cache.max_len == MAX_LEN


def test_append_past_max_len_is_an_error_or_nan_under_jit():
  cache = FullKVCache.init(1, 4, num_kv_heads=1, head_dim=HEAD_DIM)
  k = _normal(0, 1, 3, 1, HEAD_DIM)
  cache = cache.prefill(k, k, jnp.zeros(1, jnp.int32))
  with pytest.raises(ValueError, match="exceeds its max_len=4"):
    cache.append(k[:, :2], k[:, :2])
  overflowed = jax.jit(lambda c, k: c.append(k, k))(cache, k[:, :2])
  assert np.isnan(overflowed.attend(_normal(1, 1, 1, 2, HEAD_DIM))).all()


@pytest.mark.parametrize("call, match", [
    (lambda c: c.prefill(jnp.zeros((2, 4, 2, 8)), jnp.zeros((2, 4, 2, 8)),
                         jnp.zeros(2, jnp.int32)), r"k has shape \(2, 4, 2, 8\); expected"),
    (lambda c: c.prefill(jnp.zeros((3, 4, 2, 8)), jnp.zeros((3, 5, 2, 8)),
                         jnp.zeros(3, jnp.int32)), r"k has 4 tokens and v has 5"),
    (lambda c: c.prefill(jnp.zeros((3, 17, 2, 8)), jnp.zeros((3, 17, 2, 8)),
                         jnp.zeros(3, jnp.int32)), r"at most max_len=16"),
    (lambda c: c.prefill(jnp.zeros((3, 4, 2, 8)), jnp.zeros((3, 4, 2, 8)),
                         jnp.zeros(2, jnp.int32)), r"start has dtype int32 and shape \(2,\)"),
    (lambda c: c.attend(jnp.zeros((3, 1, 5, 8))), r"heads a multiple of kv_heads=2"),
    (lambda c: c.attend(jnp.zeros((3, 1, 6, 4))), r"head_dim=8"),
    (lambda c: FullKVCache.init(0, 4, num_kv_heads=1, head_dim=8), r"batch is 0"),
])
def test_bad_arguments_are_clear_errors(call, match):
  cache = FullKVCache.init(BATCH, MAX_LEN, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
  with pytest.raises(ValueError, match=match):
    call(cache)
