"""KV caches for autoregressive decoding, behind one interface (:class:`KVCache`).

:class:`FullKVCache` stores keys and values in full precision; it is the baseline for the
quantized caches that implement the same interface.
"""

from effjax.kv_cache.base import KVCache
from effjax.kv_cache.full import FullKVCache

__all__ = ["FullKVCache", "KVCache"]
