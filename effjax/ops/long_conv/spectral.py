"""What the FFT implementations of ``long_conv`` share: the plan, the mode windows, the gates and
one recomputing ``custom_vjp``.

Every mode is a circular convolution of size ``n`` of the zero-padded input and kernel, read
through a window: with ``z = ifft(fft(pad(v, n)) * fft(pad(kernel, n)))``,

* causal: ``y = z[:seq]``, exact when ``n >= seq + K - 1`` (nothing wraps into ``[0, seq)``);
* bidirectional: the kernel is padded with its lags ``-M..-1`` (``M = K // 2``) wrapped to the
  end (rows ``n - M..n - 1``), so again ``y = z[:seq]``, exact when ``n >= seq + M``;
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
implement :class:`FusedKernel`; :func:`fused_long_conv` gives them ONE recomputing ``custom_vjp``
of the whole gated op (gates, skip, ``P`` and ``S`` on chip whenever ``S`` is a prefix, see
:func:`fused_long_conv`).
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

  @property
  def prefix(self) -> bool:
    """Whether ``S`` keeps the first ``seq`` rows (all but a folded circular convolution)."""
    return self.mode != "circular" or self.n == self.seq

  def window(self, z: Float[Array, "batch n channels"]) -> Float[Array, "batch seq channels"]:
    """The mode's output ``y`` from the size-``n`` circular convolution ``z`` (``S``)."""
    if self.prefix:
      return z[:, :self.seq]
    tail = z[:, self.seq:self.seq + self.kernel_len - 1]
    return z[:, :self.seq] + _pad_axis1(tail, 0, self.seq - tail.shape[1])

  def window_transpose(self, dy: Float[Array, "batch seq channels"]
                       ) -> Float[Array, "batch n channels"]:
    """The adjoint ``S^T`` of :meth:`window`."""
    if self.prefix:
      return _pad_axis1(dy, 0, self.n - self.seq)
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
  """The float32 kernel (lags first) zero-padded to the transform size; a bidirectional
  kernel's negative lags (its first ``K // 2`` rows) wrap to the end."""
  kernel_t = kernel_t.astype(jnp.float32)
  pad = ((0, plan.n - plan.kernel_len), (0, 0))
  if plan.mode != "bidirectional":
    return jnp.pad(kernel_t, pad)
  return jnp.roll(jnp.pad(kernel_t, pad), -(plan.kernel_len // 2), axis=0)


def unpad_kernel(padded: Float[Array, "n channels"], plan: Plan
                 ) -> Float[Array, "kernel_len channels"]:
  """The adjoint of :func:`pad_kernel` (float32)."""
  if plan.mode == "bidirectional":
    padded = jnp.roll(padded, plan.kernel_len // 2, axis=0)
  return padded[:plan.kernel_len]


def kernel_gradient(v, kernel_t, dy, plan: Plan, transform: Transform):
  """``dk = pad_kernel^T ifft(sum_batch fft(S^T dy) * conj(fft(P v)))``, in the kernel's
  dtype."""
  dy_hat = transform.forward(plan.window_transpose(dy))
  v_hat = transform.forward(pad_signal(v, plan))
  return unpad_kernel(transform.inverse((dy_hat * jnp.conj(v_hat)).sum(0)), plan).astype(
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
  """A fused kernel computing size-``n`` circular convolutions with the kernel spectrum
  precomputed in its own layout, the gates, the skip term, the zero padding ``P`` and the prefix
  window on chip; hashable (it is a static argument)."""
  n: int

  @property
  def transform(self) -> Transform:
    """The transform :func:`kernel_gradient` uses for the kernel's gradient (a batch sum)."""

  def spectrum(self, kernel_t: Float[Array, "kernel_len channels"], plan: Plan
               ) -> tuple[jax.Array, jax.Array]:
    """(re, im) of :func:`pad_kernel`'s spectrum, float32, in the kernel's layout."""

  def convolve(self, x: Float[Array, "batch seq channels"], k_re: jax.Array, k_im: jax.Array, *,
               pre_gate: Float[Array, "batch seq channels"] | None = None,
               post_gate: Float[Array, "batch seq channels"] | None = None,
               skip: Float[Array, " channels"] | None = None, dtype: Any = jnp.float32
               ) -> Float[Array, "batch seq channels"]:
    """Rows ``[0, seq)`` of ``post_gate * (z + skip * v)`` in ``dtype``, ``z`` the circular
    convolution of ``v = pre_gate * x`` zero-extended to ``n`` rows (``seq <= n``) with the
    spectrum ``k_re + i k_im``; ``x`` and the gates in any float dtype, math in float32."""


def _finish(z, v, skip, post_gate, dtype):
  """``post_gate * (z + skip * v)`` in ``dtype`` (float32 math; None: no skip, no gate)."""
  if skip is not None:
    z = z + skip.astype(jnp.float32) * v.astype(jnp.float32)
  if post_gate is not None:
    z = post_gate.astype(jnp.float32) * z
  return z.astype(dtype)


def _gate(x, gate):
  """``gate * x`` in float32, or ``x`` as it is without a gate."""
  return x if gate is None else gate.astype(jnp.float32) * x.astype(jnp.float32)


def _fused_apply(kernel: FusedKernel, plan: Plan, x, k_re, k_im, *, adjoint: bool = False,
                 pre_gate=None, post_gate=None, skip=None, dtype: Any = jnp.float32):
  """``post_gate * (A v + skip * v)``, ``v = pre_gate * x``, with ``A = S C P`` (the adjoint
  ``P^T C S^T`` when ``adjoint``; the caller conjugates the spectrum). A prefix ``S`` is one
  kernel call doing everything on chip; the folded circular window pads, folds and gates in XLA
  around an ungated call on ``n`` rows."""
  if plan.prefix:
    return kernel.convolve(x, k_re, k_im, pre_gate=pre_gate, post_gate=post_gate, skip=skip,
                           dtype=dtype)
  v = _gate(x, pre_gate)
  signal = plan.window_transpose(v.astype(jnp.float32)) if adjoint else pad_signal(v, plan)
  z = kernel.convolve(signal, k_re, k_im)
  return _finish(z[:, :plan.seq] if adjoint else plan.window(z), v, skip, post_gate, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused_long_conv(u, kernel_t, skip, pre_gate, post_gate, plan: Plan, kernel: FusedKernel):
  return _fused_apply(kernel, plan, u, *kernel.spectrum(kernel_t, plan), pre_gate=pre_gate,
                      post_gate=post_gate, skip=skip, dtype=u.dtype)


def _fused_long_conv_fwd(u, kernel_t, skip, pre_gate, post_gate, plan, kernel):
  y = _fused_long_conv(u, kernel_t, skip, pre_gate, post_gate, plan, kernel)
  return y, (u, kernel_t, skip, pre_gate, post_gate)


def _fused_long_conv_bwd(plan, kernel, residuals, dy):
  """``y = g2 (conv(v) + D v)``, ``v = g1 u``, ``dz = g2 dy``: ``dv = conv^T(dz) + D dz`` (the
  kernel on ``dy`` with pre-gate ``g2``, skip ``D`` and the conjugate spectrum), ``du = g1 dv``,
  ``dg1 = u dv``, ``dg2 = dy (conv(v) + D v)`` (the forward kernel recomputed with ``dy`` as its
  post-gate), ``dD = sum(dz v)``, ``dk`` by :func:`kernel_gradient`."""
  u, kernel_t, skip, pre_gate, post_gate = residuals
  k_re, k_im = kernel.spectrum(kernel_t, plan)
  dv = _fused_apply(kernel, plan, dy, k_re, -k_im, adjoint=True, pre_gate=post_gate, skip=skip)
  du, d_pre = dv, None
  if pre_gate is not None:
    du, d_pre = dv * pre_gate.astype(jnp.float32), (dv * u.astype(jnp.float32)).astype(
        pre_gate.dtype)
  d_post = None
  if post_gate is not None:
    d_post = _fused_apply(kernel, plan, u, k_re, k_im, pre_gate=pre_gate, post_gate=dy,
                          skip=skip, dtype=post_gate.dtype)
  v, dz = _gate(u, pre_gate).astype(jnp.float32), _gate(dy, post_gate).astype(jnp.float32)
  d_skip = None if skip is None else jnp.sum(dz * v, axis=(0, 1)).astype(skip.dtype)
  d_kernel = kernel_gradient(v, kernel_t, dz, plan, kernel.transform)
  return du.astype(u.dtype), d_kernel, d_skip, d_pre, d_post


_fused_long_conv.defvjp(_fused_long_conv_fwd, _fused_long_conv_bwd)


def fused_long_conv(
    u: Float[Array, "batch seq channels"],
    kernel: Float[Array, "channels kernel_len"],
    *,
    plan: Plan,
    fused: FusedKernel,
    skip: Float[Array, " channels"] | None = None,
    pre_gate: Float[Array, "batch seq channels"] | None = None,
    post_gate: Float[Array, "batch seq channels"] | None = None,
) -> Float[Array, "batch seq channels"]:
  """``post_gate * (conv(v) + skip * v)``, ``v = pre_gate * u``, in u's dtype, through a fused
  kernel with ONE recomputing ``custom_vjp`` (residuals: the inputs).

  When the window is a prefix (every mode but a folded circular one) each pass is one kernel call
  that loads ``u`` and the gates from ``[batch, seq, channels]`` (zero rows up to ``n`` on chip)
  and stores ``y`` in u's dtype: forward 1 call; backward 2 (``dv`` on the conjugate spectrum
  with pre-gate ``post_gate`` and skip; ``dpost_gate = dy * (conv(v) + skip * v)`` recomputed by
  the forward kernel with ``dy`` as its post-gate, instead of keeping ``conv(v)``: one more
  kernel pass against ``batch * seq * channels`` float32 kept between the passes) plus
  :func:`kernel_gradient` and one XLA elementwise pass for ``du``, ``dpre_gate`` and ``dskip``.
  A folded circular window (``n > seq``) gates, pads and folds in XLA around the kernel.
  """
  if fused.n != plan.n:
    raise ValueError(f"the fused kernel has size {fused.n}, the plan needs {plan.n}")
  return _fused_long_conv(u, kernel.T, skip, pre_gate, post_gate, plan, fused)


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
  v = _gate(u, pre_gate)
  return _finish(conv(v, kernel.T), v, skip, post_gate, u.dtype)
