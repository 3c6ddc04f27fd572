"""Fused FFT convolution on TPU (Pallas, Mosaic lowering), FlashButterfly / Monarch style.

Channels stay last (``[batch, n, channels]``, channels on the 128 lanes), so no transpose of the
data is ever made: one program convolves a block of ``Cb`` channels (128, or all of them when
fewer; other channel counts above 128 are zero-padded to a multiple of 128 by an XLA copy) of
one batch row. With the on-chip size ``m = n1 * n2`` (``j = j1 n2 + j2``,
``k = k1 + n1 k2``), the block ``x [m, Cb]`` goes through

1. stage 1, for each ``j2``: the ``n1`` rows ``j1 n2 + j2`` (one strided VMEM load) times
   ``G_j2 [n1, n1]``, the size-``n1`` DFT with the twiddles ``W_m^{k1 j2}`` folded into its rows
   (so the twiddles cost no vector work), into a VMEM scratch ``T`` at rows ``j2 n1 + k1``;
2. stage 2, for each ``k1``: the ``n2`` rows ``j2 n1 + k1`` of ``T`` (strided) times
   ``F2 [n2, n2]``, the product with the kernel spectrum (same digit-reversed layout as
   ``effjax.ops.long_conv.butterfly``), the inverse ``conj(F2)``, stored back in place;
3. the inverse stage 1, for each ``j2``: ``conj(G_j2)^T / n`` times the rows ``j2 n1 + k1`` of
   ``T``, stored at the output rows ``j1 n2 + j2`` (one strided store).

Stage matrices are complex, as separate real and imaginary float32 arrays; every dot is float32
at ``precision=HIGHEST`` (12 real matmuls per block for a real signal: 2 + 4 forward, 4 + 2
inverse; 16 for a complex one). Strided loads and stores do the Monarch permutations ``P`` in
VMEM, so HBM sees one read of the signal and one write of the result per element (4 + 4 bytes),
plus the kernel spectrum (8 bytes per element and channel, read once per channel block) and the
stage matrices (``16 n n1`` bytes, once; XLA computes them at each call from exactly reduced
integer exponents).

Multi-pass (FlashButterfly's scheme for sequences that do not fit on chip): ``n = n0 * m`` with
``j = j0 m + j'``, ``k = k0 + n0 k'``. Pass 1 is the size-``n0`` DFT over ``j0``, one XLA matmul
``F0 [n0, n0] @ x [n0, m * channels]`` (real in, complex out); pass 2 is the fused kernel above
run on each row ``k0`` (complex in and out), with the outer twiddles ``W_n^{k0 j'}`` folded into
its ``G`` and ``conj(G)^T`` matrices; pass 3 is the real part of ``conj(F0) @ z``. HBM traffic
per element: 4 + 8 (pass 1), 8 + 8 (pass 2), 8 + 4 (pass 3) bytes, against 8 for one pass.

VMEM budget per program (float32, ``Cb`` = 128 lanes, ``m`` rows; :func:`vmem_bytes`): the
double-buffered signal and output blocks ``2 * 2 * 512 m`` bytes (twice that for complex ones);
single-buffered (``pl.Buffered(1)``: their block changes only with the channel block or ``k0``)
the kernel spectrum ``2 * 512 m`` and the stage matrices ``G`` and ``conj(G)^T``
``4 * 512 m`` (an ``[n1, n1]`` block pads to 128 lanes, so each ``[n2, n1, n1]`` array takes
``512 m`` bytes whatever ``n1``); the scratch ``T`` ``2 * 512 m``; ``F2``
``2 * 4 * n2 * max(n2, 128)``. That is ``6 KiB * m`` for a real signal (m = 2048: 12 MiB) and
``8 KiB * m`` for a complex one (m = 1600: 12.5 MiB). :func:`tiles` keeps it under
:data:`VMEM_BUDGET` = 13 MiB, inside v5e's 16 MiB default scoped VMEM (v6e: 32 MiB) with room
for Mosaic's own spills: one pass serves transforms up to 2176 points (a causal convolution of
about 1088 positions), three passes up to ``MAX_N0 * 1600 = 409600``.

Sizes: ``n1`` in :data:`N1_CHOICES` and ``n2 <= 256``, both multiples of 8 (whole sublane tiles
for the strided accesses), so every multiple of 64 up to 2048 is one pass (at most 63 points of
padding); among the splits, :func:`mxu_cost`, a model of MXU row pushes (not measured), picks
one (it favours ``n1`` near ``n2``: a ``[8, 8] @ [8, 128]`` dot wastes most of a 128-wide MXU);
``n0`` is any integer up to :data:`MAX_N0`.

FlashButterfly ("Simple Hardware-Efficient Long Convolutions", Fu, Epstein et al. 2023) reports
convolutions 2.2x faster than FFT convolutions on GPU (A100). This kernel is checked in the TPU
interpreter and by lowering to Mosaic for TPU on a CPU (``jax.export``), never compiled by
Mosaic's own compiler or timed on a TPU: its speed, the cost of the strided sublane accesses and
the MXU efficiency of the small ``[n1, n1] @ [n1, Cb]`` stage-1 dots are unmeasured.

This module never imports effjax: effjax computes the kernel spectrum (the Monarch transform of
factors :func:`factors`), the padding, gates and the backward around it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from pallas_kernels.interpret import require_tpu_or_interpret
from pallas_kernels.long_conv import dft

_LANES = 128
_SUBLANES = 8
N1_CHOICES = (8, 16, 32, 64, 128)
MAX_N2 = 256
MAX_N0 = 256
_STEP = _SUBLANES * _SUBLANES  # n1 and n2 are multiples of 8
_MAX_M = N1_CHOICES[-1] * MAX_N2
VMEM_BUDGET = 13 * 2**20
_HIGHEST = lax.Precision.HIGHEST


def vmem_bytes(n1: int, n2: int, complex_signal: bool) -> int:
  """VMEM bytes of one program at ``Cb`` = 128 lanes (see the module docstring)."""
  row = 4 * _LANES  # one float32 row of 128 lanes
  m = n1 * n2
  signal = 2 * 2 * row * m * (2 if complex_signal else 1)  # input and output, double-buffered
  single = (2 + 4 + 2) * row * m  # spectrum, G and conj(G)^T, scratch T
  return signal + single + 2 * 4 * n2 * max(n2, _LANES)


def mxu_cost(n1: int, n2: int, complex_signal: bool) -> float:
  """A cost model (not measured): MXU row pushes per element of one on-chip transform pair. A
  ``[M, K] @ [K, 128]`` dot loads ``ceil(K / 128)`` weight tiles and pushes ``M`` rows plus about
  128 cycles of fill per tile: stage 1 is ``n2`` of them with ``M = K = n1`` (2 + 2 dots for a
  real signal, 4 + 4 for a complex one), stage 2 ``n1`` of them with ``M = K = n2`` (8 dots)."""
  stage1 = n2 * (8 if complex_signal else 4) * math.ceil(n1 / _LANES) * (n1 + _LANES)
  stage2 = n1 * 8 * math.ceil(n2 / _LANES) * (n2 + _LANES)
  return (stage1 + stage2) / (n1 * n2)


@functools.cache
def tiles(m: int, complex_signal: bool = False) -> tuple[int, int] | None:
  """``(n1, n2)`` of the on-chip size ``m`` of least :func:`mxu_cost`, ``n1`` in
  :data:`N1_CHOICES`, ``n2 = m / n1`` a multiple of 8 up to :data:`MAX_N2`, within
  :data:`VMEM_BUDGET`; None if there is none."""
  splits = [(n1, m // n1) for n1 in N1_CHOICES
            if m % n1 == 0 and (m // n1) % _SUBLANES == 0 and m // n1 <= MAX_N2
            and vmem_bytes(n1, m // n1, complex_signal) <= VMEM_BUDGET]
  return min(splits, key=lambda split: mxu_cost(*split, complex_signal), default=None)


def _multi_pass_cost(n0: int, m: int) -> float:
  """:func:`mxu_cost` of the on-chip complex size ``m`` plus passes 1 and 3 (four ``K = n0``
  dots per element, streamed by XLA), per element."""
  return mxu_cost(*tiles(m, True), True) + 4 * math.ceil(n0 / _LANES)


@functools.cache
def factors(n: int) -> tuple[int, ...] | None:
  """``(n1, n2)`` if ``n`` fits one pass, else the ``(n0, n1, n2)`` (``n0 <= MAX_N0``) of least
  :func:`_multi_pass_cost`; None if neither exists."""
  if tiles(n) is not None:
    return tiles(n)
  splits = [(n // m, m) for m in range(_STEP, min(n // 2, _MAX_M) + 1, _STEP)
            if n % m == 0 and n // m <= MAX_N0 and tiles(m, True) is not None]
  if not splits:
    return None
  n0, m = min(splits, key=lambda split: _multi_pass_cost(*split))
  return (n0, *tiles(m, True))


@functools.cache
def transform_size(length: int) -> int | None:
  """The ``n >= length`` of least ``n * cost`` that :func:`factors` accepts: one pass whenever one
  fits (``n`` up to ``2 * length``), else the multi-pass split; None beyond its limit."""
  first = _STEP * max(1, math.ceil(length / _STEP))
  one_pass = [n for n in range(first, 2 * first + 1, _STEP) if tiles(n)]
  if one_pass:
    return min(one_pass, key=lambda n: (n * mxu_cost(*tiles(n), False), n))
  splits = [(max(2, math.ceil(length / m)), m) for m in range(_STEP, _MAX_M + 1, _STEP)
            if tiles(m, True) is not None and math.ceil(length / m) <= MAX_N0]
  if not splits:
    return None
  n0, m = min(splits, key=lambda split: (split[0] * split[1] * _multi_pass_cost(*split),
                                         split[0] * split[1]))
  return n0 * m


@functools.cache
def largest_size() -> int:
  """The longest transform :func:`transform_size` serves: ``MAX_N0`` rows of the largest
  on-chip complex size."""
  return MAX_N0 * max(m for m in range(_STEP, _MAX_M + 1, _STEP) if tiles(m, True))


def _stage_matrices(n0: int, n1: int, n2: int) -> tuple[jax.Array, ...]:
  """``G [n0, n2, n1(k1), n1(j1)]`` (re, im): the size-``n1`` DFT with the twiddles
  ``W_n^{n0 k1 j2 + k0 (j1 n2 + j2)}`` (``n = n0 n1 n2``), and ``conj(G)^T / n``."""
  n = n0 * n1 * n2
  k0, j2, k1, j1 = (lax.broadcasted_iota(jnp.int32, (n0, n2, n1, n1), axis) for axis in range(4))
  exponents = n0 * (n2 * k1 * j1 + k1 * j2) + k0 * (j1 * n2 + j2)
  g_re, g_im = dft.roots(exponents, n)
  scale = jnp.float32(1 / n)
  return g_re, g_im, jnp.swapaxes(g_re, 2, 3) * scale, jnp.swapaxes(g_im, 2, 3) * -scale


def _dot(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_HIGHEST,
                         preferred_element_type=jnp.float32)


def _kernel(*refs, n1: int, n2: int, complex_signal: bool):
  if complex_signal:
    (x_re, x_im, k_re, k_im, g_re, g_im, gt_re, gt_im, f2_re, f2_im, o_re, o_im,
     t_re, t_im) = refs
  else:
    x_re, k_re, k_im, g_re, g_im, gt_re, gt_im, f2_re, f2_im, o_re, t_re, t_im = refs
    x_im = o_im = None

  def forward_stage1(j2, carry):
    rows = pl.ds(j2, n1, stride=n2)
    a_re, gr, gi = x_re[rows, :], g_re[j2], g_im[j2]
    if complex_signal:
      a_im = x_im[rows, :]
      b_re, b_im = _dot(gr, a_re) - _dot(gi, a_im), _dot(gr, a_im) + _dot(gi, a_re)
    else:
      b_re, b_im = _dot(gr, a_re), _dot(gi, a_re)
    block = pl.ds(pl.multiple_of(j2 * n1, _SUBLANES), n1)
    t_re[block, :] = b_re
    t_im[block, :] = b_im
    return carry

  def stage2(k1, carry):
    rows = pl.ds(k1, n2, stride=n1)
    a_re, a_im = t_re[rows, :], t_im[rows, :]
    fr, fi = f2_re[...], f2_im[...]
    b_re, b_im = _dot(fr, a_re) - _dot(fi, a_im), _dot(fr, a_im) + _dot(fi, a_re)
    block = pl.ds(pl.multiple_of(k1 * n2, _SUBLANES), n2)
    kr, ki = k_re[block, :], k_im[block, :]
    p_re, p_im = b_re * kr - b_im * ki, b_re * ki + b_im * kr
    t_re[rows, :] = _dot(fr, p_re) + _dot(fi, p_im)  # conj(F2) @ p
    t_im[rows, :] = _dot(fr, p_im) - _dot(fi, p_re)
    return carry

  def inverse_stage1(j2, carry):
    block = pl.ds(pl.multiple_of(j2 * n1, _SUBLANES), n1)
    a_re, a_im, gr, gi = t_re[block, :], t_im[block, :], gt_re[j2], gt_im[j2]
    rows = pl.ds(j2, n1, stride=n2)
    o_re[rows, :] = _dot(gr, a_re) - _dot(gi, a_im)
    if complex_signal:
      o_im[rows, :] = _dot(gr, a_im) + _dot(gi, a_re)
    return carry

  lax.fori_loop(0, n2, forward_stage1, 0)
  lax.fori_loop(0, n1, stage2, 0)
  lax.fori_loop(0, n2, inverse_stage1, 0)


def _fused(signal: tuple[jax.Array, ...], k_re, k_im, n0: int, n1: int, n2: int, interpret: Any
           ) -> tuple[jax.Array, ...]:
  """The on-chip kernel on ``signal`` (re[, im]) ``[batch, n0, m, channels]``, row ``k0`` with
  the spectrum rows ``[n0, m, channels]`` and the stage matrices of ``k0``."""
  batch, _, m, channels = signal[0].shape
  block = min(channels, _LANES)
  complex_signal = len(signal) == 2
  once = dict(pipeline_mode=pl.Buffered(1))
  data = pl.BlockSpec((None, None, m, block), lambda k0, c, b: (b, k0, 0, c))
  spectrum = pl.BlockSpec((None, m, block), lambda k0, c, b: (k0, 0, c), **once)
  stage = pl.BlockSpec((None, n2, n1, n1), lambda k0, c, b: (k0, 0, 0, 0), **once)
  matrix = pl.BlockSpec((n2, n2), lambda k0, c, b: (0, 0), **once)
  shape = jax.ShapeDtypeStruct(signal[0].shape, jnp.float32)
  # Every grid axis is parallel (no carried state). Not told to the TPU interpreter: it does not
  # extend the semantics over the grid axes vmap adds (jax 0.10.2); Mosaic's lowering does.
  semantics = None if interpret else (pltpu.PARALLEL,) * 3
  return pl.pallas_call(
      functools.partial(_kernel, n1=n1, n2=n2, complex_signal=complex_signal),
      grid=(n0, channels // block, batch),
      in_specs=[data] * len(signal) + [spectrum] * 2 + [stage] * 4 + [matrix] * 2,
      out_specs=[data] * len(signal),
      out_shape=[shape] * len(signal),
      scratch_shapes=[pltpu.VMEM((m, block), jnp.float32)] * 2,
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
      interpret=interpret,
      name="long_conv_fused_fft_complex" if complex_signal else "long_conv_fused_fft",
  )(*signal, k_re, k_im, *_stage_matrices(n0, n1, n2), *dft.dft(n2))


def fft_conv(x: Float[Array, "batch n channels"], k_hat_re: Float[Array, "n channels"],
             k_hat_im: Float[Array, "n channels"], *, interpret: Any = None
             ) -> Float[Array, "batch n channels"]:
  """Circular convolution ``real(ifft(fft(x) * k_hat))`` of every ``(batch, channel)`` signal.

  Args:
    x: float32 ``[batch, n, channels]``, ``n`` accepted by :func:`factors`.
    k_hat_re, k_hat_im: float32 ``[n, channels]``, the kernel spectrum in digit-reversed layout
      for :func:`factors` ``(n_a, ..., n_r)``: row ``k_a m_a + ... + k_r`` (``m_i`` the product of
      the factors after ``n_i``) holds the DFT at ``k_a + n_a k_b + ...`` (the Monarch transform's
      ``[n_a, ..., n_r, channels]`` spectrum, reshaped).
    interpret: ``pallas_call``'s ``interpret`` (``pltpu.InterpretParams`` or False); None asks
      :func:`pallas_kernels.interpret.require_tpu_or_interpret`.

  Returns:
    float32 ``[batch, n, channels]``.

  Raises:
    NotImplementedError: off a TPU unless in ``pallas_kernels.interpret.interpret_mode()``, or
      ``n`` has no :func:`factors`.
  """
  if interpret is None:
    interpret = require_tpu_or_interpret()
  batch, n, channels = x.shape
  split = factors(n)
  if split is None:
    raise NotImplementedError(f"fused TPU FFT conv needs n accepted by factors() (one pass: a "
                              f"multiple of 64 up to about 2048; else n0 * m, n0 <= {MAX_N0}), "
                              f"got n={n}")
  if k_hat_re.shape != (n, channels) or k_hat_im.shape != (n, channels):
    raise ValueError(f"kernel spectrum must have shape {(n, channels)}, got {k_hat_re.shape} and "
                     f"{k_hat_im.shape}")
  lanes = channels if channels < _LANES else -(-channels // _LANES) * _LANES
  pad = ((0, 0),) * (x.ndim - 1) + ((0, lanes - channels),)
  x, k_hat_re, k_hat_im = (jnp.pad(a, pad[-a.ndim:]) for a in (x, k_hat_re, k_hat_im))
  n0, n1, n2 = split if len(split) == 3 else (1, *split)
  m = n1 * n2
  k_re, k_im = (k.reshape(n0, m, lanes) for k in (k_hat_re, k_hat_im))
  if n0 == 1:
    (y,) = _fused((x.reshape(batch, 1, m, lanes),), k_re, k_im, n0, n1, n2, interpret)
  else:
    f0_re, f0_im = dft.dft(n0)
    rows = x.reshape(batch, n0, m * lanes)
    first = lambda f: jnp.einsum("pq,bqr->bpr", f, rows, precision=_HIGHEST)
    signal = tuple(first(f).reshape(batch, n0, m, lanes) for f in (f0_re, f0_im))
    z_re, z_im = (z.reshape(batch, n0, m * lanes)
                  for z in _fused(signal, k_re, k_im, n0, n1, n2, interpret))
    y = (jnp.einsum("pq,bqr->bpr", f0_re, z_re, precision=_HIGHEST)
         + jnp.einsum("pq,bqr->bpr", f0_im, z_im, precision=_HIGHEST))
  return y.reshape(batch, n, lanes)[..., :channels]
