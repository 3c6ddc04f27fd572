"""KIVI: tuning-free asymmetric 2/4-bit KV cache (Liu et al., ICML 2024, arXiv 2402.02750).

What the paper does, and this cache follows (its ``models/llama_kivi.py`` decode path):

* Keys are quantized **per channel**: each channel of each kv head gets its own scale and zero
  point over a group of ``group_size`` (G) consecutive tokens; keys are post-RoPE.
* Values are quantized **per token**: groups of G consecutive channels of one token.
* Asymmetric min/max quantization (:func:`effjax.kv_cache.quant.quantize_groups`), codes packed
  into uint32 words along the channel axis, scales and zero points in float16.
* The ``residual`` (R, a multiple of G) most recent tokens stay in full precision.
  Prefill: keys of the largest multiple of R prompt tokens are quantized and the rest
  (``prompt_len % R``) kept; values of all but the last R tokens are quantized.
  Decoding: a new key joins the full-precision residual, and once it holds R keys the whole
  R-token block is quantized; a new value joins the full-precision window and, when the window
  then holds R + 1 values, its oldest value is quantized (values leave one token at a time).
* KIVI attends with the new token's key and value in the residual and quantizes *after* the
  step's attention. Here ``append`` is followed by ``attend``, so the quantization KIVI does at the
  end of a step is done at the start of the next ``append``: ``attend`` sees exactly what KIVI's
  attention sees at every step (1..R full-precision keys, up to R + 1 full-precision values).
* Padding slots of left-padded rows are excluded from the per-channel key ranges.

Claims (paper): 2-bit KIVI keeps LongBench quality close to fp16 (e.g. Mistral-7B 43.54 -> 42.43)
with 2.6x less peak memory; 4-bit is near-lossless. KIVI's code takes separate key and value
widths (``k_bits``, ``v_bits``): here ``bits`` and ``value_bits``. 16 bits disables
quantization (every "quantized" slot is stored as given): the streaming and the blockwise
attention then reproduce :class:`effjax.kv_cache.FullKVCache`, which tests use.

Memory, per layer, with ``S = slots`` (``max_len`` rounded up to a multiple of the decode block,
:data:`DECODE_BLOCK_TOKENS` rounded to a multiple of G), ``W(b) = ceil(head_dim / (32 // b))``
words and ``H`` kv heads: key and value codes ``batch * S * H * (W(bits) + W(value_bits)) * 4``
bytes; key scales and zero points ``2 * batch * (S / G) * H * head_dim * 2``; value scales and
zero points ``2 * batch * S * H * (head_dim / G) * 2``; residual keys
``batch * R * H * head_dim * itemsize`` and values ``batch * (R + 1) * H * head_dim * itemsize``;
4 int32 counters plus ``start``. At 2 bits, G = 32, head_dim = 64 that is 48 bytes per token and
kv head (fp16: 256) plus the residual. Attention (:meth:`KIVICache.decode_attention`,
:meth:`KIVICache.attend`) is the op :func:`effjax.ops.kv_decode.kivi_decode_attention`: block by
block in XLA, or fused Pallas kernels that read the packed codes in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
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
from effjax.ops import kv_decode

SUPPORTED_BITS = (*quant.PACKED_BITS, 16)  # 16: quantization disabled (a test mode)
DECODE_BLOCK_TOKENS = 256  # slots dequantized at a time by attend (rounded up to a multiple of G)
SCALE_DTYPE = jnp.float16


def _check_settings(bits: Any, group_size: Any, residual: Any, value_bits: Any) -> None:
  for name, value in (("bits", bits), ("value_bits", value_bits)):
    if isinstance(value, bool) or value not in SUPPORTED_BITS:
      raise ValueError(f"{name} is {value!r}; expected one of {SUPPORTED_BITS} "
                       "(16: no quantization)")
  check_group_and_residual(group_size, residual)


@dataclasses.dataclass(frozen=True)
class KIVI:
  """KIVI settings; usable wherever a cache type is expected (``generate(cache_type=KIVI(2))``).

  Attributes:
    bits: code width: 2 or 4 in the paper (any of :data:`SUPPORTED_BITS`; 16 disables quantization).
    value_bits: the values' code width when it differs from the keys' (None: ``bits``).
    group_size: G, tokens per key group and channels per value group (KIVI: 32).
    residual: R, full-precision recent tokens (KIVI: 128); a multiple of G.
  """
  bits: int = 2
  group_size: int = 32
  residual: int = 128
  value_bits: int | None = None

  def __post_init__(self):
    _check_settings(self.bits, self.group_size, self.residual,
                    self.bits if self.value_bits is None else self.value_bits)

  def init(self, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int,
           dtype: Any = jnp.float32) -> KIVICache:
    """An empty :class:`KIVICache` with these settings."""
    return KIVICache.init(batch, max_len, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          dtype=dtype, bits=self.bits, group_size=self.group_size,
                          residual=self.residual, value_bits=self.value_bits)


class KIVICache(StreamingQuantizedCache):
  """KIVI's quantized keys/values plus full-precision residual (see the module docstring).

  Attributes:
    k_codes: packed key codes by slot, uint32 ``[batch, slots, kv_heads, words]`` (16 bits: the
      keys, ``[batch, slots, kv_heads, head_dim]`` in ``dtype``); valid below ``k_quantized``.
    k_scale, k_zero: float16 ``[batch, slots / G, kv_heads, head_dim]``: per-channel, per group of
      G slots (16 bits: zero-sized).
    k_residual: keys of slots ``[k_quantized, length)`` at rows ``[0, length - k_quantized)``,
      ``[batch, R, kv_heads, head_dim]`` in ``dtype``.
    v_codes: packed value codes by slot, like ``k_codes``; valid below ``v_quantized``.
    v_scale, v_zero: float16 ``[batch, slots, kv_heads, head_dim / G]``: per token, per group of
      G channels (16 bits: zero-sized).
    v_window: values of slots ``[v_quantized, length)``, slot ``j`` at row ``j % (R + 1)``,
      ``[batch, R + 1, kv_heads, head_dim]`` in ``dtype``.
    start: int32 ``[batch]``, each row's first real slot.
    length: int32 scalar, filled slots.
    k_quantized, v_quantized: int32 scalars, slots whose key / value is quantized (a prefix).
    key_bits, value_bits, group_size, residual, capacity: static settings; ``capacity`` is
      ``max_len``.
  """
  k_codes: jax.Array
  k_scale: jax.Array
  k_zero: jax.Array
  k_residual: jax.Array
  v_codes: jax.Array
  v_scale: jax.Array
  v_zero: jax.Array
  v_window: jax.Array
  start: jax.Array
  length: jax.Array
  k_quantized: jax.Array
  v_quantized: jax.Array
  key_bits: int = flax.struct.field(pytree_node=False)
  value_bits: int = flax.struct.field(pytree_node=False)
  group_size: int = flax.struct.field(pytree_node=False)
  residual: int = flax.struct.field(pytree_node=False)
  capacity: int = flax.struct.field(pytree_node=False)

  @classmethod
  def init(cls, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int,
           dtype: Any = jnp.float32, bits: int = 2, group_size: int = 32,
           residual: int = 128, value_bits: int | None = None) -> Self:
    """An empty cache; raises ValueError naming any invalid argument.

    ``head_dim`` must be a multiple of ``group_size`` (value groups are G channels of a token).
    """
    for name, value in (("batch", batch), ("max_len", max_len), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
      check_positive_int(name, value)
    check_floating_dtype("dtype", dtype)
    value_bits = bits if value_bits is None else value_bits
    _check_settings(bits, group_size, residual, value_bits)
    if head_dim % group_size:
      raise ValueError(f"head_dim is {head_dim}; expected a multiple of group_size={group_size} "
                       "(KIVI quantizes values per token in groups of group_size channels)")
    block = cls._block_size(group_size, max_len)
    slots = -(-max_len // block) * block
    def codes(width):
      if width == 16:
        return jnp.zeros((batch, slots, num_kv_heads, head_dim), dtype)
      return jnp.zeros((batch, slots, num_kv_heads, quant.packed_words(head_dim, width)),
                       jnp.uint32)

    def scales(width, shape):
      return jnp.zeros((batch, 0, num_kv_heads, head_dim) if width == 16 else shape, SCALE_DTYPE)

    k_scale = scales(bits, (batch, slots // group_size, num_kv_heads, head_dim))
    v_scale = scales(value_bits, (batch, slots, num_kv_heads, head_dim // group_size))
    zero = jnp.zeros((), jnp.int32)
    return cls(
        k_codes=codes(bits), k_scale=k_scale, k_zero=k_scale,
        k_residual=jnp.zeros((batch, residual, num_kv_heads, head_dim), dtype),
        v_codes=codes(value_bits), v_scale=v_scale, v_zero=v_scale,
        v_window=jnp.zeros((batch, residual + 1, num_kv_heads, head_dim), dtype),
        start=jnp.zeros((batch,), jnp.int32), length=zero, k_quantized=zero, v_quantized=zero,
        key_bits=bits, value_bits=value_bits, group_size=group_size, residual=residual,
        capacity=max_len)

  @staticmethod
  def _block_size(group_size: int, max_len: int) -> int:
    """Slots per dequantized block in attend: a multiple of G, at most ~DECODE_BLOCK_TOKENS."""
    return -(-min(DECODE_BLOCK_TOKENS, max_len) // group_size) * group_size

  @property
  def block_size(self) -> int:
    """Slots the XLA decode path dequantizes at a time (a multiple of G dividing the slots)."""
    return self._block_size(self.group_size, self.max_len)

  # Encoding and decoding. Keys: groups of G slots per channel; values: G channels per slot.

  def _encode(self, x: jax.Array, *, keys: bool, mask: jax.Array | None = None):
    """``x [batch, T, kv_heads, head_dim]`` -> (codes, scale, zero) in the stored layouts."""
    bits = self.key_bits if keys else self.value_bits
    if bits == 16:
      return x.astype(self.k_residual.dtype), None, None
    codes, scale, zero = quant.quantize_groups(
        x, bits, axis=1 if keys else -1, group_size=self.group_size, mask=mask,
        scale_dtype=SCALE_DTYPE)
    return quant.pack(codes, bits), scale, zero

  def _decode(self, bits: int, codes: jax.Array, scale: jax.Array | None,
              zero: jax.Array | None) -> jax.Array:
    """float32 values of ``bits``-wide codes ``[batch, T, kv_heads, words]`` with scales
    broadcastable to ``[batch, T, kv_heads, head_dim]`` (keys: per slot; values: repeated over
    each group); 16 bits: the stored values."""
    if bits == 16:
      return codes.astype(jnp.float32)
    head_dim = self.k_residual.shape[-1]
    values = quant.unpack(codes, bits, head_dim).astype(jnp.float32)
    return values * scale.astype(jnp.float32) + zero.astype(jnp.float32)

  def _write(self, prefix: str, codes, scale, zero, slot, scale_index) -> dict[str, jax.Array]:
    """New ``{prefix}_codes`` (written at ``slot``) and scales (at ``scale_index``), as kwargs."""
    out = {f"{prefix}_codes": lax.dynamic_update_slice(getattr(self, f"{prefix}_codes"), codes,
                                                       (0, slot, 0, 0))}
    if scale is not None:
      for name, value in (("scale", scale), ("zero", zero)):
        out[f"{prefix}_{name}"] = lax.dynamic_update_slice(
            getattr(self, f"{prefix}_{name}"), value, (0, scale_index, 0, 0))
    return out

  def _real(self, slots: jax.Array) -> jax.Array:
    """``[batch, T, 1, 1]``: which slots hold real tokens (not left padding)."""
    return (slots[None, :] >= self.start[:, None])[:, :, None, None]

  def decode_block(self, j0: Int[Array, ""], size: int
                   ) -> tuple[Float[Array, "batch size kv_heads head_dim"],
                              Float[Array, "batch size kv_heads head_dim"]]:
    """float32 quantized keys and values of slots ``[j0, j0 + size)`` (multiples of G; valid
    below ``k_quantized`` / ``v_quantized``), dequantized from the codes."""
    key_scales = [None, None] if self.key_bits == 16 else [
        jnp.repeat(lax.dynamic_slice_in_dim(s, j0 // self.group_size, size // self.group_size,
                                            axis=1), self.group_size, axis=1)
        for s in (self.k_scale, self.k_zero)]
    value_scales = [None, None] if self.value_bits == 16 else [
        self._value_scales(lax.dynamic_slice_in_dim(s, j0, size, axis=1))
        for s in (self.v_scale, self.v_zero)]
    return (self._decode(self.key_bits, lax.dynamic_slice_in_dim(self.k_codes, j0, size, 1),
                         *key_scales),
            self._decode(self.value_bits, lax.dynamic_slice_in_dim(self.v_codes, j0, size, 1),
                         *value_scales))

  def keys_at(self, slots: Int[Array, "T"]) -> jax.Array:
    """float32 keys ``[batch, T, kv_heads, head_dim]`` of ``slots`` as attend sees them."""
    scales = [None, None] if self.key_bits == 16 else [
        jnp.take(s, slots // self.group_size, axis=1, mode="clip")
        for s in (self.k_scale, self.k_zero)]
    quantized = self._decode(self.key_bits, jnp.take(self.k_codes, slots, axis=1, mode="clip"),
                             *scales)
    full = jnp.take(self.k_residual, slots - self.k_quantized, axis=1, mode="clip")
    return jnp.where((slots < self.k_quantized)[None, :, None, None], quantized,
                     full.astype(jnp.float32))

  def values_at(self, slots: Int[Array, "T"]) -> jax.Array:
    """float32 values ``[batch, T, kv_heads, head_dim]`` of ``slots`` as attend sees them."""
    scales = [None, None] if self.value_bits == 16 else [
        self._value_scales(jnp.take(s, slots, axis=1, mode="clip"))
        for s in (self.v_scale, self.v_zero)]
    quantized = self._decode(self.value_bits,
                             jnp.take(self.v_codes, slots, axis=1, mode="clip"), *scales)
    full = jnp.take(self.v_window, slots % (self.residual + 1), axis=1)
    return jnp.where((slots < self.v_quantized)[None, :, None, None], quantized,
                     full.astype(jnp.float32))

  def _value_scales(self, scale: jax.Array) -> jax.Array:
    """Per-group value scales ``[..., head_dim / G]`` repeated to ``[..., head_dim]``."""
    return jnp.repeat(scale, self.group_size, axis=-1)

  def dequantize(self) -> tuple[Float[Array, "batch max_len kv_heads head_dim"],
                                Float[Array, "batch max_len kv_heads head_dim"]]:
    """float32 keys and values of every slot as :meth:`attend` sees them (0 past ``length``).

    For tests and inspection only: it materializes the whole cache in float32.
    """
    slots = jnp.arange(self.max_len)
    filled = (slots < self.length)[None, :, None, None]
    return (jnp.where(filled, self.keys_at(slots), 0.0),
            jnp.where(filled, self.values_at(slots), 0.0))

  # The cache interface.

  def prefill(self, k: Float[Array, "batch seq kv_heads head_dim"],
              v: Float[Array, "batch seq kv_heads head_dim"],
              start: Int[Array, "batch"]) -> Self:
    """Quantizes the keys of the first ``(seq // R) * R`` slots and the values of all but the last
    R (KIVI's prefill); the rest stays in full precision. Replaces any content."""
    check_kv(k, v, **self._geometry, max_len=self.max_len)
    cache = self.replace(start=check_start(start, self._geometry["batch"], k.shape[1]))
    seq, residual = k.shape[1], self.residual
    k_quantized, v_quantized = seq // residual * residual, max(0, seq - residual)
    updates: dict[str, jax.Array] = {}
    if k_quantized:
      mask = cache._real(jnp.arange(k_quantized))
      updates |= cache._write("k", *cache._encode(k[:, :k_quantized], keys=True, mask=mask), 0, 0)
    if v_quantized:
      updates |= cache._write("v", *cache._encode(v[:, :v_quantized], keys=False), 0, 0)
    rows = np.arange(v_quantized, seq) % (residual + 1)
    return cache.replace(
        k_residual=jnp.zeros_like(self.k_residual).at[:, :seq - k_quantized].set(
            k[:, k_quantized:].astype(self.k_residual.dtype)),
        v_window=jnp.zeros_like(self.v_window).at[:, rows].set(
            v[:, v_quantized:].astype(self.v_window.dtype)),
        length=jnp.asarray(seq, jnp.int32), k_quantized=jnp.asarray(k_quantized, jnp.int32),
        v_quantized=jnp.asarray(v_quantized, jnp.int32), **updates)

  def _flush_keys(self) -> Self:
    """Quantizes the R residual keys into the slots ``[k_quantized, k_quantized + R)``."""
    slots = self.k_quantized + jnp.arange(self.residual)
    encoded = self._encode(self.k_residual, keys=True, mask=self._real(slots))
    return self.replace(k_quantized=self.k_quantized + self.residual,
                        **self._write("k", *encoded, self.k_quantized,
                                      self.k_quantized // self.group_size))

  def _evict_value(self) -> Self:
    """Quantizes the oldest full-precision value (slot ``v_quantized``)."""
    row = self.v_quantized % (self.residual + 1)
    oldest = lax.dynamic_slice_in_dim(self.v_window, row, 1, axis=1)
    return self.replace(v_quantized=self.v_quantized + 1,
                        **self._write("v", *self._encode(oldest, keys=False), self.v_quantized,
                                      self.v_quantized))

  def _append_one(self, k: jax.Array, v: jax.Array) -> Self:
    cache = lax.cond(self.length - self.k_quantized == self.residual,
                     KIVICache._flush_keys, lambda c: c, self)
    cache = lax.cond(cache.length - cache.v_quantized == cache.residual + 1,
                     KIVICache._evict_value, lambda c: c, cache)
    return cache.replace(
        k_residual=lax.dynamic_update_slice(
            cache.k_residual, k[:, None].astype(cache.k_residual.dtype),
            (0, cache.length - cache.k_quantized, 0, 0)),
        v_window=lax.dynamic_update_slice(
            cache.v_window, v[:, None].astype(cache.v_window.dtype),
            (0, cache.length % (cache.residual + 1), 0, 0)),
        length=cache.length + 1)

  def decode_attention(self, q: Float[Array, "batch seq heads head_dim"], *,
                       scale: float | None = None) -> Float[Array, "batch seq heads head_dim"]:
    """:func:`effjax.ops.kv_decode.kivi_decode_attention` in the platform's default order."""
    return kv_decode.kivi_decode_attention(self, q, scale=scale)

  def attend(self, q: Float[Array, "batch seq heads head_dim"], *,
             scale: float | None = None) -> Float[Array, "batch seq heads head_dim"]:
    """:func:`effjax.ops.kv_decode.kivi_decode_attention` by its ``"xla"`` implementation:
    slots below ``max(0, length - R - 1)`` (key and value quantized) dequantized
    :attr:`block_size` at a time, the last ``R + 1`` slots gathered slot by slot; never a float32
    copy of the whole cache."""
    return kv_decode.kivi_decode_attention(self, q, scale=scale, implementation="xla")
