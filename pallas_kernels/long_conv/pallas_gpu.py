"""Fused FFT convolution on GPU (Pallas, Triton lowering), FlashButterfly / Monarch style.

Channels stay last (``[batch, n, channels]``): one program convolves a block of ``cb`` channels
of one batch row (:func:`channel_block`: ``m * cb = 4096`` elements, 16 float32 registers per
thread and tile at 8 warps, so the live tiles and the 3xTF32 dot operands mostly fit the
register file), all at once, so every DFT stage is ONE matmul whose N dimension spans many
signals (``n2 * cb`` or ``n1 * cb``: at least 128 when there are enough channels). With the
on-chip size ``m = n1 * n2`` (``j = j1 n2 + j2``, ``k = k1 + n1 k2``; powers of two,
``16 <= n1, n2 <= 64``, so ``256 <= m <= 4096``), the block viewed as ``[n1, n2 * cb]`` goes
through

1. ``F1 [n1, n1] @ x [n1, n2 cb]`` (size-``n1`` DFTs: 2 real matmuls for a real signal, 4 for a
   complex one), the twiddles ``W_m^{k1 j2}`` broadcast over the channels;
2. a transpose to ``[n2, n1 cb]`` (in registers), ``F2 [n2, n2] @`` (4 real matmuls), leaving the
   spectrum in digit-reversed ``[k2, k1, c]`` layout; the product with the kernel spectrum (same
   layout); ``conj(F2) @`` (4);
3. the conjugate twiddles, the transpose back, and ``conj(F1) @`` (2 for the real part only, 4
   for a complex result), / m.

One pass serves transform sizes ``n = m`` from 256 to 4096 (a causal convolution up to 2048
positions). Longer transforms, ``n = n0 * m`` with ``n0`` a power of two in ``[16, 64]`` (so up
to :func:`largest_size` ``= 262144`` points, a causal convolution of 131072), take
FlashButterfly's three passes (:func:`factors`; ``j = j0 m + j'``, ``k = k0 + n0 k'``):

* pass 1 (:func:`_outer_forward_kernel`): ``F0 [n0, n0] @ x [n0(j0), mb * cb]``, the size-``n0``
  DFTs along the strided outer axis for a block of ``mb`` positions ``j'`` and ``cb`` channels,
  times the twiddles ``W_n^{k0 j'}``: complex rows ``z [k0, j']``;
* pass 2: the one-pass kernel above on each complex row ``z [k0, :]`` of length ``m`` (complex in
  and out), with the kernel spectrum rows ``K = k0 + n0 (k1 + n1 k2)`` in the same ``[k2, k1]``
  layout (the Monarch spectrum of factors ``(n0, n1, n2)``);
* pass 3 (:func:`_outer_inverse_kernel`): the conjugate twiddles, then the real part of
  ``conj(F0) @``, / n0.

Where the kernels meet HBM (:class:`_Edge`), the signal, the gates and the result are the
caller's ``[batch, seq, channels]`` arrays, ``seq <= n``, in their own dtype: a program gathers
the rows it needs with masked loads (rows ``>= seq`` and channels past the last read as zero,
never from memory), multiplies by the pre-gate as it loads (one pass, or pass 1), and applies
``post_gate * (z + skip * v)`` and the cast as it scatters the first ``seq`` rows (one pass, or
pass 3, which reloads ``x`` and the pre-gate only for the skip term). Static flags: an absent
option is neither an operand nor a load. So no zero-padded copy to ``n`` rows, no channel
padding, no output window, gate or cast pass exists in XLA.

HBM traffic per element of ``u`` (bfloat16 ``u``, gates ``g``; per point of ``n`` inside three
passes): one pass reads 2 (+ 2 per gate) and writes 2 bytes, 4 without gates. Three passes:
2 (+ 2) + 8 (pass 1), 8 + 8 (pass 2), 8 (+ 2 per gate, + 2 for the skip) + 2 (pass 3) = 36 bytes
(40 for float32 ``u``). Both add the kernel spectrum (8 bytes per element and channel, once per
batch row), the small DFT matrices and, for three passes, the ``[n0, m]`` twiddle table (8 bytes
per point, shared by every batch row and channel block, so mostly L2 hits). On a GPU the float32
dots run on tensor cores as 3xTF32 (``DotAlgorithmPreset.TF32_TF32_F32_X3``: three TF32
products, about float32 accuracy); the interpreter (CPU) runs them at ``precision=HIGHEST``.

This module never imports effjax: effjax computes the kernel spectrum (with its Monarch
transform of :func:`factors`) and the backward (more calls of :func:`fft_conv`) around it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float

from pallas_kernels import shapes
from pallas_kernels.interpret import gpu_interpret
from pallas_kernels.long_conv import dft, gating

MIN_TILE, MAX_TILE = 16, 64
MAX_ON_CHIP = MAX_TILE * MAX_TILE  # the largest one-pass size m
PRE_HOPPER_ON_CHIP, PRE_HOPPER_N0 = 1024, 32  # default_block_sizes before compute capability 9
PREFERRED_ON_CHIP = 512  # three passes keep m at least this, with as many rows n0 as allowed
MIN_N0, MAX_N0 = 16, 64  # the outer DFT size of three passes (a dot needs dimensions >= 16)
BLOCK_ELEMENTS = 4096  # elements per program (m * cb in pass 2, n0 * mb * cb in passes 1 and 3)
_OUTER_CHANNELS = 32  # most channels per program in passes 1 and 3 (128-byte rows)
NUM_WARPS = 8


def split(n: int) -> tuple[int, int] | None:
  """``(n1, n2)`` with ``n1 * n2 = n``, powers of two in ``[16, 64]``, ``n1 <= n2``; else None."""
  if n < MIN_TILE * MIN_TILE or n > MAX_TILE * MAX_TILE or n & (n - 1):
    return None
  n1 = 1 << ((n.bit_length() - 1) // 2)
  return n1, n // n1


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """How many points the fused kernels transform on chip.

  Attributes:
    max_on_chip: the largest transform done in one pass, and the most points pass 2 of three
      keeps on chip: a power of two in ``[256, 4096]``. A smaller one makes longer transforms
      three passes (tests reach them at 4096 points with 256).
    max_n0: the largest outer DFT (rows ``n0``) of three passes: a power of two in ``[16, 64]``.
  """
  max_on_chip: int = MAX_ON_CHIP
  max_n0: int = MAX_N0

  def __post_init__(self):
    if (not isinstance(self.max_on_chip, int) or isinstance(self.max_on_chip, bool)
        or split(self.max_on_chip) is None):
      raise ValueError(f"BlockSizes.max_on_chip must be a power of two in "
                       f"[{MIN_TILE * MIN_TILE}, {MAX_ON_CHIP}], got {self.max_on_chip!r}")
    if (not isinstance(self.max_n0, int) or isinstance(self.max_n0, bool)
        or not MIN_N0 <= self.max_n0 <= MAX_N0 or self.max_n0 & (self.max_n0 - 1)):
      raise ValueError(f"BlockSizes.max_n0 must be a power of two in [{MIN_N0}, {MAX_N0}], got "
                       f"{self.max_n0!r}")


def default_block_sizes(compute_capability: tuple[int, int] | None) -> BlockSizes:
  """The block-size heuristic for an NVIDIA GPU of ``compute_capability`` (None: unknown).

  Before Hopper (sm_80/86/89) ``mma.sync`` takes both 3xTF32 operands in registers, and a
  64-point DFT stage (one pass of ``m = 2048`` or 4096 points, or an outer pass of ``n0 = 64``
  rows) spills most of the kernel's registers to local memory: there every DFT stage has at most
  32 points, so one pass stops at 1024 points and three passes at 32768 (a causal convolution of
  513-2048 positions takes three passes of 4096 points; above 16384 positions dispatch falls
  through). Hopper's ``wgmma`` reads its B operand from shared memory: :class:`BlockSizes`'
  defaults, as when the GPU is unknown."""
  if compute_capability is not None and compute_capability[0] < 9:
    return BlockSizes(PRE_HOPPER_ON_CHIP, PRE_HOPPER_N0)
  return BlockSizes()


def largest_size(block_sizes: BlockSizes = BlockSizes()) -> int:
  """The longest transform :func:`factors` splits: ``max_n0`` rows of ``max_on_chip`` points."""
  return block_sizes.max_n0 * block_sizes.max_on_chip


@functools.cache
def factors(n: int, block_sizes: BlockSizes = BlockSizes()) -> tuple[int, ...] | None:
  """``(n1, n2)`` (:func:`split`) when ``n <= max_on_chip`` fits one pass, else ``(n0, n1, n2)``
  with ``n0`` a power of two in ``[MIN_N0, max_n0]`` leaving ``m = n / n0 <= max_on_chip``
  points on chip: the most rows that keep ``m >= PREFERRED_ON_CHIP`` (else the fewest), since
  pass 2 spills registers above 512 points; None if none exists."""
  max_on_chip, max_n0 = block_sizes.max_on_chip, block_sizes.max_n0
  if n <= max_on_chip:
    return split(n)
  powers = (MIN_N0 << i for i in range(max_n0.bit_length() - MIN_N0.bit_length() + 1))
  rows = [n0 for n0 in powers if n % n0 == 0 and n // n0 <= max_on_chip
          and split(n // n0) is not None]
  if not rows:
    return None
  roomy = [n0 for n0 in rows if n // n0 >= PREFERRED_ON_CHIP]
  n0 = max(roomy) if roomy else min(rows)
  return (n0, *split(n // n0))


def channel_block(m: int, channels: int) -> int:
  """Channels per on-chip program: ``BLOCK_ELEMENTS / m`` (1 at m = 4096, 16 at 256), or the
  next power of two ``>= channels`` when that is fewer."""
  return min(BLOCK_ELEMENTS // m, shapes.next_power_of_two(channels))


def _dot(f, a, precision):
  """``f [rows, rows] @ a [rows, ...]``, the trailing dimensions of ``a`` merged."""
  product = lax.dot(f, a.reshape(a.shape[0], -1), precision=precision,
                    preferred_element_type=jnp.float32)
  return product.reshape(a.shape)


@dataclasses.dataclass(frozen=True)
class _Edge(gating.Options):
  """How a kernel meets the ``[batch, seq, channels]`` arrays in HBM (the signal, the gates, the
  result): each program sees them as one ``(n, cb)`` block of a batch row and gathers or
  scatters the rows it needs, masked to ``row < seq`` and ``channel < channels``: the zero
  padding to ``n`` rows and channel blocks happens in registers, not in an HBM copy."""
  seq: int
  channels: int
  cb: int

  def _index(self, rows):
    """(row, lane) gather indices ``[*rows.shape, cb]`` of ``rows`` int32 and their mask."""
    lanes = lax.broadcasted_iota(jnp.int32, (1,) * rows.ndim + (self.cb,), rows.ndim)
    rows = rows[..., None]
    mask = (rows < self.seq) & (pl.program_id(2) * self.cb + lanes < self.channels)
    return (rows, lanes), mask

  def load(self, refs, rows):
    """``v = pre_gate * x`` at ``rows`` (zero beyond ``seq``), float32 ``[*rows.shape, cb]``."""
    index, mask = self._index(rows)
    load = lambda ref: plgpu.load(ref.at[index], mask=mask, other=0).astype(jnp.float32)
    v = load(refs["x"])
    return v * load(refs["pre_gate"]) if self.pre_gate else v

  def store(self, refs, rows, z, v):
    """Stores ``post_gate * (z + skip * v)`` at ``rows`` (``v``: None reloads it)."""
    index, mask = self._index(rows)
    if self.skip:
      z = z + refs["skip"][...] * (self.load(refs, rows) if v is None else v)
    if self.post_gate:
      z = z * plgpu.load(refs["post_gate"].at[index], mask=mask, other=0).astype(jnp.float32)
    out = refs["out"]
    plgpu.store(out.at[index], z.astype(out.dtype), mask=mask)


def _rows(shape: tuple[int, int], stride: int, offset=0):
  """int32 ``[a, b]`` row numbers ``i * stride + j + offset``."""
  iota = lambda axis: lax.broadcasted_iota(jnp.int32, shape, axis)
  return iota(0) * stride + iota(1) + offset


def _kernel(*refs, names, precision, edge: _Edge | None):
  """Blocks are ``[rows, cols, cb]``; a dot contracts ``rows`` with the other two merged. A real
  signal (``edge``: one pass from and to HBM's ``[batch, seq, channels]``) is gathered as
  ``[n1, n2, cb]`` with its pre-gate and stored with its post-gate and skip; a complex one (pass
  2 of three) has two input and two output blocks."""
  refs = dict(zip(names, refs))
  dot = functools.partial(_dot, precision=precision)

  def swap(a):  # [rows, cols, cb] -> [cols, rows, cb], in registers
    return jnp.transpose(a, (1, 0, 2))

  f1r, f1i, f2r, f2i = (refs[name][...] for name in ("f1r", "f1i", "f2r", "f2i"))
  n1, n2 = f1r.shape[0], f2r.shape[0]
  tr, ti = refs["tr"][...][:, :, None], refs["ti"][...][:, :, None]  # [n1, n2, 1]
  # Forward: size-n1 DFTs, twiddles, size-n2 DFTs after the transpose.
  if edge is None:
    x, x_im = refs["x_re"][...], refs["x_im"][...]
    ar, ai = dot(f1r, x) - dot(f1i, x_im), dot(f1r, x_im) + dot(f1i, x)
  else:
    rows = _rows((n1, n2), n2)
    x = edge.load(refs, rows)  # [n1(j1), n2(j2), cb]
    ar, ai = dot(f1r, x), dot(f1i, x)
  ar, ai = swap(ar * tr - ai * ti), swap(ar * ti + ai * tr)
  xr, xi = dot(f2r, ar) - dot(f2i, ai), dot(f2r, ai) + dot(f2i, ar)  # [k2, k1, cb]
  # Pointwise product with the kernel spectrum, in the same digit-reversed layout.
  kr, ki = refs["k_re"][...], refs["k_im"][...]
  pr, pi = xr * kr - xi * ki, xr * ki + xi * kr
  # Inverse: conj(F2), transpose back, conjugate twiddles, conj(F1).
  br, bi = swap(dot(f2r, pr) + dot(f2i, pi)), swap(dot(f2r, pi) - dot(f2i, pr))
  br, bi = br * tr + bi * ti, bi * tr - br * ti
  scale = 1.0 / (n1 * n2)
  z = (dot(f1r, br) + dot(f1i, bi)) * scale
  if edge is None:
    refs["out_re"][...] = z
    refs["out_im"][...] = (dot(f1r, bi) - dot(f1i, br)) * scale
  else:
    edge.store(refs, rows, z, x)


def _outer_rows(n0: int, m: int, mb: int):
  """Rows ``j0 m + j'`` of this program's ``mb`` positions ``j'``: int32 ``[n0, mb]``."""
  return _rows((n0, mb), m, pl.program_id(1) * mb)


def _outer_forward_kernel(*refs, names, precision, edge: _Edge, m: int):
  """Pass 1 on ``x [n0(j0), mb(j'), cb]`` (gathered with its pre-gate):
  ``z = W_n^{k0 j'} (F0 @ x)``, complex."""
  refs = dict(zip(names, refs))
  f0r, f0i = refs["f0r"][...], refs["f0i"][...]
  x = edge.load(refs, _outer_rows(f0r.shape[0], m, refs["tr"].shape[1]))
  ar, ai = _dot(f0r, x, precision), _dot(f0i, x, precision)
  tr, ti = refs["tr"][...][:, :, None], refs["ti"][...][:, :, None]  # [n0, mb, 1]
  refs["z_re"][...] = ar * tr - ai * ti
  refs["z_im"][...] = ar * ti + ai * tr


def _outer_inverse_kernel(*refs, names, precision, edge: _Edge, m: int):
  """Pass 3 on ``z [n0(k0), mb(j'), cb]``: ``real(conj(F0) @ (W_n^{-k0 j'} z)) / n0``, stored
  with the post-gate and skip (which reloads the signal and its pre-gate)."""
  refs = dict(zip(names, refs))
  zr, zi = refs["z_re"][...], refs["z_im"][...]
  tr, ti = refs["tr"][...][:, :, None], refs["ti"][...][:, :, None]
  br, bi = zr * tr + zi * ti, zi * tr - zr * ti
  f0r, f0i = refs["f0r"][...], refs["f0i"][...]
  y = (_dot(f0r, br, precision) + _dot(f0i, bi, precision)) * (1.0 / zr.shape[0])
  edge.store(refs, _outer_rows(zr.shape[0], m, zr.shape[1]), y, None)


def _edge_operands(edge: _Edge, x, gates: dict[str, jax.Array | None], n: int, grid_spec):
  """``(names, arrays, specs)`` of the signal and the optional gates and skip: ``(n, cb)`` blocks
  of ``[batch, seq, channels]`` arrays, skip ``[channels]`` padded to whole ``cb`` blocks."""
  names, arrays = ["x"], [x]
  for name in edge.names():
    names.append(name)
    arrays.append(gates[name])
  specs = [pl.BlockSpec((None, n, edge.cb), grid_spec)] * len(arrays)
  if edge.skip:
    skip = gates["skip"].astype(jnp.float32)
    arrays[-1] = shapes.pad_to_multiple(skip, 0, edge.cb)
    specs[-1] = pl.BlockSpec((edge.cb,), lambda *ids: (ids[2],))
  return names, arrays, specs


def _on_chip(signal: tuple[jax.Array, ...], k_hat_re, k_hat_im, n1: int, n2: int, cb: int,
             interpret: bool, precision, edge: _Edge | None = None,
             gates: dict[str, jax.Array | None] | None = None, dtype=jnp.float32
             ) -> list[jax.Array]:
  """The one-pass kernel: ``edge`` None: on the complex ``signal`` (re, im)
  ``[batch, rows, n1, n2, channels]``, row ``r`` with the spectrum ``[rows, n2, n1, channels]``
  row ``r``; else on the real ``signal`` (x,) ``[batch, seq, channels]`` with ``gates``, storing
  ``dtype``."""
  channels = k_hat_re.shape[-1]
  spectrum = pl.BlockSpec((None, n2, n1, cb), lambda b, r, c: (r, 0, 0, c))
  whole = lambda shape: pl.BlockSpec(shape, lambda b, r, c: (0, 0))
  if edge is None:
    batch, rows = signal[0].shape[:2]
    block = pl.BlockSpec((None, None, n1, n2, cb), lambda b, r, c: (b, r, 0, 0, c))
    names, arrays, specs = ["x_re", "x_im"], list(signal), [block] * 2
    out_names, out_specs = ["out_re", "out_im"], [block] * 2
    out_shape = [jax.ShapeDtypeStruct(signal[0].shape, jnp.float32)] * 2
  else:
    (x,) = signal
    batch, rows = x.shape[0], 1
    names, arrays, specs = _edge_operands(edge, x, gates, n1 * n2, lambda b, r, c: (b, 0, c))
    out_names, out_specs = ["out"], [pl.BlockSpec((None, n1 * n2, cb), lambda b, r, c: (b, 0, c))]
    out_shape = [jax.ShapeDtypeStruct(x.shape, dtype)]
  names += ["k_re", "k_im", "f1r", "f1i", "f2r", "f2i", "tr", "ti"]
  name = "long_conv_fused_fft" if edge is not None else "long_conv_fused_fft_complex"
  return pl.pallas_call(
      functools.partial(_kernel, names=(*names, *out_names), precision=precision, edge=edge),
      grid=(batch, rows, shapes.cdiv(channels, cb)),
      in_specs=specs + [spectrum] * 2 + [whole((n1, n1))] * 2 + [whole((n2, n2))] * 2
      + [whole((n1, n2))] * 2,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret,
      name=name,
  )(*arrays, k_hat_re, k_hat_im, *dft.dft(n1), *dft.dft(n2), *dft.twiddles(n1, n2))


def _outer_pass(kernel, name: str, z: tuple[jax.Array, ...], x: jax.Array, edge: _Edge,
                gates: dict[str, jax.Array | None], n0: int, m: int, channels: int,
                interpret: bool, precision, dtype) -> list[jax.Array]:
  """Pass 1 (``z`` empty: from ``x`` to complex ``[batch, n0, m, channels]``) or pass 3 (from
  ``z`` to ``[batch, seq, channels]`` in ``dtype``): blocks of ``[n0, mb, cb]``."""
  batch, cb = x.shape[0], edge.cb
  mb = min(m, BLOCK_ELEMENTS // (n0 * cb))
  block = pl.BlockSpec((None, n0, mb, cb), lambda b, j, c: (b, 0, j, c))
  matrix = pl.BlockSpec((n0, n0), lambda b, j, c: (0, 0))
  twiddle = pl.BlockSpec((n0, mb), lambda b, j, c: (0, j))
  names, arrays, specs = _edge_operands(edge, x, gates, n0 * m, lambda b, j, c: (b, 0, c))
  if z:
    out_names, out_specs = ["out"], [pl.BlockSpec((None, n0 * m, cb), lambda b, j, c: (b, 0, c))]
    out_shape = [jax.ShapeDtypeStruct(x.shape, dtype)]
  else:
    out_names, out_specs = ["z_re", "z_im"], [block] * 2
    out_shape = [jax.ShapeDtypeStruct((batch, n0, m, channels), jnp.float32)] * 2
  names = ["z_re", "z_im"] * bool(z) + names + ["f0r", "f0i", "tr", "ti"]
  return pl.pallas_call(
      functools.partial(kernel, names=(*names, *out_names), precision=precision, edge=edge, m=m),
      grid=(batch, m // mb, channels // cb),
      in_specs=[block] * len(z) + specs + [matrix] * 2 + [twiddle] * 2,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret,
      name=name,
  )(*z, *arrays, *dft.dft(n0), *dft.twiddles(n0, m))


def fft_conv(x: Float[Array, "batch seq channels"], k_hat_re: Float[Array, "*n0 n2 n1 channels"],
             k_hat_im: Float[Array, "*n0 n2 n1 channels"], *, n: int | None = None,
             pre_gate: Float[Array, "batch seq channels"] | None = None,
             post_gate: Float[Array, "batch seq channels"] | None = None,
             skip: Float[Array, " channels"] | None = None, dtype: Any = jnp.float32,
             block_sizes: BlockSizes | None = None, interpret: bool | None = None
             ) -> Float[Array, "batch seq channels"]:
  """Gated circular convolution: rows ``[0, seq)`` of ``post_gate * (z + skip * v)``, ``z =
  real(ifft(fft(v) * k_hat))`` of size ``n`` with ``v = pre_gate * x`` zero-extended to ``n``
  rows, for every ``(batch, channel)`` signal.

  The zero extension, the channel padding, the gates, the skip term and the cast happen where
  the kernel loads and stores (masked gathers and scatters; pre-gate in the one-pass load or pass
  1, post-gate and skip in the one-pass store or pass 3); a None option costs no load.

  Args:
    x: ``[batch, seq, channels]``, any float dtype, ``seq <= n``.
    k_hat_re, k_hat_im: float32, the kernel spectrum in digit-reversed layout for
      ``factors(n, block_sizes)``: for ``(n1, n2)``, ``[n2, n1, channels]``, the DFT at
      ``k1 + n1 k2`` in ``[k2, k1]``; for ``(n0, n1, n2)``, ``[n0, n2, n1, channels]``, the DFT
      at ``k0 + n0 (k1 + n1 k2)`` in ``[k0, k2, k1]``.
    n: the transform size, accepted by :func:`factors`; None: ``seq``.
    pre_gate, post_gate: None or ``[batch, seq, channels]`` (any float dtype).
    skip: None or ``[channels]``.
    dtype: the result's dtype.
    block_sizes: the limits :func:`factors` splits ``n`` with; None: ``BlockSizes()`` (those of
      Hopper or an unknown GPU; :func:`default_block_sizes` gives them per GPU).
    interpret: run in Pallas' interpreter; None follows ``pallas_kernels.interpret``.

  Returns:
    ``[batch, seq, channels]`` in ``dtype``.

  Raises:
    NotImplementedError: off a GPU unless interpreting, or ``n`` has no :func:`factors`.
    TypeError: ``block_sizes`` is not a :class:`BlockSizes`.
    ValueError: ``seq > n``, or a gate, skip or the spectrum has the wrong shape.
  """
  interpret = gpu_interpret(interpret)
  block_sizes = shapes.resolve_block_sizes(block_sizes, BlockSizes, BlockSizes)
  batch, seq, channels = x.shape
  n = seq if n is None else n
  tiles = factors(n, block_sizes)
  if tiles is None:
    raise NotImplementedError(f"fused FFT conv needs n a power of two in [256, "
                              f"{largest_size(block_sizes)}], got {n}")
  flags = gating.Options.check(x, n, pre_gate, post_gate, skip)
  *outer, n1, n2 = tiles
  expected = (*outer, n2, n1, channels)
  if k_hat_re.shape != expected or k_hat_im.shape != expected:
    raise ValueError(f"kernel spectrum must have shape {expected}, got {k_hat_re.shape} and "
                     f"{k_hat_im.shape}")
  n0, m = n // (n1 * n2), n1 * n2
  # Powers of two: pass 2 takes cb channels per program, passes 1 and 3 up to 32 (a multiple).
  cb = channel_block(m, channels)
  unit = cb if n0 == 1 else min(_OUTER_CHANNELS, shapes.next_power_of_two(channels))
  padded = shapes.round_up(channels, unit)
  k_re, k_im = (shapes.pad_axis(k, -1, padded).reshape(n0, n2, n1, padded)
                for k in (k_hat_re, k_hat_im))
  precision = (lax.Precision.HIGHEST if interpret
               else lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
  gates = dict(pre_gate=pre_gate, post_gate=post_gate, skip=skip)
  edge = functools.partial(_Edge, seq=seq, channels=channels, **flags)
  if n0 == 1:
    (y,) = _on_chip((x,), k_re, k_im, n1, n2, cb, interpret, precision, edge(cb=cb), gates,
                    dtype)
    return y
  outer_edge = edge(cb=unit)
  z = _outer_pass(_outer_forward_kernel, "long_conv_outer_dft", (), x,
                  dataclasses.replace(outer_edge, post_gate=False, skip=False), gates, n0, m,
                  padded, interpret, precision, jnp.float32)
  z = _on_chip(tuple(part.reshape(batch, n0, n1, n2, padded) for part in z), k_re, k_im, n1, n2,
               cb, interpret, precision)
  # Pass 3 reloads x and its pre-gate only for the skip term.
  last = outer_edge if skip is not None else dataclasses.replace(outer_edge, pre_gate=False)
  (y,) = _outer_pass(_outer_inverse_kernel, "long_conv_outer_idft",
                     tuple(part.reshape(batch, n0, m, padded) for part in z), x, last, gates, n0,
                     m, padded, interpret, precision, dtype)
  return y
