"""Decode attention over a cache that is read block by block (quantized caches' XLA path).

A quantized cache cannot hand ``attend`` one full-precision K/V array without materializing a
float32 copy of the whole cache (what HF's QuantizedCache does every step). Instead the caller
supplies a ``load_block`` that dequantizes ``block_size`` slots at a time, plus a short
full-precision "tail" (KIVI's residual window); softmax is accumulated online over the blocks and
the tail (FlashAttention's running max / sum / output, combined in float32), GQA-aware: query head
``h`` reads kv head ``h // (heads // kv_heads)`` and K/V are never repeated. The values may also be
one stream shared by every kv head (XQuant: the weighted sum of the cached layer input, projected
by ``W_v`` afterwards); the tail is optional.

Memory: one dequantized block (``2 * batch * block_size * kv_heads * head_dim`` float32), its
logits (``batch * heads * seq * block_size`` float32) and the tail; never O(cache) in float32.
Work: the number of blocks is a traced count (a ``while`` loop), so only filled blocks are read.

:func:`kivi_decode_attention` and :func:`vidkv_decode_attention` choose between that path and the
fused Pallas decode kernels (``pallas_kernels.kv_decode``) for a KIVI or a VidKV cache, through
``effjax.dispatch`` (ops ``"kivi_decode"``, ``"vidkv_decode"``); the kernels' per-split partials and
the full-precision tail's are combined by one helper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from effjax.dispatch import Implementation, dispatch, register
from effjax.kv_cache.base import check_query
from pallas_kernels.kv_decode import common as kv_common

_Carry = tuple[jax.Array, jax.Array, jax.Array]  # running max, sum, output (unnormalized)


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
  batch, seq, heads, head_dim = q.shape
  k0, v0 = jax.eval_shape(load_block, jnp.zeros((), jnp.int32))
  kv_heads, dim = k0.shape[2], v0.shape[-1]
  grouped = (q.astype(jnp.float32) * scale).reshape(batch, seq, kv_heads, heads // kv_heads,
                                                    head_dim)
  last_visible = length - seq + jnp.arange(seq)
  shape = (batch, kv_heads, heads // kv_heads, seq)
  carry = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros((*shape, dim)))

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
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads, dim)


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
    kv_heads = tail_k.shape[2]
    grouped = (q.astype(jnp.float32) * scale).reshape(batch, seq, kv_heads, heads // kv_heads, -1)
    shape = (batch, kv_heads, heads // kv_heads, seq)
    m, l, acc = _update((jnp.full(shape, -jnp.inf), jnp.zeros(shape),
                         jnp.zeros((*shape, parts_out.shape[-1]))), grouped,
                        tail_k.astype(jnp.float32), tail_v.astype(jnp.float32),
                        _visible(tail_slots, start, length - seq + jnp.arange(seq)))
    seen = l > 0
    tail_out = (acc / jnp.where(seen, l, 1.0)[..., None]).transpose(0, 3, 1, 2, 4)
    tail_lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    parts_out = jnp.concatenate([parts_out, tail_out.reshape(batch, seq, heads, 1, -1)], axis=3)
    parts_lse = jnp.concatenate(
        [parts_lse, tail_lse.transpose(0, 3, 1, 2).reshape(batch, seq, heads, 1)], axis=3)
  return kv_common.combine(parts_out, parts_lse)


# ---------------------------------------------------------------------------------------------
# KIVI decode attention with a choice of implementation (the Pallas kernels read packed codes)

KIVI_DECODE = "kivi_decode"


def kivi_decode_attention(cache: Any, q: Float[Array, "batch seq heads head_dim"], *,
                          scale: float | None = None, implementation: Implementation = None,
                          num_splits: int | None = None
                          ) -> Float[Array, "batch seq heads head_dim"]:
  """``cache.attend(q, scale=scale)`` of a :class:`effjax.kv_cache.KIVICache`, by implementation.

  Implementations (default order per platform: ``effjax.dispatch.DEFAULT_ORDER["kivi_decode"]``):

  * ``"xla"``: :meth:`KIVICache.attend`, which dequantizes block by block
    (:func:`blockwise_decode_attention`). Serves every call.
  * ``"pallas_gpu"`` / ``"pallas_tpu"``: the flash-decoding kernels of
    ``pallas_kernels.kv_decode`` over the quantized prefix (packed codes dequantized in
    registers/VMEM, GQA groups together, ``num_splits`` partial results per kv head), plus the
    full-precision residual window (R + 1 slots) as one more partial computed here, all combined
    by log-sum-exp. They serve quantized caches (not 16 bits) and ``seq <= R + 1`` queries (so
    every query sees the whole quantized prefix); otherwise NotImplementedError and the next
    implementation is tried.

  Memory of the kernels: the cache is read in place (no float32 copy); extra HBM is the
  ``num_splits + 1`` partials, ``batch * (num_splits + 1) * seq * heads * (head_dim + 1)``
  float32.

  Args:
    cache: a KIVICache holding at least one token.
    q: queries of the last ``seq`` stored tokens.
    scale: logit scale (default ``head_dim ** -0.5``).
    implementation: None (platform default), a name or a sequence of names.
    num_splits: the kernels' splits per kv head (default: their heuristic); ignored by xla.
  """
  return dispatch(KIVI_DECODE, implementation, cache, q, scale=scale, num_splits=num_splits)


def _attend_xla(cache: Any, q: jax.Array, *, scale: float | None, num_splits: int | None):
  """Either cache's own ``attend`` (its block-wise XLA path)."""
  del num_splits
  return cache.attend(q, scale=scale)


def _kivi_pallas(kernel: Callable[..., Any], cache: Any, q: jax.Array, *, scale: float | None,
                 num_splits: int | None) -> jax.Array:
  """The kernels' partials over slots ``[start, length - R - 1)`` + the residual window's."""
  _check_kernel_call(cache, q, quantized=16 not in (cache.key_bits, cache.value_bits),
                     what=f"bits {(cache.key_bits, cache.value_bits)}")
  scale = q.shape[-1]**-0.5 if scale is None else scale
  prefix_end = jnp.maximum(cache.length - cache.residual - 1, 0)
  out, lse = kernel(q, cache.k_codes, cache.k_scale, cache.k_zero, cache.v_codes, cache.v_scale,
                    cache.v_zero, cache.start, prefix_end, key_bits=cache.key_bits,
                    value_bits=cache.value_bits, group_size=cache.group_size, scale=scale,
                    num_splits=num_splits)
  tail_slots = prefix_end + jnp.arange(cache.residual + 1)
  return _combine_with_tail(cache, q, scale, out, lse, tail_slots, cache._keys_at(tail_slots),
                            cache._values_at(tail_slots))


def _check_kernel_call(cache: Any, q: jax.Array, *, quantized: bool, what: str) -> None:
  """Raises NotImplementedError unless the decode kernels serve ``q`` over ``cache``: a quantized
  cache and at most R + 1 queries (decoding and short multi-token steps; prefill goes to XLA)."""
  check_query(q, batch=cache.k_residual.shape[0], kv_heads=cache.k_residual.shape[2],
              head_dim=cache.k_residual.shape[3])
  if not quantized or q.shape[1] > cache.residual + 1:
    raise NotImplementedError("the decode kernels need quantized keys and values and at most "
                              f"R + 1 = {cache.residual + 1} queries, got {what} and "
                              f"{q.shape[1]} queries")


def _combine_with_tail(cache: Any, q: jax.Array, scale: float,
                       out: Float[Array, "batch splits seq heads head_dim"],
                       lse: Float[Array, "batch splits seq heads"], tail_slots: Int[Array, "tail"],
                       tail_k: jax.Array, tail_v: jax.Array) -> jax.Array:
  """:func:`combine_with_tail` over a cache's rows and length, NaN past ``max_len`` (as
  ``attend``), in ``q``'s dtype."""
  out = combine_with_tail(q, out, lse, scale=scale, start=cache.start, length=cache.length,
                          tail_slots=tail_slots, tail_k=tail_k, tail_v=tail_v)
  return jnp.where(cache.length <= cache.max_len, out, jnp.nan).astype(q.dtype)


def _kivi_pallas_gpu(cache: Any, q: jax.Array, **options: Any) -> jax.Array:
  from pallas_kernels.kv_decode import gpu  # pylint: disable=g-import-not-at-top (Triton backend)
  return _kivi_pallas(gpu.decode_partials, cache, q, **options)


def _kivi_pallas_tpu(cache: Any, q: jax.Array, **options: Any) -> jax.Array:
  from pallas_kernels.kv_decode import tpu  # pylint: disable=g-import-not-at-top (Mosaic backend)
  return _kivi_pallas(tpu.decode_partials, cache, q, **options)


register(KIVI_DECODE, "xla", _attend_xla)
register(KIVI_DECODE, "pallas_gpu", _kivi_pallas_gpu)
register(KIVI_DECODE, "pallas_tpu", _kivi_pallas_tpu)


# ---------------------------------------------------------------------------------------------
# VidKV decode attention with a choice of implementation (the Pallas kernels read packed codes)

VIDKV_DECODE = "vidkv_decode"


def vidkv_decode_attention(cache: Any, q: Float[Array, "batch seq heads head_dim"], *,
                           scale: float | None = None, implementation: Implementation = None,
                           num_splits: int | None = None
                           ) -> Float[Array, "batch seq heads head_dim"]:
  """``cache.attend(q, scale=scale)`` of a :class:`effjax.kv_cache.VidKVCache`, by implementation.

  Implementations (default order per platform: ``effjax.dispatch.DEFAULT_ORDER["vidkv_decode"]``):

  * ``"xla"``: :meth:`VidKVCache.attend`, which dequantizes block by block
    (:func:`blockwise_decode_attention`). Serves every call.
  * ``"pallas_gpu"`` / ``"pallas_tpu"``: the flash-decoding kernels
    ``pallas_kernels.kv_decode.vidkv_{gpu,tpu}`` over the quantized slots ``[0, quantized)`` (key
    and value codes dequantized in registers/VMEM: 2-bit channels, 1-bit FFT coefficients turned
    back by a constant matrix and put in place by a one-hot permutation, base-3 ternary values;
    GQA groups together; ``num_splits`` partial results per kv head; causal per query), plus the
    full-precision residual as one more partial computed here, all combined by log-sum-exp.
    They serve at most ``R + 1`` queries (decoding and short multi-token steps); otherwise
    NotImplementedError and the next implementation is tried.

  Arguments and the kernels' memory as :func:`kivi_decode_attention`, ``cache`` a VidKVCache.
  """
  return dispatch(VIDKV_DECODE, implementation, cache, q, scale=scale, num_splits=num_splits)


def _vidkv_pallas(kernel: Callable[..., Any], cache: Any, q: jax.Array, *, scale: float | None,
                  num_splits: int | None) -> jax.Array:
  """The kernels' partials over the quantized slots ``[start, quantized)`` + the residual's."""
  _check_kernel_call(cache, q, quantized=True, what="a VidKV cache")
  scale = q.shape[-1]**-0.5 if scale is None else scale
  out, lse = kernel(q, cache.k_codes, cache.k_scale, cache.k_zero, cache.k_hot, cache.v_codes,
                    cache.v_scale, cache.key_transform(), cache.start, cache.quantized,
                    cache.length - q.shape[1], hot=cache.hot_channels,
                    group_size=cache.group_size, scale=scale, num_splits=num_splits)
  return _combine_with_tail(cache, q, scale, out, lse, cache.quantized + jnp.arange(cache.residual),
                            cache.k_residual, cache.v_residual)


def _vidkv_pallas_gpu(cache: Any, q: jax.Array, **options: Any) -> jax.Array:
  from pallas_kernels.kv_decode import vidkv_gpu  # pylint: disable=g-import-not-at-top
  return _vidkv_pallas(vidkv_gpu.decode_partials, cache, q, **options)


def _vidkv_pallas_tpu(cache: Any, q: jax.Array, **options: Any) -> jax.Array:
  from pallas_kernels.kv_decode import vidkv_tpu  # pylint: disable=g-import-not-at-top
  return _vidkv_pallas(vidkv_tpu.decode_partials, cache, q, **options)


register(VIDKV_DECODE, "xla", _attend_xla)
register(VIDKV_DECODE, "pallas_gpu", _vidkv_pallas_gpu)
register(VIDKV_DECODE, "pallas_tpu", _vidkv_pallas_tpu)
