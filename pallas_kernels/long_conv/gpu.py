"""Fused FFT convolution on GPU (Pallas, Triton lowering), FlashButterfly / Monarch style.

Channels stay last (``[batch, n, channels]``): one program convolves a block of ``cb`` channels
of one batch row (:func:`channel_block`: ``n * cb = 8192`` elements, 32 float32 registers per
thread and tile at 8 warps, so the half dozen live tiles fit the register file), all at once, so
every DFT stage is ONE matmul whose N dimension spans many signals (``n2 * cb`` or ``n1 * cb``: at
least 128 when there are enough channels). With ``n = n1 * n2`` (``j = j1 n2 + j2``,
``k = k1 + n1 k2``; powers of two, ``16 <= n1, n2 <= 64``, so ``256 <= n <= 4096``: a causal
convolution up to 2048 positions), the block viewed as ``[n1, n2 * cb]`` goes through

1. ``F1 [n1, n1] @ x [n1, n2 cb]`` (size-``n1`` DFTs, real input: 2 real matmuls), the twiddles
   ``W_n^{k1 j2}`` broadcast over the channels;
2. a transpose to ``[n2, n1 cb]`` (in registers), ``F2 [n2, n2] @`` (4 real matmuls), leaving the
   spectrum in digit-reversed ``[k2, k1, c]`` layout; the product with the kernel spectrum (same
   layout); ``conj(F2) @`` (4);
3. the conjugate twiddles, the transpose back, and the real part of ``conj(F1) @`` (2), / n.

HBM traffic: one read of the signal and one write of the result per element (4 + 4 bytes), plus
the kernel spectrum (8 bytes per element and channel, once per batch row) and the small DFT
matrices. On a GPU the float32 dots run on tensor cores as 3xTF32
(``DotAlgorithmPreset.TF32_TF32_F32_X3``: three TF32 products, about float32 accuracy); the
interpreter (CPU) runs them at ``precision=HIGHEST``. The previous version of this kernel (one
signal per program, ``[64, 64] @ [64, 64]`` IEEE float32 dots off the tensor cores) was 43-83x
slower than ``jnp.fft`` on an H200; this one is unmeasured on a GPU.

This module never imports effjax: effjax computes the kernel spectrum (with its Monarch
transform of factors ``(n1, n2)``), the padding, gates and the backward around it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float

from pallas_kernels.interpret import gpu_interpret
from pallas_kernels.long_conv import dft

MIN_TILE, MAX_TILE = 16, 64
BLOCK_ELEMENTS = 8192  # n * cb per program


def split(n: int) -> tuple[int, int] | None:
  """``(n1, n2)`` with ``n1 * n2 = n``, powers of two in ``[16, 64]``, ``n1 <= n2``; else None."""
  if n < MIN_TILE * MIN_TILE or n > MAX_TILE * MAX_TILE or n & (n - 1):
    return None
  n1 = 1 << ((n.bit_length() - 1) // 2)
  return n1, n // n1


def channel_block(n: int, channels: int) -> int:
  """Channels per program: ``BLOCK_ELEMENTS / n`` (2 at n = 4096, 32 at 256), or the next power
  of two ``>= channels`` when that is fewer."""
  return min(BLOCK_ELEMENTS // n, 1 << max(channels - 1, 0).bit_length())


def _kernel(x_ref, k_re_ref, k_im_ref, f1r_ref, f1i_ref, f2r_ref, f2i_ref, tr_ref, ti_ref,
            out_ref, *, precision):
  """Blocks are ``[rows, cols, cb]``; a dot contracts ``rows`` with the other two merged."""
  def dot(f, a):
    product = lax.dot(f, a.reshape(a.shape[0], -1), precision=precision,
                      preferred_element_type=jnp.float32)
    return product.reshape(a.shape)

  def swap(a):  # [rows, cols, cb] -> [cols, rows, cb], in registers
    return jnp.transpose(a, (1, 0, 2))

  f1r, f1i, f2r, f2i = f1r_ref[...], f1i_ref[...], f2r_ref[...], f2i_ref[...]
  tr, ti = tr_ref[...][:, :, None], ti_ref[...][:, :, None]  # [n1, n2, 1]: one per channel
  x = x_ref[...]  # [n1(j1), n2(j2), cb]
  # Forward: size-n1 DFTs (real input), twiddles, size-n2 DFTs after the transpose.
  ar, ai = dot(f1r, x), dot(f1i, x)
  ar, ai = swap(ar * tr - ai * ti), swap(ar * ti + ai * tr)
  xr, xi = dot(f2r, ar) - dot(f2i, ai), dot(f2r, ai) + dot(f2i, ar)  # [k2, k1, cb]
  # Pointwise product with the kernel spectrum, in the same digit-reversed layout.
  kr, ki = k_re_ref[...], k_im_ref[...]
  pr, pi = xr * kr - xi * ki, xr * ki + xi * kr
  # Inverse: conj(F2), transpose back, conjugate twiddles, conj(F1), real part only.
  br, bi = swap(dot(f2r, pr) + dot(f2i, pi)), swap(dot(f2r, pi) - dot(f2i, pr))
  br, bi = br * tr + bi * ti, bi * tr - br * ti
  n = x.shape[0] * x.shape[1]
  out_ref[...] = (dot(f1r, br) + dot(f1i, bi)) * (1.0 / n)


def fft_conv(x: Float[Array, "batch n channels"], k_hat_re: Float[Array, "n2 n1 channels"],
             k_hat_im: Float[Array, "n2 n1 channels"], *, interpret: bool | None = None
             ) -> Float[Array, "batch n channels"]:
  """Circular convolution ``real(ifft(fft(x) * k_hat))`` of every ``(batch, channel)`` signal.

  Args:
    x: float32 ``[batch, n, channels]``, ``n`` accepted by :func:`split`.
    k_hat_re, k_hat_im: float32 ``[n2, n1, channels]``, the kernel spectrum in digit-reversed
      layout (the DFT at ``k1 + n1 * k2`` in ``[k2, k1]``).
    interpret: run in Pallas' interpreter; None follows ``pallas_kernels.interpret``.

  Returns:
    float32 ``[batch, n, channels]``.
  """
  interpret = gpu_interpret(interpret)
  batch, n, channels = x.shape
  tiles = split(n)
  if tiles is None:
    raise NotImplementedError(f"fused FFT conv needs n a power of two in [256, 4096], got {n}")
  n1, n2 = tiles
  if k_hat_re.shape != (n2, n1, channels) or k_hat_im.shape != (n2, n1, channels):
    raise ValueError(f"kernel spectrum must have shape {(n2, n1, channels)}, got "
                     f"{k_hat_re.shape} and {k_hat_im.shape}")
  cb = channel_block(n, channels)
  padded = -(-channels // cb) * cb
  pad = lambda a: jnp.pad(a, ((0, 0),) * (a.ndim - 1) + ((0, padded - channels),))
  signal = pl.BlockSpec((None, n1, n2, cb), lambda b, c: (b, 0, 0, c))
  spectrum = pl.BlockSpec((n2, n1, cb), lambda b, c: (0, 0, c))
  whole = lambda rows, cols: pl.BlockSpec((rows, cols), lambda b, c: (0, 0))
  precision = (lax.Precision.HIGHEST if interpret
               else lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
  out = pl.pallas_call(
      functools.partial(_kernel, precision=precision),
      grid=(batch, padded // cb),
      in_specs=[signal, spectrum, spectrum, whole(n1, n1), whole(n1, n1), whole(n2, n2),
                whole(n2, n2), whole(n1, n2), whole(n1, n2)],
      out_specs=signal,
      out_shape=jax.ShapeDtypeStruct((batch, n1, n2, padded), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=1),
      interpret=interpret,
      name="long_conv_fused_fft",
  )(pad(x).reshape(batch, n1, n2, padded), pad(k_hat_re), pad(k_hat_im), *dft.dft(n1),
    *dft.dft(n2), *dft.twiddles(n1, n2))
  return out.reshape(batch, n, padded)[..., :channels]
