"""What the GPU and TPU decode kernels share: the static settings, the GQA query grouping and the
layout of their per-split results.

The cache arrays are KIVI's (``effjax.kv_cache.KIVICache``), slot-major:

* ``k_codes``, ``v_codes``: uint32 ``[batch, slots, kv_heads, words]``: the ``bits``-wide codes of
  one slot's ``head_dim`` channels packed ``32 // bits`` to a word, channel ``c`` in word
  ``c // (32 // bits)`` at bit offset ``bits * (c % (32 // bits))``;
* ``k_scale``, ``k_zero``: ``[batch, slots / G, kv_heads, head_dim]``: per channel, per group of
  G slots (keys are quantized per channel);
* ``v_scale``, ``v_zero``: ``[batch, slots, kv_heads, head_dim / G]``: per slot, per group of G
  channels (values are quantized per token).

A key or value is ``code * scale + zero``. The kernels attend over slots ``[start[b], end)`` of
this quantized prefix only; the caller adds the full-precision residual window as one more
partial result and combines all of them with :func:`combine`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

PACKED_BITS = (1, 2, 3, 4, 8)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static description of one call (hashable: a ``jit`` static argument).

  Attributes:
    key_bits, value_bits: code widths.
    group_size: G.
    head_dim: channels per head.
    group: query heads per kv head (GQA).
    seq: queries per sequence (1 for plain decoding).
    num_splits: partial results per (batch row, kv head), each over a contiguous share of the
      filled prefix.
    scale: logit scale.
  """
  key_bits: int
  value_bits: int
  group_size: int
  head_dim: int
  group: int
  seq: int
  num_splits: int
  scale: float

  @property
  def rows(self) -> int:
    """Query rows one program holds: every query head of a kv head, for every query."""
    return self.seq * self.group


def check(q, k_codes, k_scale, v_codes, v_scale, *, key_bits: int, value_bits: int,
          group_size: int, num_splits: int) -> None:
  """Raises ValueError unless the arrays have KIVI's layout for these settings."""
  batch, _, heads, head_dim = q.shape
  _, slots, kv_heads, _ = k_codes.shape
  for name, bits in (("key_bits", key_bits), ("value_bits", value_bits)):
    if bits not in PACKED_BITS:
      raise ValueError(f"{name} is {bits!r}; expected one of {PACKED_BITS}")
  if heads % kv_heads or head_dim % group_size or slots % group_size:
    raise ValueError(f"q {q.shape} and k_codes {k_codes.shape}: expected heads a multiple of "
                     f"kv_heads and head_dim, slots multiples of group_size={group_size}")
  expected = {
      "k_codes": (batch, slots, kv_heads, -(-head_dim // (32 // key_bits))),
      "v_codes": (batch, slots, kv_heads, -(-head_dim // (32 // value_bits))),
      "k_scale": (batch, slots // group_size, kv_heads, head_dim),
      "v_scale": (batch, slots, kv_heads, head_dim // group_size),
  }
  for name, x in (("k_codes", k_codes), ("v_codes", v_codes), ("k_scale", k_scale),
                  ("v_scale", v_scale)):
    if x.shape != expected[name]:
      raise ValueError(f"{name} has shape {x.shape}; expected {expected[name]}")
  if not isinstance(num_splits, int) or num_splits < 1:
    raise ValueError(f"num_splits is {num_splits!r}; expected a positive int")


def group_queries(q: Float[Array, "batch seq heads head_dim"], kv_heads: int, scale: float,
                  rows: int) -> Float[Array, "batch kv_heads rows head_dim"]:
  """Scaled float32 queries, the ``seq * group`` rows of each kv head together (row ``s * group
  + g`` is query ``s`` of head ``kv_head * group + g``), zero-padded to ``rows``."""
  batch, seq, heads, head_dim = q.shape
  grouped = (q.astype(jnp.float32) * scale).reshape(batch, seq, kv_heads, heads // kv_heads,
                                                    head_dim)
  grouped = grouped.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, -1, head_dim)
  return jnp.pad(grouped, ((0, 0), (0, 0), (0, rows - grouped.shape[2]), (0, 0)))


def ungroup(settings: Settings, out: jax.Array, lse: jax.Array):
  """Kernel results ``[batch, kv_heads, splits, rows >= seq * group, (head_dim)]`` to
  ``([batch, splits, seq, heads, head_dim], [batch, splits, seq, heads])``."""
  batch, kv_heads, splits = out.shape[:3]
  shape = (batch, kv_heads, splits, settings.seq, settings.group)
  out = out[:, :, :, :settings.rows, :settings.head_dim].reshape(*shape, settings.head_dim)
  lse = lse[:, :, :, :settings.rows].reshape(shape)
  heads = kv_heads * settings.group
  return (out.transpose(0, 2, 3, 1, 4, 5).reshape(batch, splits, settings.seq, heads, -1),
          lse.transpose(0, 2, 3, 1, 4).reshape(batch, splits, settings.seq, heads))


def combine(out: Float[Array, "*batch parts d"], lse: Float[Array, "*batch parts"]
            ) -> Float[Array, "*batch d"]:
  """Softmax attention over the union of the parts, from each part's normalized output and
  natural-log LSE (-inf: the part saw nothing); 0 where no part saw anything."""
  top = jnp.max(lse, axis=-1, keepdims=True)
  weights = jnp.exp(lse - jnp.where(jnp.isfinite(top), top, 0.0))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  return jnp.sum(weights[..., None] * out, axis=-2) / jnp.where(total > 0, total, 1.0)
