"""FlashAttention-2 in pure JAX: blockwise online softmax with a recomputing ``custom_vjp``.

Forward (Dao 2023, Algorithm 1): a ``lax.scan`` over query blocks; for each, a loop over the key
blocks it can see keeps float32 running statistics (row max ``m``, row sum ``l``, unnormalized
output ``acc``) and rescales them as new blocks arrive. Only the output and the per-query
log-sum-exp are stored.

Backward (Algorithm 2): a ``lax.scan`` over key blocks; for each, a loop over the query blocks
that can see it recomputes ``P = exp(S - LSE)`` block by block and accumulates
``dV += P^T dO``, ``dS = P * (dP - D)`` with ``D = rowsum(dO * O) - dLSE``,
``dK += dS^T Q`` and ``dQ += dS K`` (dQ is one float32 buffer updated in place, in a fixed order,
so the backward is deterministic). The LSE cotangent folds into ``D``, since
``d LSE / d S = P``.

Memory: no ``[q_len, kv_len]`` buffer exists in either pass; beyond O((q_len + kv_len) * head_dim)
copies and accumulators, only a few ``[batch, heads, block_q, block_kv]`` float32 blocks live at
once. Block skipping: the causal/window band gives, for each query block, the contiguous range of
key blocks that intersect it (and the transpose for the backward), so loops run only over those
blocks: with ``n`` blocks per side a causal pass computes ``(n + 1) / (2n)`` of the blocks, a
sliding window O(n) of them. With segment ids, a block whose mask is empty for the whole batch is
skipped at run time with ``lax.cond`` (under ``vmap`` it becomes a select and computes anyway).
Forward-mode autodiff (``jax.jvp``) is not supported, as for any ``custom_vjp``.

The loops are sequential over blocks (each block is a batched matmul over batch and heads): this
is the portable fallback, not a replacement for the Pallas kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels import shapes
from pallas_kernels.flash_attention import masks
from pallas_kernels.flash_attention.residuals import tag_residuals

# Block-size heuristic: blocks of up to _MAX_BLOCK positions, halved (down to _MIN_BLOCK) until
# one block of float32 logits over batch * heads fits in _BLOCK_ELEMENTS elements (16 MiB).
# 256 rather than 512: on CPU (B=1, H=8, D=128, f32, fwd+bwd vs jax.nn.dot_product_attention),
# causal S=512 runs at 0.93x with 256-blocks vs 1.32x with one 512-block (a causal band skips a
# quarter of 2x2 blocks, none of 1x1), and 0.42x vs 0.55x at S=2048; non-causal is level.
_MAX_BLOCK = 256
_MIN_BLOCK = 64
_BLOCK_ELEMENTS = 1 << 22
_ALIGN = 8


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call (hashable: it is a ``jit`` static argument)."""
  mask: masks.MaskSpec
  scale: float
  softcap: float | None
  block_q: int
  block_kv: int


def attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads v_head_dim"],
    *,
    causal: bool = False,
    q_segment_ids: Int[Array, "batch q_len"] | None = None,
    kv_segment_ids: Int[Array, "batch kv_len"] | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    scale: float,
    return_lse: bool = False,
    block_sizes: tuple[int, int] | None = None,
) -> (Float[Array, "batch q_len heads v_head_dim"]
      | tuple[Float[Array, "batch q_len heads v_head_dim"], Float[Array, "batch heads q_len"]]):
  """O(N)-memory exact attention; arguments as validated by ``flash_attention``.

  Args:
    q, k, v, causal, q_segment_ids, kv_segment_ids, window, softcap, scale, return_lse: see
      ``effjax.ops.attention.flash_attention`` (``scale`` already resolved to a float).
    block_sizes: ``(block_q, block_kv)``, each capped at its length; default from
      :func:`default_block_sizes`. Lengths need not be multiples: the last block is zero-padded
      and masked.

  Returns:
    The output in q's dtype, and with ``return_lse`` the float32 LSE ``[batch, heads, q_len]``.
  """
  config = _config(q, k, causal, window, softcap, scale, block_sizes)
  out, lse = _attention_jit(config, q, k, v, q_segment_ids, kv_segment_ids)
  return (out, lse) if return_lse else out


def attention_backward(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads v_head_dim"],
    lse: Float[Array, "batch heads q_len"],
    d_out: Float[Array, "batch q_len heads v_head_dim"],
    delta: Float[Array, "batch heads q_len"],
    *,
    causal: bool = False,
    q_segment_ids: Int[Array, "batch q_len"] | None = None,
    kv_segment_ids: Int[Array, "batch kv_len"] | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    scale: float,
    block_sizes: tuple[int, int] | None = None,
) -> tuple[Array, Array, Array]:
  """``(dq, dk, dv)`` from the LSE and ``delta``: FlashAttention-2's backward, without a forward.

  ``delta = rowsum(d_out * out) - d_lse`` (:func:`softmax_delta`). ``lse`` and ``delta`` need not
  come from these keys alone: when they are the statistics of a longer key sequence of which
  ``k``/``v`` is one block (ring attention), the result is exactly this block's share of the full
  gradient, since ``P = exp(S - lse)`` and ``delta`` are the full attention's; the output itself
  is not needed. Arguments as :func:`attention`.
  """
  config = _config(q, k, causal, window, softcap, scale, block_sizes)
  return _backward_from_delta(config, q, k, v, q_segment_ids, kv_segment_ids, lse, d_out, delta)


def softmax_delta(out: Float[Array, "batch q_len heads v_head_dim"],
                  d_out: Float[Array, "batch q_len heads v_head_dim"],
                  d_lse: Float[Array, "batch heads q_len"]) -> Float[Array, "batch heads q_len"]:
  """``rowsum(d_out * out) - d_lse`` in float32: the backward's per-query statistic ``D``."""
  return jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32)) - d_lse


def _config(q, k, causal, window, softcap, scale, block_sizes) -> _Config:
  batch, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  block_q, block_kv = (default_block_sizes(q_len, kv_len, batch * heads) if block_sizes is None
                       else _check_block_sizes(block_sizes))
  return _Config(masks.MaskSpec.create(q_len, kv_len, causal=causal, window=window),
                 scale, softcap, min(block_q, q_len), min(block_kv, kv_len))


def default_block_sizes(q_len: int, kv_len: int, batch_heads: int) -> tuple[int, int]:
  """The block-size heuristic: ``(block_q, block_kv)`` for these lengths.

  The target block shrinks from 256 (by halving, not below 64) until one float32 block of
  logits across ``batch_heads`` fits in 16 MiB. Each length is then cut into
  ``ceil(length / target)`` near-equal blocks rounded up to a multiple of 8 (a length that fits
  in one block is used as is), so padding stays under 8 rows per block.
  """
  target = _MAX_BLOCK
  while target > _MIN_BLOCK and batch_heads * target * target > _BLOCK_ELEMENTS:
    target //= 2
  return _fit_block(q_len, target), _fit_block(kv_len, target)


def _fit_block(length: int, target: int) -> int:
  """``length`` itself if it fits in ``target``, else near-equal blocks of a multiple of 8."""
  if length <= target:
    return length
  return shapes.balanced_block(length, target, _ALIGN)


def _check_block_sizes(block_sizes: Sequence[int]) -> tuple[int, int]:
  if (len(block_sizes) != 2
      or not all(isinstance(size, int) and not isinstance(size, bool) and size > 0
                 for size in block_sizes)):
    raise ValueError(f"block_sizes must be a pair of positive ints, got {block_sizes!r}")
  return tuple(block_sizes)


# ---------------------------------------------------------------------------------------------
# custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config: _Config, q, k, v, q_segment_ids, kv_segment_ids):
  return _forward(config, q, k, v, q_segment_ids, kv_segment_ids)


def _attention_fwd(config: _Config, q, k, v, q_segment_ids, kv_segment_ids):
  out, lse = tag_residuals(*_forward(config, q, k, v, q_segment_ids, kv_segment_ids))
  return (out, lse), (q, k, v, q_segment_ids, kv_segment_ids, out, lse)


def _attention_bwd(config: _Config, residuals, cotangents):
  return (*_backward(config, residuals, cotangents), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)
_attention_jit = jax.jit(_attention, static_argnums=0)


# ---------------------------------------------------------------------------------------------
# Forward


def _forward(config: _Config, q, k, v, q_segment_ids, kv_segment_ids):
  """Returns the output ``[b, q_len, h, dv]`` (q's dtype) and the LSE ``[b, h, q_len]`` (f32)."""
  layout = _Layout.of(config, q, k)
  qt = layout.queries(q)
  kt, vt = layout.keys(k), layout.keys(v)
  segments = layout.segments(q_segment_ids, kv_segment_ids)

  def q_block(_, i):
    q_i = _block(qt, i, config.block_q)
    init = (jnp.full(q_i.shape[:-1], -jnp.inf, jnp.float32),
            jnp.zeros(q_i.shape[:-1], jnp.float32),
            jnp.zeros((*q_i.shape[:-1], vt.shape[-1]), jnp.float32))

    def kv_step(j, carry):
      mask = _block_mask(config, i, j, segments)
      update = functools.partial(_online_softmax_update, config, mask, q_i,
                                 _block(kt, j, config.block_kv, axis=2),
                                 _block(vt, j, config.block_kv, axis=2))
      return _unless_empty(mask, segments, update, carry)

    start, stop = _block_range(config.mask.kv_range, i, config.block_q, config.block_kv)
    m, l, acc = lax.fori_loop(start, stop, kv_step, init)
    out, lse = _normalize(m, l, acc)
    return None, (out.astype(q.dtype), lse)

  _, (out, lse) = lax.scan(q_block, None, jnp.arange(layout.q_blocks))
  return layout.unblock_output(out), layout.unblock_lse(lse)


def _online_softmax_update(config: _Config, mask, q_i, k_j, v_j, carry):
  """Folds one key block into the running ``(max, sum, unnormalized output)`` of a query block."""
  m, l, acc = carry
  (q_i,), (k_j, v_j) = _zero_unseen(mask, (q_i,), (k_j, v_j))
  logits, _ = _logits(config, q_i, k_j, mask)
  m_new = jnp.maximum(m, logits.max(-1))
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row that has seen nothing yet stays 0
  p = jnp.exp(logits - shift[..., None])
  rescale = jnp.exp(m - shift)
  l = rescale * l + p.sum(-1)
  acc = rescale[..., None] * acc + jnp.einsum(
      "bhgqk,bhkd->bhgqd", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
  return m_new, l, acc


def _normalize(m, l, acc):
  """``acc / l`` and ``m + log(l)``; rows that saw no key give 0 and -inf."""
  seen = l > 0
  l = jnp.where(seen, l, 1.0)
  return acc / l[..., None], jnp.where(seen, m + jnp.log(l), -jnp.inf)


# ---------------------------------------------------------------------------------------------
# Backward


def _backward(config: _Config, residuals, cotangents):
  """Returns ``(dq, dk, dv)`` in the dtypes of ``(q, k, v)``; dk/dv summed over GQA groups."""
  q, k, v, q_segment_ids, kv_segment_ids, out, lse = residuals
  d_out, d_lse = cotangents
  return _backward_from_delta(config, q, k, v, q_segment_ids, kv_segment_ids, lse, d_out,
                              softmax_delta(out, d_out, d_lse))


def _backward_from_delta(config: _Config, q, k, v, q_segment_ids, kv_segment_ids, lse, d_out,
                         delta):
  layout = _Layout.of(config, q, k)
  qt, d_out_t = layout.queries(q), layout.queries(d_out)
  kt, vt = layout.keys(k), layout.keys(v)
  segments = layout.segments(q_segment_ids, kv_segment_ids)
  delta_t = layout.query_stats(delta)
  lse_t = layout.query_stats(jnp.where(lse == -jnp.inf, 0.0, lse))  # those rows are all masked

  def kv_block(dq, j):
    k_j, v_j = _block(kt, j, config.block_kv, axis=2), _block(vt, j, config.block_kv, axis=2)

    def q_step(i, carry):
      mask = _block_mask(config, i, j, segments)
      rows = tuple(_block(x, i, config.block_q) for x in (qt, d_out_t, lse_t, delta_t))
      update = functools.partial(_gradient_update, config, mask, i, rows, k_j, v_j)
      return _unless_empty(mask, segments, update, carry)

    init = (jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32), dq)
    start, stop = _block_range(config.mask.q_range, j, config.block_kv, config.block_q)
    dk, dv, dq = lax.fori_loop(start, stop, q_step, init)
    return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq = jnp.zeros(qt.shape, jnp.float32)
  dq, (dk, dv) = lax.scan(kv_block, dq, jnp.arange(layout.kv_blocks))
  return (layout.unblock_queries(dq).astype(q.dtype), layout.unblock_keys(dk),
          layout.unblock_keys(dv))


def _gradient_update(config: _Config, mask, i, rows, k_j, v_j, carry):
  """Adds one (query block, key block) pair's contribution to ``(dk_j, dv_j, dq)``."""
  dk, dv, dq = carry
  q_i, d_out_i, lse_i, delta_i = rows
  (q_i, d_out_i), (k_j, v_j) = _zero_unseen(mask, (q_i, d_out_i), (k_j, v_j))
  logits, tanh = _logits(config, q_i, k_j, mask)
  p = jnp.exp(logits - lse_i[..., None])  # masked logits are -inf, so p is 0 there
  dv += jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(v_j.dtype), d_out_i,
                   preferred_element_type=jnp.float32)
  dp = jnp.einsum("bhgqd,bhkd->bhgqk", d_out_i, v_j, preferred_element_type=jnp.float32)
  ds = p * (dp - delta_i[..., None])
  if tanh is not None:
    ds *= 1.0 - tanh * tanh
  ds = (ds * config.scale).astype(q_i.dtype)
  dk += jnp.einsum("bhgqk,bhgqd->bhkd", ds, q_i, preferred_element_type=jnp.float32)
  dq_i = jnp.einsum("bhgqk,bhkd->bhgqd", ds, k_j, preferred_element_type=jnp.float32)
  dq = lax.dynamic_update_slice_in_dim(dq, _block(dq, i, config.block_q) + dq_i,
                                       i * config.block_q, axis=3)
  return dk, dv, dq


# ---------------------------------------------------------------------------------------------
# Shared by both passes


def _logits(config: _Config, q_i, k_j, mask):
  """Scaled (soft-capped) float32 logits of a block, -inf where masked; also ``tanh`` or None."""
  logits = jnp.einsum("bhgqd,bhkd->bhgqk", q_i, k_j,
                      preferred_element_type=jnp.float32) * config.scale
  tanh = None
  if config.softcap is not None:
    tanh = jnp.tanh(logits / config.softcap)
    logits = config.softcap * tanh
  return jnp.where(mask, logits, -jnp.inf), tanh


def _block_mask(config: _Config, i, j, segments) -> Bool[Array, "batch_or_1 1 1 bq bk"]:
  """The mask of query block ``i`` against key block ``j``, broadcastable to their logits."""
  q_pos = i * config.block_q + jnp.arange(config.block_q)
  kv_pos = j * config.block_kv + jnp.arange(config.block_kv)
  ids = () if segments is None else (_block(segments[0], i, config.block_q, axis=1),
                                     _block(segments[1], j, config.block_kv, axis=1))
  return masks.attention_mask(config.mask, q_pos, kv_pos, *ids)[:, None, None]


def _zero_unseen(mask, q_rows: Sequence[Array], kv_rows: Sequence[Array]):
  """Zeroes query rows that see no key of the block, and key rows that no query of it sees.

  Garbage (even NaN) in masked positions then cannot reach the matmuls, where ``0 * NaN`` would
  otherwise spread it to every row of the block.
  """
  q_seen = mask.any(4, keepdims=True)  # [b, 1, 1, bq, 1]
  kv_seen = mask.any(3)[:, :, 0, :, None]  # [b, 1, bk, 1]
  return (tuple(jnp.where(q_seen, x, 0) for x in q_rows),
          tuple(jnp.where(kv_seen, x, 0) for x in kv_rows))


def _unless_empty(mask, segments, update: Callable[[Any], Any], carry):
  """``update(carry)``, skipped at run time if segment ids mask the whole block.

  Without segment ids every block in the loop range intersects the band, so there is no test.
  """
  if segments is None:
    return update(carry)
  return lax.cond(mask.any(), update, lambda unchanged: unchanged, carry)


def _block_range(positions_seen, index, block, other_block):
  """The half-open range of ``other_block``-sized blocks that block ``index`` interacts with."""
  start, stop = positions_seen(index * block, (index + 1) * block)
  first = start // other_block
  return first, jnp.maximum(shapes.cdiv(stop, other_block), first)


def _block(x, index, size: int, axis: int = 3):
  """Block ``index`` of ``size`` positions along ``axis``."""
  return lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Moves arrays between the public ``[b, s, h, d]`` layout and the blocked kernel layout.

  Inside the loops, queries are ``[b, kv_heads, group, q_pad, d]`` (the GQA group is its own axis,
  so K/V are never repeated) and keys/values ``[b, kv_heads, kv_pad, d]``, padded with zeros to
  whole blocks.
  """
  batch: int
  q_len: int
  kv_len: int
  kv_heads: int
  group: int
  q_blocks: int
  kv_blocks: int
  block_q: int
  block_kv: int

  @classmethod
  def of(cls, config: _Config, q, k) -> _Layout:
    batch, q_len, heads, _ = q.shape
    kv_len, kv_heads = k.shape[1:3]
    return cls(batch, q_len, kv_len, kv_heads, heads // kv_heads,
               shapes.cdiv(q_len, config.block_q), shapes.cdiv(kv_len, config.block_kv),
               config.block_q, config.block_kv)

  @property
  def q_pad(self) -> int:
    return self.q_blocks * self.block_q

  @property
  def kv_pad(self) -> int:
    return self.kv_blocks * self.block_kv

  def queries(self, x):
    """``[b, q_len, h, d] -> [b, kv_heads, group, q_pad, d]``."""
    x = shapes.pad_axis(x, 1, self.q_pad)
    x = x.reshape(self.batch, self.q_pad, self.kv_heads, self.group, x.shape[-1])
    return x.transpose(0, 2, 3, 1, 4)

  def keys(self, x):
    """``[b, kv_len, kv_heads, d] -> [b, kv_heads, kv_pad, d]``."""
    return shapes.pad_axis(x, 1, self.kv_pad).transpose(0, 2, 1, 3)

  def query_stats(self, x):
    """``[b, h, q_len] -> [b, kv_heads, group, q_pad]``."""
    x = shapes.pad_axis(x, 2, self.q_pad)
    return x.reshape(self.batch, self.kv_heads, self.group, self.q_pad)

  def segments(self, q_segment_ids, kv_segment_ids):
    """Segment ids padded to whole blocks, or None."""
    if q_segment_ids is None:
      return None
    return (shapes.pad_axis(q_segment_ids, 1, self.q_pad),
            shapes.pad_axis(kv_segment_ids, 1, self.kv_pad))

  def unblock_output(self, x):
    """Per-block outputs ``[q_blocks, b, kv_heads, group, block_q, dv] -> [b, q_len, h, dv]``."""
    x = x.transpose(1, 0, 4, 2, 3, 5)
    return x.reshape(self.batch, self.q_pad, -1, x.shape[-1])[:, :self.q_len]

  def unblock_lse(self, x):
    """Per-block LSE ``[q_blocks, b, kv_heads, group, block_q] -> [b, h, q_len]``."""
    x = x.transpose(1, 2, 3, 0, 4)
    return x.reshape(self.batch, self.kv_heads * self.group, self.q_pad)[..., :self.q_len]

  def unblock_queries(self, x):
    """``[b, kv_heads, group, q_pad, d] -> [b, q_len, h, d]`` (the inverse of ``queries``)."""
    x = x.transpose(0, 3, 1, 2, 4)
    return x.reshape(self.batch, self.q_pad, -1, x.shape[-1])[:, :self.q_len]

  def unblock_keys(self, x):
    """Per-block ``[kv_blocks, b, kv_heads, block_kv, d] -> [b, kv_len, kv_heads, d]``."""
    x = x.transpose(1, 0, 3, 2, 4)
    return x.reshape(self.batch, self.kv_pad, self.kv_heads, x.shape[-1])[:, :self.kv_len]
