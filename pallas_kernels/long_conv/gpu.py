"""Fused FFT convolution on GPU (Pallas, Triton lowering), FlashButterfly style.

One program convolves one ``(batch, channel)`` signal of length ``n = n1 * n2`` (powers of two,
``16 <= n1, n2 <= 64``, so ``256 <= n <= 4096``: a causal convolution up to 2048 positions) with
one precomputed kernel spectrum, entirely on chip: the signal is viewed as an ``[n1, n2]`` tile,
and the DFT is ``F1 @ x`` (size-``n1`` DFTs of the columns), the twiddles ``W_n^{k1 j2}``, and
``@ F2`` (size-``n2`` DFTs of the rows), leaving the spectrum in digit-reversed ``[k1, k2]``
layout; the product with the kernel spectrum (same layout) and the inverse (the same steps,
conjugated, in reverse order) follow without leaving registers/shared memory. 12 real matmuls of
at most 64 x 64 x 64, IEEE float32 (not TF32), per signal; HBM traffic is one read of the signal
and one write of the result (plus the small DFT matrices and the kernel spectrum).

This module never imports effjax: effjax computes the kernel spectrum (with its Monarch
transform of factors ``(n1, n2)``), the padding, gates and the backward around it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.interpret import gpu_interpret

MIN_TILE, MAX_TILE = 16, 64


def split(n: int) -> tuple[int, int] | None:
  """``(n1, n2)`` with ``n1 * n2 = n``, powers of two in ``[16, 64]``, ``n1 <= n2``; else None."""
  if n < MIN_TILE * MIN_TILE or n > MAX_TILE * MAX_TILE or n & (n - 1):
    return None
  n1 = 1 << ((n.bit_length() - 1) // 2)
  return n1, n // n1


@functools.cache
def _constants(n1: int, n2: int) -> tuple[np.ndarray, ...]:
  """float32 ``F1`` (re, im) ``[n1, n1]``, ``F2`` (re, im) ``[n2, n2]``, twiddles ``[n1, n2]``."""
  def roots(exponents, modulus):
    angle = -2 * np.pi * (exponents % modulus).astype(np.float64) / modulus
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
  f1 = roots(np.outer(np.arange(n1), np.arange(n1)), n1)
  f2 = roots(np.outer(np.arange(n2), np.arange(n2)), n2)
  twiddle = roots(np.outer(np.arange(n1), np.arange(n2)), n1 * n2)
  return (*f1, *f2, *twiddle)


def _dot(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def _kernel(x_ref, k_re_ref, k_im_ref, f1r_ref, f1i_ref, f2r_ref, f2i_ref, tr_ref, ti_ref,
            out_ref, *, scale: float):
  x = x_ref[...]
  f1r, f1i, f2r, f2i = f1r_ref[...], f1i_ref[...], f2r_ref[...], f2i_ref[...]
  tr, ti = tr_ref[...], ti_ref[...]
  # Forward: columns (size n1, real input), twiddles, rows (size n2; F2 is symmetric).
  ar, ai = _dot(f1r, x), _dot(f1i, x)
  ar, ai = ar * tr - ai * ti, ar * ti + ai * tr
  xr = _dot(ar, f2r) - _dot(ai, f2i)
  xi = _dot(ar, f2i) + _dot(ai, f2r)
  # Pointwise product with the kernel spectrum, in the same digit-reversed layout.
  kr, ki = k_re_ref[...], k_im_ref[...]
  pr, pi = xr * kr - xi * ki, xr * ki + xi * kr
  # Inverse: rows with conj(F2), conjugate twiddles, columns with conj(F1), real part only.
  br = _dot(pr, f2r) + _dot(pi, f2i)
  bi = _dot(pi, f2r) - _dot(pr, f2i)
  br, bi = br * tr + bi * ti, bi * tr - br * ti
  out_ref[...] = (_dot(f1r, br) + _dot(f1i, bi)) * scale


def fft_conv(x: jax.Array, k_hat_re: jax.Array, k_hat_im: jax.Array, *,
             interpret: bool | None = None) -> jax.Array:
  """Circular convolution ``real(ifft(fft(x) * k_hat))`` of every ``(batch, channel)`` signal.

  Args:
    x: float32 ``[batch, channels, n]``, ``n`` accepted by :func:`split`.
    k_hat_re, k_hat_im: float32 ``[channels, n1, n2]``, the kernel spectrum in digit-reversed
      layout (index ``k1 + n1 * k2`` of the DFT at ``[k1, k2]``).
    interpret: run in Pallas' interpreter; None follows ``pallas_kernels.interpret``.

  Returns:
    float32 ``[batch, channels, n]``.
  """
  interpret = gpu_interpret(interpret)
  batch, channels, n = x.shape
  tiles = split(n)
  if tiles is None:
    raise NotImplementedError(f"fused FFT conv needs n a power of two in [256, 4096], got {n}")
  n1, n2 = tiles
  if k_hat_re.shape != (channels, n1, n2) or k_hat_im.shape != (channels, n1, n2):
    raise ValueError(f"kernel spectrum must have shape {(channels, n1, n2)}, got "
                     f"{k_hat_re.shape} and {k_hat_im.shape}")
  signal = pl.BlockSpec((None, None, n1, n2), lambda b, c: (b, c, 0, 0))
  spectrum = pl.BlockSpec((None, n1, n2), lambda b, c: (c, 0, 0))
  whole = lambda rows, cols: pl.BlockSpec((rows, cols), lambda b, c: (0, 0))
  out = pl.pallas_call(
      functools.partial(_kernel, scale=1.0 / n),
      grid=(batch, channels),
      in_specs=[signal, spectrum, spectrum, whole(n1, n1), whole(n1, n1), whole(n2, n2),
                whole(n2, n2), whole(n1, n2), whole(n1, n2)],
      out_specs=signal,
      out_shape=jax.ShapeDtypeStruct((batch, channels, n1, n2), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=4 if n <= 1024 else 8, num_stages=1),
      interpret=interpret,
      name="long_conv_fused_fft",
  )(x.reshape(batch, channels, n1, n2), k_hat_re, k_hat_im, *_constants(n1, n2))
  return out.reshape(batch, channels, n)
