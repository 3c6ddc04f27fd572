"""Bit packing round trips and the asymmetric group quantizer's half-step error bound."""

import jax.numpy as jnp
import numpy as np
import pytest

from effjax.kv_cache import quant


@pytest.mark.parametrize("bits", quant.PACKED_BITS)
@pytest.mark.parametrize("n", [1, 7, 64, 65])
def test_pack_round_trip(bits, n):
  codes = np.random.default_rng(bits * 100 + n).integers(0, 2**bits, size=(3, 2, n))
  words = quant.pack(jnp.asarray(codes, jnp.uint32), bits)
  assert words.dtype == jnp.uint32
  assert words.shape == (3, 2, quant.packed_words(n, bits)) == (3, 2, -(-n // (32 // bits)))
  np.testing.assert_array_equal(quant.unpack(words, bits, n), codes)


def test_pack_layout_is_kivis():
  # Code j of a word sits at bit offset bits * j.
  words = quant.pack(jnp.asarray([[1, 2, 3, 0, 1]], jnp.uint32), 2)
  assert int(words[0, 0]) == 1 | 2 << 2 | 3 << 4 | 0 << 6 | 1 << 8


@pytest.mark.parametrize("n", [1, 20, 21, 64])
def test_ternary_round_trip_uses_base_3(n):
  codes = np.random.default_rng(n).integers(0, 3, size=(4, n))
  codes[0] = 2  # the largest word value, 3**20 - 1, must not overflow
  words = quant.pack_ternary(jnp.asarray(codes, jnp.uint32))
  assert words.shape == (4, -(-n // 20)) == (4, quant.packed_words(n, None))
  np.testing.assert_array_equal(quant.unpack_ternary(words, n), codes)


def test_bad_bits_are_a_clear_error():
  with pytest.raises(ValueError, match=r"bits is 5; expected one of \(1, 2, 3, 4, 8\)"):
    quant.pack(jnp.zeros((4,), jnp.uint32), 5)


def _outlier_data(shape, seed=0):
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  x[..., 3] = x[..., 3] * 20 + 7  # an outlier channel with an offset, as keys have
  return jnp.asarray(x)


@pytest.mark.parametrize("bits", quant.PACKED_BITS)
@pytest.mark.parametrize("axis", [1, -1])
def test_error_is_at_most_half_a_step(bits, axis):
  x = _outlier_data((2, 64, 3, 32))
  codes, scale, zero = quant.quantize_groups(x, bits, axis=axis, group_size=16)
  expected_groups = list(x.shape)
  expected_groups[axis] //= 16
  assert scale.shape == zero.shape == tuple(expected_groups)
  assert scale.dtype == zero.dtype == jnp.float16
  assert int(codes.max()) <= 2**bits - 1
  x_hat = quant.dequantize_groups(codes, scale, zero, axis=axis, group_size=16)
  half_step = np.repeat(np.asarray(scale, np.float32), 16, axis=axis) / 2
  error = np.abs(np.asarray(x_hat) - np.asarray(x))
  assert np.all(error <= half_step * (1 + 1e-5) + 1e-6), (error - half_step).max()
  # The bound is tight-ish: the quantizer really is b-bit (not a lossless copy).
  assert (error / half_step).max() > 0.5


def test_mask_excludes_elements_from_the_range():
  x = jnp.asarray([[0.0, 1.0, 3.0, 1000.0]])
  mask = jnp.asarray([[True, True, True, False]])
  codes, scale, zero = quant.quantize_groups(x, 2, axis=-1, group_size=4, mask=mask)
  assert float(scale[0, 0]) == 1.0 and float(zero[0, 0]) == 0.0
  x_hat = quant.dequantize_groups(codes, scale, zero, axis=-1, group_size=4)
  np.testing.assert_allclose(x_hat[0, :3], [0.0, 1.0, 3.0])


def test_constant_and_empty_groups_are_exact():
  x = jnp.full((1, 8), 0.5)
  codes, scale, zero = quant.quantize_groups(
      x, 2, axis=-1, group_size=4, mask=jnp.asarray([[True] * 4 + [False] * 4]))
  np.testing.assert_array_equal(scale, 0.0)
  np.testing.assert_array_equal(quant.dequantize_groups(codes, scale, zero, axis=-1,
                                                        group_size=4)[0, :4], 0.5)


def test_group_size_must_divide_the_axis():
  with pytest.raises(ValueError, match="has size 10; expected a multiple of group_size=4"):
    quant.quantize_groups(jnp.zeros((10,)), 2, axis=0, group_size=4)
