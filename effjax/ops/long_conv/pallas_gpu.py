"""``long_conv`` with the fused Pallas GPU kernel (:mod:`pallas_kernels.long_conv.gpu`).

The transform size is the next power of two ``>=`` the linear-convolution length (at least 256;
circular mode uses ``seq`` itself when it is one); sizes above 4096 (causal ``seq > 2048``)
raise ``NotImplementedError`` so dispatch falls through to ``xla_fft``. The kernel spectrum
``[n2, n1, channels]`` is computed by the Monarch transform of :mod:`butterfly` (small: one
signal per channel); blocks of channels of a batch row (channels last, no transpose) are then
transformed, multiplied and transformed back in one kernel: one HBM read and one write per
element instead of the FFT convolution's round trips through complex64 spectra.

Backward (``custom_vjp``, residuals: the inputs): ``dv`` is the same fused kernel run on the
padded cotangent with the conjugate kernel spectrum (a correlation); ``dk``, a sum over the
batch, uses the ``rfft`` path of :mod:`xla_fft`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Float

from effjax.ops.long_conv import spectral
from effjax.ops.long_conv.butterfly import Butterfly
from effjax.ops.long_conv.xla_fft import RealFFT
from pallas_kernels.long_conv import gpu

MIN_SIZE = gpu.MIN_TILE * gpu.MIN_TILE


def _power_of_two(length: int) -> int:
  return max(MIN_SIZE, 1 << max(length - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class _GpuKernel:
  """:class:`spectral.FusedKernel` of :func:`pallas_kernels.long_conv.gpu.fft_conv`."""
  n: int
  interpret: bool

  @property
  def transform(self) -> RealFFT:
    return RealFFT(self.n)

  def spectrum(self, kernel_t, plan: spectral.Plan):
    """``(re, im)`` float32 ``[n2, n1, channels]`` in the kernel's digit-reversed layout."""
    spectrum = Butterfly(plan.n, gpu.split(plan.n)).forward(spectral.pad_kernel(kernel_t, plan))
    spectrum = jnp.swapaxes(spectrum, 0, 1)
    return spectrum.real, spectrum.imag

  def convolve(self, x: Float[Array, "batch n channels"], k_re, k_im
               ) -> Float[Array, "batch n channels"]:
    return gpu.fft_conv(x, k_re, k_im, interpret=self.interpret)


def long_conv(
    u: Float[Array, "batch seq channels"],
    kernel: Float[Array, "channels kernel_len"],
    *,
    mode: str,
    skip: Float[Array, " channels"] | None = None,
    pre_gate: Float[Array, "batch seq channels"] | None = None,
    post_gate: Float[Array, "batch seq channels"] | None = None,
    interpret: bool | None = None,
) -> Float[Array, "batch seq channels"]:
  """Fused-kernel long convolution; arguments as validated by ``effjax.long_conv``.

  Raises:
    NotImplementedError: off a GPU (unless interpreting), or a transform size above 4096.
  """
  interpret = gpu.gpu_interpret(interpret)  # off a GPU, not interpreting: NotImplementedError
  seq = u.shape[1]
  plan = spectral.Plan.create(mode, seq, kernel.shape[1], _power_of_two,
                              exact_circular=gpu.split(seq) is not None)
  if gpu.split(plan.n) is None:
    raise NotImplementedError(f"the fused kernel holds transforms of 256..4096 points; this call "
                              f"needs {plan.n} (seq={seq}, kernel_len={kernel.shape[1]}, {mode})")
  conv = spectral.fused_conv(plan, _GpuKernel(plan.n, interpret))
  return spectral.gated_long_conv(u, kernel, conv=conv, skip=skip, pre_gate=pre_gate,
                                  post_gate=post_gate)
