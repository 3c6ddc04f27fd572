"""Decode attention over a cache read block by block: the quantized caches' XLA path.

A quantized cache cannot hand attention one full-precision K/V array without materializing a
float32 copy of the whole cache (what HF's QuantizedCache does every step). Instead
:func:`blockwise_decode_attention` takes a ``load_block`` that dequantizes ``block_size`` slots at
a time, plus a short full-precision "tail" (the caches' residual windows); softmax is accumulated
online over the blocks and the tail (FlashAttention's running max / sum / output, combined in
float32), GQA-aware: query head ``h`` reads kv head ``h // (heads // kv_heads)`` and K/V are never
repeated. The values may also be one stream shared by every kv head (XQuant: the weighted sum of
the cached layer input, projected by ``C_v`` afterwards); the tail is optional.

Memory: one dequantized block (``2 * batch * block_size * kv_heads * head_dim`` float32), its
logits (``batch * heads * seq * block_size`` float32) and the tail; never O(cache) in float32.
Work: the number of blocks is a traced count (a ``while`` loop), so only filled blocks are read.

:func:`kivi`, :func:`vidkv` and :func:`xquant` are the ``"xla"`` implementations of the ops
``"kivi_decode"``, ``"vidkv_decode"`` and ``"xquant_decode"`` (:mod:`effjax.ops.kv_decode.api`);
:func:`combine_with_tail` and the ``*_tail`` helpers serve the Pallas implementations too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels.kv_decode import common

if TYPE_CHECKING:
  from effjax.kv_cache import KIVICache, LayerInputs, VidKVCache, XQuantCache
  from effjax.kv_cache.xquant import CrossLayerCarry

_Carry = tuple[jax.Array, jax.Array, jax.Array]  # running max, sum, output (unnormalized)
Tail = dict[str, jax.Array]  # tail_slots, tail_k, tail_v (empty: no tail)


def _visible(slots: jax.Array, start: jax.Array, last_visible: jax.Array) -> jax.Array:
  """``[batch, seq, T]``: slot is a real token (>= start) no later than the query's own slot."""
  return ((slots[None, None, :] >= start[:, None, None])
          & (slots[None, None, :] <= last_visible[None, :, None]))


def _update(carry: _Carry, q: jax.Array, k: jax.Array, v: jax.Array,
            visible: Bool[Array, "batch seq T"]) -> _Carry:
  """Folds one block into the online softmax: keys ``[batch, T, kv_heads, head_dim]``, values
  ``[batch, T, kv_heads, dim]`` (per kv head) or ``[batch, T, dim]`` (one stream every kv head
  reads, as XQuant's value stream before its projection)."""
  m, l, acc = carry
  logits = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
  shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row that saw nothing yet stays at 0
  p = jnp.exp(logits - shift[..., None])
  correction = jnp.exp(m - shift)
  l = l * correction + jnp.sum(p, axis=-1)
  seen = jnp.any(visible, axis=1)  # [batch, T]
  v = jnp.where(seen.reshape(*seen.shape, *(1,) * (v.ndim - 2)), v, 0.0)  # 0 * garbage stays 0
  mix = "bkgst,btkd->bkgsd" if v.ndim == 4 else "bkgst,btd->bkgsd"
  acc = acc * correction[..., None] + jnp.einsum(mix, p, v, preferred_element_type=jnp.float32)
  return m_new, l, acc


def _initial(q: jax.Array, kv_heads: int, dim: int, scale: float) -> tuple[jax.Array, _Carry]:
  """Scaled float32 queries grouped ``[batch, seq, kv_heads, group, head_dim]`` and the empty
  online-softmax carry."""
  batch, seq, heads, head_dim = q.shape
  grouped = (q.astype(jnp.float32) * scale).reshape(batch, seq, kv_heads, heads // kv_heads,
                                                    head_dim)
  shape = (batch, kv_heads, heads // kv_heads, seq)
  return grouped, (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros((*shape, dim)))


def blockwise_decode_attention(
    q: Float[Array, "batch seq heads head_dim"], *,
    load_block: Callable[[jax.Array], tuple[jax.Array, jax.Array]], block_size: int,
    prefix_end: Int[Array, ""], start: Int[Array, "batch"], length: Int[Array, ""], scale: float,
    tail_slots: Int[Array, "tail"] | None = None,
    tail_k: Float[Array, "batch tail kv_heads head_dim"] | None = None,
    tail_v: Float[Array, "batch tail kv_heads dim"] | Float[Array, "batch tail dim"] | None = None,
) -> Float[Array, "batch seq heads dim"]:
  """Attention of the last ``seq`` tokens' queries over slots ``[0, prefix_end)`` + the tail.

  Args:
    q: queries of the last ``seq`` stored tokens (query ``i`` sits at slot ``length - seq + i``).
    load_block: ``j0 -> (k, v)``, float32 keys ``[batch, block_size, kv_heads, head_dim]`` and
      values ``[batch, block_size, kv_heads, dim]``, or ``[batch, block_size, dim]`` for one value
      stream shared by every kv head (XQuant), of the (dequantized) slots
      ``[j0, j0 + block_size)``; called for ``j0 = 0, block_size, ...`` below ``prefix_end``
      only. Slots at or past ``prefix_end`` are masked out.
    block_size: slots per block.
    prefix_end: traced end of the block-read region.
    start: each row's first real slot; earlier slots are never attended to.
    length: number of filled slots.
    scale: logit scale.
    tail_slots: the slots of the tail rows (``>= prefix_end``; slots ``>= length`` are masked);
      None: no tail.
    tail_k, tail_v: keys/values of those slots, laid out as ``load_block``'s.

  Returns:
    float32 ``softmax(q k^T * scale) v`` with the causal, bottom-right aligned mask of
    :meth:`effjax.kv_cache.KVCache.attend`; a query that sees no slot gets 0. Shared values
    give query head ``h`` its kv head's weighted sum of the stream, ``[batch, seq, heads, dim]``.
  """
  batch, seq, heads, _ = q.shape
  k0, v0 = jax.eval_shape(load_block, jnp.zeros((), jnp.int32))
  grouped, carry = _initial(q, k0.shape[2], v0.shape[-1], scale)
  last_visible = length - seq + jnp.arange(seq)

  def body(index, carry):
    j0 = index * block_size
    k, v = load_block(j0)
    slots = j0 + jnp.arange(block_size)
    visible = _visible(slots, start, last_visible) & (slots < prefix_end)[None, None, :]
    return _update(carry, grouped, k, v, visible)

  num_blocks = (prefix_end + block_size - 1) // block_size
  m, l, acc = lax.fori_loop(0, num_blocks, body, carry)
  if tail_slots is not None:
    m, l, acc = _update((m, l, acc), grouped, tail_k.astype(jnp.float32),
                        tail_v.astype(jnp.float32), _visible(tail_slots, start, last_visible))
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [batch, kv_heads, group, seq, dim]
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads, -1)


def combine_with_tail(
    q: Float[Array, "batch seq heads head_dim"], out: Float[Array, "batch splits seq heads dim"],
    lse: Float[Array, "batch splits seq heads"], *, scale: float, start: Int[Array, "batch"],
    length: Int[Array, ""], tail_slots: Int[Array, "tail"] | None = None,
    tail_k: Float[Array, "batch tail kv_heads head_dim"] | None = None,
    tail_v: Float[Array, "batch tail kv_heads dim"] | Float[Array, "batch tail dim"] | None = None,
) -> Float[Array, "batch seq heads dim"]:
  """A decode kernel's per-split partials combined with the full-precision tail's attention.

  Args:
    q: the queries (of the last ``seq`` stored tokens), as :func:`blockwise_decode_attention`.
    out, lse: each split's normalized float32 output and natural-log LSE (-inf: saw nothing).
    scale, start, length: as :func:`blockwise_decode_attention`.
    tail_slots, tail_k, tail_v: the tail (causally masked here), as
      :func:`blockwise_decode_attention`; None: no tail.

  Returns:
    float32 attention over the union of the splits and the tail (0 where nothing was seen).
    Memory: the tail's logits and one more partial, ``batch * seq * heads * (dim + 1)`` float32.
  """
  parts_out, parts_lse = out.transpose(0, 2, 3, 1, 4), lse.transpose(0, 2, 3, 1)
  if tail_slots is not None:
    batch, seq, heads, _ = q.shape
    grouped, carry = _initial(q, tail_k.shape[2], parts_out.shape[-1], scale)
    m, l, acc = _update(carry, grouped, tail_k.astype(jnp.float32), tail_v.astype(jnp.float32),
                        _visible(tail_slots, start, length - seq + jnp.arange(seq)))
    seen = l > 0
    tail_out = (acc / jnp.where(seen, l, 1.0)[..., None]).transpose(0, 3, 1, 2, 4)
    tail_lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    parts_out = jnp.concatenate([parts_out, tail_out.reshape(batch, seq, heads, 1, -1)], axis=3)
    parts_lse = jnp.concatenate(
        [parts_lse, tail_lse.transpose(0, 3, 1, 2).reshape(batch, seq, heads, 1)], axis=3)
  return common.combine(parts_out, parts_lse)


def finish(out: Float[Array, "*shape"], cache: Any, dtype: Any) -> Array:
  """A cache's attention output in ``dtype``, NaN if the cache overflowed (``length >
  max_len``: appends past the end are dropped, so its attention is undefined)."""
  return jnp.where(cache.length <= cache.max_len, out, jnp.nan).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Each cache format: which slots are read block by block and which form the full-precision tail.


def kivi_tail(cache: KIVICache) -> tuple[Int[Array, ""], Tail]:
  """``(prefix_end, tail)`` of a KIVI cache: slots below ``max(0, length - R - 1)`` have both key
  and value quantized (read block by block); the last ``R + 1`` slots are gathered slot by slot,
  as its attention sees them (full-precision or just quantized)."""
  prefix_end = jnp.maximum(cache.length - cache.residual - 1, 0)
  slots = prefix_end + jnp.arange(cache.residual + 1)
  return prefix_end, {"tail_slots": slots, "tail_k": cache.keys_at(slots),
                      "tail_v": cache.values_at(slots)}


def vidkv_tail(cache: VidKVCache) -> tuple[Int[Array, ""], Tail]:
  """``(prefix_end, tail)`` of a VidKV cache: the quantized slots ``[0, quantized)``, then the
  full-precision residual."""
  return cache.quantized, {"tail_slots": cache.quantized + jnp.arange(cache.residual),
                           "tail_k": cache.k_residual, "tail_v": cache.v_residual}


def xquant_tail(cache: XQuantCache, key_up: jax.Array, inputs: LayerInputs) -> Tail:
  """The full-precision window of an XQuant cache as the tail (empty if R = 0): its keys
  rematerialized at the window's slots, its value stream as is."""
  if not cache.residual:
    return {}
  slots = cache.window_slots()
  keys, values = cache.keys_and_values(cache.window.astype(jnp.float32), slots, key_up, inputs)
  return {"tail_slots": slots, "tail_k": keys, "tail_v": values}


def project_values(cache: XQuantCache, mixed: Float[Array, "batch seq heads value_width"],
                   value_up: Float[Array, "value_width kv_heads head_dim"], dtype: Any
                   ) -> Float[Array, "batch seq heads head_dim"]:
  """Each query head's weighted value stream times its kv head's ``C_v`` (once per head,
  ``heads * seq * value_width * head_dim`` multiply-adds), as :func:`finish` does."""
  batch, seq, heads, _ = mixed.shape
  kv_heads, head_dim = value_up.shape[1:]
  mixed = mixed.reshape(batch, seq, kv_heads, heads // kv_heads, -1)
  out = jnp.einsum("bskgw,wkd->bskgd", mixed, value_up)
  return finish(out.reshape(batch, seq, heads, head_dim), cache, dtype)


# ---------------------------------------------------------------------------------------------
# The "xla" implementations (arguments as validated by effjax.ops.kv_decode.api).


def _read_in_blocks(cache: Any, q: jax.Array, scale: float, prefix_end: jax.Array, tail: Tail
                    ) -> jax.Array:
  """:func:`blockwise_decode_attention` of a KIVI or VidKV cache: its quantized slots below
  ``prefix_end`` dequantized ``cache.block_size`` at a time (``cache.decode_block``), then
  ``tail``."""
  block = cache.block_size
  out = blockwise_decode_attention(
      q, load_block=lambda j0: cache.decode_block(j0, block), block_size=block,
      prefix_end=prefix_end, start=cache.start, length=cache.length, scale=scale, **tail)
  return finish(out, cache, q.dtype)


def kivi(cache: KIVICache, q: Float[Array, "batch seq heads head_dim"], *, scale: float,
         block_sizes: Any = None) -> Float[Array, "batch seq heads head_dim"]:
  """KIVI: ``cache.block_size`` slots dequantized at a time, then the ``R + 1`` tail slots
  (:func:`kivi_tail`); ``block_sizes`` (the kernels' tiling) is ignored."""
  del block_sizes
  return _read_in_blocks(cache, q, scale, *kivi_tail(cache))


def vidkv(cache: VidKVCache, q: Float[Array, "batch seq heads head_dim"], *, scale: float,
          block_sizes: Any = None) -> Float[Array, "batch seq heads head_dim"]:
  """VidKV: ``cache.block_size`` quantized slots dequantized at a time, then the residual;
  ``block_sizes`` is ignored."""
  del block_sizes
  return _read_in_blocks(cache, q, scale, *vidkv_tail(cache))


def xquant(cache: XQuantCache, q: Float[Array, "batch seq heads head_dim"], inputs: LayerInputs,
           previous: CrossLayerCarry | None, *, scale: float, block_sizes: Any = None
           ) -> Float[Array, "batch seq heads head_dim"]:
  """XQuant: ``cache.block_size`` slots of the stream dequantized at a time (XQuant-CL: the sum
  of the layers' decoded blocks), their keys rematerialized (projection, then RoPE at the slots'
  positions), then the window; the value projection applied once per head to the weighted
  stream. Scratch: one block's stream and keys, ``batch * block * (width + kv_heads *
  head_dim)`` float32 (times the layers summed for XQuant-CL). ``block_sizes`` is ignored."""
  del block_sizes
  key_up, value_up = cache.projections(inputs)
  chain = cache.chain(previous)
  block = cache.block_size

  def load_block(j0):
    z = sum(layer.decode_block(j0, block) for layer in chain)
    return cache.keys_and_values(z, j0 + jnp.arange(block), key_up, inputs)

  mixed = blockwise_decode_attention(
      q, load_block=load_block, block_size=block, prefix_end=cache.quantized, start=cache.start,
      length=cache.length, scale=scale, **xquant_tail(cache, key_up, inputs))
  return project_values(cache, mixed, value_up, q.dtype)
