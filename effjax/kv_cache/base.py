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
from typing import Any, NamedTuple, Protocol, Self

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


def check_positive_int(name: str, value: Any) -> None:
  """Raises ValueError naming ``name`` unless ``value`` is a positive int (not a bool)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} is {value!r}; expected a positive int")


def check_kv(k: jax.Array, v: jax.Array, *, batch: int, kv_heads: int, head_dim: int,
             max_len: int) -> None:
  """Validates keys/values written to a cache of that geometry: a ValueError (shape) or TypeError
  (not floating) naming the argument."""
  expected = (batch, kv_heads, head_dim)
  for name, x in (("k", k), ("v", v)):
    check_floating_array(name, x)
    if x.ndim != 4 or (x.shape[0], x.shape[2], x.shape[3]) != expected:
      raise ValueError(
          f"{name} has shape {x.shape}; expected [batch, seq, kv_heads, head_dim] with "
          f"[batch, kv_heads, head_dim] = {list(expected)} as in the cache")
  if k.shape[1] != v.shape[1]:
    raise ValueError(f"k has {k.shape[1]} tokens and v has {v.shape[1]}; expected the same")
  if k.shape[1] > max_len:
    raise ValueError(f"k has {k.shape[1]} tokens; expected at most max_len={max_len}")


def check_floating_array(name: str, x: Any) -> None:
  """Raises TypeError naming ``name`` unless ``x`` is an array of a floating dtype."""
  dtype = getattr(x, "dtype", None)
  if dtype is None or not hasattr(x, "shape"):
    raise TypeError(f"{name} is a {type(x).__name__}; expected a floating array")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name} has dtype {dtype}; expected a floating dtype")


def check_floating_dtype(name: str, dtype: Any) -> None:
  """Raises TypeError naming ``name`` unless ``dtype`` is a floating dtype (a cache's storage)."""
  try:
    given = jnp.dtype(dtype)
  except TypeError:
    raise TypeError(f"{name} is {dtype!r}; expected a floating dtype (e.g. jnp.float32)") from None
  if not jnp.issubdtype(given, jnp.floating):
    raise TypeError(f"{name} is {given}; expected a floating dtype (e.g. jnp.float32)")


def check_start(start: Any, batch: int, seq: int | None = None) -> jax.Array:
  """``start`` as int32 ``[batch]``, or a ValueError naming it.

  With ``seq`` (a prompt's length), a concrete ``start`` must lie in ``[0, seq]`` (``seq``: the
  row's prompt is empty, its first real token comes with the next append); a traced one (under
  ``jit``) is checked for shape and dtype only.
  """
  start = jnp.asarray(start)
  if start.shape != (batch,) or not jnp.issubdtype(start.dtype, jnp.integer):
    raise ValueError(f"start has dtype {start.dtype} and shape {start.shape}; expected integer "
                     f"[batch] = [{batch}]")
  if seq is not None and not isinstance(start, jax.core.Tracer):
    values = np.asarray(start)  # concrete: no ops staged into an enclosing trace
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > seq:
      raise ValueError(f"start has values in [{low}, {high}]; expected each in [0, seq={seq}] "
                       "(the slot of each row's first real token)")
  return start.astype(jnp.int32)


def check_room(length: jax.Array, seq: int, max_len: int) -> None:
  """Raises ValueError if appending ``seq`` tokens overflows (only checkable outside ``jit``)."""
  if not isinstance(length, jax.core.Tracer) and int(length) + seq > max_len:
    raise ValueError(f"appending {seq} tokens to a cache holding {int(length)} "
                     f"exceeds its max_len={max_len}")


def check_query(q: jax.Array, *, batch: int, kv_heads: int, head_dim: int) -> None:
  """Validates the queries given to ``attend`` (ValueError naming ``q``)."""
  if q.ndim != 4 or q.shape[0] != batch or q.shape[3] != head_dim or q.shape[2] % kv_heads:
    raise ValueError(
        f"q has shape {q.shape}; expected [batch={batch}, seq, heads, head_dim={head_dim}] "
        f"with heads a multiple of kv_heads={kv_heads}")


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
        ``[0, seq]`` (``seq``: no real token yet; it comes with the next append).
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

  def decode_attention(self, q: Float[Array, "batch seq heads head_dim"], *,
                       scale: float | None = None) -> Float[Array, "batch seq heads head_dim"]:
    """:meth:`attend` as a decoding step runs it (:func:`effjax.models.extend`): the quantized
    caches (KIVI, VidKV) run their op of :mod:`effjax.ops.kv_decode` in the platform's default
    order (``effjax.dispatch``); the others attend directly."""
    return self.attend(q, scale=scale)

  def nbytes(self) -> int:
    """Bytes of every array in the cache (codes, scales, bookkeeping), per layer."""
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(self))


def check_group_and_residual(group_size: Any, residual: Any) -> None:
  """Validates a quantized cache's group size G and full-precision residual R (R % G == 0)."""
  check_positive_int("group_size", group_size)
  check_positive_int("residual", residual)
  if residual % group_size:
    raise ValueError(f"residual is {residual}; expected a multiple of group_size={group_size} "
                     "(a flushed residual block is a whole number of groups)")


class StreamingQuantizedCache(KVCache):
  """Shared by caches that keep a full-precision residual of recent tokens and quantize it in
  blocks as it fills (KIVI, VidKV): subclasses define the static field ``capacity`` (= max_len),
  the arrays ``k_residual [batch, R, kv_heads, head_dim]``, and ``_append_one(k, v)`` (one token,
  ``[batch, kv_heads, head_dim]``, with their streaming rules)."""

  @property
  def max_len(self) -> int:
    return self.capacity

  @property
  def _geometry(self) -> dict[str, int]:
    batch, _, kv_heads, head_dim = self.k_residual.shape
    return {"batch": batch, "kv_heads": kv_heads, "head_dim": head_dim}

  def append(self, k: Float[Array, "batch seq kv_heads head_dim"],
             v: Float[Array, "batch seq kv_heads head_dim"]) -> Self:
    """Appends ``seq`` tokens one at a time through ``_append_one`` (the streaming rules)."""
    check_kv(k, v, **self._geometry, max_len=self.max_len)
    check_room(self.length, k.shape[1], self.max_len)
    cache = self
    for i in range(k.shape[1]):
      cache = cache._append_one(k[:, i], v[:, i])
    return cache

  @abc.abstractmethod
  def _append_one(self, k: jax.Array, v: jax.Array) -> Self:
    """Appends one token per row."""


class LayerInputs(NamedTuple):
  """What the decoding router hands a :class:`LayerInputCache` for one layer, instead of K/V.

  Attributes:
    x: the attention's input (post-norm), ``[batch, seq, d_model]``: what W_k and W_v consume.
    residual: the residual stream before the attention norm, ``[batch, seq, d_model]``.
    key_kernel, value_kernel: ``[d_model, kv_heads, head_dim]``, ``k = x @ key_kernel`` (then
      RoPE), ``v = x @ value_kernel``.
    norm_scale: ``[d_model]``, the attention RMSNorm's scale: ``x = rmsnorm(residual) * scale``.
    norm_eps: that norm's epsilon.
    rope_theta: RoPE base of the keys.
  """
  x: jax.Array
  residual: jax.Array
  key_kernel: jax.Array
  value_kernel: jax.Array
  norm_scale: jax.Array
  norm_eps: float
  rope_theta: float


class LayerInputCache(KVCache):
  """A cache that stores (a function of) the layer input and rematerializes K/V from it (XQuant).

  :mod:`effjax.models.decoding` routes such caches through the three ``*_inputs`` methods below
  (it reads :class:`LayerInputs` from the model), in layer order, threading what each layer's
  write returns (a "carry", opaque to the router; None for the first layer) to the next layer:
  cross-layer caches store deltas against the layers before them and read their codes. The K/V
  methods of :class:`KVCache` raise TypeError.
  """

  @abc.abstractmethod
  def prefill_inputs(self, inputs: LayerInputs, start: Int[Array, "batch"], previous: Any
                     ) -> tuple[Self, Any]:
    """Stores a left-padded prompt's inputs in slots ``[0, seq)`` (see :meth:`KVCache.prefill`);
    ``previous`` is the previous layer's carry. Returns the cache and this layer's carry."""

  @abc.abstractmethod
  def append_inputs(self, inputs: LayerInputs, previous: Any) -> tuple[Self, Any]:
    """Stores ``seq`` new tokens' inputs in the next slots (see :meth:`KVCache.append`); returns
    the cache and this layer's carry."""

  @abc.abstractmethod
  def attend_inputs(self, q: Float[Array, "batch seq heads head_dim"], inputs: LayerInputs,
                    previous: Any, *, scale: float | None = None
                    ) -> Float[Array, "batch seq heads head_dim"]:
    """:meth:`KVCache.attend`, with K/V rematerialized from the stored inputs and the layer's
    weights in ``inputs``; ``previous``: the carry this layer was written with."""

  def with_weights(self, key_kernel: Float[Array, "d_model kv_heads head_dim"],
                   value_kernel: Float[Array, "d_model kv_heads head_dim"]) -> Self:
    """This cache with whatever it precomputes from its layer's weights (default: nothing);
    :func:`effjax.models.init_caches` calls it when given the model's params."""
    del key_kernel, value_kernel
    return self

  def _needs_inputs(self, *_, **__):
    raise TypeError(f"{type(self).__name__} stores layer inputs, not keys/values; use it through "
                    "effjax.models.decoding (prefill/extend), which calls *_inputs")

  prefill = append = attend = _needs_inputs


class CacheFactory(Protocol):
  """Anything with KVCache's ``init`` signature, e.g. settings objects like :class:`KIVI`."""

  def init(self, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int,
           dtype: Any = ...) -> KVCache:
    ...


# What decoding and generation accept as ``cache_type``: a cache class or a (hashable) factory.
CacheType = type[KVCache] | CacheFactory
