"""The test oracle: undo the layout, attend the whole sequence in float32, redo the layout."""

from __future__ import annotations

from jaxtyping import Array

from effjax.ops.attention.reference import attention
from effjax.ops.ring_attention.layout import from_layout, to_layout


def ring_attention(q: Array, k: Array, v: Array, *, num_devices: int, layout: str,
                   causal: bool = False, q_segment_ids: Array | None = None,
                   kv_segment_ids: Array | None = None,
                   window: tuple[int | None, int | None] | None = None,
                   softcap: float | None = None,
                   scale: float | None = None) -> tuple[Array, Array]:
  """``(out, lse)`` of single-device reference attention on the natural order, laid out again."""
  natural = lambda x: None if x is None else from_layout(x, num_devices, layout)
  out, lse = attention(
      natural(q), natural(k), natural(v), causal=causal, q_segment_ids=natural(q_segment_ids),
      kv_segment_ids=natural(kv_segment_ids), window=window, softcap=softcap,
      scale=q.shape[-1] ** -0.5 if scale is None else scale, return_lse=True)
  return (to_layout(out, num_devices, layout), to_layout(lse, num_devices, layout, axis=2))
