"""``long_conv`` with the fused Pallas TPU kernel (:mod:`pallas_kernels.long_conv.pallas_tpu`).

The transform size is :func:`pallas_kernels.long_conv.pallas_tpu.transform_size` of the
linear-convolution length: a multiple of 64 whose on-chip split ``n1 * n2`` fits VMEM (one
pass; about 2048 points, a causal convolution up to about 1024 positions), else ``n0 * m`` run in
three passes (up to ``n0 = 256``); circular mode uses ``n = seq`` when the kernel accepts it.
Longer calls raise ``NotImplementedError`` so dispatch falls through to ``butterfly``.

The kernel spectrum ``[n, channels]`` comes from the Monarch transform of :mod:`butterfly` with the
kernel's factors (small: one signal per channel); each block of 128 channels of a batch row is
then transformed, multiplied and transformed back on chip. In one pass the kernel reads ``u``
and the gates from ``[batch, seq, channels]`` and writes ``y`` in u's dtype itself (padding
``P``, window ``S``, gates, skip and cast on chip): a bfloat16 forward moves 2 + 2 bytes per
element (2 more per gate). Three passes gate, pad and window in the XLA matmuls of passes 1 and 3; a
folded circular window (``n > seq``) gates in XLA around the kernel.

Backward (:func:`spectral.fused_long_conv`, one ``custom_vjp`` with the GPU kernel, residuals:
the inputs): ``dv`` is the same kernel run on the cotangent with the post-gate as its pre-gate
and the conjugate spectrum, the post-gate's gradient the forward kernel recomputed with the
cotangent as its post-gate; ``dk`` (a sum over the batch) uses the Monarch transform of
:mod:`butterfly` in XLA (its own split of ``n``, else the kernel's factors), pairs of the batch
packed into complex signals.
"""

from __future__ import annotations

import dataclasses

from jaxtyping import Array, Float

from effjax.ops.long_conv import butterfly, spectral
from effjax.ops.long_conv.butterfly import Butterfly
from pallas_kernels import shapes
from pallas_kernels.interpret import require_tpu_or_interpret
from pallas_kernels.long_conv import pallas_tpu


@dataclasses.dataclass(frozen=True)
class _TpuKernel:
  """:class:`spectral.FusedKernel` of :func:`pallas_kernels.long_conv.pallas_tpu.fft_conv`."""
  n: int
  block_sizes: pallas_tpu.BlockSizes
  interpret: bool

  @property
  def transform(self) -> Butterfly:
    """:mod:`butterfly`'s own split of ``n`` when it has one (its cost model), else the kernel's."""
    if butterfly.factorize(self.n) is not None:
      return Butterfly.of_size(self.n, pack_batch=True)
    return Butterfly(self.n, pallas_tpu.factors(self.n, self.block_sizes), pack_batch=True)

  def spectrum(self, kernel_t, plan: spectral.Plan):
    """``(re, im)`` float32 ``[n, channels]``, the digit-reversed Monarch spectrum flattened."""
    spectrum = Butterfly(self.n, pallas_tpu.factors(self.n, self.block_sizes)).forward(
        spectral.pad_kernel(kernel_t, plan))
    spectrum = spectrum.reshape(self.n, spectrum.shape[-1])
    return spectrum.real, spectrum.imag

  def convolve(self, x: Float[Array, "batch seq channels"], k_re, k_im, **options
               ) -> Float[Array, "batch seq channels"]:
    return pallas_tpu.fft_conv(x, k_re, k_im, n=self.n, block_sizes=self.block_sizes,
                               interpret=self.interpret, **options)


def _size(length: int, block_sizes: pallas_tpu.BlockSizes) -> int:
  n = pallas_tpu.transform_size(length, block_sizes)
  if n is None:
    raise NotImplementedError(f"the fused TPU kernel serves transforms of up to "
                              f"{pallas_tpu.largest_size(block_sizes)} points; this call needs "
                              f"{length}")
  return n


def long_conv(
    u: Float[Array, "batch seq channels"],
    kernel: Float[Array, "channels kernel_len"],
    *,
    mode: str,
    skip: Float[Array, " channels"] | None = None,
    pre_gate: Float[Array, "batch seq channels"] | None = None,
    post_gate: Float[Array, "batch seq channels"] | None = None,
    block_sizes: pallas_tpu.BlockSizes | None = None,
    interpret: bool | None = None,
) -> Float[Array, "batch seq channels"]:
  """Fused-kernel long convolution; arguments as validated by ``effjax.long_conv``.

  Args:
    block_sizes: the kernel's on-chip limits; None: ``pallas_tpu.BlockSizes()``.
    interpret: run the kernel in the TPU interpreter; None follows
      ``pallas_kernels.interpret.interpret_mode``.

  Raises:
    NotImplementedError: off a TPU (unless interpreting), a transform beyond the multi-pass
      limit, or float16 in one pass on a TPU (Mosaic has no float16 vector loads).
    TypeError: ``block_sizes`` is not a :class:`pallas_tpu.BlockSizes`.
  """
  # Off a TPU, not interpreting: NotImplementedError.
  interpret = bool(require_tpu_or_interpret(interpret))
  block_sizes = shapes.resolve_block_sizes(block_sizes, pallas_tpu.BlockSizes,
                                           pallas_tpu.BlockSizes)
  seq = u.shape[1]
  plan = spectral.Plan.create(mode, seq, kernel.shape[1], lambda n: _size(n, block_sizes),
                              exact_circular=pallas_tpu.factors(seq, block_sizes) is not None)
  return spectral.fused_long_conv(u, kernel, plan=plan,
                                  fused=_TpuKernel(plan.n, block_sizes, interpret), skip=skip,
                                  pre_gate=pre_gate, post_gate=post_gate)
