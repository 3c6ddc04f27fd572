"""``long_conv`` with the DFT as Monarch / FlashButterfly matrix products (matmuls only).

FlashButterfly ("Simple Hardware-Efficient Long Convolutions", Fu, Epstein et al. 2023) writes
the DFT of size ``n = n_1 n_2`` as ``F_n = P (I ⊗ F_{n_1}) P^T D (I ⊗ F_{n_2}) P``: dense DFTs
of the small sizes as batched (block-diagonal) matrix products, with twiddle factors ``D`` in
between, recursively for ``n = n_1 n_2 ... n_r``; the paper reports convolutions 2.2x faster than
FFT convolutions on GPU (the matmuls run on tensor cores). Here, with ``x`` viewed as
``[n_1, ..., n_r]`` (row-major, ``j = j_1 n_2...n_r + ... + j_r``), stage ``i`` is a DFT of size
``n_i`` along axis ``i`` then the twiddle ``exp(-2 pi i k_i J_i / m_i)`` (``m_i = n_i...n_r``,
``J_i`` the flat index of ``j_{i+1..r}``). The spectrum is left digit-reversed
(``k = k_1 + n_1 k_2 + n_1 n_2 k_3 + ...``): a convolution multiplies two spectra in the same
layout and the inverse undoes the stages in reverse order, so no transpose is ever needed.

Any length: the transform size ``n`` is the cheapest 7-smooth number ``>= `` the
linear-convolution length whose factors are all ``<= max_block`` (a few percent of padding at
most); circular mode uses ``n = seq`` when ``seq`` factorizes so, and otherwise folds the linear
convolution (see :mod:`effjax.ops.long_conv.spectral`). Transforms are float32 (complex64) at
HIGHEST matmul precision whatever the input dtype.

Cost: ``8 n sum(n_i)`` real flops per transform and channel, ``r`` passes over
``[batch / 2, n, channels]`` complex64: pairs of the batch share one complex transform
(``u_2p + i u_2p+1``; the kernel is real, so real and imaginary parts convolve separately). The
recomputing ``custom_vjp`` keeps only the inputs between forward and backward.

Learned butterfly (the paper's extension; safari's ``BlockFFT``): pass ``blocks``, one
``[2, n_i, n_i]`` (real, imaginary) matrix per stage, initialized by :func:`dft_blocks`, to
replace the small DFTs of the forward transforms of both input and kernel; the twiddles and the
inverse transform stay exact. Gradients then flow to ``blocks`` by plain autodiff.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from effjax.ops.long_conv import spectral
from effjax.ops.long_conv.xla_fft import _smooth_numbers

MAX_BLOCK = 64
# Relative cost of one pass over the data, in units of one multiply-add per element per factor.
_PASS_COST = 64
_HIGHEST = lax.Precision.HIGHEST
_AXES = "ABCDEFGHIJKLMNOP"


@functools.cache
def factorize(n: int, max_block: int = MAX_BLOCK) -> tuple[int, ...] | None:
  """Factors ``<= max_block`` with product ``n``, largest first, of least cost
  ``sum(factors) + _PASS_COST * len(factors)``; ``()`` for ``n = 1``; None if ``n`` has a prime
  factor above ``max_block``."""
  if n == 1:
    return ()
  fewest = max(1, math.ceil(math.log(n) / math.log(max_block) - 1e-9))
  splits = [_best_split(n, count, max_block) for count in range(fewest, fewest + 4)]
  splits = [split for split in splits if split is not None]
  return min(splits, key=lambda s: sum(s) + _PASS_COST * len(s)) if splits else None


@functools.cache
def _best_split(n: int, count: int, largest: int) -> tuple[int, ...] | None:
  """Non-increasing factors ``<= largest``, ``count`` of them, product ``n``, least sum."""
  if count == 1:
    return (n,) if n <= largest else None
  best = None
  for factor in range(min(n, largest), 1, -1):
    if n % factor == 0 and factor ** count >= n:
      rest = _best_split(n // factor, count - 1, factor)
      if rest is not None and (best is None or factor + sum(rest) < sum(best)):
        best = (factor, *rest)
  return best


@functools.cache
def butterfly_size(length: int, max_block: int = MAX_BLOCK) -> int:
  """The 7-smooth ``n`` in ``[length, 2 length]`` (factors ``<= max_block``) of least cost
  ``n * (sum(factors) + _PASS_COST * len(factors))``."""
  def cost(n):
    factors = factorize(n, max_block)
    return math.inf if factors is None else n * (sum(factors) + _PASS_COST * len(factors))
  candidates = [n for n in _smooth_numbers(2 * max(length, 1)) if n >= length]
  return min(candidates, key=lambda n: (cost(n), n))


@functools.cache
def _dft_matrix(size: int, inverse: bool = False) -> np.ndarray:
  """``exp(-+2 pi i k j / size)`` as complex64, the angle reduced exactly in integers."""
  k = np.arange(size)
  return _roots(np.outer(k, k) % size, size, inverse)


def _roots(exponents: np.ndarray, modulus: int, inverse: bool) -> np.ndarray:
  angle = (2 if inverse else -2) * np.pi * exponents.astype(np.float64) / modulus
  return np.exp(1j * angle).astype(np.complex64)


def dft_blocks(factors: Sequence[int]) -> tuple[np.ndarray, ...]:
  """The exact DFT blocks, one float32 ``[2, n_i, n_i]`` (real, imaginary) per stage: the
  initialization of a learned butterfly."""
  return tuple(np.stack([_dft_matrix(f).real, _dft_matrix(f).imag]).astype(np.float32)
               for f in factors)


@functools.cache
def _twiddle(factors: tuple[int, ...], stage: int, inverse: bool = False) -> np.ndarray:
  """``[n_i, n_{i+1}, ..., n_r, 1]`` twiddles applied after stage ``i`` (channels last)."""
  rest = math.prod(factors[stage + 1:])
  exponents = np.outer(np.arange(factors[stage]), np.arange(rest)) % (factors[stage] * rest)
  return _roots(exponents, factors[stage] * rest, inverse).reshape(*factors[stage:], 1)


def _stage_subscripts(stage: int, count: int) -> str:
  axes = _AXES[:count]
  source = axes[:stage] + "q" + axes[stage + 1:]
  target = axes[:stage] + "p" + axes[stage + 1:]
  return f"pq,...{source}Z->...{target}Z"


@dataclasses.dataclass(frozen=True)
class Butterfly:
  """The size-``n`` DFT along axis -2 as ``len(factors)`` block-diagonal matmul stages.

  Spectra are ``[..., n_1, ..., n_r, channels]`` complex64 in digit-reversed order (see the
  module docstring); :meth:`natural_order` converts one to ``jnp.fft.fft``'s order. With
  ``pack_batch``, a batch ``[batch, n, channels]`` of real signals is transformed two at a time
  as ``u_2p + i u_2p+1`` (half the transforms; valid because a convolution with a real kernel maps
  real and imaginary parts separately), and :meth:`inverse` with ``batch`` unpacks them.
  """
  n: int
  factors: tuple[int, ...]
  pack_batch: bool = False

  def __post_init__(self):
    if math.prod(self.factors) != self.n:
      raise ValueError(f"factors {self.factors} do not multiply to n={self.n}")

  @classmethod
  def of_size(cls, n: int, max_block: int = MAX_BLOCK, pack_batch: bool = False) -> Butterfly:
    factors = factorize(n, max_block)
    if factors is None:
      raise ValueError(f"n={n} has a prime factor above max_block={max_block}")
    return cls(n, factors, pack_batch)

  def forward(self, x: Float[Array, "*batch n channels"],
              blocks: Sequence[jax.Array] | None = None) -> jax.Array:
    """The DFT of real ``x`` (or the learned transform with ``blocks``), digit-reversed."""
    count = len(self.factors)
    if self.pack_batch and x.ndim == 3 and x.shape[0] > 1:
      x = jnp.pad(x, ((0, x.shape[0] % 2), (0, 0), (0, 0)))
      x = lax.complex(x[0::2], x[1::2])
    x = x.reshape(*x.shape[:-2], *self.factors, x.shape[-1])
    if count == 0:
      return x.astype(jnp.complex64)
    if blocks is None:
      blocks = dft_blocks(self.factors)
    elif tuple(jnp.shape(b) for b in blocks) != tuple((2, f, f) for f in self.factors):
      raise ValueError(f"blocks must have shapes {[(2, f, f) for f in self.factors]} for "
                       f"n={self.n}, got {[jnp.shape(b) for b in blocks]}")
    for stage, block in enumerate(blocks):
      subscripts = _stage_subscripts(stage, count)
      if jnp.iscomplexobj(x):
        x = jnp.einsum(subscripts, lax.complex(block[0], block[1]), x, precision=_HIGHEST)
      else:  # real input: two real matmuls
        x = lax.complex(*(jnp.einsum(subscripts, block[part], x, precision=_HIGHEST)
                          for part in (0, 1)))
      if stage < count - 1:
        x = x * _twiddle(self.factors, stage)
    return x

  def inverse(self, spectrum: jax.Array, batch: int | None = None
              ) -> Float[Array, "*batch n channels"]:
    """Real part of the inverse DFT (with the 1/n) of a digit-reversed spectrum; with
    ``pack_batch`` and ``batch > 1``, the ``batch`` real signals packed by :meth:`forward`."""
    count = len(self.factors)
    unpack = self.pack_batch and batch is not None and batch > 1
    lead = spectrum.shape[:spectrum.ndim - count - 1]
    x = spectrum
    for stage in reversed(range(count)):
      if stage < count - 1:
        x = x * _twiddle(self.factors, stage, inverse=True)
      matrix = _dft_matrix(self.factors[stage], inverse=True)
      subscripts = _stage_subscripts(stage, count)
      if stage == 0 and not unpack:  # only the real part is needed: two real matmuls
        x = (jnp.einsum(subscripts, matrix.real, x.real, precision=_HIGHEST)
             - jnp.einsum(subscripts, matrix.imag, x.imag, precision=_HIGHEST))
      else:
        x = jnp.einsum(subscripts, matrix, x, precision=_HIGHEST)
    x = x.reshape(*lead, self.n, spectrum.shape[-1])
    if unpack:
      x = jnp.stack([x.real, x.imag], axis=1).reshape(-1, self.n, x.shape[-1])[:batch]
    return jnp.real(x) * np.float32(1 / self.n)

  def natural_order(self, spectrum: jax.Array) -> jax.Array:
    """``[..., n_1..n_r, channels]`` digit-reversed -> ``[..., n, channels]`` in DFT order."""
    count = len(self.factors)
    lead = spectrum.ndim - count - 1
    order = (*range(lead), *reversed(range(lead, lead + count)), spectrum.ndim - 1)
    return spectrum.transpose(order).reshape(*spectrum.shape[:lead], self.n, spectrum.shape[-1])


def plan_and_transform(mode: str, seq: int, kernel_len: int, max_block: int = MAX_BLOCK,
                       pack_batch: bool = False) -> tuple[spectral.Plan, Butterfly]:
  """The plan and transform ``long_conv`` uses for these sizes (e.g. to shape learned blocks)."""
  plan = spectral.Plan.create(
      mode, seq, kernel_len, functools.partial(butterfly_size, max_block=max_block),
      exact_circular=factorize(seq, max_block) is not None)
  return plan, Butterfly.of_size(plan.n, max_block, pack_batch=pack_batch)


def long_conv(
    u: Float[Array, "batch seq channels"],
    kernel: Float[Array, "channels kernel_len"],
    *,
    mode: str,
    skip: Float[Array, " channels"] | None = None,
    pre_gate: Float[Array, "batch seq channels"] | None = None,
    post_gate: Float[Array, "batch seq channels"] | None = None,
    blocks: Sequence[jax.Array] | None = None,
    max_block: int = MAX_BLOCK,
) -> Float[Array, "batch seq channels"]:
  """Monarch-DFT long convolution; arguments as validated by ``effjax.long_conv``.

  Args:
    blocks: learned forward DFT blocks (see the module docstring); None for the exact DFT.
    max_block: largest small-DFT size (a stage is a matmul with this contraction length).
  """
  if not isinstance(max_block, int) or max_block < 2:
    raise ValueError(f"max_block must be an int >= 2, got {max_block!r}")
  # Packing pairs of the batch relies on the forward transform being the DFT.
  plan, transform = plan_and_transform(mode, u.shape[1], kernel.shape[1], max_block,
                                       pack_batch=blocks is None)
  return spectral.gated_long_conv(u, kernel, conv=spectral.transform_conv(plan, transform, blocks),
                                  skip=skip, pre_gate=pre_gate, post_gate=post_gate)
