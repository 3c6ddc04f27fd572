"""Flash-decoding over XQuant's quantized stream with keys rematerialized in-kernel (Triton).

XQuant (Tomar et al. 2025) caches a per-token quantized stream ``Z`` (the layer input X, or its
SVD latents ``[X U_k, X U_v]``) instead of K/V; layout in :mod:`pallas_kernels.kv_decode.common`.
One program per (batch row, kv head, split) walks its share of the filled quantized slots
``block_slots`` (:class:`pallas_kernels.kv_decode.common.DecodeBlockSizes`) at a time and, per
block, in registers:

1. loads the packed words of the key segment (masked loads: the word tile is padded to a power
   of two and the last block may overrun the slots) and the per-token scales/zeros;
2. dequantizes code position ``j`` of every word (``(words >> bits * j) & mask``, a
   ``[slots, words]`` tile of channels ``word * 32 / bits + j``) and projects it on the matching
   rows of this kv head's ``C_k`` (permuted outside): a loop of ``32 / bits`` steps, two
   matmuls each, gives both RoPE halves of the keys, no lane gather;
3. rotates the keys at the slots' positions ``max(slot - start, 0)`` (the "rotate half" RoPE of
   ``effjax.nn.rope.apply_rope``; the inverse frequencies come from the caller), takes the logits
   with all ``seq * group`` query rows of the kv head (causal per query: the quantized slots may
   include the newest tokens when the window is short) and updates a float32 online softmax;
4. accumulates ``p @ Z_v``, the dequantized value stream (the same words when ``Z_v = Z_k``),
   ``32 / bits`` accumulators in the permuted order.

Each split writes its normalized stream output and natural-log LSE; outside, the splits and the
full-precision window are combined and ``C_v`` is applied once per head.

Why one kv head per program: a program per batch row holding every kv head would read the stream
once instead of ``kv_heads`` times, but Triton cannot slice a register tile by kv head, and the
projection work is the same either way (every kv head needs all ``width`` channels of the slot).
The ``kv_heads`` programs of one (row, split) walk the same slots at the same time, so their
repeated reads hit L2, and the grid has ``kv_heads`` times more programs to fill the SMs.

HBM bytes read per slot (SmolLM2, latent stream 2r = 384 channels, G = 64, per layer): 4-bit
192 + 24 (scales/zeros) = 216 bytes, 2-bit 120, vs 768 for float16 K/V of its 3 kv heads
(``2 * 3 * 64 * 2``) and 240 / 144 for KIVI-4 / KIVI-2 at G = 32; the codes are read once per
kv head from L2. The work is not: every slot is projected (``width * kv_heads * head_dim``
multiply-adds, 74k for SmolLM2's latents), which makes the kernel compute-bound where KIVI's is
bandwidth-bound; the float32 matmuls run at IEEE precision (no TF32) to match the XLA path.

Shared memory (Triton stages dot operands through it): the key projection is a loop over code
positions, not unrolled, because Triton hoists loop-invariant loads and their shared-memory
copies out of the slot loop (unrolled, all ``2 * 32 / bits`` weight tiles of ``C_k`` would be
resident at once). Looped, it takes about ``num_stages`` weight tiles plus one dequantized value
tile (:func:`_num_stages`), under :data:`pallas_kernels.kv_decode.common_gpu.SHARED_MEMORY_BUDGET`.
The weight tiles are re-read from L1/L2 every block.

Limits: ``head_dim / 2`` must be a power of two >= 16 (Triton tiles; else NotImplementedError).
Segment word tiles are padded to powers of two (lanes past the stream are masked loads, zero
weights). For a latent stream only the key words are projected and only the value words
accumulated; an unquantized (16-bit) stream is not served (the caller's XLA path is), nor a
key tile whose weights exceed the shared-memory budget (a 2048-wide X stream at head_dim 128:
NotImplementedError). Registers hold ``32 / bits`` accumulators of ``[rows, value tile]`` (a
576-wide X stream at 4 bits: 8 of ``[rows, 128]``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int, UInt32

from pallas_kernels.interpret import gpu_interpret
from pallas_kernels.kv_decode import common
from pallas_kernels.kv_decode.common_gpu import (
    MIN_TILE,
    SHARED_MEMORY_BUDGET,
    default_num_splits,
)
from pallas_kernels.shapes import next_power_of_two

_BLOCK_SLOTS = 32  # default slots per loop step
_WORD_BYTES = 4  # float32 weights and dequantized tiles, uint32 words
# What Triton allocates besides the weight and value tiles (measured with Triton and ptxas for
# sm_80 and sm_90).
_SCRATCH = 8 * 1024


def decode_partials(
    q: Float[Array, "batch seq heads head_dim"],
    codes: UInt32[Array, "batch slots words"],
    code_scale: Float[Array, "batch slots groups"],
    code_zero: Float[Array, "batch slots groups"],
    key_up: Float[Array, "key_width kv_heads head_dim"],
    inv_freq: Float[Array, "half"],
    start: Int[Array, "batch"],
    end: Int[Array, ""],
    length: Int[Array, ""],
    *,
    bits: int,
    group_size: int,
    key_channels: tuple[int, int],
    value_channels: tuple[int, int],
    scale: float,
    block_sizes: common.DecodeBlockSizes | None = None,
    interpret: bool | None = None,
) -> tuple[Float[Array, "batch splits seq heads value_width"],
           Float[Array, "batch splits seq heads"]]:
  """Per-split attention of ``q`` over the quantized stream slots ``[start[b], end)``, keys
  ``rope(Z_k C_k)`` rebuilt in-kernel, values the stream ``Z_v`` (layout:
  :mod:`pallas_kernels.kv_decode.common`).

  Args:
    q: queries of the last ``seq`` of ``length`` stored tokens (query ``i`` at slot
      ``length - seq + i`` sees slots up to its own).
    codes, code_scale, code_zero: the stream (``width = code_scale.shape[2] * group_size``
      channels).
    key_up: ``C_k``, the key projection of the key channels.
    inv_freq: RoPE inverse frequencies (``effjax.nn.rope.rope_frequencies``).
    start: each row's first real slot (keys rotate at ``slot - start``).
    end: the quantized slots' end; later slots (the full-precision window) are the caller's.
    length: filled slots.
    bits, group_size: the stream's code width and G.
    key_channels, value_channels: ``[begin, end)`` stream channels of ``Z_k`` and ``Z_v``.
    scale: logit scale.
    block_sizes: ``block_slots``, slots per loop step, a power of two >= 16 (None:
      :data:`_BLOCK_SLOTS`); ``num_splits`` (None:
      :func:`pallas_kernels.kv_decode.common_gpu.default_num_splits`).
    interpret: run in Pallas' interpreter; None follows ``pallas_kernels.interpret``.

  Returns:
    Each split's float32 normalized value-stream output and natural-log LSE (-inf, output 0:
    saw nothing). Memory: ``batch * kv_heads * splits * rows * (value tile * 32 / bits + 1)``
    float32 results; the cache is read in place.

  Raises:
    NotImplementedError: off a GPU and not interpreting, ``head_dim / 2`` not a power of two
      >= 16, or a key weight tile too large for the shared-memory budget (:func:`_num_stages`).
    ValueError: the arrays do not have XQuant's layout, or ``block_slots`` is not a power of two
      >= 16.
  """
  interpret = gpu_interpret(interpret)
  batch, head_dim = q.shape[0], q.shape[3]
  slots, kv_heads = codes.shape[1], key_up.shape[1]
  half = head_dim // 2
  if half < MIN_TILE or half & (half - 1):
    raise NotImplementedError(f"Triton XQuant decode kernel needs head_dim / 2 a power of two >= "
                              f"{MIN_TILE}, got head_dim={head_dim}")
  sizes = common.block_sizes_or_default(block_sizes)
  block = _BLOCK_SLOTS if sizes.block_slots is None else sizes.block_slots
  if block < MIN_TILE or block & (block - 1):
    raise ValueError(f"block_slots is {block}; expected a power of two >= {MIN_TILE}")
  num_splits = (default_num_splits(batch, kv_heads, slots, block) if sizes.num_splits is None
                else sizes.num_splits)
  settings = common.xquant_settings(
      q, codes, code_scale, code_zero, key_up, inv_freq, bits=bits, group_size=group_size,
      key_channels=key_channels, value_channels=value_channels, logit_scale=scale,
      num_splits=num_splits, tiles="pow2")
  return _decode_jit(settings, block, interpret, q, codes, code_scale, code_zero, key_up,
                     inv_freq, start, end, length)


def _num_stages(settings: common.XQuantSettings, block: int) -> int:
  """Pipelining depth of the key projection's loop that fits :data:`SHARED_MEMORY_BUDGET`.

  Triton stages each ``[key tile, head_dim / 2]`` weight tile ``W`` of the loop over code
  positions through shared memory, ``num_stages`` deep, and one ``[block, value tile]``
  dequantized value operand ``Z``: about ``num_stages * W + Z`` plus :data:`_SCRATCH`. 2 (the next
  weight tile loads under the current matmul) where that fits, else 1.

  Raises:
    NotImplementedError: a stream so wide that even one stage does not fit.
  """
  weight = settings.key_segment.tile * settings.head_dim // 2 * _WORD_BYTES
  value = block * settings.value_segment.tile * _WORD_BYTES
  for stages in (2, 1):
    if stages * weight + value + _SCRATCH <= SHARED_MEMORY_BUDGET:
      return stages
  raise NotImplementedError(
      f"Triton XQuant decode kernel: a {settings.key_segment.tile}-word key tile at head_dim "
      f"{settings.head_dim} needs more than {SHARED_MEMORY_BUDGET} bytes of shared memory")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode_jit(settings: common.XQuantSettings, block: int, interpret: bool, q, codes,
                code_scale, code_zero, key_up, inv_freq, start, end, length):
  batch, slots = codes.shape[:2]
  kv_heads = key_up.shape[1]
  half, per_word, splits = settings.head_dim // 2, settings.per_word, settings.num_splits
  rows = next_power_of_two(settings.rows, MIN_TILE)
  tile = settings.value_segment.tile
  queries = common.split_queries(q, kv_heads, settings.scale, rows)
  weights = common.key_weights(settings, key_up)
  # Per row: start, end, length and the two segments' first words (read at run time: a static
  # slice start would be checked against the codes' width, which the padded tiles overrun).
  bounds = jnp.stack([start.astype(jnp.int32)] + [
      jnp.broadcast_to(jnp.asarray(x, jnp.int32), (batch,))
      for x in (end, length, settings.key_segment.word0, settings.value_segment.word0)], axis=1)
  stream_spec = lambda array: pl.BlockSpec((None, slots, array.shape[2]),
                                           lambda b, h, s: (b, 0, 0))
  out, lse = pl.pallas_call(
      functools.partial(_kernel, settings, block),
      grid=(batch, kv_heads, splits),
      in_specs=[pl.BlockSpec((None, None, 2, rows, half), lambda b, h, s: (b, h, 0, 0, 0)),
                stream_spec(codes), stream_spec(code_scale), stream_spec(code_zero),
                pl.BlockSpec((None, *weights.shape[1:]), lambda b, h, s: (h, 0, 0, 0, 0)),
                pl.BlockSpec((1, half), lambda b, h, s: (0, 0)),
                pl.BlockSpec((None, 5), lambda b, h, s: (b, 0))],
      out_specs=[pl.BlockSpec((None, None, None, per_word, rows, tile),
                              lambda b, h, s: (b, h, s, 0, 0, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0))],
      out_shape=[jax.ShapeDtypeStruct((batch, kv_heads, splits, per_word, rows, tile),
                                      jnp.float32),
                 jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=_num_stages(settings, block)),
      interpret=interpret,
      name="xquant_decode",
  )(queries, codes, code_scale, code_zero, weights,
    inv_freq.reshape(1, half).astype(jnp.float32), bounds)
  return common.ungroup(settings, common.stream_output(settings, out), lse)


def _kernel(settings: common.XQuantSettings, block: int, q_ref, codes_ref, scale_ref, zero_ref,
            w_ref, f_ref, bounds_ref, o_ref, lse_ref):
  """One (row, kv head, split): online softmax over its share of the filled slot blocks."""
  splits, per_word = settings.num_splits, settings.per_word
  first, end, length = bounds_ref[0], bounds_ref[1], bounds_ref[2]
  lo = first // block
  hi = jnp.maximum((end + block - 1) // block, lo)
  per_split = (hi - lo + splits - 1) // splits
  begin = lo + pl.program_id(2) * per_split
  stop = jnp.minimum(begin + per_split, hi)
  q_lo, q_hi, inv_freq = q_ref[0], q_ref[1], f_ref[...]
  rows = q_lo.shape[0]
  row = lax.broadcasted_iota(jnp.int32, (rows, block), 0)
  key_segment, value_segment = settings.key_segment, settings.value_segment

  def step(i, carry):
    m, l, acc = carry
    slot = i * block + lax.broadcasted_iota(jnp.int32, (block,), 0)
    stream = _Block(settings, codes_ref, scale_ref, zero_ref, i * block, block,
                    (slot >= first) & (slot < end),
                    {key_segment: bounds_ref[3], value_segment: bounds_ref[4]})

    def project(j, k):  # a loop, not unrolled: one weight tile in shared memory at a time
      z = stream.dequantize(key_segment, j)
      return k[0] + common.dot(z, w_ref[0, j]), k[1] + common.dot(z, w_ref[1, j])

    k_lo, k_hi = lax.fori_loop(0, per_word, project,
                               (jnp.zeros((block, settings.head_dim // 2), jnp.float32),) * 2)
    angles = jnp.maximum(slot - first, 0).astype(jnp.float32)[:, None] * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    logits = (common.dot(q_lo, k_lo * cos - k_hi * sin, trans_b=True)
              + common.dot(q_hi, k_hi * cos + k_lo * sin, trans_b=True))
    visible = common.visible_to_rows(slot[None, :], row, first, end, length - settings.seq,
                                     settings.group)
    logits = jnp.where(visible, logits, -jnp.inf)
    m_new = jnp.maximum(m, logits.max(axis=1))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen nothing stay at 0
    p = jnp.exp(logits - shift[:, None])
    rescale = jnp.exp(m - shift)
    acc = tuple(rescale[:, None] * acc[j] + common.dot(p, stream.dequantize(value_segment, j))
                for j in range(per_word))
    return m_new, rescale * l + p.sum(axis=1), acc

  init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
          (jnp.zeros((rows, value_segment.tile), jnp.float32),) * per_word)
  m, l, acc = lax.fori_loop(begin, stop, step, init)
  seen = l > 0
  l = jnp.where(seen, l, 1.0)
  for j in range(per_word):
    o_ref[j] = acc[j] / l[:, None]
  lse_ref[...] = jnp.where(seen, m + jnp.log(l), -jnp.inf)


class _Block:
  """One block of ``size`` slots of the stream: each segment's words (and, when every code
  position shares its word's scale layout, their float32 scales and zeros) loaded once, before
  the key projection's loop over code positions; dequantized per (segment, code position)."""

  def __init__(self, settings, codes_ref, scale_ref, zero_ref, t0, size, valid, word0):
    self.settings, self.refs, self.t0 = settings, (codes_ref, scale_ref, zero_ref), t0
    self.size = size
    self.valid = valid[:, None]  # [slots, 1]: in [start, end)
    self.in_cache = (t0 + lax.broadcasted_iota(jnp.int32, (size,), 0)) < codes_ref.shape[0]
    self.words = {segment: self._load_words(segment, first)  # segment -> [slots, tile] uint32
                  for segment, first in word0.items()}
    self.shared_affine = ({segment: self._affine(segment, 0) for segment in word0}
                          if settings.scale_variant(1) == 0 else None)

  def _load_words(self, segment: common.Segment, first):
    """The segment's ``[slots, tile]`` words from its traced first word ``first``."""
    lane = lax.broadcasted_iota(jnp.int32, (1, segment.tile), 1)
    return plgpu.load(self.refs[0].at[pl.ds(self.t0, self.size), pl.ds(first, segment.tile)],
                      mask=self.in_cache[:, None] & (lane < segment.words), other=0)

  def _affine(self, segment: common.Segment, j):
    """float32 ``[slots, tile]`` scale and zero of code position ``j``'s channels (``j`` static
    or traced): one masked column load and select per scale column (Triton has no lane
    gather)."""
    lane = lax.broadcasted_iota(jnp.int32, (self.size, segment.tile), 1)
    column_of_lane = common.group_of_lane(self.settings, segment, lane, j)
    return tuple(self._columns(ref, column_of_lane) for ref in self.refs[1:])

  def _columns(self, ref, column_of_lane):
    out = jnp.zeros(column_of_lane.shape, jnp.float32)
    for column in range(ref.shape[1]):
      values = plgpu.load(ref.at[pl.ds(self.t0, self.size), pl.ds(column, 1)],
                          mask=self.in_cache[:, None], other=0).astype(jnp.float32)
      out = jnp.where(column_of_lane == column, values, out)
    return out

  def dequantize(self, segment: common.Segment, j):
    """float32 ``[slots, tile]`` values of code position ``j`` (static or traced) of the
    segment's words; 0 on slots outside ``[start, end)`` (0 * garbage stays 0) and on lanes past
    the stream."""
    bits = self.settings.bits
    codes = (self.words[segment] >> jnp.asarray(bits * j, jnp.uint32)) & jnp.uint32(
        (1 << bits) - 1)
    scale, zero = (self._affine(segment, j) if self.shared_affine is None
                   else self.shared_affine[segment])
    return jnp.where(self.valid, codes.astype(jnp.int32).astype(jnp.float32) * scale + zero, 0.0)
