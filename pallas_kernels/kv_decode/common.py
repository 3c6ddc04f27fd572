"""What the decode kernels share, whatever their platform: the tiling settings
(:class:`DecodeBlockSizes`), the static settings of a call, the GQA query grouping, the layout of
their per-split results and their combination, and each cache format's lane arithmetic.

The KIVI kernels (``kivi.pallas_gpu``, ``kivi.pallas_tpu``) read KIVI's cache
(``effjax.kv_cache.KIVICache``), slot-major:

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

VidKV's cache (``effjax.kv_cache.VidKVCache``; kernels ``vidkv.pallas_gpu`` / ``vidkv.pallas_tpu``)
is laid out per slot and per key group too; its lane layouts (:func:`key_code_lanes`,
:func:`value_code_lanes`), base-3 digit extraction (:func:`ternary_digit`) and channel order
(:func:`channel_positions`) live here, written with ops that lower both to Triton and to Mosaic.
XQuant's stream (``effjax.kv_cache.XQuantCache``; kernels ``xquant.pallas_gpu`` /
``xquant.pallas_tpu``): :class:`XQuantSettings` and the helpers after it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from pallas_kernels.shapes import cdiv, next_power_of_two, pad_axis

PACKED_BITS = (1, 2, 3, 4, 8)
TERNARY_PER_WORD = 20  # base-3 digits per uint32 word (3**20 < 2**32)


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """How a decode kernel tiles the cache (every kernel wrapper takes one); a None field takes
  the kernel's heuristic.

  Attributes:
    block_slots: cache slots a program reads per step. The TPU kernels' grid step: a divisor of
      the cache's slots that is a multiple of 8 key groups (KIVI, VidKV) or of 8 slots (XQuant),
      or all the slots. XQuant's GPU kernel's loop step: a power of two >= 16. KIVI's and VidKV's
      GPU kernels step one key group at a time: only G.
    num_splits: partial results per (batch row, kv head) on GPU, per batch row on TPU, each over
      a contiguous share of the filled slots (flash-decoding's split-K); more splits make more
      programs and ``num_splits`` times the partial results' memory.
  """
  block_slots: int | None = None
  num_splits: int | None = None

  def __post_init__(self):
    for name in ("block_slots", "num_splits"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < 1):
        raise ValueError(f"{name} is {value!r}; expected a positive int or None (the kernel's "
                         "heuristic)")


def block_sizes_or_default(block_sizes: DecodeBlockSizes | None) -> DecodeBlockSizes:
  """``block_sizes``, or all-heuristic :class:`DecodeBlockSizes` for None; TypeError otherwise."""
  if block_sizes is None:
    return DecodeBlockSizes()
  if not isinstance(block_sizes, DecodeBlockSizes):
    raise TypeError(f"block_sizes is {block_sizes!r}; expected a "
                    "pallas_kernels.kv_decode.common.DecodeBlockSizes or None")
  return block_sizes


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static description of one call, shared by every cache format (hashable: a ``jit`` static
  argument).

  Attributes:
    group_size: G.
    head_dim: channels per head.
    group: query heads per kv head (GQA).
    seq: queries per sequence (1 for plain decoding).
    num_splits: partial results per (batch row, kv head), each over a contiguous share of the
      filled prefix.
    scale: logit scale.
  """
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


def geometry(q: jax.Array, kv_heads: int, *, group_size: int, num_splits: int, scale: float
             ) -> dict[str, Any]:
  """The :class:`Geometry` fields of a call on queries ``q [batch, seq, heads, head_dim]``, as
  keyword arguments of its settings class."""
  _, seq, heads, head_dim = q.shape
  return {"group_size": group_size, "head_dim": head_dim, "group": heads // kv_heads, "seq": seq,
          "num_splits": num_splits, "scale": float(scale)}


@dataclasses.dataclass(frozen=True)
class Settings(Geometry):
  """KIVI's settings: :class:`Geometry` plus the key and value code widths."""
  key_bits: int
  value_bits: int


@dataclasses.dataclass(frozen=True)
class VidKVSettings(Geometry):
  """VidKV's settings: :class:`Geometry` plus ``hot``, the 2-bit key channels per group."""
  hot: int


def check(q, k_codes, k_scale, v_codes, v_scale, *, key_bits: int, value_bits: int,
          group_size: int) -> None:
  """Raises ValueError unless the arrays have KIVI's layout for these settings."""
  batch, _, heads, head_dim = q.shape
  _, slots, kv_heads, _ = k_codes.shape
  for name, bits in (("key_bits", key_bits), ("value_bits", value_bits)):
    if bits not in PACKED_BITS:
      raise ValueError(f"{name} is {bits!r}; expected one of {PACKED_BITS}")
  _check_geometry(q, k_codes, group_size)
  if head_dim % group_size:
    raise ValueError(f"head_dim is {head_dim}; expected a multiple of group_size={group_size} "
                     "(KIVI's values are quantized per group of G channels)")
  _check_shapes({
      "k_codes": (k_codes, (batch, slots, kv_heads, cdiv(head_dim, 32 // key_bits))),
      "v_codes": (v_codes, (batch, slots, kv_heads, cdiv(head_dim, 32 // value_bits))),
      "k_scale": (k_scale, (batch, slots // group_size, kv_heads, head_dim)),
      "v_scale": (v_scale, (batch, slots, kv_heads, head_dim // group_size)),
  })


def check_vidkv(q, k_codes, k_scale, k_zero, k_hot, v_codes, v_scale, transform, *, hot: int,
                group_size: int) -> None:
  """Raises ValueError unless the arrays have VidKV's layout for these settings."""
  batch, _, heads, head_dim = q.shape
  _, slots, kv_heads, _ = k_codes.shape
  if not isinstance(hot, int) or not 0 <= hot <= head_dim:
    raise ValueError(f"hot is {hot!r}; expected an int in [0, head_dim={head_dim}]")
  _check_geometry(q, k_codes, group_size)
  groups = (batch, slots // group_size, kv_heads)
  _check_shapes({
      "k_codes": (k_codes, (batch, slots, kv_heads,
                            cdiv(hot, 16) + cdiv(head_dim - hot, 32))),
      "k_scale": (k_scale, (*groups, head_dim)),
      "k_zero": (k_zero, (*groups, hot)),
      "k_hot": (k_hot, (*groups, cdiv(head_dim, 32))),
      "v_codes": (v_codes, (batch, slots, cdiv(kv_heads * head_dim, TERNARY_PER_WORD))),
      "v_scale": (v_scale, (*groups, head_dim)),
      "transform": (transform, (head_dim, head_dim)),
  })


def _check_geometry(q, k_codes, group_size: int) -> None:
  heads = q.shape[2]
  slots, kv_heads = k_codes.shape[1:3]
  if heads % kv_heads or slots % group_size:
    raise ValueError(f"q {q.shape} and k_codes {k_codes.shape}: expected heads a multiple of "
                     f"kv_heads and slots a multiple of group_size={group_size}")


def _check_shapes(arrays: dict[str, tuple[jax.Array, tuple[int, ...]]]) -> None:
  for name, (x, expected) in arrays.items():
    if x.shape != expected:
      raise ValueError(f"{name} has shape {x.shape}; expected {expected}")


def group_queries(q: Float[Array, "batch seq heads head_dim"], kv_heads: int, scale: float,
                  rows: int) -> Float[Array, "batch kv_heads rows head_dim"]:
  """Scaled float32 queries, the ``seq * group`` rows of each kv head together (row ``s * group
  + g`` is query ``s`` of head ``kv_head * group + g``), zero-padded to ``rows``."""
  batch, seq, heads, head_dim = q.shape
  grouped = (q.astype(jnp.float32) * scale).reshape(batch, seq, kv_heads, heads // kv_heads,
                                                    head_dim)
  grouped = grouped.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, -1, head_dim)
  return pad_axis(grouped, 2, rows)


def ungroup(settings: Geometry, out: jax.Array, lse: jax.Array):
  """Kernel results ``[batch, kv_heads, splits, rows >= seq * group, (dim)]`` to
  ``([batch, splits, seq, heads, dim], [batch, splits, seq, heads])``."""
  batch, kv_heads, splits = out.shape[:3]
  shape = (batch, kv_heads, splits, settings.seq, settings.group)
  out = out[:, :, :, :settings.rows].reshape(*shape, out.shape[-1])
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


def dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False,
        precision: Any = lax.Precision.HIGHEST) -> jax.Array:
  """2-D float32 matmul, by default at full (IEEE) precision: one-hot and 0/1 products are exact,
  and a GPU does not round to TF32."""
  return lax.dot_general(a, b, (((1,), (1 if trans_b else 0,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def visible_to_rows(slot: Int[Array, "..."], row: Int[Array, "..."], first: jax.Array,
                    end: jax.Array, last: jax.Array, group: int) -> jax.Array:
  """Whether query row ``row`` (query ``row // group``) sees ``slot``: a real slot of the read
  range ``[first, end)`` no later than the query's own slot ``last + row // group``."""
  return (slot >= first) & (slot < end) & (slot <= last + lax.div(row, group))


# VidKV (layout: effjax.kv_cache.VidKVCache). Lane ``l`` of a key group's stored order is its
# ``l``-th 2-bit channel for ``l < hot`` and its ``(l - hot)``-th 1-bit FFT coefficient after.


def key_code_lanes(lane: Int[Array, "..."], hot: int):
  """``(word, shift, mask)`` int32 of each stored-order lane's key code: the 2-bit codes of the
  ``hot`` anomalous channels (16 per word), then the 1-bit codes (32 per word)."""
  two_bit = lane < hot
  coefficient = jnp.maximum(lane - hot, 0)
  word = jnp.where(two_bit, lax.div(lane, 16), cdiv(hot, 16) + lax.div(coefficient, 32))
  shift = jnp.where(two_bit, 2 * lax.rem(lane, 16), lax.rem(coefficient, 32))
  return word, shift, jnp.where(two_bit, 3, 1)


def value_code_lanes(flat: Int[Array, "..."]):
  """``(word, digit)`` int32 of value code ``flat = kv_head * head_dim + channel`` of a token (base
  3, :data:`TERNARY_PER_WORD` per word, heads then channels)."""
  return lax.div(flat, TERNARY_PER_WORD), lax.rem(flat, TERNARY_PER_WORD)


def power_of_three(exponent: Int[Array, "..."]) -> Int[Array, "..."]:
  """int32 ``3 ** exponent`` for exponents in ``[0, TERNARY_PER_WORD)`` (static powers, selected
  per lane)."""
  power = jnp.ones_like(exponent)
  for i in range(1, TERNARY_PER_WORD):
    power = jnp.where(exponent == i, 3**i, power)
  return power


def ternary_digit(lo: Int[Array, "*shape"], hi: Int[Array, "*shape"], digit: Int[Array, "..."]
                  ) -> Int[Array, "*shape"]:
  """Base-3 digit ``digit`` (broadcast per lane) of the uint32 words ``hi * 2**16 + lo``, given as
  their int32 16-bit halves, with int32 arithmetic only (no unsigned division, no overflow; for
  the TPU kernel, where a GPU divides uint32 words directly):
  ``word // p = (hi // p) * 2**16 + (hi % p * 2**16 + lo) // p``, and ``2**16 = 1 (mod 3)``;
  digits from 9 on divide ``word // 3**9 < 2**18`` instead."""
  low = jnp.broadcast_to(power_of_three(jnp.minimum(digit, 9)), lo.shape)
  high = jnp.broadcast_to(power_of_three(jnp.maximum(digit - 9, 0)), lo.shape)

  def quotient_mod_three(p):  # (word // p) % 3 for p <= 3**9
    return lax.rem(lax.div(hi, p) + lax.div(lax.rem(hi, p) * 65536 + lo, p), 3)

  nine = jnp.full(lo.shape, 3**9, jnp.int32)
  word_over_3_9 = lax.div(hi, nine) * 65536 + lax.div(lax.rem(hi, nine) * 65536 + lo, nine)
  return jnp.where(jnp.broadcast_to(digit, lo.shape) <= 9, quotient_mod_three(low),
                   lax.rem(lax.div(word_over_3_9, high), 3))


def channel_positions(anomalous: Array, counted: Array, hot: int) -> Int[Array, "... head_dim"]:
  """Stored-order lane of each channel: ``anomalous`` (1 or 0 per channel) and ``counted``, its
  inclusive prefix sum along channels (a scan on GPU, a triangular-ones matmul on TPU), give rank
  among the anomalous channels, or ``hot`` + rank among the normal ones."""
  lane = lax.broadcasted_iota(jnp.int32, anomalous.shape, anomalous.ndim - 1)
  counted = counted.astype(jnp.int32)
  return jnp.where(anomalous > 0, counted - 1, hot + lane - counted)


# XQuant (layout: effjax.kv_cache.XQuantCache; kernels in xquant.pallas_gpu / .pallas_tpu). One
# stream of ``width`` channels per slot, shared by every kv head: ``codes`` uint32 ``[batch,
# slots, words]`` (channel ``c`` in word ``c // (32 // bits)`` at bit ``bits * (c % (32 //
# bits))``), ``scale`` / ``zero`` float16 ``[batch, slots, width / G]`` per G consecutive
# channels. The kernels never gather lanes: the ``j``-th code of every word (``(words >> bits *
# j) & mask``) is a ``[slots, words]`` tile of channels ``word * (32 // bits) + j``, so the key
# projection is split into ``32 // bits`` matmuls against the matching rows of ``C_k`` (permuted
# once, outside) and the value stream is accumulated in that permuted order and put back in order
# outside.


@dataclasses.dataclass(frozen=True)
class Segment:
  """Words ``[word0, word0 + words)`` of a slot (a run of channels), held as ``tile`` lanes."""
  word0: int
  words: int
  tile: int


@dataclasses.dataclass(frozen=True)
class XQuantSettings(Geometry):
  """XQuant's settings: :class:`Geometry` (``group_size``: G of the stream) plus the stream.

  Attributes:
    bits: code width.
    width: stream channels per slot.
    key_channels, value_channels: ``[begin, end)`` channels of the key input ``Z_k`` and of the
      value stream ``Z_v`` (latent: ``[0, r)`` and ``[r, 2r)``; X: both ``[0, width)``).
    tiles: ``"pow2"``: each segment's word tile rounded up to a power of two >= 16 (Triton);
      ``"whole"``: every segment is all the slot's words (Mosaic: no unaligned lane slices; the
      lanes of the other channels get zero weights or are cut).
  """
  bits: int
  width: int
  key_channels: tuple[int, int]
  value_channels: tuple[int, int]
  tiles: str

  @property
  def per_word(self) -> int:
    return 32 // self.bits

  def segment(self, channels: tuple[int, int]) -> Segment:
    """The words holding ``channels`` (the first and last may hold other channels too)."""
    if self.tiles == "whole":
      words = cdiv(self.width, self.per_word)
      return Segment(0, words, words)
    word0, stop = channels[0] // self.per_word, cdiv(channels[1], self.per_word)
    return Segment(word0, stop - word0, next_power_of_two(stop - word0, 16))

  @property
  def key_segment(self) -> Segment:
    return self.segment(self.key_channels)

  @property
  def value_segment(self) -> Segment:
    return self.segment(self.value_channels)

  def scale_variant(self, j: int) -> int:
    """Which code position's scale layout code ``j`` shares: every ``j`` reads its word's group
    when G is a multiple of ``32 // bits`` (0), else its own (``j``)."""
    return 0 if self.group_size % self.per_word == 0 else j


def xquant_settings(q, codes, scale, zero, key_up, inv_freq, *, bits: int, group_size: int,
                    key_channels: tuple[int, int], value_channels: tuple[int, int],
                    logit_scale: float, num_splits: int, tiles: str) -> XQuantSettings:
  """The settings of one XQuant kernel call (arguments as
  ``pallas_kernels.kv_decode.xquant.pallas_gpu.decode_partials``, ``num_splits`` resolved); raises
  ValueError unless the arrays have XQuant's layout for them."""
  batch, seq, heads, head_dim = q.shape
  slots = codes.shape[1]
  kv_heads = key_up.shape[1]
  settings = XQuantSettings(
      group_size=group_size, head_dim=head_dim, group=heads // kv_heads, seq=seq,
      num_splits=num_splits, scale=float(logit_scale), bits=bits,
      width=scale.shape[2] * group_size, key_channels=tuple(key_channels),
      value_channels=tuple(value_channels), tiles=tiles)
  if settings.bits not in PACKED_BITS:
    raise ValueError(f"bits is {settings.bits!r}; expected one of {PACKED_BITS}")
  if head_dim % 2 or heads % kv_heads or settings.width % settings.group_size:
    raise ValueError(f"q {q.shape}, key_up {key_up.shape}: expected an even head_dim, heads a "
                     f"multiple of kv_heads and width={settings.width} a multiple of "
                     f"group_size={settings.group_size}")
  for name, (begin, end) in (("key_channels", settings.key_channels),
                             ("value_channels", settings.value_channels)):
    if not 0 <= begin < end <= settings.width:
      raise ValueError(f"{name} is {(begin, end)}; expected 0 <= begin < end <= width="
                       f"{settings.width}")
  key_width = settings.key_channels[1] - settings.key_channels[0]
  groups = (batch, slots, settings.width // settings.group_size)
  _check_shapes({"codes": (codes, (batch, slots, cdiv(settings.width, settings.per_word))),
                 "scale": (scale, groups), "zero": (zero, groups),
                 "key_up": (key_up, (key_width, kv_heads, head_dim)),
                 "inv_freq": (inv_freq, (head_dim // 2,))})
  return settings


def _segment_channels(settings: XQuantSettings, segment: Segment) -> np.ndarray:
  """int ``[tile, 32 // bits]``: the stream channel of each (lane, code position)."""
  return ((segment.word0 + np.arange(segment.tile))[:, None] * settings.per_word
          + np.arange(settings.per_word)[None, :])


def key_weights(settings: XQuantSettings, key_up: Float[Array, "key_width kv_heads head_dim"]
                ) -> Float[Array, "kv_heads 2 per_word tile half"]:
  """``C_k`` permuted to the key segment's (code position, lane) order, zero on lanes that hold
  no key channel, its columns split into the two RoPE halves (float32, weights-sized)."""
  begin, end = settings.key_channels
  channels = _segment_channels(settings, settings.key_segment)
  inside = (channels >= begin) & (channels < end)
  rows = jnp.where(inside[..., None, None],
                   key_up.astype(jnp.float32)[np.clip(channels - begin, 0, end - begin - 1)], 0.0)
  kv_heads, head_dim = key_up.shape[1:]
  rows = rows.reshape(*channels.shape, kv_heads, 2, head_dim // 2)
  return rows.transpose(2, 3, 1, 0, 4)  # [kv_heads, 2, per_word, tile, half]


def split_queries(q: Float[Array, "batch seq heads head_dim"], kv_heads: int, scale: float,
                  rows: int) -> Float[Array, "batch kv_heads 2 rows half"]:
  """:func:`group_queries` with the two RoPE halves of the channels apart."""
  grouped = group_queries(q, kv_heads, scale, rows)
  return grouped.reshape(*grouped.shape[:3], 2, -1).transpose(0, 1, 3, 2, 4)


def group_of_lane(settings: XQuantSettings, segment: Segment, lane: Int[Array, "..."], j: int
                  ) -> Int[Array, "..."]:
  """Scale/zero column of code position ``j`` of segment lane ``lane`` (past the stream on
  padding lanes, whose codes are 0 and weights 0)."""
  return lax.div((segment.word0 + lane) * settings.per_word + j, settings.group_size)


def stream_output(settings: XQuantSettings, out: Float[Array, "*batch per_word rows tile"]
                  ) -> Float[Array, "*batch rows value_width"]:
  """The value segment's (code position, lane) accumulators back in channel order, cut to the
  value channels."""
  segment = settings.value_segment
  begin = settings.value_channels[0] - segment.word0 * settings.per_word
  width = settings.value_channels[1] - settings.value_channels[0]
  out = jnp.moveaxis(out, -3, -1)  # [..., rows, tile, per_word]: lane-major = channel order
  return out.reshape(*out.shape[:-2], -1)[..., begin:begin + width]
