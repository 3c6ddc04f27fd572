"""What the FFT implementations of ``long_conv`` share: the plan, the mode windows, the gates and
one recomputing ``custom_vjp``.

Every mode is a circular convolution of size ``n`` of the zero-padded input and kernel, read
through a window: with ``z = ifft(fft(pad(v, n)) * fft(pad(kernel, n)))``,

* causal: ``y = z[:seq]``, exact when ``n >= seq + K - 1`` (nothing wraps into ``[0, seq)``);
* bidirectional: ``y = z[M:M + seq]`` with ``M = K // 2``, exact when ``n >= seq + M``;
* circular: ``y = z`` when ``n == seq``; otherwise (``n >= seq + K - 1``, ``z`` is the whole
  linear convolution) ``y[t] = z[t] + z[t + seq]``, the fold of the linear convolution.

A transform (``xla_fft``'s rfft, ``butterfly``'s Monarch DFT) maps ``[..., n, channels]`` float32
to a spectrum ``[..., *spectrum_shape, channels]`` and back; spectra multiply pointwise.

Backward (``custom_vjp``): the convolution is bilinear with adjoint
``dv = P^T ifft(fft(S^T dy) * conj(fft(k)))`` and ``dk = P^T ifft(sum_batch fft(S^T dy) *
conj(fft(v)))``, where ``S`` is the output window and ``P`` the zero padding. Residuals are the
inputs only; the spectra are recomputed (three forward and two inverse transforms in the
backward), so no ``[batch, n, channels]`` spectrum is kept between the passes. Without a
pre-gate the input is kept in its own dtype (2 bytes per element in bfloat16, against 8 per
frequency for the complex64 spectrum autodiff of an FFT convolution keeps).

Fused kernels (``pallas_gpu``, ``pallas_tpu``: transform, product and inverse in one kernel)
implement :class:`FusedKernel`; :func:`fused_conv` gives them the same recomputing
``custom_vjp``, with ``dv`` computed by the kernel itself on the conjugate spectrum.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class Transform(Protocol):
  """A length-``n`` DFT along axis -2 (channels last); hashable (it is a static argument).

  A transform may pack the real signals of a batch ``[batch, n, channels]`` two by two into
  complex ones (``u_2p + i u_2p+1``): the spectra of a batch are then "packed" (any layout, as
  long as products with an unbatched real signal's spectrum and sums over the leading axis stay
  linear), and :meth:`inverse` with ``batch`` unpacks them.
  """
  n: int

  def forward(self, x: Float[Array, "*batch n channels"], blocks: Any = None) -> Array:
    """Spectrum ``[*lead, *spectrum_shape, channels]`` of real ``x`` (``blocks``: learned DFT
    blocks, for transforms that have them)."""

  def inverse(self, spectrum: Array, batch: int | None = None) -> Float[Array, "*batch n channels"]:
    """Real part of the inverse DFT (with the 1/n); ``batch``: the spectrum is the forward
    transform of ``batch`` real signals (unpack them); None: of one signal, or a sum of
    products of spectra."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static facts of one call: the mode, the lengths and the transform size ``n``."""
  mode: str
  seq: int
  kernel_len: int
  n: int

  @classmethod
  def create(cls, mode: str, seq: int, kernel_len: int, fft_size: Callable[[int], int], *,
             exact_circular: bool) -> Plan:
    """``n = fft_size(shortest exact size)``; circular uses ``n = seq`` if ``exact_circular``."""
    if mode == "circular" and exact_circular:
      return cls(mode, seq, kernel_len, seq)
    shortest = seq + kernel_len // 2 if mode == "bidirectional" else seq + kernel_len - 1
    n = fft_size(shortest)
    if n < shortest:
      raise ValueError(f"fft_size({shortest}) returned {n} < {shortest}")
    return cls(mode, seq, kernel_len, n)

  def window(self, z: Float[Array, "batch n channels"]) -> Float[Array, "batch seq channels"]:
    """The mode's output ``y`` from the size-``n`` circular convolution ``z`` (``S``)."""
    if self.mode == "causal":
      return z[:, :self.seq]
    if self.mode == "bidirectional":
      start = self.kernel_len // 2
      return z[:, start:start + self.seq]
    if self.n == self.seq:
      return z
    tail = z[:, self.seq:self.seq + self.kernel_len - 1]
    return z[:, :self.seq] + _pad_axis1(tail, 0, self.seq - tail.shape[1])

  def window_transpose(self, dy: Float[Array, "batch seq channels"]
                       ) -> Float[Array, "batch n channels"]:
    """The adjoint ``S^T`` of :meth:`window`."""
    if self.mode == "causal":
      return _pad_axis1(dy, 0, self.n - self.seq)
    if self.mode == "bidirectional":
      start = self.kernel_len // 2
      return _pad_axis1(dy, start, self.n - start - self.seq)
    if self.n == self.seq:
      return dy
    unfolded = jnp.concatenate([dy, dy[:, :self.kernel_len - 1]], axis=1)
    return _pad_axis1(unfolded, 0, self.n - unfolded.shape[1])


def _pad_axis1(x: jax.Array, before: int, after: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (before, after), (0, 0)))


def pad_signal(v: Float[Array, "batch seq channels"], plan: Plan
               ) -> Float[Array, "batch n channels"]:
  """``P``: float32 ``v`` zero-padded to the transform size."""
  return _pad_axis1(v.astype(jnp.float32), 0, plan.n - plan.seq)


def pad_kernel(kernel_t: Float[Array, "kernel_len channels"], plan: Plan
               ) -> Float[Array, "n channels"]:
  """The float32 kernel (lags first) zero-padded to the transform size."""
  return jnp.pad(kernel_t.astype(jnp.float32), ((0, plan.n - plan.kernel_len), (0, 0)))


def kernel_gradient(v, kernel_t, dy, plan: Plan, transform: Transform):
  """``dk = P^T ifft(sum_batch fft(S^T dy) * conj(fft(P v)))``, in the kernel's dtype."""
  dy_hat = transform.forward(plan.window_transpose(dy))
  v_hat = transform.forward(pad_signal(v, plan))
  return transform.inverse((dy_hat * jnp.conj(v_hat)).sum(0))[:plan.kernel_len].astype(
      kernel_t.dtype)


def _spectra(v, kernel_t, plan: Plan, transform: Transform, blocks: Any = None):
  return (transform.forward(pad_signal(v, plan), blocks),
          transform.forward(pad_kernel(kernel_t, plan), blocks))


def _conv(v, kernel_t, plan: Plan, transform: Transform, blocks: Any = None):
  v_hat, k_hat = _spectra(v, kernel_t, plan, transform, blocks)
  return plan.window(transform.inverse(v_hat * k_hat, v.shape[0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_recompute(v, kernel_t, plan: Plan, transform: Transform):
  return _conv(v, kernel_t, plan, transform)


def _conv_recompute_fwd(v, kernel_t, plan, transform):
  return _conv(v, kernel_t, plan, transform), (v, kernel_t)


def _conv_recompute_bwd(plan, transform, residuals, dy):
  v, kernel_t = residuals
  k_hat = transform.forward(pad_kernel(kernel_t, plan))
  dy_hat = transform.forward(plan.window_transpose(dy))
  dv = transform.inverse(dy_hat * jnp.conj(k_hat), dy.shape[0])[:, :plan.seq]
  return dv.astype(v.dtype), kernel_gradient(v, kernel_t, dy, plan, transform)


_conv_recompute.defvjp(_conv_recompute_fwd, _conv_recompute_bwd)

Conv = Callable[[jax.Array, jax.Array], jax.Array]


def transform_conv(plan: Plan, transform: Transform, blocks: Any = None) -> Conv:
  """``conv(v [batch, seq, channels], kernel_t [kernel_len, channels]) -> float32 y`` through
  ``transform``: the recomputing ``custom_vjp``, or, with learned ``blocks`` (the forward
  transform is then not the DFT and the adjoint formula does not hold), plain autodiff."""
  if blocks is None:
    return lambda v, kernel_t: _conv_recompute(v, kernel_t, plan, transform)
  return lambda v, kernel_t: _conv(v, kernel_t, plan, transform, blocks)


class FusedKernel(Protocol):
  """A fused kernel computing size-``n`` circular convolutions ``real(ifft(fft(x) * k_hat))`` with
  the kernel spectrum precomputed in its own layout; hashable (it is a static argument)."""
  n: int

  @property
  def transform(self) -> Transform:
    """The transform :func:`kernel_gradient` uses for the kernel's gradient (a batch sum)."""

  def spectrum(self, kernel_t: Float[Array, "kernel_len channels"], plan: Plan
               ) -> tuple[jax.Array, jax.Array]:
    """(re, im) of the zero-padded kernel's spectrum, float32, in the kernel's layout."""

  def convolve(self, x: Float[Array, "batch n channels"], k_re: jax.Array, k_im: jax.Array
               ) -> Float[Array, "batch n channels"]:
    """The circular convolution of float32 ``x`` with the spectrum ``k_re + i k_im``."""


def _fused(v, kernel_t, plan: Plan, kernel: FusedKernel):
  return plan.window(kernel.convolve(pad_signal(v, plan), *kernel.spectrum(kernel_t, plan)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fused_recompute(v, kernel_t, plan: Plan, kernel: FusedKernel):
  return _fused(v, kernel_t, plan, kernel)


def _fused_recompute_fwd(v, kernel_t, plan, kernel):
  return _fused(v, kernel_t, plan, kernel), (v, kernel_t)


def _fused_recompute_bwd(plan, kernel, residuals, dy):
  v, kernel_t = residuals
  k_re, k_im = kernel.spectrum(kernel_t, plan)
  dv = kernel.convolve(plan.window_transpose(dy), k_re, -k_im)[:, :plan.seq]  # a correlation
  return dv.astype(v.dtype), kernel_gradient(v, kernel_t, dy, plan, kernel.transform)


_fused_recompute.defvjp(_fused_recompute_fwd, _fused_recompute_bwd)


def fused_conv(plan: Plan, kernel: FusedKernel) -> Conv:
  """``conv(v, kernel_t) -> float32 y`` through a fused kernel, with the recomputing
  ``custom_vjp``: ``dv`` is the same kernel run on ``S^T dy`` with the conjugate spectrum, ``dk``
  comes from :func:`kernel_gradient` through ``kernel.transform``; residuals are the inputs."""
  if kernel.n != plan.n:
    raise ValueError(f"the fused kernel has size {kernel.n}, the plan needs {plan.n}")
  return lambda v, kernel_t: _fused_recompute(v, kernel_t, plan, kernel)


def gated_long_conv(
    u: Float[Array, "batch seq channels"],
    kernel: Float[Array, "channels kernel_len"],
    *,
    conv: Conv,
    skip: Float[Array, " channels"] | None = None,
    pre_gate: Float[Array, "batch seq channels"] | None = None,
    post_gate: Float[Array, "batch seq channels"] | None = None,
) -> Float[Array, "batch seq channels"]:
  """``post_gate * (conv(v) + skip * v)``, ``v = pre_gate * u``, in float32, rounded to u's dtype.

  ``conv`` (e.g. :func:`transform_conv`) gets ``v`` and the kernel transposed to
  ``[kernel_len, channels]``; without a pre-gate ``v`` is u in its own dtype, so a recomputing
  backward keeps u as is.
  """
  dtype = u.dtype
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  v = u if pre_gate is None else f32(pre_gate) * f32(u)
  y = conv(v, kernel.T)
  v, skip, post_gate = map(f32, (v, skip, post_gate))
  if skip is not None:
    y = y + skip * v
  if post_gate is not None:
    y = post_gate * y
  return y.astype(dtype)
