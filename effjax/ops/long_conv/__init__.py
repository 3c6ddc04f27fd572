"""Long depthwise convolutions (causal, bidirectional, circular) by FFT or Monarch matmuls."""

from effjax.ops.long_conv.api import MODES, long_conv
from effjax.ops.long_conv.reference import long_conv as long_conv_reference

__all__ = ["MODES", "long_conv", "long_conv_reference"]
