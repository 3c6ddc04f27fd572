"""Shared test base of ``long_conv``: every implementation runs these tests.

Subclass :class:`LongConvTestBase`, set ``implementation`` (or override :meth:`conv`), and name the
subclass ``Test...``. Argument validation happens before dispatch, the same for every
implementation, so its tests run once (``test_long_conv.TestValidation``). Numerical tests compare
with the float32 direct convolution through ``effjax.testing.check_against_reference`` (output and
the gradients with respect to u, kernel, skip and both gates); bfloat16 cases also pass the H3 /
FlashAttention rule: the error against the float32 reference is at most twice the error of the plain
``jnp.fft`` convolution in bfloat16 (``effjax.ops.long_conv.reference.fft_conv``), plus a rounding
floor.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import testing
from effjax.ops.long_conv import MODES, long_conv
from effjax.ops.long_conv.api import normalize_arguments
from effjax.ops.long_conv.reference import fft_conv

REFERENCE = jax.jit(functools.partial(long_conv, implementation="reference"),
                    static_argnames="mode")
PLAIN_FFT = jax.jit(fft_conv, static_argnames="mode")
LENGTHS = (1, 7, 64, 100, 257, 1024, 4099)
OPTIONAL = ("skip", "pre_gate", "post_gate")


@dataclasses.dataclass(frozen=True)
class Case:
  """One problem; ``kernel_len=None`` is the longest the mode allows (seq, or 2 seq - 1)."""
  seq: int
  mode: str = "causal"
  kernel_len: int | None = None
  channels: int = 3
  batch: int = 2
  skip: bool = False
  gates: bool = False
  dtype: str = "float32"
  kernel_dtype: str = "float32"

  def __str__(self) -> str:
    return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                    if getattr(self, f.name) != f.default or f.name in ("seq", "mode"))

  @property
  def resolved_kernel_len(self) -> int:
    if self.kernel_len is not None:
      return self.kernel_len
    return 2 * self.seq - 1 if self.mode == "bidirectional" else self.seq

  def inputs(self, seed: int = 0) -> tuple[jax.Array, ...]:
    """``(u, kernel, skip, pre_gate, post_gate)``; absent options are None. The kernel is scaled
    by ``1 / sqrt(kernel_len)`` so outputs are O(1) at every length."""
    # Not key(seed): check_against_reference draws its cotangent from key(0), which would then
    # equal u (a correlated cotangent makes dk[0] = sum u^2, a spike FFT round-off scales with).
    keys = jax.random.split(jax.random.key(1000 + seed), 5)
    shape = (self.batch, self.seq, self.channels)
    kernel_len = self.resolved_kernel_len
    u = jax.random.normal(keys[0], shape, self.dtype)
    kernel = (jax.random.normal(keys[1], (self.channels, kernel_len), jnp.float32)
              / np.sqrt(kernel_len)).astype(self.kernel_dtype)
    skip = jax.random.normal(keys[2], (self.channels,), self.kernel_dtype) if self.skip else None
    gates = [jax.random.normal(key, shape, self.dtype) if self.gates else None
             for key in keys[3:]]
    return (u, kernel, skip, *gates)


# Default run: every length, mode, option and dtype at least once (about 1 s each on 2 cores).
DEFAULT_CASES = [
    Case(1, "bidirectional", skip=True, gates=True),
    Case(7, "causal", kernel_len=3, skip=True, gates=True, channels=5),
    Case(7, "circular", kernel_len=4, channels=1),
    Case(64, "bidirectional", kernel_len=31, channels=7),
    Case(100, "circular", skip=True, gates=True, batch=3),
    Case(257, "causal", kernel_len=100, channels=5, gates=True),
    Case(1024, "bidirectional", batch=1, skip=True),
    Case(4099, "causal", skip=True, batch=1, channels=1),
    Case(4099, "circular", batch=1, channels=1, kernel_len=1000),
]
DEFAULT_BF16_CASES = [
    Case(257, "bidirectional", dtype="bfloat16", kernel_dtype="bfloat16", skip=True, gates=True),
]
# For variants of an implementation (other block sizes, learned blocks at init): one per mode.
FEW_CASES = [DEFAULT_CASES[1], DEFAULT_CASES[4], DEFAULT_CASES[6], DEFAULT_BF16_CASES[0]]
# The kernel gradient grows as sqrt(batch * seq) and FFT round-off with it: batch 1 from 1024 on.
SLOW_CASES = [Case(seq, mode, channels=channels, batch=1 if seq >= 1024 else 2, **option)
              for (seq, mode), (channels, option) in itertools.product(
                  itertools.product(LENGTHS, MODES),
                  [(3, {}), (5, {"skip": True, "gates": True}), (1, {"kernel_len": 1})])]
SLOW_BF16_CASES = [Case(seq, mode, dtype="bfloat16", skip=True, gates=True,
                        batch=1 if seq >= 1024 else 2)
                   for seq, mode in itertools.product(LENGTHS, MODES)] + [
                       Case(100, "causal", dtype="bfloat16", kernel_dtype="bfloat16", skip=True),
                       Case(1024, "circular", dtype="bfloat16", gates=True)]


def slow(test):
  """A copy of the inherited ``test`` marked slow, for one subclass: ``pytest.mark.slow(test)``
  marks the shared function itself, so in every class that inherits it."""
  @functools.wraps(test)
  def copy(self, *args, **kwargs):
    return test(self, *args, **kwargs)
  return pytest.mark.slow(copy)


def _equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in its equations' parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          yield from _equations(inner)


def signal_operands(fn, *args) -> tuple[list[int], int]:
  """``fn``'s jaxpr: for each ``pallas_call``, how many of its operands have u's
  ``[batch, seq, channels]`` shape (the signal, gates or cotangent it loads itself), and how
  many elementwise ``mul`` outside the kernels touch such an array (gating done in XLA)."""
  shape = args[0].shape
  operands, multiplies = [], 0
  for eqn in _equations(jax.make_jaxpr(fn)(*args).jaxpr):
    shapes = [getattr(var.aval, "shape", None) for var in eqn.invars]
    if eqn.primitive.name == "pallas_call":
      operands.append(shapes.count(shape))
    elif eqn.primitive.name == "mul" and shape in shapes:
      multiplies += 1
  return operands, multiplies


def numpy_gated_circular_conv(x, kernel, n, pre_gate=None, post_gate=None, skip=None):
  """Rows ``[0, seq)`` of ``post_gate * (circ_n(v, kernel) + skip * v)``, ``v = pre_gate * x``
  zero-extended to ``n`` rows, in float64 (the fused kernels' contract)."""
  f64 = lambda a: np.asarray(a, np.float64)
  v = f64(x) if pre_gate is None else f64(x) * f64(pre_gate)
  seq = v.shape[1]
  padded = np.pad(v, ((0, 0), (0, n - seq), (0, 0)))
  z = np.fft.irfft(np.fft.rfft(padded, axis=1) * np.fft.rfft(f64(kernel), axis=0), n,
                   axis=1)[:, :seq]
  if skip is not None:
    z = z + f64(skip) * v
  return z if post_gate is None else z * f64(post_gate)


def gated_kernel_inputs(seq, n, channels, dtype, pre, post, skip):
  """``(x, kernel [n, channels], pre_gate, post_gate, skip)``, absent options None."""
  keys = jax.random.split(jax.random.key(3), 5)
  x = jax.random.normal(keys[0], (2, seq, channels), dtype)
  kernel = jax.random.normal(keys[1], (n, channels), jnp.float32) / np.sqrt(n)
  gate = lambda key, on: jax.random.normal(key, x.shape, dtype) if on else None
  skip = jax.random.normal(keys[4], (channels,), jnp.float32) if skip else None
  return x, kernel, gate(keys[2], pre), gate(keys[3], post), skip


def gated_loss(conv, mode):
  """``sum(y^2)`` of ``conv(u, kernel, mode=, skip=, pre_gate=, post_gate=)`` (options None when
  not given), for gradients with respect to every input."""
  def loss(u, kernel, skip=None, pre_gate=None, post_gate=None):
    options = normalize_arguments(u, kernel, mode=mode, skip=skip, pre_gate=pre_gate,
                                  post_gate=post_gate)
    return jnp.sum(conv(u, kernel, **options).astype(jnp.float32) ** 2)
  return loss


def _positional(fn, mode):
  """``fn`` as ``(u, kernel, skip, pre_gate, post_gate) -> y`` for check_against_reference."""
  def call(u, kernel, skip, pre_gate, post_gate):
    return fn(u, kernel, mode=mode, skip=skip, pre_gate=pre_gate, post_gate=post_gate)
  return call


def _vjp_values(fn, args, argnums, cotangent):
  """``[y, *grads]`` of ``fn(*args)`` with respect to ``args[argnums]`` as float32 numpy."""
  def partial_fn(*diff):
    full = list(args)
    for index, value in zip(argnums, diff):
      full[index] = value
    return fn(*full)
  y, vjp = jax.vjp(partial_fn, *(args[i] for i in argnums))
  return [np.asarray(x, np.float32) for x in (y, *vjp(cotangent.astype(y.dtype)))]


def assert_plain_fft_error_rule(fn, case: Case, *, factor: float = 2.0) -> None:
  """``max|fn - ref32| <= factor * max|plain_fft_lowp - ref32| + floor`` for y and every gradient;
  ``floor`` is the dtype's rounding step at the reference's magnitude."""
  args = case.inputs()
  argnums = [i for i, a in enumerate(args) if a is not None]
  cotangent = jax.random.normal(jax.random.key(1), args[0].shape, jnp.float32)
  upcast = [None if a is None else a.astype(jnp.float32) for a in args]
  expected = _vjp_values(_positional(REFERENCE, case.mode), upcast, argnums, cotangent)
  actual = _vjp_values(_positional(fn, case.mode), args, argnums, cotangent)
  baseline = _vjp_values(_positional(PLAIN_FFT, case.mode), args, argnums, cotangent)
  eps = float(jnp.finfo(case.dtype).eps)
  names = ["y"] + [("u", "kernel", *OPTIONAL)[i] for i in argnums]
  for name, got, want, plain in zip(names, actual, expected, baseline):
    error, plain_error = np.abs(got - want).max(), np.abs(plain - want).max()
    floor = eps * np.abs(want).max(initial=1.0)
    assert error <= factor * plain_error + floor, (
        f"{name}: error {error:.3g} > {factor} x plain jnp.fft {case.dtype} error "
        f"{plain_error:.3g} + floor {floor:.3g}")


@pytest.mark.usefixtures("strict_promotion")
class LongConvTestBase:
  """Tests every implementation of ``long_conv`` must pass."""

  implementation: str = ""

  def conv(self, u, kernel, **options):
    """The implementation under test, with ``long_conv``'s signature."""
    return long_conv(u, kernel, implementation=self.implementation, **options)

  def check(self, case: Case) -> None:
    args = case.inputs()
    fn = _positional(self.conv, case.mode)
    y = jax.eval_shape(fn, *args)
    assert (y.shape, y.dtype) == (args[0].shape, args[0].dtype)
    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    testing.check_against_reference(jax.jit(fn), _positional(REFERENCE, case.mode), *args,
                                    argnums=argnums)
    if case.dtype != "float32":
      assert_plain_fft_error_rule(self.conv, case)

  @pytest.mark.parametrize("case", DEFAULT_CASES + DEFAULT_BF16_CASES, ids=str)
  def test_matches_reference(self, case):
    self.check(case)

  @pytest.mark.slow
  @pytest.mark.parametrize("case", SLOW_CASES + SLOW_BF16_CASES, ids=str)
  def test_matches_reference_grid(self, case):
    self.check(case)

  @pytest.mark.slow
  def test_float16(self):
    self.check(Case(100, "causal", dtype="float16", skip=True, gates=True))

  @pytest.mark.parametrize("mode", MODES)
  def test_causality(self, mode):
    """d y_t / d u_s is zero (up to round-off) exactly where the mode says: s > t for causal;
    and non-zero there for the other modes, so the test can tell them apart."""
    u, kernel, *_ = Case(40, mode, batch=1, channels=2).inputs()
    jacobian = jax.jacrev(lambda u: self.conv(u, kernel, mode=mode))(u)[0, :, :, 0, :, :]
    jacobian = np.abs(np.asarray(jacobian)).max(axis=(1, 3))  # [t, s]
    future = np.triu(np.ones_like(jacobian, bool), k=1)
    scale = jacobian.max()
    assert np.all(jacobian[~future].max() > 0.01 * scale)
    if mode == "causal":
      assert jacobian[future].max() <= 1e-6 * scale, jacobian[future].max() / scale
    else:
      assert jacobian[future].max() > 0.01 * scale

  def test_jit_and_vmap(self):
    self.check_jit_and_vmap(Case(50, "bidirectional", skip=True, gates=True))

  def check_jit_and_vmap(self, case: Case) -> None:
    """vmap over two kernels of the value and gradients equals the unbatched calls (``case``
    with skip and gates)."""
    u, kernel, skip, pre_gate, _ = case.inputs()
    kernels = jnp.stack([kernel, kernel[:, ::-1]])

    def loss(u, kernel, skip, pre_gate):
      y = self.conv(u, kernel, mode=case.mode, skip=skip, pre_gate=pre_gate)
      return jnp.sum(y * y)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    batched = jax.jit(jax.vmap(grad, in_axes=(None, 0, None, None)))(u, kernels, skip, pre_gate)
    for index in range(2):
      testing.assert_close(jax.tree.map(lambda x: x[index], batched),
                           grad(u, kernels[index], skip, pre_gate))
