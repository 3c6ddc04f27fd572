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
inverse; 16 for a complex one). Strided loads and stores of float32 rows do the Monarch
permutations ``P`` in VMEM. In one pass the kernel reads the caller's ``[batch, seq, channels]``
arrays (signal and gates, ``seq <= m``, their own dtype) as ``(m, Cb)`` blocks reaching past the
array's end (lanes past the last channel are per-lane garbage, never stored, as the DFTs contract
rows only). Mosaic has strided loads and stores of 32-bit data only ("Strided load with non
32-bit data" for bfloat16), so these blocks are touched by contiguous row blocks only, staged
through a float32 VMEM scratch ``v [m, Cb]``: a first loop over the ``n1`` blocks of ``n2`` rows
stores ``v = pre_gate * x`` (rows ``>= seq`` masked to zero), stage 1 reads ``v`` strided, the
inverse stage 1 writes ``z + skip * v`` back over it (each strided row read and written by the
same step), and a last loop stores ``post_gate * v`` in the output dtype. The conversions happen
in registers (no float32 copy of a bfloat16 signal in HBM); the staging costs the scratch
(``512 m`` bytes) and two contiguous VMEM passes per block, beside the 12 matmuls. An absent
option is neither an operand nor a load. float16 arrays cannot be loaded by Mosaic at all (no
float16 vector loads on any generation): the compiled one pass refuses them
(``NotImplementedError``; the TPU interpreter runs them). So HBM sees one read of the signal
and one write of the result per element (2 + 2 bytes in bfloat16, plus 2 per gate), plus the
kernel spectrum (8 bytes per element and channel, read once per channel block) and the stage
matrices (``16 n n1`` bytes, once; XLA computes them at each call from exactly reduced integer
exponents).

Multi-pass (FlashButterfly's scheme for sequences that do not fit on chip): ``n = n0 * m`` with
``j = j0 m + j'``, ``k = k0 + n0 k'``. Pass 1 is the size-``n0`` DFT over ``j0``, one XLA matmul
``F0 [n0, n0] @ x [n0, m * channels]`` (real in, complex out); pass 2 is the fused kernel above
run on each row ``k0`` (complex in and out), with the outer twiddles ``W_n^{k0 j'}`` folded into
its ``G`` and ``conj(G)^T`` matrices; pass 3 is the real part of ``conj(F0) @ z``. HBM traffic
per element: 4 + 8 (pass 1), 8 + 8 (pass 2), 8 + 4 (pass 3) bytes, against 8 for one pass. The
pre-gate, the zero padding, the window, skip, post-gate and cast are elementwise XLA work on the
inputs of pass 1 and the output of pass 3, left to XLA to fuse into those matmuls.

VMEM budget per program (float32, ``Cb`` = 128 lanes, ``m`` rows; :func:`vmem_bytes`): the
double-buffered signal and output blocks ``2 * 2 * 512 m`` bytes (twice that for complex ones);
single-buffered (``pl.Buffered(1)``: their block changes only with the channel block or ``k0``)
the kernel spectrum ``2 * 512 m`` and the stage matrices ``G`` and ``conj(G)^T``
``4 * 512 m`` (an ``[n1, n1]`` block pads to 128 lanes, so each ``[n2, n1, n1]`` array takes
``512 m`` bytes whatever ``n1``); the scratch ``T`` ``2 * 512 m`` (a real signal's staging
scratch ``v``: ``512 m`` more); ``F2`` ``2 * 4 * n2 * max(n2, 128)``. That is ``6.5 KiB * m``
for a real signal (m = 2048: 13 MiB) and ``8 KiB * m`` for a complex one (m = 1728: 13.5 MiB);
the gates, not in the model, add ``2 * 2 * 512 m`` each in float32 (half in bfloat16).
:func:`tiles` keeps the model under :data:`VMEM_BUDGET` = 14 MiB, inside the 16 MiB default
scoped VMEM of v4 and v5e (v6e: 32 MiB) with room for Mosaic's own spills: one pass serves
transforms up to 2176 points (a causal convolution of about 1088 positions), three passes up to
``MAX_N0 * 1728 = 442368``; :class:`BlockSizes` lowers both limits.

Sizes: ``n1`` in :data:`N1_CHOICES` and ``n2 <= 256``, both multiples of 8 (whole sublane tiles
for the strided accesses), so every multiple of 64 up to 2048 is one pass (at most 63 points of
padding); among the splits, :func:`mxu_cost`, a model of MXU row pushes (not measured), picks
one (it favours ``n1`` near ``n2``: a ``[8, 8] @ [8, 128]`` dot wastes most of a 128-wide MXU);
``n0`` is any integer up to :data:`MAX_N0`.

The scheme is FlashButterfly's ("Simple Hardware-Efficient Long Convolutions", Fu, Epstein et
al. 2023): the FFT as Monarch matrix products, here on the MXU.

This module never imports effjax: effjax computes the kernel spectrum (the Monarch transform of
factors :func:`factors`) and the backward (more calls of :func:`fft_conv`) around it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from pallas_kernels import shapes
from pallas_kernels.interpret import require_tpu_or_interpret
from pallas_kernels.long_conv import dft, gating

_LANES = 128
_SUBLANES = 8
N1_CHOICES = (8, 16, 32, 64, 128)
MAX_N2 = 256
MAX_N0 = 256
_STEP = _SUBLANES * _SUBLANES  # n1 and n2 are multiples of 8
MAX_ON_CHIP = N1_CHOICES[-1] * MAX_N2  # the largest on-chip size m the splits allow
VMEM_BUDGET = 14 * 2**20
_HIGHEST = lax.Precision.HIGHEST


def vmem_bytes(n1: int, n2: int, complex_signal: bool) -> int:
  """VMEM bytes of one program at ``Cb`` = 128 lanes (see the module docstring)."""
  row = 4 * _LANES  # one float32 row of 128 lanes
  m = n1 * n2
  signal = 2 * 2 * row * m * (2 if complex_signal else 1)  # input and output, double-buffered
  single = (2 + 4 + 2) * row * m  # spectrum, G and conj(G)^T, scratch T
  single += 0 if complex_signal else row * m  # a real signal's staging scratch v
  return signal + single + 2 * 4 * n2 * max(n2, _LANES)


def mxu_cost(n1: int, n2: int, complex_signal: bool) -> float:
  """A cost model (not measured): MXU row pushes per element of one on-chip transform pair. A
  ``[M, K] @ [K, 128]`` dot loads ``ceil(K / 128)`` weight tiles and pushes ``M`` rows plus about
  128 cycles of fill per tile: stage 1 is ``n2`` of them with ``M = K = n1`` (2 + 2 dots for a
  real signal, 4 + 4 for a complex one), stage 2 ``n1`` of them with ``M = K = n2`` (8 dots)."""
  stage1 = n2 * (8 if complex_signal else 4) * shapes.cdiv(n1, _LANES) * (n1 + _LANES)
  stage2 = n1 * 8 * shapes.cdiv(n2, _LANES) * (n2 + _LANES)
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


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """How many points the fused kernel transforms on chip.

  Attributes:
    max_on_chip: the largest on-chip size ``m`` (one pass, or pass 2 of three): a multiple of 64
      up to :data:`MAX_ON_CHIP`. :func:`tiles` also keeps every split within
      :data:`VMEM_BUDGET`, so the default is that budget's limit. A smaller one makes longer
      transforms three passes.
    max_n0: the most rows ``n0`` of three passes, in ``[2, MAX_N0]``.
  """
  max_on_chip: int = MAX_ON_CHIP
  max_n0: int = MAX_N0

  def __post_init__(self):
    if (not isinstance(self.max_on_chip, int) or isinstance(self.max_on_chip, bool)
        or not _STEP <= self.max_on_chip <= MAX_ON_CHIP or self.max_on_chip % _STEP):
      raise ValueError(f"BlockSizes.max_on_chip must be a multiple of {_STEP} in "
                       f"[{_STEP}, {MAX_ON_CHIP}], got {self.max_on_chip!r}")
    if (not isinstance(self.max_n0, int) or isinstance(self.max_n0, bool)
        or not 2 <= self.max_n0 <= MAX_N0):
      raise ValueError(f"BlockSizes.max_n0 must be an int in [2, {MAX_N0}], got "
                       f"{self.max_n0!r}")


def _multi_pass_cost(n0: int, m: int) -> float:
  """:func:`mxu_cost` of the on-chip complex size ``m`` plus passes 1 and 3 (four ``K = n0``
  dots per element, streamed by XLA), per element."""
  return mxu_cost(*tiles(m, True), True) + 4 * shapes.cdiv(n0, _LANES)


@functools.cache
def factors(n: int, block_sizes: BlockSizes = BlockSizes()) -> tuple[int, ...] | None:
  """``(n1, n2)`` if ``n`` fits one pass, else the ``(n0, n1, n2)`` (``n0 <= max_n0``) of least
  :func:`_multi_pass_cost`; None if neither exists within ``block_sizes``."""
  max_on_chip, max_n0 = block_sizes.max_on_chip, block_sizes.max_n0
  if n <= max_on_chip and tiles(n) is not None:
    return tiles(n)
  splits = [(n // m, m) for m in range(_STEP, min(n // 2, max_on_chip) + 1, _STEP)
            if n % m == 0 and n // m <= max_n0 and tiles(m, True) is not None]
  if not splits:
    return None
  n0, m = min(splits, key=lambda split: _multi_pass_cost(*split))
  return (n0, *tiles(m, True))


@functools.cache
def transform_size(length: int, block_sizes: BlockSizes = BlockSizes()) -> int | None:
  """The ``n >= length`` of least ``n * cost`` that :func:`factors` accepts: one pass whenever one
  fits (``n`` up to ``2 * length``), else the multi-pass split; None beyond its limit."""
  max_on_chip, max_n0 = block_sizes.max_on_chip, block_sizes.max_n0
  first = shapes.round_up(max(length, 1), _STEP)
  one_pass = [n for n in range(first, 2 * first + 1, _STEP) if n <= max_on_chip and tiles(n)]
  if one_pass:
    return min(one_pass, key=lambda n: (n * mxu_cost(*tiles(n), False), n))
  splits = [(max(2, shapes.cdiv(length, m)), m) for m in range(_STEP, max_on_chip + 1, _STEP)
            if tiles(m, True) is not None and shapes.cdiv(length, m) <= max_n0]
  if not splits:
    return None
  n0, m = min(splits, key=lambda split: (split[0] * split[1] * _multi_pass_cost(*split),
                                         split[0] * split[1]))
  return n0 * m


@functools.cache
def largest_size(block_sizes: BlockSizes = BlockSizes()) -> int:
  """The longest transform :func:`transform_size` serves: ``max_n0`` rows of the largest
  on-chip complex size."""
  return block_sizes.max_n0 * max(m for m in range(_STEP, block_sizes.max_on_chip + 1, _STEP)
                                  if tiles(m, True))


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


@dataclasses.dataclass(frozen=True)
class _Edge(gating.Options):
  """The one-pass kernel reading and writing HBM's ``[batch, seq, channels]`` arrays directly:
  an ``(m, Cb)`` block of a batch row (rows beyond ``seq`` and lanes beyond ``channels`` are
  outside the array: their loads are masked to zero by row, the lanes are per-channel garbage
  that is never stored), with the optional gates and skip, staged through the float32 scratch
  ``v [m, Cb]`` by whole row blocks (Mosaic has no strided load or store of 16-bit data)."""
  seq: int

  def stage_in(self, refs, rows):
    """``v = pre_gate * x`` (float32, zero from row ``seq`` on) into the scratch at the
    contiguous ``rows``."""
    v = refs["x"][rows, :].astype(jnp.float32)
    if self.pre_gate:
      v = v * refs["pre_gate"][rows, :].astype(jnp.float32)
    row = lax.broadcasted_iota(jnp.int32, v.shape, 0) + rows.start
    refs["v"][rows, :] = jnp.where(row < self.seq, v, 0.0)

  def finish(self, refs, rows, z):
    """Overwrites ``v`` with ``z + skip * v`` at the strided ``rows`` (each row is read and
    written by the same step only)."""
    if self.skip:
      z = z + refs["skip"][...] * refs["v"][rows, :]
    refs["v"][rows, :] = z

  def stage_out(self, refs, rows):
    """Stores ``post_gate * v`` at the contiguous ``rows`` in the output's dtype."""
    z = refs["v"][rows, :]
    if self.post_gate:
      z = z * refs["post_gate"][rows, :].astype(jnp.float32)
    refs["out"][rows, :] = z.astype(refs["out"].dtype)


def _kernel(*refs, names, n1: int, n2: int, edge: _Edge | None):
  """``edge`` None: a complex signal (pass 2 of three); else a real one from and to HBM."""
  refs = dict(zip(names, refs))
  g_re, g_im, gt_re, gt_im = refs["g_re"], refs["g_im"], refs["gt_re"], refs["gt_im"]
  t_re, t_im, k_re, k_im = refs["t_re"], refs["t_im"], refs["k_re"], refs["k_im"]

  def forward_stage1(j2, carry):
    rows = pl.ds(j2, n1, stride=n2)
    gr, gi = g_re[j2], g_im[j2]
    if edge is None:
      a_re, a_im = refs["x_re"][rows, :], refs["x_im"][rows, :]
      b_re, b_im = _dot(gr, a_re) - _dot(gi, a_im), _dot(gr, a_im) + _dot(gi, a_re)
    else:
      a_re = refs["v"][rows, :]
      b_re, b_im = _dot(gr, a_re), _dot(gi, a_re)
    block = pl.ds(pl.multiple_of(j2 * n1, _SUBLANES), n1)
    t_re[block, :] = b_re
    t_im[block, :] = b_im
    return carry

  def stage2(k1, carry):
    rows = pl.ds(k1, n2, stride=n1)
    a_re, a_im = t_re[rows, :], t_im[rows, :]
    fr, fi = refs["f2_re"][...], refs["f2_im"][...]
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
    z = _dot(gr, a_re) - _dot(gi, a_im)
    if edge is None:
      refs["o_re"][rows, :] = z
      refs["o_im"][rows, :] = _dot(gr, a_im) + _dot(gi, a_re)
    else:
      edge.finish(refs, rows, z)
    return carry

  def whole_rows(stage):
    """A loop step calling ``stage`` on the block's rows ``[j1 n2, (j1 + 1) n2)``."""
    def step(j1, carry):
      stage(refs, pl.ds(pl.multiple_of(j1 * n2, _SUBLANES), n2))
      return carry
    return step

  if edge is not None:
    lax.fori_loop(0, n1, whole_rows(edge.stage_in), 0)
  lax.fori_loop(0, n2, forward_stage1, 0)
  lax.fori_loop(0, n1, stage2, 0)
  lax.fori_loop(0, n2, inverse_stage1, 0)
  if edge is not None:
    lax.fori_loop(0, n1, whole_rows(edge.stage_out), 0)


def _fused(signal: tuple[jax.Array, ...], k_re, k_im, n0: int, n1: int, n2: int, interpret: Any,
           edge: _Edge | None = None, gates: dict[str, jax.Array | None] | None = None,
           dtype: Any = jnp.float32) -> tuple[jax.Array, ...]:
  """The on-chip kernel: ``edge`` None: on the complex ``signal`` (re, im)
  ``[batch, n0, m, channels]``, row ``k0`` with the spectrum rows ``[n0, m, channels]`` and the
  stage matrices of ``k0``; else (``n0 = 1``) on the real ``signal`` (x,) ``[batch, seq,
  channels]`` with ``gates``, storing ``[batch, seq, channels]`` in ``dtype``."""
  m, lanes = k_re.shape[1:]
  batch, channels = signal[0].shape[0], signal[0].shape[-1]
  block = min(channels, _LANES)
  once = dict(pipeline_mode=pl.Buffered(1))
  spectrum = pl.BlockSpec((None, m, block), lambda k0, c, b: (k0, 0, c), **once)
  stage = pl.BlockSpec((None, n2, n1, n1), lambda k0, c, b: (k0, 0, 0, 0), **once)
  matrix = pl.BlockSpec((n2, n2), lambda k0, c, b: (0, 0), **once)
  if edge is None:
    data = pl.BlockSpec((None, None, m, block), lambda k0, c, b: (b, k0, 0, c))
    names, arrays, specs = ["x_re", "x_im"], list(signal), [data] * 2
    out_names, out_specs = ["o_re", "o_im"], [data] * 2
    out_shape = [jax.ShapeDtypeStruct(signal[0].shape, jnp.float32)] * 2
  else:
    data = pl.BlockSpec((None, m, block), lambda k0, c, b: (b, 0, c))
    names, arrays = ["x", *edge.names()], [signal[0], *(gates[n] for n in edge.names())]
    specs = [data] * len(arrays)
    if edge.skip:  # [1, lanes] float32, a lane vector per channel block
      skip = gates["skip"].astype(jnp.float32)
      arrays[-1] = shapes.pad_axis(skip, 0, lanes)[None]
      specs[-1] = pl.BlockSpec((1, block), lambda k0, c, b: (0, c))
    out_names, out_specs = ["out"], [data]
    out_shape = [jax.ShapeDtypeStruct(signal[0].shape, dtype)]
  names += ["k_re", "k_im", "g_re", "g_im", "gt_re", "gt_im", "f2_re", "f2_im"]
  # Every grid axis is parallel (no carried state). Not told to the TPU interpreter: it does not
  # extend the semantics over the grid axes vmap adds (jax 0.10.2); Mosaic's lowering does.
  semantics = None if interpret else (pltpu.PARALLEL,) * 3
  scratch = ["t_re", "t_im"] + ([] if edge is None else ["v"])
  return pl.pallas_call(
      functools.partial(_kernel, names=(*names, *out_names, *scratch), n1=n1, n2=n2, edge=edge),
      grid=(n0, lanes // block, batch),
      in_specs=specs + [spectrum] * 2 + [stage] * 4 + [matrix] * 2,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((m, block), jnp.float32)] * len(scratch),
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
      interpret=interpret,
      name="long_conv_fused_fft" if edge is not None else "long_conv_fused_fft_complex",
  )(*arrays, k_re, k_im, *_stage_matrices(n0, n1, n2), *dft.dft(n2))


def fft_conv(x: Float[Array, "batch seq channels"], k_hat_re: Float[Array, "n channels"],
             k_hat_im: Float[Array, "n channels"], *, n: int | None = None,
             pre_gate: Float[Array, "batch seq channels"] | None = None,
             post_gate: Float[Array, "batch seq channels"] | None = None,
             skip: Float[Array, " channels"] | None = None, dtype: Any = jnp.float32,
             block_sizes: BlockSizes | None = None, interpret: bool | None = None
             ) -> Float[Array, "batch seq channels"]:
  """Gated circular convolution: rows ``[0, seq)`` of ``post_gate * (z + skip * v)``, ``z =
  real(ifft(fft(v) * k_hat))`` of size ``n`` with ``v = pre_gate * x`` zero-extended to ``n``
  rows, for every ``(batch, channel)`` signal.

  One pass does the zero extension, the gates, the skip term and the cast in the kernel's loads
  and stores (see the module docstring); three passes do them in the XLA matmuls of passes 1
  and 3. A None option costs no load.

  Args:
    x: ``[batch, seq, channels]``, any float dtype, ``seq <= n``.
    k_hat_re, k_hat_im: float32 ``[n, channels]``, the kernel spectrum in digit-reversed layout
      for ``factors(n, block_sizes)`` ``(n_a, ..., n_r)``: row ``k_a m_a + ... + k_r`` (``m_i``
      the product of the factors after ``n_i``) holds the DFT at ``k_a + n_a k_b + ...`` (the
      Monarch transform's ``[n_a, ..., n_r, channels]`` spectrum, reshaped).
    n: the transform size, accepted by :func:`factors`; None: ``seq``.
    pre_gate, post_gate: None or ``[batch, seq, channels]`` (any float dtype).
    skip: None or ``[channels]``.
    dtype: the result's dtype.
    block_sizes: the limits :func:`factors` splits ``n`` with; None: ``BlockSizes()``.
    interpret: run in the TPU interpreter (CPU); None follows
      ``pallas_kernels.interpret.interpret_mode``.

  Returns:
    ``[batch, seq, channels]`` in ``dtype``.

  Raises:
    NotImplementedError: off a TPU unless interpreting, ``n`` has no :func:`factors`, or a
      compiled one pass with a float16 signal, gate or ``dtype``.
    TypeError: ``block_sizes`` is not a :class:`BlockSizes`.
    ValueError: ``seq > n``, or a gate, skip or the spectrum has the wrong shape.
  """
  interpret = require_tpu_or_interpret(interpret)
  block_sizes = shapes.resolve_block_sizes(block_sizes, BlockSizes, BlockSizes)
  batch, seq, channels = x.shape
  n = seq if n is None else n
  split = factors(n, block_sizes)
  if split is None:
    raise NotImplementedError(f"fused TPU FFT conv needs n accepted by factors() (one pass: a "
                              f"multiple of 64 up to about 2048; else n0 * m, n0 <= "
                              f"{block_sizes.max_n0}), got n={n}")
  flags = gating.Options.check(x, n, pre_gate, post_gate, skip)
  if k_hat_re.shape != (n, channels) or k_hat_im.shape != (n, channels):
    raise ValueError(f"kernel spectrum must have shape {(n, channels)}, got {k_hat_re.shape} and "
                     f"{k_hat_im.shape}")
  lanes = channels if channels < _LANES else shapes.round_up(channels, _LANES)
  n0, n1, n2 = split if len(split) == 3 else (1, *split)
  m = n1 * n2
  k_re, k_im = (shapes.pad_axis(k, -1, lanes).reshape(n0, m, lanes) for k in (k_hat_re, k_hat_im))
  if n0 == 1:
    dtypes = [jnp.dtype(dtype), *(a.dtype for a in (x, pre_gate, post_gate) if a is not None)]
    if not interpret and jnp.dtype(jnp.float16) in dtypes:
      raise NotImplementedError("Mosaic TPU has no float16 vector loads or stores: the compiled "
                                "one-pass kernel takes float32 or bfloat16 signals and gates")
    edge = _Edge(seq=seq, **flags)
    gates = dict(pre_gate=pre_gate, post_gate=post_gate, skip=skip)
    (y,) = _fused((x,), k_re, k_im, n0, n1, n2, interpret, edge, gates, dtype)
    return y
  # Passes 1 and 3 are XLA matmuls: the gates, padding and window fuse into them.
  f0_re, f0_im = dft.dft(n0)
  v = x.astype(jnp.float32)
  if pre_gate is not None:
    v = v * pre_gate.astype(jnp.float32)
  rows = shapes.pad_axes(v, {1: n, 2: lanes}).reshape(batch, n0, m * lanes)
  first = lambda f: jnp.einsum("pq,bqr->bpr", f, rows, precision=_HIGHEST)
  signal = tuple(first(f).reshape(batch, n0, m, lanes) for f in (f0_re, f0_im))
  z_re, z_im = (z.reshape(batch, n0, m * lanes)
                for z in _fused(signal, k_re, k_im, n0, n1, n2, interpret))
  y = (jnp.einsum("pq,bqr->bpr", f0_re, z_re, precision=_HIGHEST)
       + jnp.einsum("pq,bqr->bpr", f0_im, z_im, precision=_HIGHEST))
  y = y.reshape(batch, n, lanes)[:, :seq, :channels]
  if skip is not None:
    y = y + skip.astype(jnp.float32) * v
  if post_gate is not None:
    y = y * post_gate.astype(jnp.float32)
  return y.astype(dtype)
