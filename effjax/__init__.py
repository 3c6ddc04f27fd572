"""effjax: memory-efficient building blocks for training and serving large models in JAX.

Public entry points are re-exported here as they land; see README.md for the API at a glance.
"""

from effjax import dispatch
from effjax.ops.attention import flash_attention
from effjax.optim import zero_trainer
from effjax.ops.long_conv import long_conv
from effjax.ops.ring_attention import ring_attention
from effjax.ops.kv_decode import (
    kivi_decode_attention,
    vidkv_decode_attention,
    xquant_decode_attention,
)

__all__ = ["dispatch", "flash_attention", "ring_attention", "zero_trainer", "long_conv", "kivi_decode_attention",
           "vidkv_decode_attention", "xquant_decode_attention"]
__version__ = "0.1.0"
