"""Packed prefill (Prepacking) on real SmolLM2 weights (2 blocks) against the padded prefill."""

import jax
import numpy as np
import pytest

from effjax.kv_cache import KIVI, FullKVCache, XQuant, XQuantCL
from effjax.models import (extend, generate, init_caches, left_pad, pack_prompts, prefill,
                           prefill_packed)

TEXTS = ("The government said on Monday that it would not change its plans for the new tax.",
         "Australia's cricket team won the match",
         "Rain",
         "The Prime Minister flew to Sydney on Tuesday to meet the",
         "Fire crews battled blazes across New South Wales",
         "Hello there")


@pytest.fixture(scope="module")
def prompts(smollm2_2layers):
  _, _, tokenizer = smollm2_2layers
  return [tokenizer.encode(text) for text in TEXTS]


def test_plan_places_each_prompt_and_its_cache_slots(prompts):
  plan = pack_prompts(prompts)
  longest = max(map(len, prompts))
  assert plan.tokens.shape[1] == longest and plan.tokens.shape[0] < len(prompts)  # rows shared
  for n, prompt in enumerate(prompts):
    start = longest - len(prompt)
    assert plan.start[n] == start
    rebuilt = plan.tokens[plan.source_row[n, start:], plan.source_col[n, start:]]
    assert rebuilt.tolist() == prompt
    assert plan.tokens[plan.last_row[n], plan.last_col[n]] == prompt[-1]
    assert np.all(plan.source_row[n, :start] == 0) and np.all(plan.source_col[n, :start] == 0)


def test_packed_prefill_matches_padded_logits_and_decoding(smollm2_2layers, prompts):
  model, params, tokenizer = smollm2_2layers
  tokens, start = left_pad(prompts, tokenizer.pad_id)
  max_len = tokens.shape[1] + 1
  padded_logits, padded_caches = jax.jit(prefill, static_argnums=0)(
      model, params, tokens, start, init_caches(model, len(prompts), max_len))
  packed_logits, packed_caches = prefill_packed(
      model, params, prompts, init_caches(model, len(prompts), max_len), all_logits=True)
  last, _ = prefill_packed(model, params, prompts, init_caches(model, len(prompts), max_len))
  real = np.arange(tokens.shape[1])[None, :] >= start[:, None]
  np.testing.assert_allclose(np.asarray(packed_logits)[real], np.asarray(padded_logits)[real],
                             atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(last, padded_logits[:, -1], atol=1e-4, rtol=1e-4)
  assert not np.asarray(packed_logits)[~real].any()
  # Same K/V in every real cache slot; the next decoding step sees the same context.
  for a, b in zip(packed_caches, padded_caches):
    np.testing.assert_allclose(np.asarray(a.k)[:, :tokens.shape[1]][real],
                               np.asarray(b.k)[:, :tokens.shape[1]][real], atol=1e-4)
  token = np.full((len(prompts), 1), 7, np.int32)
  positions = tokens.shape[1] - start[:, None]
  step = jax.jit(extend, static_argnums=0)
  np.testing.assert_allclose(step(model, params, token, positions, packed_caches)[0],
                             step(model, params, token, positions, padded_caches)[0],
                             atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cache_type", [FullKVCache, KIVI(bits=2, group_size=32, residual=32),
                                        XQuant(bits=4, group_size=64), XQuantCL()])
def test_generate_with_packed_prefill_gives_the_same_greedy_tokens(smollm2_2layers, prompts,
                                                                   cache_type):
  model, params, tokenizer = smollm2_2layers
  run = lambda prefill: generate(model, params, prompts, max_new_tokens=8,
                                 pad_id=tokenizer.pad_id, cache_type=cache_type, prefill=prefill)
  assert run("packed") == run("padded")


def test_fixed_row_count_and_bad_input(smollm2_2layers, prompts):
  model, params, tokenizer = smollm2_2layers
  plan = pack_prompts(prompts, row_len=64, num_rows=4)
  assert plan.tokens.shape == (4, 64)
  with pytest.raises(ValueError, match="num_rows is 1; expected None or an int >= 3"):
    pack_prompts(prompts, num_rows=1)
  with pytest.raises(ValueError, match=r"sequences\[0\] has \d+ tokens; expected at most row_len=4"):
    pack_prompts(prompts, row_len=4)
  with pytest.raises(ValueError, match=r"prompts\[1\] has ids outside"):
    prefill_packed(model, params, [[1], [model.config.vocab_size]], init_caches(model, 2, 4))
  with pytest.raises(ValueError, match="prefill is 'chunked'; expected one of"):
    generate(model, params, prompts, max_new_tokens=2, pad_id=tokenizer.pad_id, prefill="chunked")
