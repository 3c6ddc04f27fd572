"""Public sequence-parallel attention: validation, then ``shard_map`` over the sequence axis."""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import Array, Float, Int

from effjax.dispatch import Implementation
from effjax.ops.attention.api import normalize_arguments
from effjax.ops.ring_attention import blocks, layout as layouts, ring as strategies

__all__ = ["ring_attention", "STRATEGIES"]

STRATEGIES = ("ring", "all_gather")


def ring_attention(
    q: Float[Array, "batch seq heads head_dim"],
    k: Float[Array, "batch seq kv_heads head_dim"],
    v: Float[Array, "batch seq kv_heads v_head_dim"],
    *,
    mesh: Mesh,
    axis: str = "seq",
    causal: bool = False,
    q_segment_ids: Int[Array, "batch seq"] | None = None,
    kv_segment_ids: Int[Array, "batch seq"] | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    layout: str = "zigzag",
    strategy: str = "ring",
    return_lse: bool = False,
    implementation: Implementation = None,
) -> (Float[Array, "batch seq heads v_head_dim"]
      | tuple[Float[Array, "batch seq heads v_head_dim"], Float[Array, "batch heads seq"]]):
  """Exact attention with the sequence split over the devices of one mesh axis.

  The arrays are global, in ``layout`` order (see :func:`to_layout`): device ``d`` of ``axis``
  holds the ``d``-th contiguous slice of the sequence axis (shard them with
  ``PartitionSpec(None, axis)``, or let ``jit`` do it). Each device attends its queries to every
  device's keys with ``flash_attention(..., return_lse=True)`` (``implementation`` picks its
  kernel; the platform default otherwise) and merges the partial results by log-sum-exp, so no
  device ever holds a ``[seq, seq]`` block or, with ``strategy="ring"``, more than two K/V blocks.
  Other mesh axes stay automatic (e.g. batch sharded on ``data`` in a data x seq mesh).

  * ``strategy="ring"``: K/V blocks rotate with ``ppermute``, the next transfer issued before the
    current block's compute; the backward is a second ring in which dK/dV travel with their
    blocks (``custom_vjp``). Per device memory O(S / n) beyond the inputs.
  * ``strategy="all_gather"``: K/V are all-gathered once; O(S) K/V per device, fewer
    collectives (better when K/V are small, e.g. GQA with few kv heads).
  * Causal masking follows the GLOBAL positions of ``layout``: ``"zigzag"`` and ``"striped"``
    give every device the same work; ``"contiguous"`` skips fully masked steps but leaves the
    early devices idle. GQA/MQA as in ``flash_attention``: K/V are never repeated.
  * Segment ids (packed documents) are laid out like the tokens and may cross device borders.

  Args:
    q, k, v: ``[batch, seq, heads | kv_heads, head_dim]``, laid out; q and k/v have equal seq.
    mesh: the device mesh; ``axis`` names the sequence-parallel axis in it.
    causal, q_segment_ids, kv_segment_ids, softcap, scale, return_lse, implementation: as in
      ``flash_attention`` (positions are the global ones of the layout).
    window: ``(left, right)`` sliding window over global positions, as in ``flash_attention``;
      layouts ``"contiguous"`` and ``"striped"``. The ring stops after the steps it needs.
    layout: ``"zigzag"`` | ``"striped"`` | ``"contiguous"``: how the sequence was laid out.
    strategy: ``"ring"`` | ``"all_gather"``.

  Returns:
    The output ``[batch, seq, heads, v_head_dim]`` in q's dtype, laid out like q; with
    ``return_lse`` also the float32 LSE ``[batch, heads, seq]``.

  Raises:
    ValueError / TypeError: a wrong argument (shapes, an axis not in the mesh, a sequence length
      the layout cannot split over the axis, an unknown layout or strategy), named in the message.
  """
  options = normalize_arguments(
      q, k, v, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      window=window, softcap=softcap, scale=scale, return_lse=return_lse)
  num_devices = _check_mesh(mesh, axis)
  if k.shape[1] != q.shape[1]:
    raise ValueError(f"k must have q's sequence length {q.shape[1]} (self-attention over one "
                     f"sharded sequence), got shape {k.shape}")
  layouts.check_layout(layout, q.shape[1], num_devices)
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if options["window"] is not None and layout == "zigzag":
    raise ValueError("window needs layout 'contiguous' or 'striped' (a sliding window already "
                     "balances causal work), got layout 'zigzag'")
  step = blocks.StepOptions(layout, num_devices, options["causal"], options["window"],
                            options["softcap"], options["scale"], implementation)
  block = q.shape[1] // num_devices
  num_steps = num_devices if options["window"] is None else blocks.window_steps(step, block)
  config = strategies.RingConfig(axis, num_devices, num_steps, step)
  per_device = functools.partial(
      strategies.ring if strategy == "ring" else strategies.all_gather, config)
  tokens, segments = P(None, axis, None, None), P(None, axis)
  sharded = jax.shard_map(
      per_device, mesh=_current(mesh), axis_names={axis},
      in_specs=(tokens, tokens, tokens, segments, segments),
      out_specs=(tokens, P(None, None, axis)), check_vma=False)
  out, lse = sharded(q, k, v, q_segment_ids, kv_segment_ids)
  return (out, lse) if options["return_lse"] else out


def _current(mesh: Mesh) -> Mesh | jax.sharding.AbstractMesh:
  """``mesh``, or the abstract mesh of the enclosing ``shard_map`` (e.g. a ZeRO trainer that is
  manual over the batch axes), which a nested ``shard_map`` must name instead."""
  context = jax.sharding.get_abstract_mesh()
  return mesh if context.empty else context


def _check_mesh(mesh: Any, axis: Any) -> int:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if axis not in mesh.axis_names:
    raise ValueError(f"axis must name an axis of the mesh {mesh.axis_names}, got {axis!r}")
  return mesh.shape[axis]
