"""``long_conv`` with the fused Pallas GPU kernel (:mod:`pallas_kernels.long_conv.gpu`).

The transform size is the next power of two ``>=`` the linear-convolution length (at least 256;
circular mode uses ``seq`` itself when it is one); sizes above 4096 (causal ``seq > 2048``)
raise ``NotImplementedError`` so dispatch falls through to ``xla_fft``. The kernel spectrum
``[channels, n1, n2]`` is computed by the Monarch transform of :mod:`butterfly` (small: one
signal per channel); each ``(batch, channel)`` signal is then transformed, multiplied and
transformed back in one kernel: one HBM read and one write per element instead of the
FFT convolution's round trips through complex64 spectra.

Backward (``custom_vjp``, residuals: the inputs): ``dv`` is the same fused kernel run on the
padded cotangent with the conjugate kernel spectrum (a correlation); ``dk``, a sum over the
batch, uses the ``rfft`` path of :mod:`xla_fft`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from effjax.ops.long_conv import spectral
from effjax.ops.long_conv.butterfly import Butterfly
from effjax.ops.long_conv.xla_fft import RealFFT
from pallas_kernels.long_conv import gpu

MIN_SIZE = gpu.MIN_TILE * gpu.MIN_TILE


def _power_of_two(length: int) -> int:
  return max(MIN_SIZE, 1 << max(length - 1, 0).bit_length())


def _kernel_spectrum(kernel_t, plan: spectral.Plan):
  """``(re, im)`` float32 ``[channels, n1, n2]`` in the kernel's digit-reversed layout."""
  spectrum = Butterfly(plan.n, gpu.split(plan.n)).forward(spectral.pad_kernel(kernel_t, plan))
  spectrum = jnp.moveaxis(spectrum, -1, 0)
  return spectrum.real, spectrum.imag


def _fused(x: Float[Array, "batch n channels"], k_re, k_im, interpret: bool
           ) -> Float[Array, "batch n channels"]:
  return jnp.swapaxes(gpu.fft_conv(jnp.swapaxes(x, 1, 2), k_re, k_im, interpret=interpret), 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(v, kernel_t, plan: spectral.Plan, interpret: bool):
  return plan.window(_fused(spectral.pad_signal(v, plan), *_kernel_spectrum(kernel_t, plan),
                            interpret))


def _conv_fwd(v, kernel_t, plan, interpret):
  return _conv(v, kernel_t, plan, interpret), (v, kernel_t)


def _conv_bwd(plan, interpret, residuals, dy):
  v, kernel_t = residuals
  k_re, k_im = _kernel_spectrum(kernel_t, plan)
  dv = _fused(plan.window_transpose(dy), k_re, -k_im, interpret)[:, :plan.seq]
  dk = spectral.kernel_gradient(v, kernel_t, dy, plan, RealFFT(plan.n))
  return dv.astype(v.dtype), dk


_conv.defvjp(_conv_fwd, _conv_bwd)


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
  return spectral.gated_long_conv(u, kernel, conv=lambda v, k: _conv(v, k, plan, interpret), skip=skip,
                                  pre_gate=pre_gate, post_gate=post_gate)
