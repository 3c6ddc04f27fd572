"""``long_conv`` by ``jnp.fft.rfft`` / ``irfft`` in float32 (the default on CPU and GPU).

The FFT size is the smallest 7-smooth number (``2^a 3^b 5^c 7^d``, fast in ducc and cuFFT) that is
at least the linear-convolution length (``seq + kernel_len - 1``; ``seq + kernel_len // 2`` for
bidirectional); circular mode uses ``n = seq`` exactly (any length, primes by Bluestein inside the
FFT library). bfloat16/float16 inputs are transformed in float32 (complex64). The backward is the
recomputing ``custom_vjp`` of :mod:`effjax.ops.long_conv.spectral`: residuals are the inputs.

Time O(batch * channels * n log n); scratch a few ``[batch, n // 2 + 1, channels]`` complex64
spectra.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools

import jax.numpy as jnp
from jaxtyping import Array, Float

from effjax.ops.long_conv import spectral

_SMOOTH_PRIMES = (2, 3, 5, 7)


@functools.cache
def _smooth_numbers(limit: int) -> tuple[int, ...]:
  """Every 7-smooth number <= limit, sorted."""
  numbers = [1]
  for prime in _SMOOTH_PRIMES:
    numbers = [m * prime**e for m in numbers for e in range(64) if m * prime**e <= limit]
  return tuple(sorted(set(numbers)))


def smooth_size(length: int) -> int:
  """The smallest 7-smooth number ``>= length``."""
  limit = 1 << max(length - 1, 1).bit_length()  # a power of two >= length
  numbers = _smooth_numbers(limit)
  return numbers[bisect.bisect_left(numbers, length)]


@dataclasses.dataclass(frozen=True)
class RealFFT:
  """``rfft`` of size ``n`` along axis -2; spectra ``[..., n // 2 + 1, channels]`` complex64."""
  n: int

  def forward(self, x: Float[Array, "*batch n channels"], blocks: None = None) -> jnp.ndarray:
    if blocks is not None:
      raise ValueError("RealFFT has no learned blocks")
    return jnp.fft.rfft(x, n=self.n, axis=-2)

  def inverse(self, spectrum: jnp.ndarray, batch: int | None = None
              ) -> Float[Array, "*batch n channels"]:
    del batch  # rfft spectra are never packed
    return jnp.fft.irfft(spectrum, n=self.n, axis=-2)


def long_conv(
    u: Float[Array, "batch seq channels"],
    kernel: Float[Array, "channels kernel_len"],
    *,
    mode: str,
    skip: Float[Array, " channels"] | None = None,
    pre_gate: Float[Array, "batch seq channels"] | None = None,
    post_gate: Float[Array, "batch seq channels"] | None = None,
) -> Float[Array, "batch seq channels"]:
  """FFT long convolution; arguments as validated by ``effjax.long_conv``."""
  plan = spectral.Plan.create(mode, u.shape[1], kernel.shape[1], smooth_size, exact_circular=True)
  return spectral.gated_long_conv(u, kernel, conv=spectral.transform_conv(plan, RealFFT(plan.n)),
                                  skip=skip, pre_gate=pre_gate, post_gate=post_gate)
