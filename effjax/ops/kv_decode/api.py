"""Public decode-attention ops over the quantized KV caches: argument validation, then dispatch.

One op per cache format, each with the same implementations (``effjax.dispatch.DEFAULT_ORDER``
gives the order tried per platform; a kernel enters it only after it has run correctly on its
hardware, and is opt-in by name until then):

* ``"reference"``: every slot dequantized at once, then plain float32 attention
  (:mod:`effjax.ops.kv_decode.reference`); the test oracle, never a default.
* ``"xla"``: the cache dequantized block by block with an online softmax
  (:mod:`effjax.ops.kv_decode.xla`); never a float32 copy of the whole cache. Serves every call.
* ``"pallas_gpu"`` / ``"pallas_tpu"``: flash-decoding Pallas kernels (Triton / Mosaic TPU,
  ``pallas_kernels.kv_decode``) that read the packed codes in place and dequantize in registers
  (VMEM on TPU), ``num_splits`` partial results per kv head, plus the full-precision tail as one
  more partial, combined by log-sum-exp (:mod:`effjax.ops.kv_decode.partials`). A call they do
  not serve raises NotImplementedError and the next implementation is tried.

The ops:

* :func:`kivi_decode_attention` (op ``"kivi_decode"``), :class:`effjax.kv_cache.KIVICache`: the
  kernels serve quantized caches (not 16 bits) and at most ``R + 1`` queries (so every query sees
  the whole quantized prefix they read).
* :func:`vidkv_decode_attention` (op ``"vidkv_decode"``), :class:`effjax.kv_cache.VidKVCache`:
  key codes decoded in stored order (2-bit channels, 1-bit FFT coefficients turned back by a
  constant matrix and put in place by a one-hot permutation), base-3 ternary values; at most
  ``R + 1`` queries, causal per query.
* :func:`xquant_decode_attention` (op ``"xquant_decode"``), :class:`effjax.kv_cache.XQuantCache`:
  keys rematerialized and rotated in-kernel from the quantized stream, the weighted value stream
  projected once per head afterwards; quantized XQuant caches (latent or X) and any ``seq``;
  XQuant-CL and 16 bits are XLA only.

HBM read per slot and kv head by the kernels: the packed codes and scales (KIVI 2-bit, G = 32,
head_dim 64: 48 bytes, vs 256 for float16 K/V; XQuant, SmolLM2's latent stream at 4 / 2 bits,
G = 64: 216 / 120 bytes per slot for all 3 kv heads, vs 768).
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

from jaxtyping import Array, Float

from effjax import kv_cache  # its caches call these ops: bound here, read at call time
from effjax.dispatch import Implementation, dispatch, register
from effjax.kv_cache.base import check_query
from pallas_kernels.kv_decode.common import DecodeBlockSizes, block_sizes_or_default

if TYPE_CHECKING:
  from effjax.kv_cache import KIVICache, LayerInputs, VidKVCache, XQuantCache
  from effjax.kv_cache.xquant import CrossLayerCarry

__all__ = ["DecodeBlockSizes", "kivi_decode_attention", "vidkv_decode_attention",
           "xquant_decode_attention"]

KIVI_DECODE, VIDKV_DECODE, XQUANT_DECODE = "kivi_decode", "vidkv_decode", "xquant_decode"

for _op, _format in ((KIVI_DECODE, "kivi"), (VIDKV_DECODE, "vidkv"), (XQUANT_DECODE, "xquant")):
  for _name in ("reference", "xla", "pallas_gpu", "pallas_tpu"):
    register(_op, _name, f"effjax.ops.kv_decode.{_name}:{_format}")


def kivi_decode_attention(
    cache: KIVICache, q: Float[Array, "batch seq heads head_dim"], *, scale: float | None = None,
    implementation: Implementation = None, block_sizes: DecodeBlockSizes | None = None,
) -> Float[Array, "batch seq heads head_dim"]:
  """Softmax attention of the queries of the last ``seq`` stored tokens over a KIVI cache.

  Query ``i`` sees the real tokens up to its own, ``start[b] <= j <= length - seq + i`` (causal,
  bottom-right aligned), as :meth:`effjax.kv_cache.KVCache.attend`; grouped-query: query head
  ``h`` reads kv head ``h // (heads // kv_heads)``, K/V never repeated. Implementations: module
  docstring.

  Args:
    cache: a :class:`effjax.kv_cache.KIVICache` holding at least one token.
    q: queries of the last ``seq`` stored tokens; ``heads`` a multiple of the cache's kv heads.
    scale: logit scale (default ``head_dim ** -0.5``).
    implementation: None (the platform's default order), a name or a sequence of names.
    block_sizes: the kernels' tiling (None: their heuristics); ignored by ``"xla"`` and
      ``"reference"``.

  Returns:
    ``[batch, seq, heads, head_dim]`` in q's dtype (float32 accumulation); a query that sees no
    token gets 0; NaN everywhere if the cache overflowed (``length > max_len``).

  Raises:
    TypeError / ValueError: an argument has a wrong type, shape or value.
    effjax.dispatch.NoImplementationError: no requested implementation serves the call.
  """
  _check_type("cache", cache, kv_cache.KIVICache)
  scale = _check(q, scale, block_sizes, kv_shape=cache.k_residual.shape)
  return dispatch(KIVI_DECODE, implementation, cache, q, scale=scale, block_sizes=block_sizes)


def vidkv_decode_attention(
    cache: VidKVCache, q: Float[Array, "batch seq heads head_dim"], *, scale: float | None = None,
    implementation: Implementation = None, block_sizes: DecodeBlockSizes | None = None,
) -> Float[Array, "batch seq heads head_dim"]:
  """:func:`kivi_decode_attention` over a :class:`effjax.kv_cache.VidKVCache` (same arguments,
  results and errors)."""
  _check_type("cache", cache, kv_cache.VidKVCache)
  scale = _check(q, scale, block_sizes, kv_shape=cache.k_residual.shape)
  return dispatch(VIDKV_DECODE, implementation, cache, q, scale=scale, block_sizes=block_sizes)


def xquant_decode_attention(
    cache: XQuantCache, q: Float[Array, "batch seq heads head_dim"], inputs: LayerInputs,
    previous: CrossLayerCarry | None = None, *, scale: float | None = None,
    implementation: Implementation = None, block_sizes: DecodeBlockSizes | None = None,
) -> Float[Array, "batch seq heads head_dim"]:
  """:func:`kivi_decode_attention` over a :class:`effjax.kv_cache.XQuantCache`: keys
  ``rope(Z_k C_k)`` rematerialized from the cached stream, values ``Z_v C_v`` with the
  projection applied once per head after the weighted sum of the value stream.

  Args:
    cache: an XQuantCache holding at least one token, written with ``inputs``' layer.
    q: queries of the last ``seq`` stored tokens.
    inputs: the layer's inputs and weights (only the weights, the norm's and RoPE's settings
      are read).
    previous: XQuant-CL: the carry this layer was written with (None for the first layer and
      for XQuant).
    scale, implementation, block_sizes: as :func:`kivi_decode_attention`.
  """
  _check_type("cache", cache, kv_cache.XQuantCache)
  _check_type("inputs", inputs, kv_cache.LayerInputs)
  _, kv_heads, head_dim = inputs.key_kernel.shape
  scale = _check(q, scale, block_sizes, kv_shape=(cache.codes.shape[0], 0, kv_heads, head_dim))
  return dispatch(XQUANT_DECODE, implementation, cache, q, inputs, previous, scale=scale,
                  block_sizes=block_sizes)


def _check_type(name: str, value: Any, expected: type) -> None:
  if not isinstance(value, expected):
    raise TypeError(f"{name} is a {type(value).__name__}; expected an effjax.kv_cache."
                    f"{expected.__name__}")


def _check(q: Any, scale: Any, block_sizes: Any, *, kv_shape: tuple[int, ...]) -> float:
  """Validates a decode op's common arguments (``kv_shape``: the cache's ``[batch, _, kv_heads,
  head_dim]``); returns ``scale`` as a float, ``head_dim ** -0.5`` for None."""
  if not (hasattr(q, "ndim") and hasattr(q, "dtype")):
    raise TypeError(f"q is a {type(q).__name__}; expected an array")
  batch, _, kv_heads, head_dim = kv_shape
  check_query(q, batch=batch, kv_heads=kv_heads, head_dim=head_dim)
  block_sizes_or_default(block_sizes)
  if scale is None:
    return head_dim**-0.5
  if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
    raise TypeError(f"scale is {scale!r}; expected a real number (static) or None")
  if not math.isfinite(scale):
    raise ValueError(f"scale is {scale!r}; expected a finite number")
  return float(scale)
