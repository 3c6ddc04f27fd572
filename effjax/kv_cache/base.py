"""The KV cache interface: one attention layer's keys and values, kept across decoding steps.

A cache is an immutable pytree (a ``flax.struct.PyTreeNode``), so it jits, shards and checkpoints;
every method that changes it returns a new cache (the optax pattern). Keys are stored after RoPE.
A model holds one cache per layer (a tuple of caches, see :mod:`effjax.models.decoding`).

Slots and padding. A cache of ``max_len`` slots is filled left to right, by every row at once: a
batch of prompts of different lengths is LEFT-padded to a common length, and ``start[b]`` is the
slot of row ``b``'s first real token. Slots before ``start[b]`` are never attended to. The number
of filled slots, ``length``, is the same for every row, so one decoding step writes one slot.

Life cycle::

    cache = FullKVCache.init(batch, max_len, num_kv_heads=3, head_dim=64)
    cache = cache.prefill(k_prompt, v_prompt, start)    # slots [0, prompt_len)
    for each step:
      cache = cache.append(k_new, v_new)                # the next slot(s)
      out = cache.attend(q_new)                         # queries of the tokens just appended

Implementations (full precision here; quantized caches later) differ in what they store and in
how ``attend`` reads it; callers only use this interface.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Self

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class KVCache(flax.struct.PyTreeNode, abc.ABC):
  """One layer's key/value cache. See the module docstring for slots, padding and life cycle."""

  @classmethod
  @abc.abstractmethod
  def init(cls, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int,
           dtype: Any = jnp.float32) -> Self:
    """An empty cache of ``max_len`` slots for ``batch`` rows of ``num_kv_heads`` heads."""

  @property
  @abc.abstractmethod
  def max_len(self) -> int:
    """Number of slots."""

  @abc.abstractmethod
  def prefill(self, k: Float[Array, "batch seq kv_heads head_dim"],
              v: Float[Array, "batch seq kv_heads head_dim"],
              start: Int[Array, "batch"]) -> Self:
    """Stores a left-padded prompt in slots ``[0, seq)`` (replacing any content).

    Args:
      k, v: keys (after RoPE) and values of the prompt.
      start: slot of each row's first real token (the number of padding slots before it), in
        ``[0, seq)``.
    """

  @abc.abstractmethod
  def append(self, k: Float[Array, "batch seq kv_heads head_dim"],
             v: Float[Array, "batch seq kv_heads head_dim"]) -> Self:
    """Stores ``seq`` new tokens (every row's, all real) in the next ``seq`` slots."""

  @abc.abstractmethod
  def attend(self, q: Float[Array, "batch seq heads head_dim"], *,
             scale: float | None = None) -> Float[Array, "batch seq heads head_dim"]:
    """Softmax attention of the queries of the last ``seq`` stored tokens over the cache.

    Query ``i`` sees the real tokens up to and including its own (causal, bottom-right aligned):
    slots ``start[b] <= j <= length - seq + i``. Grouped-query: ``heads`` is a multiple of
    ``kv_heads`` and query head ``h`` uses kv head ``h // (heads // kv_heads)``, without repeating
    K/V. ``scale`` defaults to ``head_dim ** -0.5``.
    """

  def nbytes(self) -> int:
    """Bytes of every array in the cache (codes, scales, bookkeeping), per layer."""
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(self))
