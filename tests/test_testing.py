"""effjax.testing: the comparisons must fail when an implementation is wrong."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import testing
from pallas_kernels import interpret as pallas_interpret


def _softmax_reference(x, w):
  return jax.nn.softmax(x @ w, axis=-1)


def test_matching_implementation_passes():
  x = jax.random.normal(jax.random.key(0), (4, 8))
  w = jax.random.normal(jax.random.key(1), (8, 5))
  stable = lambda x, w: jnp.exp(jax.nn.log_softmax(x @ w, axis=-1))
  testing.check_against_reference(stable, _softmax_reference, x, w, argnums=(0, 1))


def test_wrong_output_fails():
  x = jax.random.normal(jax.random.key(0), (4, 8))
  w = jax.random.normal(jax.random.key(1), (8, 5))
  with pytest.raises(AssertionError):
    testing.check_against_reference(lambda x, w: _softmax_reference(x, w) * 1.001,
                                    _softmax_reference, x, w)


def test_wrong_gradient_with_right_output_fails():
  @jax.custom_vjp
  def bad(x, w):
    return _softmax_reference(x, w)
  bad.defvjp(lambda x, w: (bad(x, w), (x, w)),
             lambda res, g: jax.tree.map(lambda t: 1.01 * t,
                                         jax.vjp(_softmax_reference, *res)[1](g)))
  x = jax.random.normal(jax.random.key(0), (4, 8))
  w = jax.random.normal(jax.random.key(1), (8, 5))
  testing.check_against_reference(bad, _softmax_reference, x, w, check_gradients=False)
  with pytest.raises(AssertionError):
    testing.check_against_reference(bad, _softmax_reference, x, w, argnums=(0, 1))


def test_bf16_inputs_use_the_bf16_tolerance_and_pass_integer_args_through():
  x = jax.random.normal(jax.random.key(0), (16, 32), jnp.bfloat16)
  segments = jnp.arange(16) // 5

  def masked_sum(x, segments):
    return jax.ops.segment_sum(x.astype(jnp.float32), segments, num_segments=4).astype(x.dtype)

  testing.check_against_reference(masked_sum, masked_sum, x, segments)
  assert testing.tolerance(jnp.bfloat16).atol > testing.tolerance(jnp.float32).atol
  assert testing.tolerance(jnp.float32, gradient=True).atol > testing.tolerance(jnp.float32).atol


def test_nan_where_reference_is_finite_fails():
  expected = np.zeros(4, np.float32)
  actual = expected.copy()
  actual[2] = np.nan
  with pytest.raises(AssertionError, match="non-finite"):
    testing.assert_close(actual, expected)
  testing.assert_close(np.array([0.0, -np.inf]), np.array([0.0, -np.inf]))
  with pytest.raises(AssertionError):
    testing.assert_close(np.array([-np.inf]), np.array([np.inf]))


def test_unknown_dtype_tolerance():
  with pytest.raises(ValueError, match="no tolerance for dtype int32"):
    testing.tolerance(jnp.int32)


def test_interpret_mode_switch():
  from jax.experimental.pallas import tpu as pltpu
  assert not testing.interpreting()
  with pytest.raises(NotImplementedError, match="needs a GPU"):
    pallas_interpret.gpu_interpret(None)
  with pytest.raises(NotImplementedError, match="needs a TPU"):
    pallas_interpret.require_tpu_or_interpret()
  with testing.interpret_mode():
    assert testing.interpreting()
    assert pallas_interpret.gpu_interpret(None) is True
    assert isinstance(pallas_interpret.require_tpu_or_interpret(), pltpu.InterpretParams)
  assert not testing.interpreting()
  assert pallas_interpret.gpu_interpret(True) is True


def test_interpret_mode_runs_a_pallas_kernel_on_cpu():
  from jax.experimental import pallas as pl

  def add_one(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0

  x = jnp.arange(8, dtype=jnp.float32)
  with testing.interpret_mode():
    out = pl.pallas_call(add_one, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                         interpret=pallas_interpret.gpu_interpret(None))(x)
  np.testing.assert_array_equal(out, x + 1.0)
