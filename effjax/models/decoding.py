"""Cached forward passes of a :class:`effjax.nn.DecoderLM`: prefill a prompt, then extend it.

The model is unchanged: both functions run ``model`` with a different ``attention_fn`` that routes
each layer's post-RoPE keys and values through that layer's :class:`effjax.kv_cache.KVCache`
(a tuple of caches, one per layer, is the model's cache):

* :func:`prefill` stores the prompt's K/V with ``cache.prefill`` and attends with the model's own
  ``attention_fn`` (e.g. flash attention: O(prompt) memory), masking left padding with segment
  ids;
* :func:`extend` stores the new tokens' K/V with ``cache.append`` and attends with
  ``cache.decode_attention`` (one token per decoding step, GQA without repeating K/V; a quantized
  cache's op of :mod:`effjax.ops.kv_decode`, by the implementation ``effjax.dispatch`` picks).

Caches that store the layer input instead of K/V (:class:`effjax.kv_cache.LayerInputCache`,
XQuant) get it as :class:`effjax.kv_cache.LayerInputs`: the router intercepts each
``DecoderBlock``/``MultiHeadAttention`` call (``flax.linen.intercept_methods``) to read the
residual stream, the attention's input and the layer's weights, and threads the carry each such
cache's write returns to the next layer's cache. A cache type with a ``for_layer(layer, config)``
method gets per-layer settings from it (e.g. XQuant-CL's wider first layers); ``init_caches``
with ``params`` lets such caches precompute from their layer's weights once (XQuant's SVD).

Both are pure functions of arrays and caches; jit them (``model`` static). The routing relies on
DecoderLM calling ``attention_fn`` once per layer, in layer order, inside one trace; this is
checked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from effjax.kv_cache import CacheType, FullKVCache, KVCache
from effjax.kv_cache.base import LayerInputCache, LayerInputs
from effjax.nn import DecoderBlock, DecoderLM, MultiHeadAttention

Caches = tuple[KVCache, ...]


def init_caches(model: DecoderLM, batch: int, max_len: int, *,
                cache_type: CacheType = FullKVCache, dtype: Any = None,
                params: Any = None) -> Caches:
  """One empty cache per layer of ``model``, ``max_len`` slots each (``dtype``: model's).

  ``params`` (the model's variables): caches of layer inputs get their layer's attention weights
  (:meth:`effjax.kv_cache.LayerInputCache.with_weights`, e.g. XQuant's SVD factors, computed once
  per model); latent XQuant caches require it.
  """
  config = model.config
  for_layer = getattr(cache_type, "for_layer", None)
  caches = []
  for layer in range(config.num_layers):
    cache = (cache_type if for_layer is None else for_layer(layer, config)).init(
        batch, max_len, num_kv_heads=config.num_kv_heads, head_dim=config.resolved_head_dim,
        dtype=model.dtype if dtype is None else dtype)
    if params is not None and isinstance(cache, LayerInputCache):
      weights = params["params"][f"layer_{layer}"]["attention"]
      cache = cache.with_weights(weights["key"]["kernel"], weights["value"]["kernel"])
    caches.append(cache)
  return tuple(caches)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
  """The prompts as lists of ints; ValueError naming the prompt unless each is a non-empty
  sequence of ids in ``[0, vocab_size)``."""
  if isinstance(prompts, (str, bytes)) or not prompts:
    raise ValueError("prompts must be a non-empty sequence of token id lists, got "
                     f"{type(prompts).__name__} {prompts!r:.40}")
  checked = []
  for i, prompt in enumerate(prompts):
    ids = np.asarray(prompt)
    if ids.ndim != 1 or not ids.size or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(
          f"prompts[{i}] must be a non-empty list of int token ids, got {prompt!r:.40}")
    if ids.min() < 0 or ids.max() >= vocab_size:
      raise ValueError(f"prompts[{i}] has ids outside [0, vocab_size={vocab_size})")
    checked.append(ids.tolist())
  return checked


class CacheRouter:
  """An ``attention_fn`` that sends layer ``i``'s K/V through ``caches[i]`` (see module doc).

  ``write_inputs(cache, inputs, previous) -> (cache, carry)`` and ``attend_inputs(cache, q, k, v,
  inputs, previous, **kw)`` serve :class:`LayerInputCache` layers instead of ``write`` /
  ``attend``.
  """

  def __init__(self, caches: Sequence[KVCache],
               write: Callable[[KVCache, jax.Array, jax.Array], KVCache],
               attend: Callable[..., jax.Array],
               write_inputs: Callable[..., LayerInputCache] | None = None,
               attend_inputs: Callable[..., jax.Array] | None = None):
    self.caches = tuple(caches)
    self.write = write
    self.attend = attend
    self.write_inputs = write_inputs
    self.attend_inputs = attend_inputs
    self.updated: list[KVCache] = []
    self.carry: Any = None  # what the last LayerInputCache's write returned
    self.inputs: dict[str, Any] = {}  # read from the current block by _intercept

  def _intercept(self, next_fun, args, kwargs, context):
    """Records the residual stream, the attention input and weights of the block being run."""
    module = context.module
    if context.method_name == "__call__" and isinstance(module, DecoderBlock):
      norm = module.variables["params"]["attention_norm"]["scale"]
      self.inputs = {"residual": args[0], "norm_scale": norm,
                     "norm_eps": module.config.norm_eps}
    elif context.method_name == "__call__" and isinstance(module, MultiHeadAttention):
      if module.qk_norm:
        raise ValueError("the model uses qk_norm; caches of layer inputs (XQuant) do not "
                         "rematerialize normalized keys")
      weights = module.variables["params"]
      self.inputs |= {"x": args[0], "key_kernel": weights["key"]["kernel"],
                      "value_kernel": weights["value"]["kernel"],
                      "rope_theta": module.rope_theta}
    return next_fun(*args, **kwargs)

  def __call__(self, q, k, v, *, causal, q_segment_ids=None, kv_segment_ids=None):
    layer = len(self.updated)
    if layer >= len(self.caches):
      raise ValueError(f"the model has more attention layers than the {len(self.caches)} caches")
    kw = {"causal": causal, "q_segment_ids": q_segment_ids, "kv_segment_ids": kv_segment_ids}
    cache = self.caches[layer]
    if isinstance(cache, LayerInputCache):
      inputs = LayerInputs(**self.inputs)
      previous = self.carry
      cache, self.carry = self.write_inputs(cache, inputs, previous)
      self.updated.append(cache)
      return self.attend_inputs(cache, q, k, v, inputs, previous, **kw)
    cache = self.write(cache, k, v)
    self.updated.append(cache)
    return self.attend(cache, q, k, v, **kw)

  def run(self, model: DecoderLM, params: Any, *args: Any, **kwargs: Any
          ) -> tuple[jax.Array, Caches]:
    with nn.intercept_methods(self._intercept):
      logits = model.clone(attention_fn=self).apply(params, *args, **kwargs)
    if len(self.updated) != len(self.caches):
      raise ValueError(f"the model ran {len(self.updated)} attention layers for "
                       f"{len(self.caches)} caches; expected one cache per layer")
    return logits, tuple(self.updated)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int
             ) -> tuple[Int[np.ndarray, "batch seq"], Int[np.ndarray, "batch"]]:
  """Prompts left-padded with ``pad_id`` to the longest one: int32 ``(tokens [batch, seq],
  start [batch])``, ``start[b]`` the first real slot of row ``b`` (the input of :func:`prefill`)."""
  length = max(len(p) for p in prompts)
  start = np.asarray([length - len(p) for p in prompts], np.int32)
  return np.asarray([[pad_id] * s + list(p) for s, p in zip(start, prompts)], np.int32), start


def prompt_layout(start: Int[Array, "batch"], seq: int
                  ) -> tuple[Int[Array, "batch seq"], Int[Array, "batch seq"]]:
  """Positions and segment ids of left-padded rows whose real tokens begin at slot ``start``.

  Returns:
    ``(positions, segment_ids)``: positions count from 0 at ``start`` (0 on padding); segment ids
    are 1 on real tokens and 0 on padding, so no real token attends to padding.
  """
  slot = jnp.arange(seq, dtype=jnp.int32)[None, :]
  start = jnp.asarray(start, jnp.int32)[:, None]
  return jnp.maximum(slot - start, 0), (slot >= start).astype(jnp.int32)


def prefill(model: DecoderLM, params: Any, tokens: Int[Array, "batch seq"],
            start: Int[Array, "batch"], caches: Caches, *, last_only: bool = False
            ) -> tuple[Float[Array, "batch seq vocab"] | Float[Array, "batch vocab"], Caches]:
  """Runs a left-padded prompt through ``model``, storing every layer's K/V in ``caches``.

  Args:
    model: the decoder.
    params: its variables.
    tokens: prompts, row ``b`` left-padded with ``start[b]`` arbitrary valid ids.
    start: int ``[batch]``, each row's first real slot, in ``[0, seq)``.
    caches: :func:`init_caches` with ``max_len >= seq``.
    last_only: compute only the last slot's logits, ``[batch, vocab]`` (what decoding needs; the
      vocabulary projection then runs on ``batch`` tokens, not ``batch * seq``).

  Returns:
    float32 logits (rows' padding positions are meaningless) and the filled caches.
    Memory: the model's forward pass on ``[batch, seq]`` plus the caches.
  """
  positions, segment_ids = prompt_layout(start, tokens.shape[1])
  attend = lambda cache, q, k, v, *_, **kw: model.attention_fn(q, k, v, **kw)
  router = CacheRouter(
      caches, lambda cache, k, v: cache.prefill(k, v, start), attend,
      lambda cache, inputs, previous: cache.prefill_inputs(inputs, start, previous), attend)
  batch, seq = tokens.shape
  last = (jnp.arange(batch), jnp.full((batch,), seq - 1)) if last_only else None
  return router.run(model, params, tokens, positions, segment_ids, logits_at=last)


def extend(model: DecoderLM, params: Any, tokens: Int[Array, "batch seq"],
           positions: Int[Array, "batch seq"], caches: Caches
           ) -> tuple[Float[Array, "batch seq vocab"], Caches]:
  """Appends real tokens (every row's) after the cached ones and returns their logits.

  Args:
    model: the decoder.
    params: its variables.
    tokens: the new tokens; ``seq`` is 1 when decoding.
    positions: their RoPE positions (row ``b``'s slot minus its ``start``).
    caches: the caches after :func:`prefill` (and earlier extends), with ``seq`` free slots.

  Returns:
    float32 logits of the new tokens and the updated caches.
    Memory: the caches' ``attend`` (FullKVCache: ``batch * heads * seq * max_len`` floats).
  """
  router = CacheRouter(
      caches, lambda cache, k, v: cache.append(k, v),
      lambda cache, q, k, v, **kw: cache.decode_attention(q),
      lambda cache, inputs, previous: cache.append_inputs(inputs, previous),
      lambda cache, q, k, v, inputs, previous, **kw: cache.attend_inputs(q, inputs, previous))
  return router.run(model, params, tokens, positions)
