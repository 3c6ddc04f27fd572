"""Cached forward passes on real SmolLM2 weights (2 blocks) against the plain forward pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import testing
from effjax.models import extend, init_caches, left_pad, prefill, prompt_layout
from effjax.ops.attention import flash_attention

TEXTS = ("The government said on Monday that it would not change its plans.",
         "Australia's cricket team won the match")


@pytest.fixture(scope="module")
def rows(smollm2_2layers):
  _, _, tokenizer = smollm2_2layers
  return [tokenizer.encode(text) for text in TEXTS]


def test_padding_does_not_change_a_rows_logits(smollm2_2layers, rows):
  model, params, tokenizer = smollm2_2layers
  tokens, start = left_pad(rows, tokenizer.pad_id)
  positions, segment_ids = prompt_layout(start, tokens.shape[1])
  batched = jax.jit(model.apply)(params, tokens, positions, segment_ids)
  for b, row in enumerate(rows):
    alone = jax.jit(model.apply)(params, jnp.asarray([row]))
    testing.assert_close(batched[b, start[b]:], alone[0])


def test_prefill_then_token_by_token_equals_full_forward(smollm2_2layers, rows):
  model, params, tokenizer = smollm2_2layers
  prompt_len = 6
  prompts, start = left_pad([row[:prompt_len + b] for b, row in enumerate(rows)],
                             tokenizer.pad_id)
  steps = min(map(len, rows)) - prompt_len - 1
  caches = init_caches(model, len(rows), prompts.shape[1] + steps)
  logits, caches = jax.jit(prefill, static_argnums=0)(model, params, prompts, start, caches)
  cached = [logits[:, -1]]
  step = jax.jit(extend, static_argnums=0)
  for i in range(steps):
    token = np.array([[row[prompt_len + b + i]] for b, row in enumerate(rows)], np.int32)
    positions = prompts.shape[1] + i - start[:, None]
    logits, caches = step(model, params, token, positions, caches)
    cached.append(logits[:, 0])
  cached = jnp.stack(cached, axis=1)
  for b, row in enumerate(rows):
    full = jax.jit(model.apply)(params, jnp.asarray([row]))[0]
    expected = full[prompt_len + b - 1:prompt_len + b + steps]
    testing.assert_close(cached[b], expected)
  assert int(caches[0].length) == prompts.shape[1] + steps


def test_prefill_last_only_gives_the_last_logits_and_the_same_caches(smollm2_2layers, rows):
  model, params, tokenizer = smollm2_2layers
  prompts, start = left_pad(rows, tokenizer.pad_id)
  run = jax.jit(prefill, static_argnums=0, static_argnames="last_only")
  fresh = lambda: init_caches(model, len(rows), prompts.shape[1] + 4)
  logits, caches = run(model, params, prompts, start, fresh())
  last, last_caches = run(model, params, prompts, start, fresh(), last_only=True)
  assert last.shape == (len(rows), model.config.vocab_size)
  testing.assert_close(last, logits[:, -1])
  for cache, last_cache in zip(caches, last_caches):
    np.testing.assert_array_equal(last_cache.k, cache.k)
    np.testing.assert_array_equal(last_cache.v, cache.v)


def test_flash_attention_in_the_model_matches_reference_attention(smollm2_2layers, rows):
  model, params, tokenizer = smollm2_2layers
  tokens, start = left_pad(rows, tokenizer.pad_id)
  positions, segment_ids = prompt_layout(start, tokens.shape[1])
  logits = {
      implementation: jax.jit(model.clone(attention_fn=functools.partial(
          flash_attention, implementation=implementation)).apply)(
              params, tokens, positions, segment_ids)
      for implementation in ("xla", "reference")}
  real = np.asarray(segment_ids, bool)  # padding positions' logits are meaningless
  testing.assert_close(logits["xla"][real], logits["reference"][real])


def test_prefill_with_default_flash_attention_matches_reference(smollm2_2layers, rows):
  model, params, tokenizer = smollm2_2layers  # default attention_fn: flash_attention
  tokens, start = left_pad(rows, tokenizer.pad_id)
  reference = model.clone(attention_fn=functools.partial(flash_attention,
                                                         implementation="reference"))
  results = [jax.jit(prefill, static_argnums=0)(m, params, tokens, start,
                                                init_caches(m, len(rows), tokens.shape[1]))
             for m in (model, reference)]
  (logits, caches), (reference_logits, reference_caches) = results
  real = np.asarray(prompt_layout(start, tokens.shape[1])[1], bool)
  testing.assert_close(logits[real], reference_logits[real])
  testing.assert_close(caches, reference_caches)


def test_cache_count_must_match_layers(smollm2_2layers):
  model, params, _ = smollm2_2layers
  caches = init_caches(model, 1, 8)
  run = lambda caches: jax.eval_shape(functools.partial(prefill, model), params,
                                      jnp.ones((1, 4), jnp.int32), jnp.zeros(1, jnp.int32), caches)
  with pytest.raises(ValueError, match="more attention layers than the 1 caches"):
    run(caches[:1])
  with pytest.raises(ValueError, match="ran 2 attention layers for 3 caches"):
    run(caches + caches[:1])
