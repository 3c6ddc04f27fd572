"""The float32 reference of ``long_conv`` (a direct depthwise convolution, the test oracle) and
the plain ``jnp.fft`` convolution that benchmarks and the bfloat16 error rule compare against.

It pads ``u`` for the mode (zeros on the left for causal, on both sides for bidirectional,
a periodic copy for circular) and runs ``lax.conv_general_dilated`` with one group per channel
at HIGHEST precision: O(batch * channels * seq * kernel_len) time, no FFT, no padding to a
transform size. Gradients come from plain autodiff. Never a default.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float


def long_conv(
    u: Float[Array, "batch seq channels"],
    kernel: Float[Array, "channels kernel_len"],
    *,
    mode: str,
    skip: Float[Array, " channels"] | None = None,
    pre_gate: Float[Array, "batch seq channels"] | None = None,
    post_gate: Float[Array, "batch seq channels"] | None = None,
) -> Float[Array, "batch seq channels"]:
  """Direct convolution in float32; arguments as validated by ``effjax.long_conv``."""
  dtype = u.dtype
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  u, kernel, skip, pre_gate, post_gate = map(f32, (u, kernel, skip, pre_gate, post_gate))
  v = u if pre_gate is None else pre_gate * u
  seq, channels = v.shape[1:]
  kernel_len = kernel.shape[1]
  if mode == "causal":
    padded = jnp.pad(v, ((0, 0), (kernel_len - 1, 0), (0, 0)))
  elif mode == "bidirectional":
    half = kernel_len // 2
    padded = jnp.pad(v, ((0, 0), (half, half), (0, 0)))
  elif mode == "circular":
    padded = jnp.concatenate([v[:, seq - (kernel_len - 1):], v], axis=1)
  else:
    raise ValueError(f"unknown mode {mode!r}")
  # lax convolutions are correlations: flip the kernel. rhs [kernel_len, 1, channels] ("WIO").
  weights = jnp.flip(kernel, axis=1).T[:, None, :]
  y = lax.conv_general_dilated(
      padded, weights, window_strides=(1,), padding="VALID",
      dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=channels,
      precision=lax.Precision.HIGHEST)
  if skip is not None:
    y = y + skip * v
  if post_gate is not None:
    y = post_gate * y
  return y.astype(dtype)


def fft_conv(
    u: Float[Array, "batch seq channels"],
    kernel: Float[Array, "channels kernel_len"],
    *,
    mode: str,
    skip: Float[Array, " channels"] | None = None,
    pre_gate: Float[Array, "batch seq channels"] | None = None,
    post_gate: Float[Array, "batch seq channels"] | None = None,
) -> Float[Array, "batch seq channels"]:
  """The textbook FFT convolution as users write it: the baseline of benchmarks and bf16 tests.

  As safari's ``LongConv``: ``irfft(rfft(v, n=2 seq) * rfft(k, n=2 seq))[:seq]`` (``n = seq`` for
  circular; a bidirectional kernel's negative lags wrap to the end of the size-``2 seq``
  buffer), transforms in float32 (``jnp.fft`` has no bfloat16), gates and skip in u's dtype.
  Time O(batch * channels * seq log seq); autodiff keeps the spectra for the backward.
  """
  dtype = u.dtype
  seq, kernel_len = u.shape[1], kernel.shape[1]
  v = u if pre_gate is None else pre_gate * u
  n = seq if mode == "circular" else 2 * seq
  kernel = kernel.astype(jnp.float32)
  if mode == "bidirectional":
    half = kernel_len // 2  # kernel[:, half + m] is lag m, for m in [-half, half]
    kernel = jnp.concatenate(
        [kernel[:, half:], jnp.zeros((kernel.shape[0], n - kernel_len), jnp.float32),
         kernel[:, :half]], axis=1)
  spectrum = (jnp.fft.rfft(v.astype(jnp.float32), n=n, axis=1)
              * jnp.fft.rfft(kernel, n=n, axis=1).T)
  y = jnp.fft.irfft(spectrum, n=n, axis=1)[:, :seq].astype(dtype)
  if skip is not None:
    y = y + skip.astype(dtype) * v
  if post_gate is not None:
    y = post_gate * y
  return y
