"""VidKV: 1.x-bit KV cache (Tao et al. 2025, "Plug-and-Play 1.x-Bit KV Cache Quantization for
Video Large Language Models", arXiv 2503.16257).

What the paper describes, and this cache implements:

* Keys, mixed precision per channel. In each group of G (``group_size``) consecutive tokens of a kv
  head, the ``hot = round((key_bits - 1) * head_dim)`` channels with the largest range
  (max - min over the group's real tokens) are "anomalous" and get 2-bit asymmetric min/max codes
  per channel (:func:`effjax.kv_cache.quant.quantize_groups`); the other ``n = head_dim - hot``
  "normal" channels are transformed by an FFT along the channel dimension and the ``n``
  transformed coefficients get 1-bit codes per coefficient-channel: ``q = [c >= 0]``,
  ``c_hat = (2q - 1) * a`` with ``a = mean |c|`` over the group (the paper's 1-bit equation: the
  code decodes to ``+-a``); the inverse FFT gives the normal channels back. ``key_bits = 1.5``
  (the paper's K1.5) puts half the channels at 2 bits and half at 1 bit.
* Values, 1.58-bit ternary **per channel** (groups of G tokens of one channel, as the paper
  recommends for video models): ``a = mean |v|``, ``t = clip(round(v / a), -1, 1)`` (zero below
  ``a / 2``), ``v_hat = t * a`` (the paper's / BitNet b1.58's absmean equation, scale included).
* The ``residual`` (R, a multiple of G) most recent tokens stay in full precision, streamed like
  KIVI's keys (:mod:`effjax.kv_cache.kivi`), for keys and values alike because both are grouped
  over tokens: prefill quantizes the largest multiple of R prompt tokens; a decoded token joins the
  residual and, when the residual holds R tokens at the next append, the whole block is quantized.
  So ``attend`` sees 1..R full-precision tokens, as KIVI's attention sees its keys.

Where the released code (``transformers/{cache_utils,vidkv_quant}.py``) differs and what this
follows instead:

* Its 1-bit decode returns ``q * a`` in {0, a} (zero point 0), not ``+-a``: here ``+-a`` (paper).
* Its ternary decode returns ``q - 1`` without the scale: here ``t * a`` (paper).
* It stores the full complex FFT (real and imaginary parts of all ``n`` bins: ``2n`` one-bit codes
  for ``n`` channels, i.e. 2 bits per "1-bit" channel). Here the FFT is the real FFT with the
  Hermitian-redundant half dropped: DC, the ``(n - 1) // 2`` complex bins as ``sqrt(2)`` times
  their real and imaginary parts, and Nyquist for even ``n``, ``n`` reals in all, with
  ``norm="ortho"``. That is an orthogonal transform, so 1 bit per normal channel really is 1 bit,
  and (Parseval) the normal channels' squared error equals the coefficients' squared error.
* It picks the anomalous channels once per layer over all batch rows, heads and tokens (and
  re-quantizes the whole history at each flush, HF QuantizedCache style). Here they are picked per
  batch row, kv head and group of G tokens (rows stay independent and the history is never
  re-quantized); each group stores its choice as a ``head_dim``-bit mask.
* Its values use 2-bit slots for ternary codes; here they are packed in base 3 (20 per uint32
  word, :func:`effjax.kv_cache.quant.pack_ternary`) over all kv heads of a token.
* Not implemented: STP (keeping "semantically salient" visual tokens at 2-bit values), which needs
  token indices from a vision encoder.

Padding slots of left-padded rows are excluded from ranges and means. Scales and zero points are
float16 (as KIVI).

Memory, per layer, ``S`` slots (``max_len`` rounded up to a multiple of the decode block, as
KIVI), ``H`` kv heads, ``D = head_dim``, ``W(n, b) = ceil(n / (32 // b))``: key codes
``batch * S * H * (W(hot, 2) + W(n, 1)) * 4`` bytes; key scales (``hot`` 2-bit scales and ``n``
1-bit scales) ``batch * (S / G) * H * D * 2``, key zero points ``batch * (S / G) * H * hot * 2``,
channel masks ``batch * (S / G) * H * W(D, 1) * 4``; value codes
``batch * S * ceil(H * D / 20) * 4``, value scales ``batch * (S / G) * H * D * 2``; residual keys
and values ``2 * batch * R * H * D * itemsize``; ``start`` and 2 int32 counters. At ``D = 64``,
``G = 32``, ``key_bits = 1.5``: keys 1.5 + 0.75 (scales) + 0.03 (mask) bits per element, values
1.67 (3 heads) + 0.5 bits. Attention (:meth:`VidKVCache.decode_attention`,
:meth:`VidKVCache.attend`) is the op :func:`effjax.ops.kv_decode.vidkv_decode_attention`: block by
block in XLA (never a float32 copy of the whole cache), or fused Pallas kernels
(``pallas_kernels.kv_decode.vidkv``) that read the packed codes in place.

Claim (paper): K1.5 / V1.58 with almost no drop from fp16 on LLaVA-OV-7B and Qwen2.5-VL-7B on six
video benchmarks.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Self

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from effjax.kv_cache import quant
from effjax.kv_cache.base import (
    StreamingQuantizedCache,
    check_floating_dtype,
    check_group_and_residual,
    check_kv,
    check_positive_int,
    check_start,
)
from effjax.kv_cache.kivi import SCALE_DTYPE, KIVICache
from effjax.ops import kv_decode


def real_fft(x: Float[Array, "... n"]) -> Float[Array, "... n"]:
  """Orthogonal real FFT of the last axis: ``n`` reals (DC, ``sqrt(2)`` Re and Im of bins
  ``1 .. (n - 1) // 2``, Nyquist if ``n`` is even), so ``|real_fft(x)| = |x|``."""
  n = x.shape[-1]
  pairs = (n - 1) // 2
  spectrum = jnp.fft.rfft(x.astype(jnp.float32), axis=-1, norm="ortho")
  middle = spectrum[..., 1:pairs + 1] * math.sqrt(2)
  parts = [spectrum[..., :1].real, middle.real, middle.imag]
  if n % 2 == 0 and n > 1:
    parts.append(spectrum[..., n // 2:].real)
  return jnp.concatenate(parts, axis=-1)


def inverse_real_fft(c: Float[Array, "... n"]) -> Float[Array, "... n"]:
  """Inverse of :func:`real_fft` (also its transpose)."""
  n = c.shape[-1]
  pairs = (n - 1) // 2
  middle = lax.complex(c[..., 1:pairs + 1], c[..., pairs + 1:2 * pairs + 1]) / math.sqrt(2)
  ends = [c[..., :1]] + ([c[..., 2 * pairs + 1:]] if n % 2 == 0 and n > 1 else [])
  ends = [lax.complex(e, jnp.zeros_like(e)) for e in ends]
  spectrum = jnp.concatenate([ends[0], middle, *ends[1:]], axis=-1)
  return jnp.fft.irfft(spectrum, n=n, axis=-1, norm="ortho")


def _check_settings(key_bits: Any, group_size: Any, residual: Any) -> None:
  if (isinstance(key_bits, bool) or not isinstance(key_bits, numbers.Real)
      or not 1 <= key_bits <= 2):
    raise ValueError(f"key_bits is {key_bits!r}; expected a number in [1, 2] (the paper's 1.5: "
                     "half the channels at 2 bits, half at 1 bit)")
  check_group_and_residual(group_size, residual)


@dataclasses.dataclass(frozen=True)
class VidKV:
  """VidKV settings; usable wherever a cache type is expected (``generate(cache_type=VidKV())``).

  Attributes:
    key_bits: average key code width in [1, 2]: ``round((key_bits - 1) * head_dim)`` channels
      per group at 2 bits, the rest at 1 bit after the FFT (paper: 1.5). Values are always
      ternary (1.58-bit).
    group_size: G, tokens per group of every key and value channel (paper: 32).
    residual: R, full-precision recent tokens (paper: 128); a multiple of G.
  """
  key_bits: float = 1.5
  group_size: int = 32
  residual: int = 128

  def __post_init__(self):
    _check_settings(self.key_bits, self.group_size, self.residual)

  def init(self, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int,
           dtype: Any = jnp.float32) -> VidKVCache:
    """An empty :class:`VidKVCache` with these settings."""
    return VidKVCache.init(batch, max_len, num_kv_heads=num_kv_heads, head_dim=head_dim,
                           dtype=dtype, key_bits=self.key_bits, group_size=self.group_size,
                           residual=self.residual)


class VidKVCache(StreamingQuantizedCache):
  """VidKV's quantized keys/values plus full-precision residual (see the module docstring).

  Attributes:
    k_codes: uint32 ``[batch, slots, kv_heads, W(hot, 2) + W(n, 1)]``: per token and head, the
      packed 2-bit codes of the group's anomalous channels (ascending channel order), then the
      packed 1-bit codes of the real FFT of its normal channels; valid below ``quantized``.
    k_scale: float16 ``[batch, slots / G, kv_heads, head_dim]``: the ``hot`` 2-bit steps, then the
      ``n`` 1-bit scales ``mean |c|``.
    k_zero: float16 ``[batch, slots / G, kv_heads, hot]``: zero points of the 2-bit channels.
    k_hot: uint32 ``[batch, slots / G, kv_heads, W(head_dim, 1)]``: packed mask of the anomalous
      channels of each group.
    v_codes: uint32 ``[batch, slots, ceil(kv_heads * head_dim / 20)]``: base-3 packed ternary
      codes (``t + 1``) of a token's values, heads then channels.
    v_scale: float16 ``[batch, slots / G, kv_heads, head_dim]``: ``mean |v|`` per channel and group.
    k_residual, v_residual: keys/values of slots ``[quantized, length)`` at rows
      ``[0, length - quantized)``, ``[batch, R, kv_heads, head_dim]`` in ``dtype``.
    start: int32 ``[batch]``, each row's first real slot.
    length: int32 scalar, filled slots.
    quantized: int32 scalar, slots whose key and value are quantized (a multiple of R).
    hot_channels, group_size, residual, capacity: static settings; ``capacity`` is ``max_len``.
  """
  k_codes: jax.Array
  k_scale: jax.Array
  k_zero: jax.Array
  k_hot: jax.Array
  v_codes: jax.Array
  v_scale: jax.Array
  k_residual: jax.Array
  v_residual: jax.Array
  start: jax.Array
  length: jax.Array
  quantized: jax.Array
  hot_channels: int = flax.struct.field(pytree_node=False)
  group_size: int = flax.struct.field(pytree_node=False)
  residual: int = flax.struct.field(pytree_node=False)
  capacity: int = flax.struct.field(pytree_node=False)

  @classmethod
  def init(cls, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int,
           dtype: Any = jnp.float32, key_bits: float = 1.5, group_size: int = 32,
           residual: int = 128) -> Self:
    """An empty cache; raises ValueError naming any invalid argument."""
    for name, value in (("batch", batch), ("max_len", max_len), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
      check_positive_int(name, value)
    check_floating_dtype("dtype", dtype)
    _check_settings(key_bits, group_size, residual)
    hot = round((key_bits - 1) * head_dim)
    block = KIVICache._block_size(group_size, max_len)  # pylint: disable=protected-access
    slots = -(-max_len // block) * block
    groups = (batch, slots // group_size, num_kv_heads)
    key_words = quant.packed_words(hot, 2) + quant.packed_words(head_dim - hot, 1)
    residual_kv = jnp.zeros((batch, residual, num_kv_heads, head_dim), dtype)
    zero = jnp.zeros((), jnp.int32)
    return cls(
        k_codes=jnp.zeros((batch, slots, num_kv_heads, key_words), jnp.uint32),
        k_scale=jnp.zeros((*groups, head_dim), SCALE_DTYPE),
        k_zero=jnp.zeros((*groups, hot), SCALE_DTYPE),
        k_hot=jnp.zeros((*groups, quant.packed_words(head_dim, 1)), jnp.uint32),
        v_codes=jnp.zeros((batch, slots, quant.packed_words(num_kv_heads * head_dim, None)),
                          jnp.uint32),
        v_scale=jnp.zeros((*groups, head_dim), SCALE_DTYPE),
        k_residual=residual_kv, v_residual=residual_kv, start=jnp.zeros((batch,), jnp.int32),
        length=zero, quantized=zero, hot_channels=hot, group_size=group_size, residual=residual,
        capacity=max_len)

  # Encoding and decoding of whole groups: T (a multiple of G) slots at a time.

  def _encode(self, k: jax.Array, v: jax.Array, real: jax.Array) -> dict[str, jax.Array]:
    """Quantized fields (k_codes, k_scale, ...) of ``k, v [batch, T, kv_heads, head_dim]``;
    ``real [batch, T, 1, 1]`` marks the tokens that set ranges and scales."""
    batch, tokens, kv_heads, head_dim = k.shape
    group, hot = self.group_size, self.hot_channels
    k = k.astype(jnp.float32)
    grouped = k.reshape(batch, tokens // group, group, kv_heads, head_dim)
    inside = jnp.broadcast_to(real, k.shape).reshape(grouped.shape)
    lo = jnp.min(jnp.where(inside, grouped, jnp.inf), axis=2)
    spread = jnp.where(jnp.isfinite(lo), jnp.max(jnp.where(inside, grouped, -jnp.inf), 2) - lo, 0)
    anomalous = jnp.any(lax.top_k(spread, hot)[1][..., None] == jnp.arange(head_dim), axis=-2)
    # Anomalous channels first (ascending), then the normal ones (ascending).
    order = jnp.repeat(jnp.argsort(~anomalous, axis=-1, stable=True), group, axis=1)
    ordered = jnp.take_along_axis(k, order, axis=-1)
    words, scales, zero = [], [], jnp.zeros((batch, tokens // group, kv_heads, 0), SCALE_DTYPE)
    if hot:
      codes, scale, zero = quant.quantize_groups(ordered[..., :hot], 2, axis=1, group_size=group,
                                                 mask=real, scale_dtype=SCALE_DTYPE)
      words.append(quant.pack(codes, 2))
      scales.append(scale)
    if hot < head_dim:
      codes, scale = quant.quantize_sign_groups(real_fft(ordered[..., hot:]), axis=1,
                                                group_size=group, mask=real,
                                                scale_dtype=SCALE_DTYPE)
      words.append(quant.pack(codes, 1))
      scales.append(scale)
    v_codes, v_scale = quant.quantize_ternary_groups(v, axis=1, group_size=group, mask=real,
                                                     scale_dtype=SCALE_DTYPE)
    return {"k_codes": jnp.concatenate(words, axis=-1),
            "k_scale": jnp.concatenate(scales, axis=-1), "k_zero": zero,
            "k_hot": quant.pack(anomalous.astype(jnp.uint32), 1),
            "v_codes": quant.pack_ternary(v_codes.reshape(batch, tokens, -1)), "v_scale": v_scale}

  @property
  def block_size(self) -> int:
    """Slots the XLA decode path dequantizes at a time (KIVI's rule: a multiple of G)."""
    return KIVICache._block_size(self.group_size, self.max_len)  # pylint: disable=protected-access

  def decode_block(self, j0: jax.Array, tokens: int) -> tuple[jax.Array, jax.Array]:
    """float32 keys and values ``[batch, tokens, kv_heads, head_dim]`` of the quantized slots
    ``[j0, j0 + tokens)`` (``j0`` and ``tokens`` multiples of G)."""
    batch, _, kv_heads, head_dim = self.k_residual.shape
    group, hot = self.group_size, self.hot_channels
    codes = lax.dynamic_slice_in_dim(self.k_codes, j0, tokens, axis=1)
    params = {name: lax.dynamic_slice_in_dim(getattr(self, name), j0 // group, tokens // group,
                                             axis=1)
              for name in ("k_scale", "k_zero", "k_hot", "v_scale")}
    hot_words = quant.packed_words(hot, 2)
    parts = []
    if hot:
      parts.append(quant.dequantize_groups(
          quant.unpack(codes[..., :hot_words], 2, hot), params["k_scale"][..., :hot],
          params["k_zero"], axis=1, group_size=group))
    if hot < head_dim:
      parts.append(inverse_real_fft(quant.dequantize_sign_groups(
          quant.unpack(codes[..., hot_words:], 1, head_dim - hot), params["k_scale"][..., hot:],
          axis=1, group_size=group)))
    anomalous = quant.unpack(params["k_hot"], 1, head_dim).astype(bool)
    # Position of each channel in the stored order (the inverse of _encode's permutation).
    position = jnp.where(anomalous, jnp.cumsum(anomalous, -1) - 1,
                         hot + jnp.cumsum(~anomalous, -1) - 1)
    keys = jnp.take_along_axis(jnp.concatenate(parts, axis=-1),
                               jnp.repeat(position, group, axis=1), axis=-1)
    v_codes = quant.unpack_ternary(lax.dynamic_slice_in_dim(self.v_codes, j0, tokens, axis=1),
                                   kv_heads * head_dim).reshape(batch, tokens, kv_heads, head_dim)
    values = quant.dequantize_ternary_groups(v_codes, params["v_scale"], axis=1, group_size=group)
    return keys, values

  def key_transform(self) -> Float[Array, "head_dim head_dim"]:
    """float32 ``blockdiag(I_hot, M)``, ``M`` the inverse real FFT of ``n`` points as a matrix
    (``x = c @ M``): a decoded key in stored order (2-bit channels, then 1-bit coefficients)
    times it is the anomalous, then the normal channels. The Pallas decode kernels' constant."""
    head_dim, hot = self.k_residual.shape[3], self.hot_channels
    out = jnp.eye(head_dim, dtype=jnp.float32)
    if hot < head_dim:
      out = out.at[hot:, hot:].set(inverse_real_fft(jnp.eye(head_dim - hot, dtype=jnp.float32)))
    return out

  def _real(self, slots: jax.Array) -> jax.Array:
    """``[batch, T, 1, 1]``: which slots hold real tokens (not left padding)."""
    return (slots[None, :] >= self.start[:, None])[:, :, None, None]

  def _store(self, k: jax.Array, v: jax.Array, slot: jax.Array) -> dict[str, jax.Array]:
    """Fields with ``k, v`` quantized into slots ``[slot, slot + T)``, as ``replace`` kwargs."""
    encoded = self._encode(k, v, self._real(slot + jnp.arange(k.shape[1])))
    return {name: lax.dynamic_update_slice_in_dim(
        getattr(self, name), value, slot if name in ("k_codes", "v_codes")
        else slot // self.group_size, axis=1) for name, value in encoded.items()}

  def dequantize(self) -> tuple[Float[Array, "batch max_len kv_heads head_dim"],
                                Float[Array, "batch max_len kv_heads head_dim"]]:
    """float32 keys and values of every slot as :meth:`attend` sees them (0 past ``length``).

    For tests and inspection only: it materializes the whole cache in float32.
    """
    slots = jnp.arange(self.k_codes.shape[1])
    quantized = self.decode_block(jnp.zeros((), jnp.int32), slots.size)
    rows = jnp.clip(slots - self.quantized, 0, self.residual - 1)
    out = []
    for decoded, residual in zip(quantized, (self.k_residual, self.v_residual)):
      full = jnp.take(residual, rows, axis=1).astype(jnp.float32)
      value = jnp.where((slots < self.quantized)[None, :, None, None], decoded, full)
      filled = (slots < self.length)[None, :, None, None]
      out.append(jnp.where(filled, value, 0.0)[:, :self.max_len])
    return out[0], out[1]

  # The cache interface.

  def prefill(self, k: Float[Array, "batch seq kv_heads head_dim"],
              v: Float[Array, "batch seq kv_heads head_dim"],
              start: Int[Array, "batch"]) -> Self:
    """Quantizes keys and values of the first ``(seq // R) * R`` slots; the rest stays in full
    precision (KIVI's key rule). Replaces any content."""
    check_kv(k, v, **self._geometry, max_len=self.max_len)
    cache = self.replace(start=check_start(start, self._geometry["batch"], k.shape[1]))
    seq = k.shape[1]
    quantized = seq // self.residual * self.residual
    updates = cache._store(k[:, :quantized], v[:, :quantized], jnp.zeros((), jnp.int32)) \
        if quantized else {}
    return cache.replace(
        k_residual=jnp.zeros_like(self.k_residual).at[:, :seq - quantized].set(
            k[:, quantized:].astype(self.k_residual.dtype)),
        v_residual=jnp.zeros_like(self.v_residual).at[:, :seq - quantized].set(
            v[:, quantized:].astype(self.v_residual.dtype)),
        length=jnp.asarray(seq, jnp.int32), quantized=jnp.asarray(quantized, jnp.int32),
        **updates)

  def _flush(self) -> Self:
    """Quantizes the R residual tokens into slots ``[quantized, quantized + R)``."""
    return self.replace(quantized=self.quantized + self.residual,
                        **self._store(self.k_residual, self.v_residual, self.quantized))

  def _append_one(self, k: jax.Array, v: jax.Array) -> Self:
    cache = lax.cond(self.length - self.quantized == self.residual, VidKVCache._flush,
                     lambda c: c, self)
    row = (0, cache.length - cache.quantized, 0, 0)
    return cache.replace(
        k_residual=lax.dynamic_update_slice(cache.k_residual,
                                            k[:, None].astype(cache.k_residual.dtype), row),
        v_residual=lax.dynamic_update_slice(cache.v_residual,
                                            v[:, None].astype(cache.v_residual.dtype), row),
        length=cache.length + 1)

  def decode_attention(self, q: Float[Array, "batch seq heads head_dim"], *,
                       scale: float | None = None) -> Float[Array, "batch seq heads head_dim"]:
    """:func:`effjax.ops.kv_decode.vidkv_decode_attention` in the platform's default order."""
    return kv_decode.vidkv_decode_attention(self, q, scale=scale)

  def attend(self, q: Float[Array, "batch seq heads head_dim"], *,
             scale: float | None = None) -> Float[Array, "batch seq heads head_dim"]:
    """:func:`effjax.ops.kv_decode.vidkv_decode_attention` by its ``"xla"`` implementation:
    quantized slots dequantized :attr:`block_size` at a time, then the residual."""
    return kv_decode.vidkv_decode_attention(self, q, scale=scale, implementation="xla")
