"""Sampling rules, and generation through the KV cache on real SmolLM2 weights (2 blocks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.models import Sampling, generate, sample_tokens
from effjax.models import generation

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def _support(sampling, probs=PROBS, draws=400):
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  keys = jax.random.split(jax.random.key(0), draws)
  tokens = jax.jit(jax.vmap(lambda key: sample_tokens(logits, key, sampling)))(keys)
  return set(np.asarray(tokens).ravel().tolist())


def test_greedy_is_argmax():
  logits = jax.random.normal(jax.random.key(0), (4, 50))
  np.testing.assert_array_equal(sample_tokens(logits, jax.random.key(1), Sampling()),
                                jnp.argmax(logits, axis=-1))


@pytest.mark.parametrize("sampling, support", [
    (Sampling(temperature=1.0), {0, 1, 2, 3}),
    (Sampling(temperature=1.0, top_k=2), {0, 1}),
    (Sampling(temperature=1.0, top_k=1), {0}),
    (Sampling(temperature=1.0, top_p=0.7), {0, 1}),     # 0.5 < 0.7 <= 0.8
    (Sampling(temperature=1.0, top_p=0.81), {0, 1, 2}),
    (Sampling(temperature=1.0, top_p=0.4), {0}),
    (Sampling(temperature=1.0, top_k=3, top_p=0.99), {0, 1, 2}),
])
def test_sampling_support(sampling, support):
  assert _support(sampling) == support


def test_temperature_sharpens():
  logits = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]
  keys = jax.random.split(jax.random.key(0), 2000)
  top_share = lambda t: float(jnp.mean(jax.vmap(
      lambda key: sample_tokens(logits, key, Sampling(temperature=t)))(keys) == 0))
  assert abs(top_share(1.0) - 0.5) < 0.05
  assert top_share(0.2) > 0.88  # p0 = 0.5^5 / sum(p^5) = 0.92


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature is -1.0"),
    (dict(temperature=1.0, top_k=0), "top_k is 0"),
    (dict(temperature=1.0, top_p=1.5), "top_p is 1.5"),
    (dict(top_k=5), "need a temperature > 0"),
    (dict(temperature=True), "temperature is True"),  # bool is an int: not a temperature
    (dict(temperature="0.5"), "temperature is '0.5'"),
    (dict(temperature=1.0, top_k=True), "top_k is True"),
    (dict(temperature=1.0, top_p=True), "top_p is True"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p is nan"),
])
def test_bad_sampling_is_a_clear_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Sampling(**kwargs)


def _naive_greedy(model, params, prompt, new_tokens, buffer_len=32):
  """Greedy decoding by re-running the full forward pass (no cache) on a fixed-size buffer.

  Causal attention keeps the unwritten tail of the buffer from affecting earlier positions.
  """
  forward = jax.jit(model.apply)
  buffer = np.zeros((1, buffer_len), np.int32)
  buffer[0, :len(prompt)] = prompt
  for index in range(len(prompt), len(prompt) + new_tokens):
    buffer[0, index] = int(jnp.argmax(forward(params, buffer)[0, index - 1]))
  return buffer[0, len(prompt):len(prompt) + new_tokens].tolist()


@pytest.fixture(scope="module")
def prompts(smollm2_2layers):
  _, _, tokenizer = smollm2_2layers
  return [tokenizer.encode(text) for text in
          ("The government said on Monday that", "Hello", "In 1999, the company")]


def test_greedy_batch_with_padding_equals_naive_per_prompt(smollm2_2layers, prompts):
  model, params, tokenizer = smollm2_2layers
  out = generate(model, params, prompts, max_new_tokens=6, pad_id=tokenizer.pad_id)
  assert out == [_naive_greedy(model, params, prompt, 6) for prompt in prompts]


def test_eos_stops_each_row(smollm2_2layers, prompts):
  model, params, tokenizer = smollm2_2layers
  free = generate(model, params, prompts, max_new_tokens=5, pad_id=tokenizer.pad_id)
  eos = free[0][2]  # row 0 produces this id by its third token; make it the EOS
  stopped = generate(model, params, prompts, max_new_tokens=5, pad_id=tokenizer.pad_id,
                     eos_id=eos)
  for row_free, row_stopped in zip(free, stopped):
    end = row_free.index(eos) + 1 if eos in row_free else len(row_free)
    assert row_stopped == row_free[:end]
  assert len(stopped[0]) <= 3


def test_decode_loop_compiles_once_across_prompt_lengths(smollm2_2layers, prompts):
  model, params, tokenizer = smollm2_2layers
  run = lambda batch: generate(model, params, batch, max_new_tokens=3, pad_id=tokenizer.pad_id,
                               sampling=Sampling(temperature=0.7, top_k=20),
                               key=jax.random.key(0))
  run(prompts)
  compiled = generation._decode._cache_size()  # pylint: disable=protected-access
  run([prompts[1]] * 3)  # same batch and cache size, other prompt lengths
  run([prompts[0] * 3, prompts[2], prompts[1]])
  assert generation._decode._cache_size() == compiled  # pylint: disable=protected-access


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[]), "non-empty sequence"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\] must be a non-empty list"),
    (dict(prompts=[[1, 10**6]]), r"prompts\[0\] has ids outside \[0, vocab_size=49152\)"),
    (dict(max_new_tokens=0), "max_new_tokens is 0"),
    (dict(eos_id=-3), "eos_id is -3"),
    (dict(max_len=4), r"max_len is 4; expected >= longest prompt \(2\) \+ max_new_tokens \(3\)"),
    (dict(sampling=Sampling(temperature=1.0)), "needs a PRNG key"),
])
def test_bad_generate_arguments_are_clear_errors(smollm2_2layers, kwargs, match):
  model, params, _ = smollm2_2layers
  arguments = dict(prompts=[[1, 2]], max_new_tokens=3, pad_id=0) | kwargs
  with pytest.raises(ValueError, match=match):
    generate(model, params, arguments.pop("prompts"), **arguments)
