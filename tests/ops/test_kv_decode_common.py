"""The decode kernels' shared helpers (``pallas_kernels.kv_decode.common`` and ``common_tpu``):
the log-sum-exp combination of partial results, the TPU kernels' float16 decoding, VidKV's
int32-only base-3 digits, and the tiling heuristics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kv_decode import common, common_tpu
from pallas_kernels.kv_decode.common import DecodeBlockSizes


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


def test_float16_bits_decode_exactly():
  """The TPU kernels' float16 decoding (integer ops on the uint16 bits) equals numpy's float16 ->
  float32 bit for bit on all 65536 patterns: subnormals, +-0, +-inf and NaN payloads included."""
  bits = np.arange(1 << 16, dtype=np.uint16)
  decoded = jax.jit(common_tpu.float16_to_float32)(
      common_tpu.float16_bits(jnp.asarray(bits.view(np.float16))))
  np.testing.assert_array_equal(np.asarray(decoded).view(np.uint32),
                                bits.view(np.float16).astype(np.float32).view(np.uint32))
  assert common_tpu.as_float32(jnp.ones(2, jnp.bfloat16)).dtype == jnp.float32


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


def test_tpu_tiling():
  """Default blocks: the largest multiple of the unit dividing the slots up to the target (at
  least one unit), else all the slots; splits up to 8 of at least 4 blocks. A given block must
  divide the slots and be a multiple of the unit, or be all of them."""
  assert common_tpu.tiling(None, 4096, 256, 512) == (512, 2)
  assert common_tpu.tiling(None, 4096, 8, 256) == (256, 4)
  assert common_tpu.tiling(None, 384, 256, 512) == (384, 1)  # 256 does not divide 384
  assert common_tpu.tiling(None, 1024, 1024, 512) == (1024, 1)  # one unit above the target
  assert common_tpu.tiling(DecodeBlockSizes(128, 3), 512, 128, 512) == (128, 3)
  assert common_tpu.tiling(DecodeBlockSizes(60), 60, 8, 256) == (60, 1)  # whole: any size
  with pytest.raises(ValueError, match="block_slots is 64"):
    common_tpu.tiling(DecodeBlockSizes(64), 512, 128, 512)
  with pytest.raises(TypeError, match="block_sizes"):
    common_tpu.tiling((128, 2), 512, 128, 512)
