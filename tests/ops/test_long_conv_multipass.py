"""Tests of the three-pass fused GPU long convolution (``pallas_gpu`` above the on-chip size):
the kernel against NumPy, the op against the float32 reference (forward and gradients, every
mode) in interpret mode, the split of the sizes, the Triton lowering for CUDA and the limit.

To keep the interpreter cheap, most cases lower the one-pass limit (:data:`SMALL`): the
smallest three-pass transform is then 4096 points, ``n0 = 16`` rows of 256."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aot_compile import TRITON_GPUS, compile_for_gpu
from long_conv_test_base import (DEFAULT_BF16_CASES, Case, LongConvTestBase, gated_kernel_inputs,
                                 gated_loss, numpy_gated_circular_conv, signal_operands, slow)

from effjax.ops.long_conv import butterfly, long_conv
from effjax.ops.long_conv import pallas_gpu as pallas_gpu_impl
from effjax.ops.long_conv.api import normalize_arguments
from pallas_kernels.interpret import interpret_mode
from pallas_kernels.long_conv import pallas_gpu

SMALL = pallas_gpu.BlockSizes(max_on_chip=256)  # longer transforms round up to 16 x 256
KERNEL_NAMES = ("long_conv_outer_dft", "long_conv_fused_fft_complex", "long_conv_outer_idft",
                "long_conv_fused_fft")


def _numpy_circular_conv(x, kernel):
  n = x.shape[1]
  return np.fft.irfft(np.fft.rfft(np.asarray(x, np.float64), axis=1)
                      * np.fft.rfft(np.asarray(kernel, np.float64), axis=0), n, axis=1)


@pytest.mark.parametrize("n, channels, block_sizes", [
    (4096, 40, SMALL), (8192, 5, pallas_gpu.BlockSizes())], ids=["16x256_40ch", "16x512_5ch"])
def test_three_pass_kernel_is_a_circular_convolution(n, channels, block_sizes):
  """40 channels: padded to 64, two channel blocks in every pass; 8192 is three passes at the
  real on-chip limit (the smallest n0 = 16, so 512 points on chip)."""
  n0, n1, n2 = pallas_gpu.factors(n, block_sizes)
  assert n0 == pallas_gpu.MIN_N0 and n1 * n2 == n // n0
  x = jax.random.normal(jax.random.key(0), (2, n, channels), jnp.float32)
  kernel = jax.random.normal(jax.random.key(1), (n, channels), jnp.float32) / np.sqrt(n)
  spectrum = jnp.swapaxes(butterfly.Butterfly(n, (n0, n1, n2)).forward(kernel), -3, -2)
  y = pallas_gpu.fft_conv(x, spectrum.real, spectrum.imag, block_sizes=block_sizes,
                          interpret=True)
  np.testing.assert_allclose(y, _numpy_circular_conv(x, kernel), atol=2e-5)


@pytest.mark.parametrize("pre, post, skip", [(True, True, True), (False, True, False)], ids=str)
def test_three_pass_kernel_gates_in_passes_one_and_three(pre, post, skip):
  """``[batch, seq, channels]`` in and out (seq 3000 of 4096 rows, 40 channels: two blocks of
  32, the second partly outside the array), pre-gate in pass 1, post-gate and skip in pass 3,
  bfloat16 result."""
  n, seq, channels = 4096, 3000, 40
  x, kernel, pre_gate, post_gate, skip = gated_kernel_inputs(seq, n, channels, jnp.float32, pre,
                                                             post, skip)
  split = pallas_gpu.factors(n, SMALL)
  spectrum = jnp.swapaxes(butterfly.Butterfly(n, split).forward(kernel), -3, -2)
  y = pallas_gpu.fft_conv(x, spectrum.real, spectrum.imag, n=n, pre_gate=pre_gate,
                          post_gate=post_gate, skip=skip, dtype=jnp.bfloat16,
                          block_sizes=SMALL, interpret=True)
  assert y.shape == x.shape and y.dtype == jnp.bfloat16
  expected = numpy_gated_circular_conv(x, kernel, n, pre_gate, post_gate, skip)
  np.testing.assert_allclose(np.asarray(y, np.float32), expected,
                             atol=1e-2 * np.abs(expected).max())


def test_three_pass_gates_reach_passes_one_and_three():
  """Forward jaxpr: pass 1 loads u and the pre-gate, pass 3 u, the pre-gate (for the skip) and
  the post-gate, no XLA multiply touches them; the backward adds ``dv`` and the post-gate's
  gradient, three passes each."""
  case = Case(300, "causal", kernel_len=100, skip=True, gates=True, channels=5)
  args = case.inputs()
  conv = functools.partial(pallas_gpu_impl.long_conv, block_sizes=SMALL, interpret=True)
  y = lambda u, kernel, skip, pre_gate, post_gate: conv(u, kernel, **normalize_arguments(
      u, kernel, skip=skip, pre_gate=pre_gate, post_gate=post_gate))
  assert signal_operands(y, *args) == ([2, 0, 3], 0)
  operands, _ = signal_operands(jax.grad(gated_loss(conv, "causal"), argnums=range(5)), *args)
  assert operands == [2, 0, 3, 2, 0, 2, 2, 0, 3]


def test_three_pass_kernel_checks_the_spectrum_layout():
  x = jnp.zeros((1, 4096, 2), jnp.float32)
  one_pass = jnp.zeros((64, 64, 2), jnp.float32)  # the one-pass layout of 4096
  with pytest.raises(ValueError, match=r"\(16, 16, 16, 2\)"):
    pallas_gpu.fft_conv(x, one_pass, one_pass, block_sizes=SMALL, interpret=True)


def test_factors_cover_every_power_of_two_up_to_the_limit():
  assert pallas_gpu.largest_size() == 262144
  for log_n in range(8, 19):
    n = 1 << log_n
    split = pallas_gpu.factors(n)
    *outer, n1, n2 = split
    assert int(np.prod(split)) == n and pallas_gpu.split(n1 * n2) == (n1, n2)
    assert not outer if n <= 4096 else pallas_gpu.MIN_N0 <= outer[0] <= pallas_gpu.MAX_N0
  # The most rows that leave at least 512 points on chip.
  assert pallas_gpu.factors(8192) == (16, 16, 32) and pallas_gpu.factors(32768) == (64, 16, 32)
  assert pallas_gpu.factors(65536) == (64, 32, 32) and pallas_gpu.factors(262144) == (64, 64, 64)
  assert pallas_gpu.factors(524288) is None and pallas_gpu.factors(3 * 4096) is None
  assert pallas_gpu.factors(4096, SMALL) == (16, 16, 16)
  assert pallas_gpu.factors(2048, SMALL) is None  # n0 would be 8 < 16


class TestPallasGpuThreePass(LongConvTestBase):
  """The op in interpret mode with :data:`SMALL` (256 points on chip): transforms of 512 points
  or more take three passes of at least 4096 (256 stays one pass). By default one three-pass
  case per mode with odd channel counts; the base's lists (one- and three-pass) in the slow
  run."""
  test_matches_reference = slow(LongConvTestBase.test_matches_reference)
  test_causality = slow(LongConvTestBase.test_causality)
  test_jit_and_vmap = slow(LongConvTestBase.test_jit_and_vmap)

  def conv(self, u, kernel, **options):
    with interpret_mode():
      return pallas_gpu_impl.long_conv(u, kernel, block_sizes=SMALL,
                                       **normalize_arguments(u, kernel, **options))

  @pytest.mark.parametrize("case", [
      Case(300, "causal", kernel_len=100, skip=True, gates=True, channels=5),
      Case(300, "circular", kernel_len=40, skip=True, gates=True, batch=3),  # folded, n = 4096
      Case(300, "bidirectional", kernel_len=61, channels=33),  # two channel blocks of 32
      Case(4096, "circular", kernel_len=33, batch=1),  # n = seq: no padding
      DEFAULT_BF16_CASES[0],  # bidirectional bfloat16: the plain-FFT error rule
  ], ids=str)
  def test_matches_reference_three_pass(self, case):
    u, kernel, *_ = case.inputs()
    jaxpr = jax.make_jaxpr(functools.partial(self.conv, mode=case.mode))(u, kernel)
    assert all(name in str(jaxpr) for name in KERNEL_NAMES[:3])
    self.check(case)

  def test_three_pass_under_jit_and_vmap(self):
    """The base's vmap over two kernels (a grid axis added to each of the three kernels)."""
    self.check_jit_and_vmap(Case(300, "bidirectional", kernel_len=41, skip=True, gates=True))


def test_three_pass_at_the_real_on_chip_limit():
  """The op at causal seq 4097 (8192 points: 16 rows of 512) with the real limit."""
  base = LongConvTestBase()
  base.implementation = "pallas_gpu"
  base.conv = lambda u, kernel, **options: _interpreted_op(u, kernel, **options)
  base.check(Case(4097, "causal", skip=True, batch=1, channels=3))


def _interpreted_op(u, kernel, **options):
  with interpret_mode():
    return long_conv(u, kernel, implementation="pallas_gpu", **options)


@pytest.mark.parametrize("seq, channels, mode, block_sizes, split, gated", [
    pytest.param(16384, 768, "causal", pallas_gpu.BlockSizes(), (64, 16, 32), False,
                 marks=pytest.mark.slow),
    pytest.param(131072, 3, "causal", pallas_gpu.BlockSizes(), (64, 64, 64), False,
                 marks=pytest.mark.slow),
    pytest.param(65536, 5, "circular", pallas_gpu.BlockSizes(), (64, 32, 32), False,
                 marks=pytest.mark.slow),
    (300, 7, "bidirectional", SMALL, (16, 16, 16), False),
    (16384, 40, "bidirectional", pallas_gpu.BlockSizes(), (64, 16, 32), True),
], ids=["causal_16k_768ch", "causal_128k_largest", "circular_64k", "small_limit",
        "gated_bidirectional_16k"])
@TRITON_GPUS
def test_three_pass_compiles(monkeypatch, gpu_name, seq, channels, mode, block_sizes, split,
                             gated):
  """Forward and backward (bfloat16 u), vmapped over two kernels (one more grid axis), compile
  for an A100 and an H100 on this CPU-only machine (Triton and ptxas, :mod:`pallas_kernels.aot`):
  passes 1 and 3 and the complex on-chip kernel,
  twice each (forward and dv; three times with both gates and skip, all differentiated: the
  post-gate's gradient recomputes the forward), no one-pass kernel; the kernel spectrum has the
  ``[n0, n2, n1, channels]`` layout of the expected split."""
  spectrum_shapes, fft_conv = set(), pallas_gpu.fft_conv

  def recording_fft_conv(x, k_re, k_im, **options):
    spectrum_shapes.add(k_re.shape)
    return fft_conv(x, k_re, k_im, **options)

  monkeypatch.setattr(pallas_gpu, "fft_conv", recording_fft_conv)
  kernel_len = 2 * seq - 1 if mode == "bidirectional" else seq
  u = jax.ShapeDtypeStruct((2, seq, channels), jnp.bfloat16)
  args = (u, jax.ShapeDtypeStruct((2, channels, kernel_len), jnp.float32),
          jax.ShapeDtypeStruct((channels,), jnp.float32), u, u)[:5 if gated else 2]
  conv = functools.partial(pallas_gpu_impl.long_conv, block_sizes=block_sizes)
  grads = jax.vmap(jax.grad(gated_loss(conv, mode), argnums=range(len(args))),
                   in_axes=(None, 0, *[None] * (len(args) - 2)))
  text = compile_for_gpu(gpu_name, grads, *args).as_text()
  calls = 3 if gated else 2
  assert [text.count(f'name = "{name}"') for name in KERNEL_NAMES] == [calls] * 3 + [0]
  n0, n1, n2 = split
  assert spectrum_shapes == {(n0, n2, n1, channels)}


def test_pallas_gpu_falls_through_beyond_the_three_pass_limit():
  """A causal seq of 262144 needs 262145 points: beyond 64 rows of 4096, so xla_fft serves it."""
  u, kernel, *_ = Case(pallas_gpu.largest_size(), "causal", kernel_len=2, channels=1,
                       batch=1).inputs()
  with interpret_mode():
    with pytest.raises(NotImplementedError,
                       match="up to 262144 points here; this call needs 262145"):
      long_conv(u, kernel, implementation="pallas_gpu")
    np.testing.assert_array_equal(long_conv(u, kernel, implementation=("pallas_gpu", "xla_fft")),
                                  long_conv(u, kernel, implementation="xla_fft"))


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    Case(5000, "causal", skip=True, channels=16, batch=2),
    Case(3000, "bidirectional", kernel_len=2001, dtype="bfloat16", gates=True, channels=48,
         batch=1)], ids=str)
def test_three_pass_on_gpu(case):
  """On a GPU: Triton-compiled three passes (8192 points: 16 rows of 512), 3xTF32 dots, against
  the float32 reference, forward and gradients."""
  base = LongConvTestBase()
  base.implementation = "pallas_gpu"
  base.check(case)
