"""Tests of ``long_conv``: each implementation through the shared base, argument validation (once,
before dispatch), the reference and the plain FFT baseline against a NumPy loop, the Monarch DFT
against ``jnp.fft``, the fused kernels (in their interpreters, and lowered for their platforms on
CPU), sizes, dispatch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aot_compile import (ALL_GENERATIONS, TRITON_GPUS, compile_for_gpu, compile_for_tpu,
                         gpu_kernel_resources, kernel_calls)
from long_conv_test_base import (DEFAULT_BF16_CASES, DEFAULT_CASES, FEW_CASES, PLAIN_FFT,
                                 REFERENCE, Case, LongConvTestBase, _positional,
                                 gated_kernel_inputs, gated_loss, numpy_gated_circular_conv,
                                 signal_operands, slow)

from effjax import dispatch, testing
from effjax.ops.long_conv import butterfly, long_conv
from effjax.ops.long_conv import pallas_gpu as pallas_gpu_impl
from effjax.ops.long_conv import pallas_tpu as pallas_tpu_impl
from effjax.ops.long_conv.api import normalize_arguments
from effjax.ops.long_conv.xla_fft import smooth_size
from pallas_kernels.interpret import compile_target, interpret_mode
from pallas_kernels.long_conv import pallas_gpu, pallas_tpu


class TestXlaFft(LongConvTestBase):
  implementation = "xla_fft"


class TestButterfly(LongConvTestBase):
  implementation = "butterfly"


class TestValidation:
  """``long_conv`` validates its arguments before dispatch (``api.normalize_arguments``), the same
  for every implementation: the bad-input checks run once, on the default one."""

  @pytest.mark.parametrize("change, error, words", [
      (dict(u=np.zeros((2, 8))), ValueError, ["u", "rank 3", "(2, 8)"]),
      (dict(u=np.zeros((2, 0, 3), np.float32)), ValueError, ["u", ">= 1", "(2, 0, 3)"]),
      (dict(u=np.zeros((2, 8, 3), np.int32)), TypeError, ["u", "int32"]),
      (dict(u=[[[1.0]]]), TypeError, ["u", "array", "list"]),
      (dict(kernel=np.zeros((3, 9), np.float32)), ValueError, ["kernel_len", "<= seq = 8", "9"]),
      (dict(kernel=np.zeros((3, 9), np.float32), mode="circular"), ValueError,
       ["kernel_len", "'circular'", "(3, 9)"]),
      (dict(kernel=np.zeros((3, 4), np.float32), mode="bidirectional"), ValueError,
       ["odd", "bidirectional", "(3, 4)"]),
      (dict(kernel=np.zeros((3, 17), np.float32), mode="bidirectional"), ValueError,
       ["<= 2 * seq - 1 = 15", "(3, 17)"]),
      (dict(kernel=np.zeros((4, 8), np.float32)), ValueError, ["kernel", "channels=3", "(4, 8)"]),
      (dict(kernel=np.zeros((3,), np.float32)), ValueError, ["kernel", "rank 2", "(3,)"]),
      (dict(kernel=np.zeros((3, 8), np.float64)), TypeError, ["kernel", "float64"]),
      (dict(mode="anticausal"), ValueError, ["mode", "'anticausal'", "circular"]),
      (dict(mode=None), ValueError, ["mode", "None"]),
      (dict(skip=np.zeros((4,), np.float32)), ValueError, ["skip", "(3,)", "(4,)"]),
      (dict(skip=np.zeros((3,), np.int32)), TypeError, ["skip", "int32"]),
      (dict(pre_gate=np.zeros((2, 8, 4), np.float32)), ValueError, ["pre_gate", "(2, 8, 4)"]),
      (dict(post_gate=np.zeros((2, 8, 3), np.float16)), TypeError, ["post_gate", "float16"]),
  ])
  def test_bad_input_raises(self, change, error, words):
    arguments = dict(u=np.zeros((2, 8, 3), np.float32), kernel=np.zeros((3, 8), np.float32))
    arguments.update(change)
    with pytest.raises(error) as raised:
      long_conv(**arguments)
    for word in words:
      assert word in str(raised.value), f"{word!r} not in {raised.value}"


class _Variant(LongConvTestBase):
  """A variant of an implementation: the full case list only in the slow run."""

  test_matches_reference = slow(LongConvTestBase.test_matches_reference)

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
  """The fused Pallas GPU kernel in interpret mode (one pass up to 4096 points, three passes
  above: see test_long_conv_multipass.py). The interpreter runs the grid sequentially: two cases
  by default, the rest in the slow run."""
  implementation = "pallas_gpu"
  test_matches_reference_few = slow(_Variant.test_matches_reference_few)
  test_causality = slow(_Variant.test_causality)
  test_jit_and_vmap = slow(_Variant.test_jit_and_vmap)

  def conv(self, u, kernel, **options):
    with interpret_mode():
      return super().conv(u, kernel, **options)

  @pytest.mark.parametrize("case", [*FEW_CASES[:2], DEFAULT_BF16_CASES[0]], ids=str)
  def test_matches_reference_default(self, case):
    """Causal and (one pass, gates on chip, bfloat16 rule) bidirectional; folded circular (gates
    in XLA)."""
    self.check(case)


@pytest.mark.parametrize("n, channels", [(256, 70), (512, 3), (1024, 3), (2048, 3), (4096, 5)])
def test_fused_kernel_is_a_circular_convolution(n, channels):
  """Channel blocks of 32 (n = 256: 70 channels are three blocks, zero-padded) down to 2."""
  x = jax.random.normal(jax.random.key(0), (2, n, channels), jnp.float32)
  kernel = jax.random.normal(jax.random.key(1), (n, channels), jnp.float32) / np.sqrt(n)
  spectrum = jnp.swapaxes(butterfly.Butterfly(n, pallas_gpu.split(n)).forward(kernel), 0, 1)
  y = pallas_gpu.fft_conv(x, spectrum.real, spectrum.imag, interpret=True)
  expected = np.fft.irfft(np.fft.rfft(np.asarray(x, np.float64), axis=1)
                          * np.fft.rfft(np.asarray(kernel, np.float64), axis=0), n, axis=1)
  np.testing.assert_allclose(y, expected, atol=2e-5)


GATE_FLAGS = [(True, False, False), (False, True, False), (False, False, True),
              (True, True, True)]


@pytest.mark.parametrize("pre, post, skip", GATE_FLAGS, ids=str)
@pytest.mark.parametrize("seq, n, channels, dtype", [(200, 256, 5, jnp.float32),
                                                     (300, 512, 40, jnp.bfloat16)])
def test_fused_gpu_kernel_gates_on_chip(seq, n, channels, dtype, pre, post, skip):
  """The one-pass kernel reads ``[batch, seq, channels]`` (zero rows up to n and channel blocks
  by masked loads), applies each option on its own and all together, stores u's dtype."""
  x, kernel, pre_gate, post_gate, skip = gated_kernel_inputs(seq, n, channels, dtype, pre, post,
                                                             skip)
  spectrum = jnp.swapaxes(butterfly.Butterfly(n, pallas_gpu.split(n)).forward(kernel), 0, 1)
  y = pallas_gpu.fft_conv(x, spectrum.real, spectrum.imag, n=n, pre_gate=pre_gate,
                          post_gate=post_gate, skip=skip, dtype=dtype, interpret=True)
  assert y.shape == x.shape and y.dtype == dtype
  expected = numpy_gated_circular_conv(x, kernel, n, pre_gate, post_gate, skip)
  tolerance = 2e-5 if dtype == jnp.float32 else 1e-2 * np.abs(expected).max()
  np.testing.assert_allclose(np.asarray(y, np.float32), expected, atol=tolerance)


def _gated_args(seq, channels, mode, kernel_len, dtype):
  """Shapes of ``(u, kernels [2, ...], skip, pre_gate, post_gate)`` for the lowering tests."""
  u = jax.ShapeDtypeStruct((2, seq, channels), dtype)
  return (u, jax.ShapeDtypeStruct((2, channels, kernel_len), jnp.float32),
          jax.ShapeDtypeStruct((channels,), jnp.float32), u, u)


@pytest.mark.parametrize("n, channels, gated", [
    (256, 768, False), pytest.param(4096, 3, False, marks=pytest.mark.slow), (1024, 130, True)])
@TRITON_GPUS
def test_fused_gpu_kernel_compiles(gpu_name, n, channels, gated):
  """Forward and backward, vmapped over two kernels, compile for an A100 and an H100 on this
  CPU-only machine (Triton and ptxas, :mod:`pallas_kernels.aot`): every primitive of the kernel
  (reshapes, 3-D transposes, 3xTF32 dots, masked gathers and scatters) has a Triton lowering and
  the tiles fit the card's shared memory; n = 256 with 768 channels: 24 programs of 32 channels
  per batch row. Gated (both gates and skip, all differentiated): a third kernel call recomputes
  the forward for the post-gate's gradient."""
  seq = n // 2
  args = _gated_args(seq, channels, "causal", seq, jnp.bfloat16)[:5 if gated else 2]
  grad = jax.grad(gated_loss(pallas_gpu_impl.long_conv, "causal"), argnums=range(len(args)))
  grad = jax.vmap(grad, in_axes=(None, 0, *[None] * (len(args) - 2)))
  text = compile_for_gpu(gpu_name, grad, *args).as_text()
  assert text.count('name = "long_conv_fused_fft"') == (3 if gated else 2)  # forward and dv


@pytest.mark.parametrize("n", [512, 8192], ids=["one_pass", "three_pass"])
def test_fused_gpu_kernel_barely_spills_on_h100(n):
  """The on-chip programs of ``pallas_gpu.BLOCK_ELEMENTS`` elements fit an H100's registers: ptxas
  spills at most 64 bytes per thread in the one-pass kernel (n = 512) and in pass 2 of three
  (n = 8192: 16 rows of 512), where 8192-element programs spilled 1-1.6 KB."""
  *outer, n1, n2 = pallas_gpu.factors(n)
  x = jax.ShapeDtypeStruct((1, n // 2, 768), jnp.bfloat16)
  spectrum = jax.ShapeDtypeStruct((*outer, n2, n1, 768), jnp.float32)
  conv = lambda x, re, im: pallas_gpu.fft_conv(x, re, im, n=n, dtype=jnp.bfloat16)
  report = gpu_kernel_resources("h100", conv, x, spectrum, spectrum)
  on_chip = report["long_conv_fused_fft_complex" if outer else "long_conv_fused_fft"]
  assert on_chip.spill_store_bytes <= 64, on_chip
  assert len(report) >= (3 if outer else 1)


def test_fused_gpu_kernel_takes_three_passes_before_hopper():
  """``pallas_gpu.default_block_sizes``: on an A100 a causal convolution of 1024 positions
  takes three passes over 16 rows of 256 points (n = 4096), all barely spilling, instead of one
  pass of 2048 points, where ptxas keeps 32 registers and 25+ KB per thread of local memory; an
  H100 keeps the one pass."""
  pre_hopper = pallas_gpu.BlockSizes(max_on_chip=1024, max_n0=32)
  assert pallas_gpu.default_block_sizes((8, 0)) == pallas_gpu.default_block_sizes((8, 9)) == (
      pre_hopper)
  assert pallas_gpu.default_block_sizes((9, 0)) == pallas_gpu.default_block_sizes(None) == (
      pallas_gpu.BlockSizes(max_on_chip=4096, max_n0=64))
  assert pallas_gpu.factors(65536, pre_hopper) is None
  assert pallas_gpu.factors(32768, pre_hopper) == (32, 32, 32)
  u = jax.ShapeDtypeStruct((1, 1024, 768), jnp.bfloat16)
  kernel = jax.ShapeDtypeStruct((768, 1024), jnp.float32)
  conv = functools.partial(pallas_gpu_impl.long_conv, mode="causal")
  a100 = gpu_kernel_resources("a100", conv, u, kernel)
  passes = ("long_conv_outer_dft", "long_conv_fused_fft_complex", "long_conv_outer_idft")
  assert all(a100[name].spill_store_bytes <= 64 for name in passes), a100
  assert "long_conv_fused_fft" in gpu_kernel_resources("h100", conv, u, kernel)


class TestPallasTpuInterpret(_Variant):
  """The fused Pallas TPU kernel in the TPU interpreter (about 15 s a case on 2 cores): a
  one-pass case with gates and a three-pass case by default, the rest in the slow run."""
  implementation = "pallas_tpu"
  test_matches_reference_few = slow(_Variant.test_matches_reference_few)
  test_causality = slow(_Variant.test_causality)
  test_jit_and_vmap = slow(_Variant.test_jit_and_vmap)

  def conv(self, u, kernel, **options):
    with interpret_mode():
      return super().conv(u, kernel, **options)

  @pytest.mark.parametrize("case", [
      FEW_CASES[0], DEFAULT_BF16_CASES[0],  # one pass, gates on chip; the bfloat16 rule
      Case(2100, "causal", kernel_len=50, skip=True, gates=True, batch=1, channels=2),  # 3 passes
  ], ids=str)
  def test_matches_reference_default(self, case):
    self.check(case)


@pytest.mark.parametrize("pre, post, skip", GATE_FLAGS[1:], ids=str)
def test_fused_tpu_kernel_gates_on_chip(pre, post, skip):
  """One pass from ``[batch, seq, channels]`` (seq 300 of 320 rows, 130 channels: the second
  lane block lies partly outside the array) with each option, bfloat16 in and out."""
  n, seq, channels = 320, 300, 130
  x, kernel, pre_gate, post_gate, skip = gated_kernel_inputs(seq, n, channels, jnp.bfloat16,
                                                             pre, post, skip)
  with interpret_mode():
    y = pallas_tpu.fft_conv(x, *_digit_reversed_spectrum(kernel), n=n, pre_gate=pre_gate,
                            post_gate=post_gate, skip=skip, dtype=jnp.bfloat16)
  assert y.shape == x.shape and y.dtype == jnp.bfloat16
  expected = numpy_gated_circular_conv(x, kernel, n, pre_gate, post_gate, skip)
  np.testing.assert_allclose(np.asarray(y, np.float32), expected,
                             atol=1e-2 * np.abs(expected).max())


@pytest.mark.parametrize("implementation", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("mode, kernel_len, forward, backward", [
    ("bidirectional", 41, ([3], 0), [3, 2, 3]),
    ("causal", 300, ([3], 0), [3, 2, 3]),
    ("circular", 40, ([0], 3), [0, 0, 0]),  # folded (n > seq): gates, pad and fold in XLA
])
def test_gates_reach_the_kernel(implementation, mode, kernel_len, forward, backward):
  """In the forward jaxpr the kernel gets u and both gates itself (three ``[batch, seq,
  channels]`` operands) and no XLA multiply touches them; the backward has the forward, the
  ``dv`` call (cotangent and post-gate) and the post-gate's gradient (u, pre-gate, cotangent)."""
  case = Case(300, mode, kernel_len=kernel_len, skip=True, gates=True, channels=5)
  args = case.inputs()
  conv = functools.partial(long_conv, implementation=implementation)
  loss = gated_loss(conv, mode)
  with interpret_mode():
    assert signal_operands(_positional(conv, mode), *args) == forward
    operands, _ = signal_operands(jax.grad(loss, argnums=range(5)), *args)
  assert operands == backward


@pytest.mark.tpu
class TestPallasTpuCompiled(LongConvTestBase):
  """On a TPU: the whole base on the Mosaic-compiled kernel."""
  implementation = "pallas_tpu"


def _digit_reversed_spectrum(kernel, block_sizes=pallas_tpu.BlockSizes()):
  """``(re, im)`` of ``kernel [n, channels]`` in :func:`pallas_tpu.fft_conv`'s layout."""
  n, channels = kernel.shape
  split = pallas_tpu.factors(n, block_sizes)
  spectrum = butterfly.Butterfly(n, split).forward(kernel).reshape(n, channels)
  return spectrum.real, spectrum.imag


SMALL_TPU_BLOCKS = pallas_tpu.BlockSizes(max_on_chip=128)  # 320 points: three passes of 5 x 64


@pytest.mark.parametrize("n, channels, batch, block_sizes, passes", [
    (192, 130, 1, pallas_tpu.BlockSizes(), 1), (2560, 3, 2, pallas_tpu.BlockSizes(), 3),
    (320, 3, 1, SMALL_TPU_BLOCKS, 3),
], ids=["one_pass_two_channel_blocks", "three_pass", "three_pass_small_on_chip"])
def test_fused_tpu_kernel_is_a_circular_convolution(n, channels, batch, block_sizes, passes):
  """130 channels: padded to two blocks of 128 lanes; 2560 = 2 x (32 x 40): three passes; with
  at most 128 points on chip, 320 = 5 x 64: three passes."""
  assert len(pallas_tpu.factors(n, block_sizes)) == (2 if passes == 1 else 3)
  x = jax.random.normal(jax.random.key(0), (batch, n, channels), jnp.float32)
  kernel = jax.random.normal(jax.random.key(1), (n, channels), jnp.float32) / np.sqrt(n)
  y = pallas_tpu.fft_conv(x, *_digit_reversed_spectrum(kernel, block_sizes),
                          block_sizes=block_sizes, interpret=True)
  expected = np.fft.irfft(np.fft.rfft(np.asarray(x, np.float64), axis=1)
                          * np.fft.rfft(np.asarray(kernel, np.float64), axis=0), n, axis=1)
  np.testing.assert_allclose(y, expected, atol=2e-5)


@pytest.mark.parametrize("length", [1, 63, 64, 65, 257, 1000, 2048, 2049, 4099, 10**5 + 3,
                                    pallas_tpu.MAX_N0 * 1024])
def test_tpu_transform_sizes_fit_vmem(length):
  n = pallas_tpu.transform_size(length)
  split = pallas_tpu.factors(n)
  assert length <= n <= 2 * max(length, 64) and int(np.prod(split)) == n
  *outer, n1, n2 = split
  assert n1 in pallas_tpu.N1_CHOICES and n2 % 8 == 0 and n2 <= pallas_tpu.MAX_N2
  assert pallas_tpu.vmem_bytes(n1, n2, complex_signal=bool(outer)) <= pallas_tpu.VMEM_BUDGET
  assert pallas_tpu.VMEM_BUDGET < 16 * 2**20
  assert not outer or (length > 2048 and 2 <= outer[0] <= pallas_tpu.MAX_N0)
  if length <= 2048:  # one pass, at most 63 points of padding
    assert not outer and n - length < 64


def test_tpu_transform_size_has_a_limit():
  longest = pallas_tpu.largest_size()
  assert longest == pallas_tpu.MAX_N0 * max(m for m in range(64, 2**15, 64)
                                            if pallas_tpu.tiles(m, True))
  assert pallas_tpu.transform_size(longest) == longest
  assert pallas_tpu.transform_size(longest + 1) is None
  assert pallas_tpu.factors(longest + 64) is None and pallas_tpu.factors(100) is None


def test_tpu_block_sizes_lower_the_limits():
  """A smaller ``max_on_chip`` makes shorter transforms three passes; ``max_n0`` caps the rows."""
  assert pallas_tpu.factors(320, SMALL_TPU_BLOCKS) == (5, 8, 8)
  n = pallas_tpu.transform_size(300, SMALL_TPU_BLOCKS)
  assert len(pallas_tpu.factors(n, SMALL_TPU_BLOCKS)) == 3
  few_rows = pallas_tpu.BlockSizes(max_on_chip=128, max_n0=4)
  assert pallas_tpu.largest_size(few_rows) == 4 * 128
  assert pallas_tpu.transform_size(4 * 128 + 1, few_rows) is None


@pytest.mark.parametrize("seq, channels, mode, dtype, gated", [
    pytest.param(1000, 256, "causal", jnp.bfloat16, False, id="one_pass_bf16"),
    # ~2.5 min to compile; the gated three-pass case below covers the same kernels and more.
    pytest.param(1500, 130, "bidirectional", jnp.float32, False, id="three_pass_f32",
                 marks=pytest.mark.slow),
    pytest.param(1000, 130, "causal", jnp.bfloat16, True, id="one_pass_gated_bf16"),
    pytest.param(1500, 130, "bidirectional", jnp.float32, True, id="three_pass_gated_f32")])
@ALL_GENERATIONS
def test_pallas_tpu_compiles(generation, seq, channels, mode, dtype, gated):
  """Forward and backward, vmapped over two kernels, compile for a TPU (Mosaic's own compiler
  from libtpu, no TPU needed): the block shapes against the (8, 128) tiling, the strided loads
  and stores, every op of the kernel body, its vector layouts and VMEM on that generation, and the
  grid axis vmap adds. Gated (both gates and skip; 130 channels: a lane block partly outside the
  array): a third call recomputes the forward for the post-gate's gradient."""
  kernel_len = seq if mode == "causal" else 2 * seq - 1
  args = _gated_args(seq, channels, mode, kernel_len, dtype)[:5 if gated else 2]
  if not gated:  # a kernel in u's dtype
    args = (args[0], jax.ShapeDtypeStruct(args[1].shape, dtype))
  grad = jax.grad(gated_loss(pallas_tpu_impl.long_conv, mode), argnums=range(len(args)))
  grads = jax.vmap(grad, in_axes=(None, 0, *[None] * (len(args) - 2)))
  compiled = compile_for_tpu(generation, grads, *args)
  assert kernel_calls(compiled) == (3 if gated else 2)  # forward and dv; dk is XLA's
  assert ("long_conv_fused_fft_complex" in compiled.as_text()) == (mode != "causal")


def test_compiled_tpu_one_pass_refuses_float16():
  """Mosaic has no float16 vector loads: the compiled one pass raises NotImplementedError (dispatch
  moves on), bfloat16 traces; three passes (float32 in the kernel) take float16."""
  spectrum = lambda n: [jax.ShapeDtypeStruct((n, 3), jnp.float32)] * 2
  conv = lambda x, n, dtype: jax.eval_shape(
      functools.partial(pallas_tpu.fft_conv, n=n, dtype=dtype), x, *spectrum(n))
  with compile_target("tpu"):
    for x_dtype, dtype in [(jnp.float16, jnp.float32), (jnp.float32, jnp.float16)]:
      with pytest.raises(NotImplementedError, match="float16"):
        conv(jax.ShapeDtypeStruct((1, 100, 3), x_dtype), 128, dtype)
    assert conv(jax.ShapeDtypeStruct((1, 100, 3), jnp.bfloat16), 128, jnp.bfloat16).shape == (
        1, 100, 3)
    assert conv(jax.ShapeDtypeStruct((1, 2500, 3), jnp.float16), 2560, jnp.float16).dtype == (
        jnp.float16)


def test_pallas_tpu_falls_through():
  """Off a TPU without the interpreter, and beyond the three-pass limit, dispatch moves on."""
  u, kernel, *_ = Case(100, "causal", channels=2, batch=1).inputs()
  with pytest.raises(NotImplementedError, match="needs a TPU"):
    long_conv(u, kernel, implementation="pallas_tpu")
  np.testing.assert_array_equal(long_conv(u, kernel, implementation=("pallas_tpu", "xla_fft")),
                                long_conv(u, kernel, implementation="xla_fft"))
  u, kernel, *_ = Case(pallas_tpu.largest_size(), "causal", kernel_len=2, channels=1,
                       batch=1).inputs()
  with interpret_mode():
    with pytest.raises(NotImplementedError, match=f"up to {pallas_tpu.largest_size()} points"):
      long_conv(u, kernel, implementation="pallas_tpu")


def test_unmeasured_kernels_are_opt_in():
  """Kernels never compiled on their hardware stay out of the default order (by name only)."""
  assert dispatch.default_order("long_conv", "tpu") == ("butterfly", "xla_fft")
  assert dispatch.default_order("long_conv", "gpu") == ("xla_fft",)


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


@pytest.mark.parametrize("implementation", ["xla_fft", "butterfly", "pallas_tpu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_backward_keeps_only_the_inputs(implementation, dtype):
  """The recomputing custom_vjp: the residuals kept for the backward are u (in its own dtype) and
  the kernel, half (bfloat16 u: a third) of the spectra autodiff of the plain FFT keeps."""
  u, kernel, *_ = Case(1000, "causal", channels=4, dtype=dtype).inputs()
  residual_bytes = lambda fn: sum(x.nbytes for x in jax.tree.leaves(jax.vjp(fn, u, kernel)[1])
                                  if hasattr(x, "nbytes"))
  with interpret_mode():  # pallas_tpu runs in the TPU interpreter
    kept = residual_bytes(functools.partial(long_conv, mode="causal",
                                            implementation=implementation))
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
