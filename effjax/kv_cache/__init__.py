"""KV caches for autoregressive decoding, behind one interface (:class:`KVCache`).

:class:`FullKVCache` stores keys and values in full precision; it is the baseline for the
quantized caches that implement the same interface: :class:`KIVICache` (2/4-bit, per-channel
keys, per-token values, full-precision residual; settings :class:`KIVI`). Low-bit packing and the
group quantizer are in :mod:`effjax.kv_cache.quant`.
"""

from effjax.kv_cache.base import CacheType, KVCache
from effjax.kv_cache.full import FullKVCache
from effjax.kv_cache.kivi import KIVI, KIVICache

__all__ = ["CacheType", "FullKVCache", "KIVI", "KIVICache", "KVCache"]
