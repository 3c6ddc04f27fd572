"""Rotary position embeddings (RoPE, Su et al. 2021) with explicit, restartable positions.

Positions are an explicit ``[batch, seq]`` int array rather than ``arange(seq)``, so packed rows
(several documents in one row, see segment ids) restart at 0 for each document, and decoding
steps pass their absolute position.

Layout: the "rotate half" convention (pairs ``(x[i], x[i + d/2])``), as Llama/HF checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rope_frequencies(head_dim: int, theta: float) -> Float[Array, "half"]:
  """Inverse frequencies ``theta ** (-2i / head_dim)`` for i < head_dim / 2 (float32)."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got head_dim={head_dim}")
  if theta <= 0:
    raise ValueError(f"RoPE theta must be > 0, got theta={theta}")
  return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x: Float[Array, "batch seq heads head_dim"], positions: Int[Array, "batch seq"],
               theta: float) -> Float[Array, "batch seq heads head_dim"]:
  """Rotates ``x`` by its positions; computed in float32, returned in ``x.dtype``."""
  if positions.shape != x.shape[:2]:
    raise ValueError(f"positions must have shape [batch, seq] = {x.shape[:2]}, "
                     f"got {positions.shape}")
  angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(x.shape[-1], theta)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def segment_positions(segment_ids: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
  """Positions that restart at 0 wherever the segment id changes along the sequence."""
  seq = segment_ids.shape[1]
  index = jnp.arange(seq, dtype=jnp.int32)[None, :]
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  start_index = jnp.where(starts, index, 0)
  return index - jax.lax.cummax(start_index, axis=1)
