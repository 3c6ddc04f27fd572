"""Flax (Linen) modules. Layers take their ops as callables (``attention_fn=...``)."""

from effjax.nn.attention import MultiHeadAttention
from effjax.nn.remat import (DECODER_ACTIVATIONS, LONG_CONV_ACTIVATIONS, REMAT_POLICIES,
                              RematPlan, count_attention_forwards, host_residual_bytes,
                              parse_remat, plan_remat, remat_policy)
from effjax.nn.rope import apply_rope, rope_frequencies, segment_positions
from effjax.nn.reversible import ReversibleDecoderLM, reversible_layers
from effjax.nn.sequence_parallel import SequenceParallel
from effjax.nn.transformer import DecoderBlock, DecoderLM, SwiGLU, TransformerConfig
from effjax.nn.long_conv import (H3LongConv, LongConv, LongConvKernel, LongConvLM,
                                 LongConvLMConfig)

__all__ = [
    "MultiHeadAttention", "DECODER_ACTIVATIONS", "LONG_CONV_ACTIVATIONS", "REMAT_POLICIES",
    "RematPlan", "count_attention_forwards", "host_residual_bytes", "parse_remat", "plan_remat",
    "remat_policy",
    "apply_rope", "rope_frequencies",
    "segment_positions", "ReversibleDecoderLM", "reversible_layers", "SequenceParallel", "DecoderBlock", "DecoderLM", "SwiGLU", "TransformerConfig",
    "H3LongConv", "LongConv", "LongConvKernel", "LongConvLM", "LongConvLMConfig",
]
