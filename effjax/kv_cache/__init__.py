"""KV caches for autoregressive decoding, behind one interface (:class:`KVCache`).

:class:`FullKVCache` stores keys and values in full precision; it is the baseline for the
quantized caches that implement the same interface: :class:`KIVICache` (2/4-bit, per-channel
keys, per-token values, full-precision residual; settings :class:`KIVI`). Low-bit packing and the
group quantizer are in :mod:`effjax.kv_cache.quant`. :class:`XQuantCache` (settings
:class:`XQuant`, :class:`XQuantCL`) stores the quantized layer input X (or its SVD latents, or
cross-layer deltas) and rematerializes K/V: a :class:`LayerInputCache`.
:class:`VidKVCache` (settings :class:`VidKV`): 1.x-bit keys (2-bit anomalous channels, 1-bit
FFT of the rest) and ternary per-channel values, full-precision residual.

Decode attention over the quantized caches is an op per format in :mod:`effjax.ops.kv_decode`
(``kivi_decode_attention``, ``vidkv_decode_attention``, ``xquant_decode_attention``: a block-wise
XLA path and Pallas kernels), which the caches' ``decode_attention`` / ``attend_inputs`` call.
"""

from effjax.kv_cache.base import CacheType, KVCache, LayerInputCache, LayerInputs
from effjax.kv_cache.full import FullKVCache
from effjax.kv_cache.kivi import KIVI, KIVICache
from effjax.kv_cache.vidkv import VidKV, VidKVCache
from effjax.kv_cache.xquant import XQuant, XQuantCache, XQuantCL

__all__ = ["CacheType", "FullKVCache", "KIVI", "KIVICache", "KVCache", "LayerInputCache",
           "LayerInputs", "VidKV", "VidKVCache", "XQuant", "XQuantCL", "XQuantCache"]
