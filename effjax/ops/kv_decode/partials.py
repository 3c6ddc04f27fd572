"""The Pallas implementations' shared half: a decode kernel's per-split partial results over a
cache's quantized slots, combined by log-sum-exp with the full-precision tail's attention
(:func:`effjax.ops.kv_decode.xla.combine_with_tail`). :mod:`effjax.ops.kv_decode.pallas_gpu` and
:mod:`effjax.ops.kv_decode.pallas_tpu` pass their platform's kernels (same signatures).

Memory: the cache is read in place (no float32 copy); extra HBM is the ``num_splits + 1``
partials, ``batch * (num_splits + 1) * seq * heads * (dim + 1)`` float32 (``dim`` the head
dim, or XQuant's value-stream width), and the tail's keys and values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
from jaxtyping import Array, Float

from effjax.nn.rope import rope_frequencies
from effjax.ops.kv_decode import xla
from pallas_kernels.kv_decode.common import DecodeBlockSizes

if TYPE_CHECKING:
  from effjax.kv_cache import KIVICache, LayerInputs, VidKVCache, XQuantCache
  from effjax.kv_cache.xquant import CrossLayerCarry

Kernel = Callable[..., tuple[jax.Array, jax.Array]]  # a decode_partials wrapper


def _check_queries(cache: Any, q: jax.Array) -> None:
  """Raises NotImplementedError unless ``q`` has at most R + 1 queries: the KIVI and VidKV
  kernels serve decoding and short multi-token steps (every query then sees the whole prefix
  they read, or is masked causally in VidKV's); a prefill goes to XLA."""
  if q.shape[1] > cache.residual + 1:
    raise NotImplementedError(f"the decode kernels serve at most R + 1 = {cache.residual + 1} "
                              f"queries, got {q.shape[1]}")


def _combine(cache: Any, q: jax.Array, scale: float, out: jax.Array, lse: jax.Array,
             tail: xla.Tail) -> jax.Array:
  """:func:`xla.combine_with_tail` over a cache's rows and length."""
  return xla.combine_with_tail(q, out, lse, scale=scale, start=cache.start, length=cache.length,
                               **tail)


def kivi(kernel: Kernel, cache: KIVICache, q: Float[Array, "batch seq heads head_dim"], *,
         scale: float, block_sizes: DecodeBlockSizes | None, interpret: bool | None = None
         ) -> Float[Array, "batch seq heads head_dim"]:
  """The kernel's partials over slots ``[start, length - R - 1)`` plus the ``R + 1`` tail
  slots'. Serves quantized caches (not 16 bits) and at most R + 1 queries."""
  if 16 in (cache.key_bits, cache.value_bits):
    raise NotImplementedError("the KIVI decode kernels read quantized keys and values, got bits "
                              f"{(cache.key_bits, cache.value_bits)}")
  _check_queries(cache, q)
  prefix_end, tail = xla.kivi_tail(cache)
  out, lse = kernel(q, cache.k_codes, cache.k_scale, cache.k_zero, cache.v_codes, cache.v_scale,
                    cache.v_zero, cache.start, prefix_end, key_bits=cache.key_bits,
                    value_bits=cache.value_bits, group_size=cache.group_size, scale=scale,
                    block_sizes=block_sizes, interpret=interpret)
  return xla.finish(_combine(cache, q, scale, out, lse, tail), cache, q.dtype)


def vidkv(kernel: Kernel, cache: VidKVCache, q: Float[Array, "batch seq heads head_dim"], *,
          scale: float, block_sizes: DecodeBlockSizes | None, interpret: bool | None = None
          ) -> Float[Array, "batch seq heads head_dim"]:
  """The kernel's partials over the quantized slots ``[start, quantized)`` (causal per query)
  plus the residual's. Serves at most R + 1 queries."""
  _check_queries(cache, q)
  prefix_end, tail = xla.vidkv_tail(cache)
  out, lse = kernel(q, cache.k_codes, cache.k_scale, cache.k_zero, cache.k_hot, cache.v_codes,
                    cache.v_scale, cache.key_transform(), cache.start, prefix_end,
                    cache.length - q.shape[1], hot=cache.hot_channels,
                    group_size=cache.group_size, scale=scale, block_sizes=block_sizes,
                    interpret=interpret)
  return xla.finish(_combine(cache, q, scale, out, lse, tail), cache, q.dtype)


def xquant(kernel: Kernel, cache: XQuantCache, q: Float[Array, "batch seq heads head_dim"],
           inputs: LayerInputs, previous: CrossLayerCarry | None, *, scale: float,
           block_sizes: DecodeBlockSizes | None, interpret: bool | None = None
           ) -> Float[Array, "batch seq heads head_dim"]:
  """The kernel's partials of the weighted value stream over slots ``[start, length - R)``
  (keys rebuilt and rotated in-kernel, causal per query) plus the window's, then ``C_v`` once per
  head. Serves quantized XQuant caches (latent or X, any ``seq``); XQuant-CL (its accumulator is
  rebuilt from earlier layers' codes) and 16 bits are XLA only."""
  del previous
  if cache.cross_layer or cache.bits == 16:
    raise NotImplementedError("the XQuant decode kernels serve quantized XQuant caches, got "
                              f"{'XQuant-CL' if cache.cross_layer else 'XQuant'} at "
                              f"{cache.bits} bits (XQuant-CL and 16 bits: XLA only)")
  key_up, value_up = cache.projections(inputs)
  half = cache.width // 2
  key_channels, value_channels = (((0, half), (half, cache.width)) if cache.latent
                                  else ((0, cache.width),) * 2)
  out, lse = kernel(q, cache.codes, cache.scale, cache.zero, key_up,
                    rope_frequencies(q.shape[-1], inputs.rope_theta), cache.start,
                    cache.quantized, cache.length, bits=cache.bits, group_size=cache.group_size,
                    key_channels=key_channels, value_channels=value_channels, scale=scale,
                    block_sizes=block_sizes, interpret=interpret)
  mixed = _combine(cache, q, scale, out, lse, xla.xquant_tail(cache, key_up, inputs))
  return xla.project_values(cache, mixed, value_up, q.dtype)


def bind(kivi_kernel: Kernel, vidkv_kernel: Kernel, xquant_kernel: Kernel
         ) -> tuple[Callable[..., jax.Array], ...]:
  """:func:`kivi`, :func:`vidkv` and :func:`xquant` over one platform's three kernels: that
  platform's implementations of the ops."""
  return (functools.partial(kivi, kivi_kernel), functools.partial(vidkv, vidkv_kernel),
          functools.partial(xquant, xquant_kernel))
