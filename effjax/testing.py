"""Test base shared by every op: one tolerance table, reference comparisons, kernel interpret mode.

Every implementation of an op is compared with the op's float32 ``reference`` on the same inputs,
for outputs AND gradients (a VJP with a random cotangent), with tolerances taken from ONE per-dtype
table. Pallas kernels run on CPU inside :func:`interpret_mode` (GPU kernels with
``interpret=True``, TPU kernels in the TPU interpret mode).

Typical use in a test::

    with interpret_mode():
      check_against_reference(
          functools.partial(flash_attention, implementation="pallas_gpu"),
          attention_reference, q, k, v, argnums=(0, 1, 2))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.interpret import interpret_mode, interpreting

__all__ = [
    "Tolerance", "TOLERANCES", "tolerance", "assert_close", "check_against_reference",
    "random_cotangent", "interpret_mode", "interpreting",
]


@dataclasses.dataclass(frozen=True)
class Tolerance:
  """Elementwise bound ``|actual - expected| <= atol + rtol * |expected|``."""
  atol: float
  rtol: float

  def scaled(self, factor: float) -> Tolerance:
    return Tolerance(self.atol * factor, self.rtol * factor)


# The ONE table, keyed by the dtype of the inputs under test. The reference always runs in float32,
# so these bound the implementation's error, not the reference's. Inputs are O(1) random normals.
TOLERANCES: dict[Any, Tolerance] = {
    jnp.dtype(jnp.float32): Tolerance(atol=2e-5, rtol=2e-5),
    jnp.dtype(jnp.float16): Tolerance(atol=5e-3, rtol=5e-3),
    jnp.dtype(jnp.bfloat16): Tolerance(atol=3e-2, rtol=3e-2),
}
# Gradients accumulate more rounding than outputs (more reductions, recomputation).
GRADIENT_FACTOR = 4.0


def tolerance(dtype: Any, *, gradient: bool = False) -> Tolerance:
  """The tolerance for inputs of ``dtype`` (outputs, or gradients when ``gradient=True``)."""
  dtype = jnp.dtype(dtype)
  if dtype not in TOLERANCES:
    raise ValueError(f"no tolerance for dtype {dtype}; the table has {sorted(map(str, TOLERANCES))}")
  base = TOLERANCES[dtype]
  return base.scaled(GRADIENT_FACTOR) if gradient else base


def assert_close(actual: Any, expected: Any, *, dtype: Any = jnp.float32, gradient: bool = False,
                 atol: float | None = None, rtol: float | None = None) -> None:
  """Asserts two pytrees are close, compared in float32, with the table's tolerance for ``dtype``.

  Non-finite entries must match exactly in position and value (a NaN or inf where the expected
  value is finite, or the reverse, fails), so padding or masking bugs cannot hide.
  """
  tol = tolerance(dtype, gradient=gradient)
  atol = tol.atol if atol is None else atol
  rtol = tol.rtol if rtol is None else rtol
  actual = jax.tree.map(lambda x: np.asarray(x, np.float32), actual)
  expected = jax.tree.map(lambda x: np.asarray(x, np.float32), expected)
  chex.assert_trees_all_equal_structs(actual, expected)
  chex.assert_trees_all_equal_shapes(actual, expected)
  for leaf_actual, leaf_expected in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    finite = np.isfinite(leaf_expected)
    np.testing.assert_array_equal(np.isfinite(leaf_actual), finite,
                                  err_msg="non-finite entries differ in position")
    np.testing.assert_array_equal(leaf_actual[~finite], leaf_expected[~finite],
                                  err_msg="non-finite entries differ in value")
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: np.where(np.isfinite(x), x, 0.0), actual),
      jax.tree.map(lambda x: np.where(np.isfinite(x), x, 0.0), expected),
      atol=atol, rtol=rtol)


def random_cotangent(key: jax.Array, tree: Any) -> Any:
  """A standard-normal cotangent with the structure, shapes and dtypes of ``tree``.

  Integer and boolean leaves get float0 cotangents (they have no gradient).
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  cotangents = [
      jax.random.normal(k, jnp.shape(leaf), jnp.result_type(leaf))
      if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
      else np.zeros(jnp.shape(leaf), jax.dtypes.float0)
      for k, leaf in zip(keys, leaves)
  ]
  return jax.tree.unflatten(treedef, cotangents)


def check_against_reference(fn: Callable[..., Any], reference: Callable[..., Any], *args: Any,
                            argnums: Sequence[int] = (0,), dtype: Any | None = None,
                            seed: int = 0, check_gradients: bool = True,
                            atol: float | None = None, rtol: float | None = None) -> None:
  """Compares ``fn(*args)`` with ``reference(*args_in_float32)``: outputs, then gradients.

  Args:
    fn: the implementation under test.
    reference: the float32 oracle with the same signature.
    *args: inputs (arrays or pytrees of arrays, e.g. Flax params), in the dtype under test.
      Floating leaves are upcast to float32 for ``reference``; integer/bool leaves (segment
      ids, masks) are passed unchanged.
    argnums: positions of ``args`` to differentiate with respect to.
    dtype: the dtype whose tolerance applies (default: the dtype of ``args[argnums[0]]``).
    seed: seed of the random cotangent used for the VJP.
    check_gradients: compare VJPs too (the default; switch off only for non-differentiable ops).
    atol, rtol: override the table for this call (justify it in the test).
  """
  dtype = jnp.result_type(jax.tree.leaves(args[argnums[0]])[0]) if dtype is None else dtype
  args32 = jax.tree.map(
      lambda a: (jnp.asarray(a, jnp.float32) if jnp.issubdtype(jnp.result_type(a), jnp.floating)
                 else a), args)
  out, fn_vjp = _vjp(fn, args, argnums)
  out_ref, ref_vjp = _vjp(reference, args32, argnums)
  assert_close(out, out_ref, dtype=dtype, atol=atol, rtol=rtol)
  if not check_gradients:
    return
  cotangent = random_cotangent(jax.random.key(seed), out)
  cotangent32 = jax.tree.map(
      lambda c: c.astype(jnp.float32) if jnp.issubdtype(c.dtype, jnp.floating) else c, cotangent)
  grads = fn_vjp(cotangent)
  grads_ref = ref_vjp(cotangent32)
  for index, grad, grad_ref in zip(argnums, grads, grads_ref):
    chex.assert_trees_all_equal_dtypes(grad, args[index])
    assert_close(grad, grad_ref, dtype=dtype, gradient=True,
                 atol=None if atol is None else atol * GRADIENT_FACTOR,
                 rtol=None if rtol is None else rtol * GRADIENT_FACTOR)


def _vjp(fn: Callable[..., Any], args: tuple[Any, ...], argnums: Sequence[int]):
  """``jax.vjp`` of ``fn`` with respect to ``args[argnums]``, the other arguments held fixed."""
  def partial_fn(*diff_args):
    full = list(args)
    for index, value in zip(argnums, diff_args):
      full[index] = value
    return fn(*full)
  return jax.vjp(partial_fn, *(args[i] for i in argnums))
