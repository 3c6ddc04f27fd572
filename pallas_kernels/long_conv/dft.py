"""DFT constants the fused kernels share, computed by XLA as float32 (re, im) pairs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def roots(exponents: jax.Array, modulus: int) -> tuple[jax.Array, jax.Array]:
  """``exp(-2 pi i e / modulus)`` (re, im) for int32 ``e``, reduced exactly before the float
  angle (so large exponents lose no accuracy)."""
  angle = (exponents % modulus).astype(jnp.float32) * jnp.float32(-2 * math.pi / modulus)
  return jnp.cos(angle), jnp.sin(angle)


def dft(size: int) -> tuple[jax.Array, jax.Array]:
  """The ``[size, size]`` DFT matrix ``W^{k j}`` (symmetric)."""
  k = lax.iota(jnp.int32, size)
  return roots(k[:, None] * k[None, :], size)


def twiddles(rows: int, cols: int) -> tuple[jax.Array, jax.Array]:
  """``[rows, cols]`` twiddles ``W_{rows cols}^{k j}`` between two Monarch stages."""
  return roots(lax.iota(jnp.int32, rows)[:, None] * lax.iota(jnp.int32, cols)[None, :],
               rows * cols)
