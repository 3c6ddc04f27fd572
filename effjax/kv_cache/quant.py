"""Low-bit codes for quantized caches: bit packing and asymmetric group quantization.

Packing. Codes of ``bits`` in (1, 2, 3, 4, 8) are packed along the last axis into uint32 words,
``32 // bits`` codes per word, code ``j`` of a word at bit offset ``bits * j`` (KIVI's layout; 3-bit
codes use 30 of 32 bits). Ternary codes (0, 1, 2) are packed in base 3, 20 per word
(``3**20 < 2**32``): 1.6 bits per code instead of the 2 of a 2-bit slot. The last word is padded
with zero codes. Memory: ``ceil(n / codes_per_word) * 4`` bytes for ``n`` codes.

Asymmetric group quantization (KIVI, Liu et al. 2024, eq. 1-2; the common min/max quantizer):
``x`` is split into groups of ``group_size`` consecutive elements along one axis; each group gets
a zero point ``z = min`` and a step ``s = (max - min) / (2**bits - 1)``, codes are
``q = clip(round((x - z) / s), 0, 2**bits - 1)`` and ``x_hat = q * s + z``. Scales and zero points
are stored in ``scale_dtype`` (float16, as KIVI). To keep the paper's guarantee
``|x - x_hat| <= s / 2`` despite that rounding, ``z`` is rounded down and ``s`` up to
``scale_dtype`` (so the stored grid still covers ``[min, max]``) and the codes are computed from
the stored ``s`` and ``z``. A constant group has ``s = 0`` and decodes exactly to ``z`` when ``z``
is representable.

Symmetric mean-|x| group quantizers (VidKV, Tao et al. 2025; BitNet's absmean): one scale
``a = mean |x|`` per group, no zero point. 1-bit (:func:`quantize_sign_groups`): code
``q = [x >= 0]``, ``x_hat = (2q - 1) * a`` = ``+-a`` (``a`` is the L2-optimal scale for sign codes,
so a group's squared error is ``sum x**2 - G a**2``, below its energy). Ternary / 1.58-bit
(:func:`quantize_ternary_groups`): ``t = clip(round(x / a), -1, 1)``, code ``q = t + 1`` in
{0, 1, 2}, ``x_hat = t * a``, so ``|x - x_hat| <= max(a / 2, |x| - a)``. Codes are computed from
the stored (``scale_dtype``-rounded) scale, so the bounds hold for the stored ``a``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, UInt32

PACKED_BITS = (1, 2, 3, 4, 8)
TERNARY_PER_WORD = 20  # 3**20 = 3486784401 < 2**32


def _check_bits(bits: Any) -> int:
  if isinstance(bits, bool) or bits not in PACKED_BITS:
    raise ValueError(f"bits is {bits!r}; expected one of {PACKED_BITS}")
  return int(bits)


def codes_per_word(bits: int) -> int:
  """How many ``bits``-wide codes one uint32 word holds."""
  return 32 // _check_bits(bits)


def packed_words(n: int, bits: int | None) -> int:
  """uint32 words holding ``n`` codes of ``bits`` (None: ternary, base 3)."""
  per_word = TERNARY_PER_WORD if bits is None else codes_per_word(bits)
  return -(-n // per_word)


def _to_words(codes: jax.Array, per_word: int) -> jax.Array:
  """``[..., n]`` -> ``[..., words, per_word]`` uint32, zero-padded."""
  n = codes.shape[-1]
  pad = -n % per_word
  codes = jnp.pad(codes.astype(jnp.uint32), [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
  return codes.reshape(*codes.shape[:-1], -1, per_word)


def pack(codes: UInt32[Array, "*batch n"], bits: int) -> UInt32[Array, "*batch words"]:
  """Packs codes in ``[0, 2**bits)`` along the last axis into uint32 words (see module doc).

  Codes out of range corrupt their neighbours; they are not checked (traced values).
  """
  per_word = codes_per_word(bits)
  shifts = jnp.arange(per_word, dtype=jnp.uint32) * jnp.uint32(bits)
  # Slots are disjoint bit ranges, so the sum is a bitwise OR.
  return jnp.sum(_to_words(codes, per_word) << shifts, axis=-1, dtype=jnp.uint32)


def unpack(words: UInt32[Array, "*batch words"], bits: int, n: int
           ) -> UInt32[Array, "*batch n"]:
  """The first ``n`` codes of :func:`pack`'s words, as uint32."""
  per_word = codes_per_word(bits)
  shifts = jnp.arange(per_word, dtype=jnp.uint32) * jnp.uint32(bits)
  codes = (words[..., None] >> shifts) & jnp.uint32((1 << bits) - 1)
  return codes.reshape(*words.shape[:-1], -1)[..., :n]


def pack_ternary(codes: UInt32[Array, "*batch n"]) -> UInt32[Array, "*batch words"]:
  """Packs codes in {0, 1, 2} along the last axis, 20 per uint32 word in base 3."""
  powers = jnp.asarray(3 ** np.arange(TERNARY_PER_WORD), jnp.uint32)
  return jnp.sum(_to_words(codes, TERNARY_PER_WORD) * powers, axis=-1, dtype=jnp.uint32)


def unpack_ternary(words: UInt32[Array, "*batch words"], n: int) -> UInt32[Array, "*batch n"]:
  """The first ``n`` codes of :func:`pack_ternary`'s words, as uint32."""
  powers = jnp.asarray(3 ** np.arange(TERNARY_PER_WORD), jnp.uint32)
  codes = (words[..., None] // powers) % jnp.uint32(3)
  return codes.reshape(*words.shape[:-1], -1)[..., :n]


def _grouped(x: jax.Array, axis: int, group_size: int) -> jax.Array:
  """Splits ``axis`` of ``x`` into ``[groups, group_size]``."""
  axis = axis % x.ndim
  if x.shape[axis] % group_size:
    raise ValueError(f"axis {axis} of x has size {x.shape[axis]}; expected a multiple of "
                     f"group_size={group_size}")
  return x.reshape(*x.shape[:axis], x.shape[axis] // group_size, group_size, *x.shape[axis + 1:])


def _round_toward(x: jax.Array, dtype: Any, direction: float) -> jax.Array:
  """``x`` cast to ``dtype``, moved one ulp toward ``direction`` (+-inf) if the cast passed it."""
  rounded = x.astype(dtype)
  past = rounded > x if direction < 0 else rounded < x
  return jnp.where(past, jnp.nextafter(rounded, jnp.asarray(direction, dtype)), rounded)


def quantize_groups(x: Float[Array, "..."], bits: int, *, axis: int, group_size: int,
                    mask: Bool[Array, "..."] | None = None, scale_dtype: Any = jnp.float16
                    ) -> tuple[UInt32[Array, "..."], Float[Array, "..."], Float[Array, "..."]]:
  """Asymmetric min/max quantization of groups of ``group_size`` elements along ``axis``.

  Args:
    x: values; ``x.shape[axis]`` must be a multiple of ``group_size``.
    bits: code width, in :data:`PACKED_BITS`.
    axis: the axis along which groups are formed.
    group_size: elements per group.
    mask: optional, broadcastable to ``x``: only True elements set a group's min and max (e.g.
      padding tokens are excluded); a group with no True element gets ``s = z = 0``.
    scale_dtype: storage dtype of scales and zero points.

  Returns:
    ``(codes, scale, zero)``: uint32 codes shaped like ``x`` (unpacked; see :func:`pack`), and
    ``scale``/``zero`` shaped like ``x`` with ``axis`` divided by ``group_size``. Every masked-in
    element satisfies ``|x - dequantize_groups(...)| <= scale / 2`` (up to float32 rounding).
  """
  _check_bits(bits)
  axis = axis % x.ndim
  x32 = _grouped(x.astype(jnp.float32), axis, group_size)
  inside = _grouped(jnp.broadcast_to(True if mask is None else mask, x.shape), axis, group_size)
  lo = jnp.min(jnp.where(inside, x32, jnp.inf), axis=axis + 1)
  hi = jnp.max(jnp.where(inside, x32, -jnp.inf), axis=axis + 1)
  empty = ~jnp.isfinite(lo)
  lo, hi = jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)
  levels = (1 << bits) - 1
  zero = _round_toward(lo, scale_dtype, -math.inf)
  scale = _round_toward((hi - zero.astype(jnp.float32)) / levels, scale_dtype, math.inf)
  scale32 = jnp.expand_dims(scale.astype(jnp.float32), axis + 1)
  zero32 = jnp.expand_dims(zero.astype(jnp.float32), axis + 1)
  steps = (x32 - zero32) / jnp.where(scale32 > 0, scale32, 1.0)
  codes = jnp.clip(jnp.round(steps), 0, levels).astype(jnp.uint32)
  return codes.reshape(x.shape), scale, zero


def dequantize_groups(codes: UInt32[Array, "..."], scale: Float[Array, "..."],
                      zero: Float[Array, "..."], *, axis: int, group_size: int
                      ) -> Float[Array, "..."]:
  """float32 ``codes * scale + zero``, each group of ``group_size`` along ``axis`` with its own."""
  axis = axis % codes.ndim
  grouped = _grouped(codes, axis, group_size).astype(jnp.float32)
  out = (grouped * jnp.expand_dims(scale.astype(jnp.float32), axis + 1)
         + jnp.expand_dims(zero.astype(jnp.float32), axis + 1))
  return out.reshape(codes.shape)


def _mean_abs(x: jax.Array, axis: int, group_size: int, mask: jax.Array | None,
              scale_dtype: Any) -> tuple[jax.Array, jax.Array]:
  """(grouped float32 ``x``, stored ``mean |x|`` of each group's masked-in elements; 0 if none)."""
  axis = axis % x.ndim
  x32 = _grouped(x.astype(jnp.float32), axis, group_size)
  inside = _grouped(jnp.broadcast_to(True if mask is None else mask, x.shape), axis, group_size)
  total = jnp.sum(jnp.where(inside, jnp.abs(x32), 0.0), axis=axis + 1)
  count = jnp.sum(inside, axis=axis + 1)
  return x32, (total / jnp.maximum(count, 1).astype(jnp.float32)).astype(scale_dtype)


def quantize_sign_groups(x: Float[Array, "..."], *, axis: int, group_size: int,
                         mask: Bool[Array, "..."] | None = None, scale_dtype: Any = jnp.float16
                         ) -> tuple[UInt32[Array, "..."], Float[Array, "..."]]:
  """1-bit codes ``[x >= 0]`` and per-group scales ``mean |x|`` (see the module docstring).

  Args and shapes as :func:`quantize_groups` (codes shaped like ``x``, scales with ``axis``
  divided by ``group_size``); decode with :func:`dequantize_sign_groups`.
  """
  _, scale = _mean_abs(x, axis, group_size, mask, scale_dtype)
  return (x >= 0).astype(jnp.uint32), scale


def dequantize_sign_groups(codes: UInt32[Array, "..."], scale: Float[Array, "..."], *, axis: int,
                           group_size: int) -> Float[Array, "..."]:
  """float32 ``(2 codes - 1) * scale``: every element decodes to ``+scale`` or ``-scale``."""
  scale = scale.astype(jnp.float32)
  return dequantize_groups(codes, 2 * scale, -scale, axis=axis, group_size=group_size)


def quantize_ternary_groups(x: Float[Array, "..."], *, axis: int, group_size: int,
                            mask: Bool[Array, "..."] | None = None,
                            scale_dtype: Any = jnp.float16
                            ) -> tuple[UInt32[Array, "..."], Float[Array, "..."]]:
  """Ternary codes ``clip(round(x / a), -1, 1) + 1`` in {0, 1, 2} and scales ``a = mean |x|``.

  Args and shapes as :func:`quantize_groups`; pack with :func:`pack_ternary`, decode with
  :func:`dequantize_ternary_groups`. A group of zeros has ``a = 0`` and codes 1 (decodes to 0).
  """
  axis = axis % x.ndim
  x32, scale = _mean_abs(x, axis, group_size, mask, scale_dtype)
  scale32 = jnp.expand_dims(scale.astype(jnp.float32), axis + 1)
  steps = x32 / jnp.where(scale32 > 0, scale32, 1.0)
  codes = jnp.clip(jnp.round(jnp.where(scale32 > 0, steps, 0.0)), -1, 1) + 1
  return codes.astype(jnp.uint32).reshape(x.shape), scale


def dequantize_ternary_groups(codes: UInt32[Array, "..."], scale: Float[Array, "..."], *,
                              axis: int, group_size: int) -> Float[Array, "..."]:
  """float32 ``(codes - 1) * scale``: each element decodes to ``-scale``, 0 or ``+scale``."""
  scale = scale.astype(jnp.float32)
  return dequantize_groups(codes, scale, -scale, axis=axis, group_size=group_size)
