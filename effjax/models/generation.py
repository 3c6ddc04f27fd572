"""Batched autoregressive generation with a KV cache: jitted prefill, then a jitted decode loop.

Prompts of different lengths are LEFT-padded to a common length; each row's positions restart at
its first real token and padding is never attended to, so a row's tokens do not depend on the
other rows. The decode loop is one ``lax.while_loop`` inside one jitted function whose shapes
depend only on ``(batch, max_len, max_new_tokens)``: it compiles once for any prompt that fits
(the prompt length is a traced scalar), and stops as soon as every row has produced ``eos_id``.
Rows that finished emit ``pad_id``.

Sampling (:class:`Sampling`): greedy (``temperature=0``), or softmax sampling at a temperature,
optionally restricted to the ``top_k`` most likely tokens and/or the smallest set whose
probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020).

Memory: the caches (FullKVCache: ``2 * layers * batch * max_len * kv_heads * head_dim`` floats),
the prefill's forward pass, and ``batch * max_new_tokens`` output ids.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from effjax.kv_cache import CacheType, FullKVCache
from effjax.models import decoding, packed_prefill
from effjax.nn import DecoderLM

# Default cache sizes are rounded up to a multiple of this, so nearby prompt lengths share one
# compiled decode loop.
CACHE_LEN_MULTIPLE = 128
PREFILLS = ("padded", "packed")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen from the logits.

  Attributes:
    temperature: 0 picks the most likely token (greedy); > 0 samples from
      ``softmax(logits / temperature)``.
    top_k: sample among the ``top_k`` most likely tokens only (None: all).
    top_p: sample among the most likely tokens whose probabilities sum to at least ``top_p``
      (None: all); tokens tied with the least likely kept one are kept too.
  """
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if not (_is_real(self.temperature) and math.isfinite(self.temperature)
            and self.temperature >= 0):
      raise ValueError(f"temperature is {self.temperature!r}; expected a finite float >= 0")
    if self.top_k is not None and (isinstance(self.top_k, bool)
                                   or not isinstance(self.top_k, (int, np.integer))
                                   or self.top_k < 1):
      raise ValueError(f"top_k is {self.top_k!r}; expected None or an int >= 1")
    if self.top_p is not None and not (_is_real(self.top_p) and 0 < self.top_p <= 1):
      raise ValueError(f"top_p is {self.top_p!r}; expected None or a float in (0, 1]")
    if self.temperature == 0 and (self.top_k is not None or self.top_p is not None):
      raise ValueError(f"top_k={self.top_k} / top_p={self.top_p} need a temperature > 0; "
                       "temperature=0 is greedy")


def _is_real(value: Any) -> bool:
  """A real number (Python or NumPy), not a bool (an int in Python) nor a bool array."""
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
      value, (bool, np.bool_))


def sample_tokens(logits: Float[Array, "batch vocab"], key: jax.Array,
                  sampling: Sampling) -> Int[Array, "batch"]:
  """Chooses one token per row (see :class:`Sampling`); int32. Memory: O(batch * vocab)."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
    kth_largest = lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if sampling.top_p is not None and sampling.top_p < 1:
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    # Keep a token while the mass of the more likely ones is still below top_p (the first always).
    keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p
    threshold = jnp.min(jnp.where(keep, descending, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model",))
def _prefill(model: DecoderLM, params: Any, tokens: jax.Array, start: jax.Array,
             caches: decoding.Caches) -> tuple[jax.Array, decoding.Caches]:
  return decoding.prefill(model, params, tokens, start, caches, last_only=True)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "eos_id",
                                             "pad_id"))
def _decode(model: DecoderLM, params: Any, caches: decoding.Caches, logits: jax.Array,
            start: jax.Array, slot: jax.Array, key: jax.Array, *, max_new_tokens: int,
            sampling: Sampling, eos_id: int | None, pad_id: int) -> jax.Array:
  """The decode loop; ``slot`` (traced) is the cache slot of the first generated token."""
  batch = logits.shape[0]
  eos = -1 if eos_id is None else eos_id

  def emit(step, token, out, done):
    token = jnp.where(done, pad_id, token)
    return out.at[:, step].set(token), done | (token == eos), token

  key, first_key = jax.random.split(key)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  out, done, token = emit(0, sample_tokens(logits, first_key, sampling), out,
                          jnp.zeros((batch,), bool))

  def cond(state):
    step, _, _, _, _, done = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, caches, token, key, out, done = state
    positions = (slot + step - 1 - start)[:, None]
    logits, caches = decoding.extend(model, params, token[:, None], positions, caches)
    key, step_key = jax.random.split(key)
    out, done, token = emit(step, sample_tokens(logits[:, -1], step_key, sampling), out, done)
    return step + 1, caches, token, key, out, done

  state = (jnp.asarray(1, jnp.int32), caches, token, key, out, done)
  return lax.while_loop(cond, body, state)[4]


def generate(model: DecoderLM, params: Any, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, pad_id: int, eos_id: int | None = None,
             sampling: Sampling = Sampling(), key: jax.Array | None = None,
             max_len: int | None = None, cache_type: CacheType = FullKVCache,
             prefill: str = "padded") -> list[list[int]]:
  """Continues each prompt by up to ``max_new_tokens`` tokens.

  Args:
    model: the decoder; params: its variables.
    prompts: token id lists, of any lengths >= 1.
    max_new_tokens: tokens to generate per prompt (fewer for a row that produces ``eos_id``).
    pad_id: id written on padding and after a row's EOS (any valid id).
    eos_id: generation stops for a row once it produces this id (None: never).
    sampling: see :class:`Sampling`.
    key: PRNG key; required when ``sampling.temperature > 0``.
    max_len: cache slots; at least longest prompt + max_new_tokens. Default: that, rounded up to
      a multiple of CACHE_LEN_MULTIPLE (so the decode loop is reused across prompt lengths).
    cache_type: the KVCache class, or settings with an ``init`` like it (e.g.
      ``effjax.kv_cache.KIVI(bits=2)``).
    prefill: ``"padded"`` (the prompts left-padded to the longest, one row each) or
      ``"packed"`` (:func:`effjax.models.prefill_packed`: packed into few rows, then scattered to
      their cache rows; same caches and logits, fewer tokens through the model).

  Returns:
    The generated ids of each prompt (prompt excluded): up to and including ``eos_id``, at most
    ``max_new_tokens``.
  """
  vocab = model.config.vocab_size
  prompts = decoding.check_prompts(prompts, vocab)
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens is {max_new_tokens!r}; expected an int >= 1")
  for name, value in (("pad_id", pad_id), ("eos_id", eos_id)):
    if value is not None and not 0 <= value < vocab:
      raise ValueError(f"{name} is {value!r}; expected an id in [0, vocab_size={vocab})")
  if prefill not in PREFILLS:
    raise ValueError(f"prefill is {prefill!r}; expected one of {list(PREFILLS)}")
  if sampling.temperature > 0 and key is None:
    raise ValueError("key is None; sampling with temperature > 0 needs a PRNG key")
  prompt_len = max(len(p) for p in prompts)
  needed = prompt_len + max_new_tokens
  if max_len is None:
    max_len = -(-needed // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE
  elif max_len < needed:
    raise ValueError(f"max_len is {max_len}; expected >= longest prompt ({prompt_len}) + "
                     f"max_new_tokens ({max_new_tokens}) = {needed}")
  tokens, start = decoding.left_pad(prompts, pad_id)
  # Built outside the jit: per-model precomputation (XQuant's SVD factors) is memoized.
  caches = decoding.init_caches(model, len(prompts), max_len, cache_type=cache_type, params=params)
  if prefill == "packed":
    logits, caches = packed_prefill.prefill_packed(model, params, prompts, caches)
  else:
    logits, caches = _prefill(model, params, tokens, start, caches)
  out = _decode(model, params, caches, logits, start, np.int32(prompt_len),
                jax.random.key(0) if key is None else key, max_new_tokens=max_new_tokens,
                sampling=sampling, eos_id=eos_id, pad_id=pad_id)
  return [row[:row.index(eos_id) + 1] if eos_id in row else row
          for row in np.asarray(out).tolist()]
