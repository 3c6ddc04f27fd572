"""``long_conv`` with the fused Pallas GPU kernel (:mod:`pallas_kernels.long_conv.pallas_gpu`).

The transform size is the next power of two ``>=`` the linear-convolution length (at least 256;
circular mode uses ``seq`` itself when it is one) that
:func:`pallas_kernels.long_conv.pallas_gpu.factors` splits: up to 4096 points (causal ``seq <=
2048``; 1024 before Hopper, see :func:`pallas_kernels.long_conv.pallas_gpu.default_block_sizes`) in
one pass, blocks of channels of a batch row (channels last, no transpose) transformed, multiplied
and transformed back in one kernel (one HBM read and one write per element instead of the FFT
convolution's round trips through complex64 spectra); above that, up to 262144 points (causal ``seq
<= 131072``), FlashButterfly's three passes (``n = n0 * m``: outer size-``n0`` DFTs with twiddles,
the fused kernel on each complex row of ``m <= 4096`` points, the inverse outer DFTs; 40 bytes of
HBM traffic per element instead of 8). Longer calls raise ``NotImplementedError`` so dispatch falls
through to ``xla_fft``. The kernel spectrum (``[n2, n1, channels]``, or ``[n0, n2, n1, channels]``)
is computed by the Monarch transform of :mod:`butterfly` with the kernel's factors (small: one
signal per channel).

The kernels load ``u`` and the gates from ``[batch, seq, channels]`` and store ``y`` in u's dtype
themselves (zero rows up to ``n`` and the output window by masked loads and stores; gates and
skip on chip, pre-gate in the one-pass load or pass 1, post-gate and skip in the one-pass store
or pass 3), except a folded circular window (``n > seq``), gated in XLA around the kernel.

Backward (:func:`spectral.fused_long_conv`, one ``custom_vjp`` with the TPU kernel, residuals:
the inputs): ``dv`` is the same fused kernel run on the cotangent with the post-gate as its
pre-gate and the conjugate kernel spectrum (a correlation), the post-gate's gradient the forward
kernel recomputed with the cotangent as its post-gate; ``dk``, a sum over the batch, uses the
``rfft`` path of :mod:`xla_fft`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Float

from effjax.ops.long_conv import spectral
from effjax.ops.long_conv.butterfly import Butterfly
from effjax.ops.long_conv.xla_fft import RealFFT
from pallas_kernels import shapes
from pallas_kernels.interpret import gpu_compute_capability
from pallas_kernels.long_conv import pallas_gpu

MIN_SIZE = pallas_gpu.MIN_TILE * pallas_gpu.MIN_TILE


def _size(length: int, block_sizes: pallas_gpu.BlockSizes) -> int:
  """The least power of two ``>= max(length, MIN_SIZE)`` that :func:`pallas_gpu.factors` splits
  within ``block_sizes``."""
  n = shapes.next_power_of_two(length, MIN_SIZE)
  largest = pallas_gpu.largest_size(block_sizes)
  while n <= largest and pallas_gpu.factors(n, block_sizes) is None:
    n *= 2
  if n > largest:
    raise NotImplementedError(f"the fused GPU kernel serves transforms of up to {largest} "
                              f"points here; this call needs {length}")
  return n


@dataclasses.dataclass(frozen=True)
class _GpuKernel:
  """:class:`spectral.FusedKernel` of :func:`pallas_kernels.long_conv.pallas_gpu.fft_conv`."""
  n: int
  block_sizes: pallas_gpu.BlockSizes
  interpret: bool

  @property
  def transform(self) -> RealFFT:
    return RealFFT(self.n)

  def spectrum(self, kernel_t, plan: spectral.Plan):
    """``(re, im)`` float32 ``[*n0, n2, n1, channels]`` in the kernel's digit-reversed layout."""
    factors = pallas_gpu.factors(self.n, self.block_sizes)
    spectrum = Butterfly(self.n, factors).forward(spectral.pad_kernel(kernel_t, plan))
    spectrum = jnp.swapaxes(spectrum, -3, -2)
    return spectrum.real, spectrum.imag

  def convolve(self, x: Float[Array, "batch seq channels"], k_re, k_im, **options
               ) -> Float[Array, "batch seq channels"]:
    return pallas_gpu.fft_conv(x, k_re, k_im, n=self.n, block_sizes=self.block_sizes,
                               interpret=self.interpret, **options)


def long_conv(
    u: Float[Array, "batch seq channels"],
    kernel: Float[Array, "channels kernel_len"],
    *,
    mode: str,
    skip: Float[Array, " channels"] | None = None,
    pre_gate: Float[Array, "batch seq channels"] | None = None,
    post_gate: Float[Array, "batch seq channels"] | None = None,
    block_sizes: pallas_gpu.BlockSizes | None = None,
    interpret: bool | None = None,
) -> Float[Array, "batch seq channels"]:
  """Fused-kernel long convolution; arguments as validated by ``effjax.long_conv``.

  Args:
    block_sizes: the kernels' on-chip limits (a smaller ``max_on_chip`` makes longer transforms
      three passes: tests reach them at 4096 points with 256). None:
      :func:`pallas_gpu.default_block_sizes` of the GPU compiled for (1024 points and outer DFTs
      of at most 32 before Hopper, else 4096 and 64).
    interpret: run the kernels in Pallas' interpreter; None follows ``pallas_kernels.interpret``.

  Raises:
    NotImplementedError: off a GPU (unless interpreting), or a transform size above
      ``max_n0 * max_on_chip`` (262144; 32768 before Hopper).
    TypeError: ``block_sizes`` is not a :class:`pallas_gpu.BlockSizes`.
  """
  interpret = pallas_gpu.gpu_interpret(interpret)  # off a GPU, not interpreting: raises
  # The interpreter runs any tile: by default, the block sizes of an unknown GPU.
  block_sizes = shapes.resolve_block_sizes(
      block_sizes, pallas_gpu.BlockSizes,
      lambda: pallas_gpu.default_block_sizes(None if interpret else gpu_compute_capability()))
  seq = u.shape[1]
  plan = spectral.Plan.create(mode, seq, kernel.shape[1], lambda n: _size(n, block_sizes),
                              exact_circular=pallas_gpu.factors(seq, block_sizes) is not None)
  return spectral.fused_long_conv(u, kernel, plan=plan,
                                  fused=_GpuKernel(plan.n, block_sizes, interpret), skip=skip,
                                  pre_gate=pre_gate, post_gate=post_gate)
