"""Exact, memory-efficient attention (FlashAttention-2 semantics) with GQA, masks and LSE."""

from effjax.ops.attention.api import flash_attention
from effjax.ops.attention.reference import attention as attention_reference

__all__ = ["flash_attention", "attention_reference"]
