"""Sequence parallelism for decoder LMs: one mesh axis splits every activation along the sequence.

A :class:`SequenceParallel` says which mesh axis carries the sequence and how tokens are laid out
on it. A model runs on the laid-out sequence with :meth:`SequenceParallel.attention_fn` as its
attention (``effjax.ring_attention``); every other layer is per token, so after
:meth:`SequenceParallel.lay_out` pins the inputs to ``PartitionSpec(batch_axes, axis)`` XLA keeps
the embeddings, MLPs, norms and logits split along the sequence too: per device activation memory
shrinks by the axis size. Positions (RoPE) and segment ids are computed in the natural order and
laid out with the tokens; labels laid out the same way leave a token-mean loss unchanged, so no
inverse permutation is needed in training.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Int

from effjax import sharding
from effjax.nn.attention import AttentionFn
from effjax.nn.rope import segment_positions
from effjax.ops.ring_attention import LAYOUTS, STRATEGIES, ring_attention, to_layout
from effjax.ops.ring_attention.layout import check_layout



@dataclasses.dataclass(frozen=True)
class SequenceParallel:
  """The sequence axis of ``mesh`` and the token layout on it.

  Attributes:
    mesh: the device mesh; the batch goes on its batch axes (``data``/``fsdp``), the sequence on
      ``axis``.
    axis: the mesh axis that splits the sequence.
    layout: ``"zigzag"`` | ``"striped"`` | ``"contiguous"`` (see ``effjax.ring_attention``).
    strategy: ``"ring"`` | ``"all_gather"``.
  """
  mesh: Mesh
  axis: str = sharding.SEQ_AXIS
  layout: str = "zigzag"
  strategy: str = "ring"

  def __post_init__(self):
    if self.axis not in self.mesh.axis_names:
      raise ValueError(f"axis must name an axis of the mesh {self.mesh.axis_names}, got "
                       f"{self.axis!r}")
    if self.layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
    if self.strategy not in STRATEGIES:
      raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")

  @property
  def size(self) -> int:
    """Devices on the sequence axis."""
    return self.mesh.shape[self.axis]

  def check_length(self, seq_len: int, name: str = "seq_len") -> None:
    """Raises ValueError unless sequences of ``seq_len`` tokens can be laid out on the axis."""
    try:
      check_layout(self.layout, seq_len, self.size)
    except ValueError as error:
      raise ValueError(f"{name}={seq_len} does not fit the sequence axis: {error}") from None

  def attention_fn(self) -> AttentionFn:
    """``ring_attention`` on this mesh axis and layout, with ``flash_attention``'s signature."""
    return functools.partial(ring_attention, mesh=self.mesh, axis=self.axis, layout=self.layout,
                             strategy=self.strategy)

  def lay_out(self, x: Array) -> Array:
    """``[batch, seq, ...]`` in layout order, sharded on the batch axes and ``axis``."""
    self.check_length(x.shape[1], "sequence length")
    x = to_layout(x, self.size, self.layout)
    context = jax.sharding.get_abstract_mesh()
    if context.empty:
      return jax.lax.with_sharding_constraint(x, sharding.batch_sharded(self.mesh, self.axis))
    # Inside a shard_map that is manual over the batch axes (the ZeRO trainer): only the
    # automatic axes can be constrained.
    batch = [a for a in sharding.mesh_axes(self.mesh, "batch") if a not in context.manual_axes]
    return jax.lax.with_sharding_constraint(
        x, PartitionSpec(tuple(batch) or None, self.axis))

  def inputs(self, tokens: Int[Array, "batch seq"],
             segment_ids: Int[Array, "batch seq"] | None = None) -> dict[str, Array]:
    """The laid-out keyword arguments of a DecoderLM call: tokens, positions, segment ids.

    Positions restart at every segment (as DecoderLM computes them unsplit) and are computed
    before the layout, so RoPE sees the global positions.
    """
    if segment_ids is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    else:
      positions = segment_positions(segment_ids)
    inputs = {"tokens": self.lay_out(tokens), "positions": self.lay_out(positions)}
    if segment_ids is not None:
      inputs["segment_ids"] = self.lay_out(segment_ids)
    return inputs
