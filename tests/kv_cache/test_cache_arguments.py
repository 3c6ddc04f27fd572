"""Every cache's public entry points (init, prefill, append, prefill_inputs, append_inputs) reject
a wrong ``start`` (dtype, shape, and range where concrete), non-floating keys/values/inputs and a
non-floating cache dtype, naming the argument; under jit only the static checks apply."""

import jax
import jax.numpy as jnp
import pytest

from effjax.kv_cache import KIVI, FullKVCache, LayerInputs, VidKV, XQuant
from effjax.nn import TransformerConfig

BATCH, KV_HEADS, HEAD_DIM, MAX_LEN, SEQ = 2, 2, 32, 64, 8
D_MODEL = 64
KV_CACHES = {"full": FullKVCache, "kivi": KIVI(2, 32, 32), "vidkv": VidKV(1.5, 32, 32)}
CONFIG = TransformerConfig(vocab_size=16, d_model=D_MODEL, num_layers=1, num_heads=2,
                           num_kv_heads=KV_HEADS, d_ff=64, head_dim=HEAD_DIM)


def _kv(dtype=jnp.float32, seq=SEQ):
  return jnp.ones((BATCH, seq, KV_HEADS, HEAD_DIM), dtype)


def _xquant():
  return XQuant(4, 32, latent=False).for_layer(0, CONFIG).init(
      BATCH, MAX_LEN, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)


def _inputs(dtype=jnp.float32, seq=SEQ):
  x = jnp.ones((BATCH, seq, D_MODEL), dtype)
  kernel = jnp.ones((D_MODEL, KV_HEADS, HEAD_DIM))
  return LayerInputs(x, x, kernel, kernel, jnp.ones((D_MODEL,)), 1e-6, 10000.0)


BAD_STARTS = [
    (jnp.array([0, SEQ + 1]), r"start has values in \[0, 9\]; expected each in \[0, seq=8\]"),
    (jnp.array([-1, 0]), r"start has values in \[-1, 0\]; expected each in \[0, seq=8\]"),
    ([0, 12], r"start has values in \[0, 12\]"),
    (jnp.zeros(BATCH), r"start has dtype float32 and shape \(2,\); expected integer"),
    (jnp.zeros(BATCH, bool), r"start has dtype bool"),
    (jnp.zeros((BATCH, 1), jnp.int32), r"start has dtype int32 and shape \(2, 1\)"),
]


@pytest.mark.parametrize("start, match", BAD_STARTS)
@pytest.mark.parametrize("kind", sorted(KV_CACHES))
def test_prefill_rejects_a_bad_start(kind, start, match):
  cache = KV_CACHES[kind].init(BATCH, MAX_LEN, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
  with pytest.raises(ValueError, match=match):
    cache.prefill(_kv(), _kv(), start)


@pytest.mark.parametrize("start, match", BAD_STARTS)
def test_xquant_prefill_rejects_a_bad_start(start, match):
  with pytest.raises(ValueError, match=match):
    _xquant().prefill_inputs(_inputs(), start, None)


@pytest.mark.parametrize("kind", sorted(KV_CACHES))
def test_traced_start_is_checked_statically_only(kind):
  cache = KV_CACHES[kind].init(BATCH, MAX_LEN, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
  filled = jax.jit(lambda c, s: c.prefill(_kv(), _kv(), s))(cache, jnp.array([0, 3]))
  assert filled.start.tolist() == [0, 3]
  with pytest.raises(ValueError, match=r"start has dtype float32"):
    jax.jit(lambda c, s: c.prefill(_kv(), _kv(), s))(cache, jnp.zeros(BATCH))


@pytest.mark.parametrize("kind", sorted(KV_CACHES))
@pytest.mark.parametrize("method", ["prefill", "append"])
def test_integer_keys_or_values_are_an_error(kind, method):
  cache = KV_CACHES[kind].init(BATCH, MAX_LEN, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
  call = ((lambda k, v: cache.prefill(k, v, jnp.zeros(BATCH, jnp.int32))) if method == "prefill"
          else cache.append)
  with pytest.raises(TypeError, match=r"k has dtype int32; expected a floating dtype"):
    call(_kv(jnp.int32), _kv())
  with pytest.raises(TypeError, match=r"v has dtype bool; expected a floating dtype"):
    call(_kv(), _kv(bool))


def test_xquant_rejects_integer_inputs():
  cache = _xquant()
  with pytest.raises(TypeError, match=r"inputs.x has dtype int32; expected a floating dtype"):
    cache.prefill_inputs(_inputs(jnp.int32), jnp.zeros(BATCH, jnp.int32), None)
  with pytest.raises(TypeError, match=r"inputs.x has dtype int32; expected a floating dtype"):
    cache.append_inputs(_inputs(jnp.int32), None)


@pytest.mark.parametrize("make", [
    lambda dtype: FullKVCache.init(BATCH, MAX_LEN, num_kv_heads=1, head_dim=32, dtype=dtype),
    lambda dtype: KIVI().init(BATCH, MAX_LEN, num_kv_heads=1, head_dim=32, dtype=dtype),
    lambda dtype: VidKV().init(BATCH, MAX_LEN, num_kv_heads=1, head_dim=32, dtype=dtype),
    lambda dtype: XQuant(4, 32, latent=False).for_layer(0, CONFIG).init(
        BATCH, MAX_LEN, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=dtype),
], ids=["full", "kivi", "vidkv", "xquant"])
def test_init_rejects_a_non_floating_dtype(make):
  with pytest.raises(TypeError, match=r"dtype is int8; expected a floating dtype"):
    make(jnp.int8)
  with pytest.raises(TypeError, match=r"dtype is 'fast'; expected a floating dtype"):
    make("fast")
  assert make(jnp.bfloat16).nbytes() > 0
