"""Decode attention over the quantized KV caches (KIVI, VidKV, XQuant): one op per cache format,
each with a float32 reference, a block-wise XLA path and Pallas GPU/TPU kernels."""

from effjax.ops.kv_decode.api import (
    DecodeBlockSizes,
    kivi_decode_attention,
    vidkv_decode_attention,
    xquant_decode_attention,
)
from effjax.ops.kv_decode.xla import blockwise_decode_attention

__all__ = ["DecodeBlockSizes", "blockwise_decode_attention", "kivi_decode_attention",
           "vidkv_decode_attention", "xquant_decode_attention"]
