"""Public long-convolution op: argument validation, then dispatch to an implementation.

Implementations (see ``effjax.dispatch.DEFAULT_ORDER`` for the order tried per platform):

* ``"reference"``: direct depthwise convolution in float32, O(seq * kernel_len) time; the test
  oracle, never a default.
* ``"xla_fft"``: ``rfft`` / ``irfft`` zero-padded to the linear-convolution length, float32
  transforms, with a recomputing ``custom_vjp``. The default on CPU and GPU.
* ``"butterfly"``: the FFT as Monarch / FlashButterfly block-diagonal matrix products with
  twiddle factors (matmuls only), same ``custom_vjp``. The default on TPU, whose FFT ignores the
  matmul precision setting.
* ``"pallas_gpu"``: a fused Pallas (Triton) kernel (Monarch DFT, product with the kernel
  spectrum, inverse, on chip) for transform sizes 256..4096 (causal ``seq <= 2048``), and
  FlashButterfly's three passes above (outer DFTs, the fused kernel on each row, inverse outer
  DFTs) up to 262144 points (causal ``seq <= 131072``; before Hopper 1024 and 32768 points,
  ``pallas_kernels.long_conv.pallas_gpu.default_block_sizes``); the gates, the skip term, the zero
  padding and the output window happen in the kernels' masked loads and stores (pre-gate in the
  first pass, post-gate and skip in the last; a folded circular window is gated in XLA); tested
  in interpret mode and compiled on CPU for H100/A100 (Triton, ptxas; :mod:`pallas_kernels.aot`),
  not yet timed on a GPU, so not in the GPU default order.
* ``"pallas_tpu"``: a fused Pallas (Mosaic) kernel, channels-last with 128 channels per program
  (Monarch DFT stages as MXU matmuls, product with the kernel spectrum, inverse, on chip) for
  transforms up to about 2048 points in one pass (gates, skip, padding and window on chip), up
  to 256 times that in three passes (FlashButterfly's scheme; gates in the XLA matmuls of the
  outer passes). Tested in the TPU interpreter and compiled for TPU v5e (v4/v5p/v6e in the slow
  tests) on CPU, not yet timed on a TPU, so not yet in the TPU default order (opt in by name).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float

from effjax.dispatch import Implementation, dispatch, register

__all__ = ["long_conv", "normalize_arguments", "MODES"]

OP = "long_conv"
MODES = ("causal", "bidirectional", "circular")
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

register(OP, "reference", "effjax.ops.long_conv.reference:long_conv")
register(OP, "xla_fft", "effjax.ops.long_conv.xla_fft:long_conv")
register(OP, "butterfly", "effjax.ops.long_conv.butterfly:long_conv")
register(OP, "pallas_gpu", "effjax.ops.long_conv.pallas_gpu:long_conv")
register(OP, "pallas_tpu", "effjax.ops.long_conv.pallas_tpu:long_conv")


def long_conv(
    u: Float[Array, "batch seq channels"],
    kernel: Float[Array, "channels kernel_len"],
    *,
    mode: str = "causal",
    skip: Float[Array, " channels"] | None = None,
    pre_gate: Float[Array, "batch seq channels"] | None = None,
    post_gate: Float[Array, "batch seq channels"] | None = None,
    implementation: Implementation = None,
) -> Float[Array, "batch seq channels"]:
  """Depthwise long convolution along ``seq``, one kernel per channel, with fused gates and skip.

  ``y = post_gate * (conv(v, kernel) + skip * v)`` with ``v = pre_gate * u`` (each gate is 1 and
  ``skip`` is 0 when omitted; the H3 / FlashFFTConv ``postgate * conv(pregate * u)`` form, with
  the D term applied to the gated input as in H3). With ``c`` a channel, ``K = kernel_len`` and
  ``v`` zero outside ``[0, seq)``, the modes are:

  * ``"causal"``: ``conv(v)[t] = sum_{s=0}^{K-1} kernel[c, s] * v[t - s]``; needs
    ``K <= seq``. Output ``t`` depends on inputs ``<= t`` only.
  * ``"bidirectional"``: a two-sided kernel of odd length ``K = 2M + 1 <= 2 * seq - 1`` whose
    center ``kernel[:, M]`` is lag 0: ``conv(v)[t] = sum_{m=-M}^{M} kernel[c, M + m] * v[t - m]``
    (``kernel[:, M + m]`` weighs the input ``m`` steps in the past, ``kernel[:, M - m]`` the
    input ``m`` steps in the future; ``numpy.convolve(v, kernel, "same")``). ``K = 2 * seq - 1``
    covers every lag, as safari's two-kernel bidirectional layer of length ``2 * seq``.
  * ``"circular"``: ``conv(v)[t] = sum_{s=0}^{K-1} kernel[c, s] * v[(t - s) mod seq]``; needs
    ``K <= seq`` (FFT of size ``seq`` without padding, in the usual FFT-conv sense).

  Any ``seq`` (primes included). "Simple Hardware-Efficient Long Convolutions" (Fu, Epstein et al.
  2023) learns such kernels directly (kept smooth by squashing and pooling, see
  :mod:`effjax.nn.long_conv`); FlashButterfly computes the FFT convolution as Monarch matrix
  products (the paper reports 2.2x over FFT convolution on GPU).

  Time and memory of the FFT implementations: O(batch * channels * n log n) time (``xla_fft``) or
  O(batch * channels * n * sum(factors)) (``butterfly``, ``n = prod(factors)``), with the FFT size
  ``n >= seq + K - 1``; scratch of a few float32 ``[batch, n, channels]`` spectra in forward and
  backward; the backward saves only the inputs and recomputes the spectra. The direct convolution
  costs O(batch * channels * seq * K).

  Args:
    u: input ``[batch, seq, channels]``, float32, bfloat16 or float16.
    kernel: ``[channels, kernel_len]``, float32 or u's dtype.
    mode: ``"causal"``, ``"bidirectional"`` or ``"circular"`` (see above).
    skip: the D term ``[channels]``, float32 or u's dtype.
    pre_gate: ``[batch, seq, channels]`` in u's dtype, multiplies u before the convolution.
    post_gate: ``[batch, seq, channels]`` in u's dtype, multiplies the result.
    implementation: None (platform default order), a registered name, or a sequence of names.

  Returns:
    ``[batch, seq, channels]`` in u's dtype. Every implementation computes in float32 (float32
    transforms for bfloat16/float16 inputs) and rounds once at the end.

  Raises:
    ValueError / TypeError: an argument has a wrong shape, dtype, type or value; the message names
      the argument, the value given and what is expected.
    effjax.dispatch.NoImplementationError: no requested implementation serves the call.
  """
  options = normalize_arguments(u, kernel, mode=mode, skip=skip, pre_gate=pre_gate,
                                post_gate=post_gate)
  return dispatch(OP, implementation, u, kernel, **options)


def normalize_arguments(u: Any, kernel: Any, *, mode: Any = "causal", skip: Any = None,
                        pre_gate: Any = None, post_gate: Any = None) -> dict[str, Any]:
  """Validates ``long_conv``'s arguments; returns its keyword options (``mode`` a str)."""
  _check_array("u", u, rank=3, layout="[batch, seq, channels]")
  if any(size < 1 for size in u.shape):
    raise ValueError(f"u must have every dimension >= 1, got shape {u.shape}")
  if u.dtype not in SUPPORTED_DTYPES:
    raise TypeError(f"u must have dtype float32, bfloat16 or float16, got {u.dtype}")
  _, seq, channels = u.shape
  if not isinstance(mode, str) or mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  _check_array("kernel", kernel, rank=2, layout="[channels, kernel_len]")
  _check_parameter_dtype("kernel", kernel, u.dtype)
  if kernel.shape[0] != channels or kernel.shape[1] < 1:
    raise ValueError(f"kernel must have shape [channels={channels}, kernel_len >= 1], got "
                     f"{kernel.shape}")
  kernel_len = kernel.shape[1]
  if mode == "bidirectional":
    if kernel_len % 2 == 0 or kernel_len > 2 * seq - 1:
      raise ValueError(f"kernel_len must be odd and <= 2 * seq - 1 = {2 * seq - 1} for mode "
                       f"'bidirectional' (center = lag 0), got kernel shape {kernel.shape}")
  elif kernel_len > seq:
    raise ValueError(f"kernel_len must be <= seq = {seq} for mode {mode!r}, got kernel shape "
                     f"{kernel.shape}")
  if skip is not None:
    _check_array("skip", skip, rank=1, layout="[channels]")
    _check_parameter_dtype("skip", skip, u.dtype)
    if skip.shape != (channels,):
      raise ValueError(f"skip must have shape ({channels},) [channels], got {skip.shape}")
  for name, gate in (("pre_gate", pre_gate), ("post_gate", post_gate)):
    if gate is None:
      continue
    _check_array(name, gate, rank=3, layout="[batch, seq, channels]")
    if gate.shape != u.shape:
      raise ValueError(f"{name} must have u's shape {u.shape}, got {gate.shape}")
    if gate.dtype != u.dtype:
      raise TypeError(f"{name} must have u's dtype {u.dtype}, got {gate.dtype}")
  return dict(mode=mode, skip=skip, pre_gate=pre_gate, post_gate=post_gate)


def _check_array(name: str, x: Any, *, rank: int, layout: str) -> None:
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if len(x.shape) != rank:
    raise ValueError(f"{name} must have rank {rank} {layout}, got shape {x.shape}")


def _check_parameter_dtype(name: str, x: Any, u_dtype: Any) -> None:
  if x.dtype not in (jnp.dtype(jnp.float32), u_dtype):
    raise TypeError(f"{name} must have dtype float32 or u's dtype {u_dtype}, got {x.dtype}")
