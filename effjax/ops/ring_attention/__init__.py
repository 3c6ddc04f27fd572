"""Sequence-parallel exact attention (ring / all-gather) with causal load-balancing layouts."""

from effjax.ops.ring_attention.api import STRATEGIES, ring_attention
from effjax.ops.ring_attention.layout import LAYOUTS, from_layout, positions, to_layout

# effjax.ring_attention.to_layout(...) etc., beside the op itself.
ring_attention.to_layout = to_layout
ring_attention.from_layout = from_layout
ring_attention.positions = positions

__all__ = ["ring_attention", "to_layout", "from_layout", "positions", "LAYOUTS", "STRATEGIES"]
