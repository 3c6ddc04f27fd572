"""The attention mask, in one place: causal, sliding window, segment ids and length bounds.

Every implementation (effjax's reference and ``xla`` paths, and the Pallas kernels, inside their
kernel bodies) asks this module which (query, key) pairs may interact, so the reference (which
builds the whole ``[q_len, kv_len]`` mask) and the blockwise paths (which build one block at a
time and skip blocks that are statically empty) cannot disagree. It lives in ``pallas_kernels``
because kernels never import effjax.

Alignment: the diagonal is aligned bottom-right (FlashAttention >= 2.1). With
``offset = kv_len - q_len``, query ``i`` sits on key ``i + offset``. ``causal`` lets it see keys
``j <= i + offset``; ``window=(left, right)`` lets it see keys
``i + offset - left <= j <= i + offset + right`` (``None`` = unbounded on that side). When
``q_len > kv_len`` under ``causal``, the first ``q_len - kv_len`` queries see no key at all.
Segment ids further restrict query ``i`` to keys ``j`` with
``q_segment_ids[i] == kv_segment_ids[j]``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

IntLike = int | Int[Array, ""]


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """The static (data-independent) part of the mask: lengths and the band around the diagonal.

  Attributes:
    q_len: number of queries; positions ``>= q_len`` (block padding) are masked.
    kv_len: number of keys; positions ``>= kv_len`` (block padding) are masked.
    left: how many keys left of the diagonal a query sees, or None (unbounded).
    right: how many keys right of the diagonal a query sees, or None (unbounded); 0 when causal.
  """
  q_len: int
  kv_len: int
  left: int | None = None
  right: int | None = None

  @classmethod
  def create(cls, q_len: int, kv_len: int, *, causal: bool,
             window: tuple[int | None, int | None] | None) -> MaskSpec:
    """Folds ``causal`` and ``window`` into one band ``[diagonal - left, diagonal + right]``."""
    left, right = (None, None) if window is None else window
    return cls(q_len, kv_len, left, 0 if causal else right)

  @property
  def offset(self) -> int:
    """Key index of query 0's diagonal (bottom-right alignment)."""
    return self.kv_len - self.q_len

  def allowed(self, q_pos: Int[Array, " q"], kv_pos: Int[Array, " kv"]) -> Bool[Array, "q kv"]:
    """Whether query ``q_pos[a]`` may attend key ``kv_pos[b]``, ignoring segment ids."""
    return self.allowed_broadcast(q_pos[:, None], kv_pos[None, :])

  def allowed_broadcast(self, q_pos: Int[Array, "..."], kv_pos: Int[Array, "..."]
                        ) -> Bool[Array, "..."]:
    """:meth:`allowed` for positions already broadcast against each other (kernels whose
    compilers have no 1-D vectors or need a register layout, e.g. two 2-D iotas)."""
    diagonal = q_pos + self.offset
    ok = (q_pos < self.q_len) & (kv_pos < self.kv_len)
    if self.left is not None:
      ok &= kv_pos >= diagonal - self.left
    if self.right is not None:
      ok &= kv_pos <= diagonal + self.right
    return ok

  def kv_range(self, q_start: IntLike, q_stop: IntLike) -> tuple[IntLike, IntLike]:
    """Half-open range of keys seen by some query in ``[q_start, q_stop)`` (empty: stop <= start).

    Every key inside the range is seen by at least one of those queries (the band is contiguous),
    so a block of keys that intersects the range is never fully masked by ``allowed``.
    """
    last_query = jnp.minimum(q_stop, self.q_len) - 1
    start = 0 if self.left is None else jnp.maximum(q_start + self.offset - self.left, 0)
    stop = (self.kv_len if self.right is None
            else jnp.minimum(last_query + self.offset + self.right + 1, self.kv_len))
    return start, stop

  def q_range(self, kv_start: IntLike, kv_stop: IntLike) -> tuple[IntLike, IntLike]:
    """Half-open range of queries that see some key in ``[kv_start, kv_stop)`` (the transpose)."""
    last_key = jnp.minimum(kv_stop, self.kv_len) - 1
    start = 0 if self.right is None else jnp.maximum(kv_start - self.offset - self.right, 0)
    stop = (self.q_len if self.left is None
            else jnp.minimum(last_key - self.offset + self.left + 1, self.q_len))
    return start, stop

  def kv_full_range(self, q_start: IntLike, q_stop: IntLike) -> tuple[IntLike, IntLike]:
    """Half-open range of keys that EVERY query in ``[q_start, q_stop)`` sees (band and lengths
    only), so blocks inside it need no mask; empty (stop <= start) when some query is padding."""
    last_query = q_stop - 1
    start = 0 if self.left is None else jnp.maximum(last_query + self.offset - self.left, 0)
    stop = (self.kv_len if self.right is None
            else jnp.minimum(q_start + self.offset + self.right + 1, self.kv_len))
    return start, stop * _as_int(q_stop <= self.q_len)

  def q_full_range(self, kv_start: IntLike, kv_stop: IntLike) -> tuple[IntLike, IntLike]:
    """Half-open range of queries that see EVERY key in ``[kv_start, kv_stop)`` (the transpose)."""
    last_key = kv_stop - 1
    start = 0 if self.right is None else jnp.maximum(last_key - self.offset - self.right, 0)
    stop = (self.q_len if self.left is None
            else jnp.minimum(kv_start - self.offset + self.left + 1, self.q_len))
    return start, stop * _as_int(kv_stop <= self.kv_len)


def _as_int(condition) -> IntLike:
  """0 or 1 (arithmetic instead of a scalar ``where``, which Pallas' Triton lowering mistypes)."""
  return jnp.asarray(condition, jnp.int32)


def attention_mask(spec: MaskSpec, q_pos: Int[Array, " q"], kv_pos: Int[Array, " kv"],
                   q_segment_ids: Int[Array, "batch q"] | None = None,
                   kv_segment_ids: Int[Array, "batch kv"] | None = None,
                   ) -> Bool[Array, "batch_or_1 q kv"]:
  """The full mask of a block of queries against a block of keys.

  Args:
    spec: the static band and lengths.
    q_pos, kv_pos: absolute positions of the block's queries and keys.
    q_segment_ids, kv_segment_ids: the block's segment ids, or both None.

  Returns:
    ``[batch, q, kv]`` with segment ids, else ``[1, q, kv]``; True where attention is allowed.
  """
  mask = spec.allowed(q_pos, kv_pos)[None]
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  return mask
