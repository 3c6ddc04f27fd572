"""Tests of ``long_conv``: each implementation through the shared base, the reference and the
plain FFT baseline against a NumPy loop, the Monarch DFT against ``jnp.fft``, sizes, dispatch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from long_conv_test_base import (DEFAULT_CASES, FEW_CASES, PLAIN_FFT, REFERENCE, Case,
                                 LongConvTestBase, _positional)

from effjax import dispatch, testing
from effjax.ops.long_conv import butterfly, long_conv
from effjax.ops.long_conv.api import normalize_arguments
from effjax.ops.long_conv.xla_fft import smooth_size
from pallas_kernels.interpret import interpret_mode
from pallas_kernels.long_conv import gpu


class TestXlaFft(LongConvTestBase):
  implementation = "xla_fft"


class TestButterfly(LongConvTestBase):
  implementation = "butterfly"


class _Variant(LongConvTestBase):
  """A variant of an implementation: the full case list only in the slow run."""

  test_matches_reference = pytest.mark.slow(LongConvTestBase.test_matches_reference)

  @pytest.mark.parametrize("case", FEW_CASES, ids=str)
  def test_matches_reference_few(self, case):
    self.check(case)


class TestButterflySmallBlocks(_Variant):
  """Blocks of at most 5: many stages (up to 6 at 4099) and padding to 5-smooth sizes."""

  def conv(self, u, kernel, **options):
    return butterfly.long_conv(u, kernel, max_block=5, **normalize_arguments(u, kernel, **options))


class TestButterflyLearnedAtDft(_Variant):
  """Learned blocks initialized to the DFT (the autodiff path) compute the same convolution."""

  def conv(self, u, kernel, **options):
    options = normalize_arguments(u, kernel, **options)
    _, transform = butterfly.plan_and_transform(options["mode"], u.shape[1], kernel.shape[1])
    blocks = [jnp.asarray(b) for b in butterfly.dft_blocks(transform.factors)]
    return butterfly.long_conv(u, kernel, blocks=blocks, **options)


class TestPallasGpuInterpret(_Variant):
  """The fused Pallas GPU kernel in interpret mode (transform sizes 256..4096). The interpreter
  runs the grid sequentially: two cases by default, the rest in the slow run."""
  implementation = "pallas_gpu"
  test_matches_reference_few = pytest.mark.slow(_Variant.test_matches_reference_few)
  test_causality = pytest.mark.slow(_Variant.test_causality)
  test_jit_and_vmap = pytest.mark.slow(_Variant.test_jit_and_vmap)

  def conv(self, u, kernel, **options):
    with interpret_mode():
      return super().conv(u, kernel, **options)

  def check(self, case):
    if case.seq > 2048:
      pytest.skip("the fused kernel serves transform sizes up to 4096 (seq <= 2048)")
    super().check(case)

  @pytest.mark.parametrize("case", FEW_CASES[:2], ids=str)
  def test_matches_reference_two(self, case):
    self.check(case)


@pytest.mark.parametrize("n", [256, 512, 1024, 2048, 4096])
def test_fused_kernel_is_a_circular_convolution(n):
  x = jax.random.normal(jax.random.key(0), (2, 3, n), jnp.float32)
  kernel = jax.random.normal(jax.random.key(1), (3, n), jnp.float32) / np.sqrt(n)
  spectrum = jnp.moveaxis(butterfly.Butterfly(n, gpu.split(n)).forward(kernel.T), -1, 0)
  y = gpu.fft_conv(x, spectrum.real, spectrum.imag, interpret=True)
  expected = np.fft.irfft(np.fft.rfft(np.asarray(x, np.float64)) * np.fft.rfft(kernel), n)
  np.testing.assert_allclose(y, expected, atol=2e-5)


def test_pallas_gpu_falls_through_beyond_its_sizes():
  u, kernel, *_ = Case(2049, "causal", channels=2, batch=1).inputs()  # needs 4097 points
  with interpret_mode():
    with pytest.raises(NotImplementedError, match="256..4096"):
      long_conv(u, kernel, implementation="pallas_gpu")
    np.testing.assert_array_equal(long_conv(u, kernel, implementation=("pallas_gpu", "xla_fft")),
                                  long_conv(u, kernel, implementation="xla_fft"))


def numpy_conv(u, kernel, mode, skip=None, pre_gate=None, post_gate=None):
  """The documented formulas, one loop over taps, in float64."""
  u, kernel = np.asarray(u, np.float64), np.asarray(kernel, np.float64)
  v = u if pre_gate is None else u * np.asarray(pre_gate, np.float64)
  seq, kernel_len = v.shape[1], kernel.shape[1]
  y = np.zeros_like(v)
  for j in range(kernel_len):
    lag = j - kernel_len // 2 if mode == "bidirectional" else j
    for t in range(seq):
      s = (t - lag) % seq if mode == "circular" else t - lag
      if 0 <= s < seq:
        y[:, t] += kernel[:, j] * v[:, s]
  if skip is not None:
    y += np.asarray(skip, np.float64) * v
  return y if post_gate is None else y * np.asarray(post_gate, np.float64)


@pytest.mark.parametrize("case", [c for c in DEFAULT_CASES if c.seq <= 257], ids=str)
@pytest.mark.parametrize("oracle", [REFERENCE, PLAIN_FFT], ids=["reference", "plain_fft"])
def test_oracles_match_numpy_loop(case, oracle):
  args = case.inputs()
  testing.assert_close(_positional(oracle, case.mode)(*args), numpy_conv(*args[:2], case.mode,
                                                                          *args[2:]))


@pytest.mark.parametrize("n", [1, 2, 7, 64, 100, 257, 1024, 4116, 8232])
@pytest.mark.parametrize("max_block", [4, 16, 64])
def test_butterfly_dft_equals_jnp_fft(n, max_block):
  if butterfly.factorize(n, max_block) is None:
    pytest.skip(f"{n} has a prime factor above {max_block}")
  transform = butterfly.Butterfly.of_size(n, max_block)
  x = jax.random.normal(jax.random.key(0), (2, n, 3), jnp.float32)
  spectrum = transform.forward(x)
  expected = np.fft.fft(np.asarray(x, np.float64), axis=1)
  scale = np.abs(expected).max()
  np.testing.assert_allclose(transform.natural_order(spectrum), expected, atol=1e-6 * scale)
  np.testing.assert_allclose(transform.inverse(spectrum), x, atol=1e-5)


@pytest.mark.parametrize("length", [1, 2, 13, 67, 257, 1000, 4099, 8197, 131071])
@pytest.mark.parametrize("max_block", [5, 16, 64])
def test_butterfly_size_factorizes(length, max_block):
  n = butterfly.butterfly_size(length, max_block)
  factors = butterfly.factorize(n, max_block)
  assert length <= n <= 2 * max(length, 1)
  assert factors is not None and all(2 <= f <= max_block for f in factors)
  assert int(np.prod(factors, dtype=np.int64)) == n


@pytest.mark.parametrize("length", [1, 2, 7, 11, 2047, 4099, 10**5 + 3])
def test_smooth_size(length):
  n = smooth_size(length)
  assert n >= length
  for prime in (2, 3, 5, 7):
    while n % prime == 0:
      n //= prime
  assert n == 1


def test_learned_blocks_get_gradients_and_change_the_output():
  u, kernel, *_ = Case(30, "causal").inputs()
  _, transform = butterfly.plan_and_transform("causal", 30, 30)
  blocks = [jnp.asarray(b) for b in butterfly.dft_blocks(transform.factors)]
  loss = jax.jit(
      lambda blocks: jnp.sum(butterfly.long_conv(u, kernel, mode="causal", blocks=blocks) ** 2))
  grads = jax.jit(jax.grad(loss))(blocks)
  assert all(float(jnp.abs(g).max()) > 0 for g in grads)
  moved = [b + 0.1 * g for b, g in zip(blocks, grads)]
  assert float(loss(moved)) != pytest.approx(float(loss(blocks)))


def test_learned_blocks_of_wrong_shape_raise():
  u, kernel, *_ = Case(30, "causal").inputs()
  with pytest.raises(ValueError, match="blocks must have shapes"):
    butterfly.long_conv(u, kernel, mode="causal", blocks=[jnp.zeros((2, 3, 3))])


def test_default_order_serves_the_call():
  assert dispatch.default_order("long_conv", "cpu") == ("xla_fft",)
  u, kernel, *_ = Case(20, "causal").inputs()
  np.testing.assert_array_equal(long_conv(u, kernel), long_conv(u, kernel,
                                                                implementation="xla_fft"))


@pytest.mark.parametrize("implementation", ["xla_fft", "butterfly"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_backward_keeps_only_the_inputs(implementation, dtype):
  """The recomputing custom_vjp: the residuals kept for the backward are u (in its own dtype) and
  the kernel, half (bfloat16 u: a third) of the spectra autodiff of the plain FFT keeps."""
  u, kernel, *_ = Case(1000, "causal", channels=4, dtype=dtype).inputs()
  residual_bytes = lambda fn: sum(x.nbytes for x in jax.tree.leaves(jax.vjp(fn, u, kernel)[1])
                                  if hasattr(x, "nbytes"))
  kept = residual_bytes(functools.partial(long_conv, mode="causal", implementation=implementation))
  assert kept <= u.nbytes + kernel.nbytes + 1024
  assert 1.9 * kept < residual_bytes(functools.partial(PLAIN_FFT, mode="causal"))


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["xla_fft", "butterfly", "pallas_gpu"])
@pytest.mark.parametrize("case", [
    Case(1000, "circular", skip=True, channels=16, batch=3),
    Case(1024, "bidirectional", dtype="bfloat16", gates=True, channels=16)], ids=str)
def test_on_gpu(implementation, case):
  """On a GPU (cuFFT, cuBLAS, Triton; TF32 must not leak into the float32 transforms)."""
  base = LongConvTestBase()
  base.implementation = implementation
  base.check(case)
