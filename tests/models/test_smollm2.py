"""The real SmolLM2-135M GGUF: metadata -> config, weights -> params, and evidence they are right.

The correctness signal is behavioural: the loaded model predicts real English far better than the
same tokens shuffled, and much better with the Q/K rows un-permuted (rotate-half RoPE) than as
stored in the file (see effjax.models.gguf).
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax.models import generate
from effjax.nn import DecoderLM

# Tokens of real text scored: the last Lee-corpus news articles. Measured with the whole model:
# perplexity 29.8; the same tokens shuffled 3233; with the Q/K rows as stored in the file 224.
# The assertions leave wide margins.
MAX_TOKENS = 256


@pytest.fixture(scope="module")
def english(smollm2):
  from effjax.data import load_documents
  _, _, tokenizer = smollm2
  ids = []
  for doc in load_documents("news")[-4:]:
    ids += tokenizer.encode(doc) + [tokenizer.eos_id]
  return np.asarray(ids[:MAX_TOKENS], np.int32)


@pytest.fixture(scope="module")
def perplexity(smollm2):
  """``perplexity(params, tokens)`` of the whole model, compiled once for the module."""
  model, _, _ = smollm2

  @jax.jit
  def mean_nll(params, tokens):
    logits = model.apply(params, tokens[None, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[None, 1:]))

  return lambda params, tokens: math.exp(float(mean_nll(params, tokens)))


def test_config_matches_metadata(smollm2, smollm2_reader):
  model, _, tokenizer = smollm2
  config = model.config
  field = lambda key: smollm2_reader.get_field(key).contents()
  assert isinstance(model, DecoderLM)
  assert (config.num_layers, config.d_model, config.num_heads, config.num_kv_heads,
          config.d_ff, config.rope_theta) == (
              field("llama.block_count"), field("llama.embedding_length"),
              field("llama.attention.head_count"), field("llama.attention.head_count_kv"),
              field("llama.feed_forward_length"), field("llama.rope.freq_base"))
  assert config.norm_eps == field("llama.attention.layer_norm_rms_epsilon")
  assert config.resolved_head_dim == field("llama.rope.dimension_count") == 64
  assert config.vocab_size == field("llama.vocab_size") == tokenizer.vocab_size == 49152
  assert config.tie_embeddings  # the file has no output.weight


def test_params_match_the_file(smollm2, smollm2_reader):
  model, params, _ = smollm2
  expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    assert (leaf.shape, leaf.dtype) == (spec.shape, jnp.float32)
  assert params["params"]["layer_0"]["attention"]["key"]["kernel"].shape == (576, 3, 64)
  file_elements = sum(int(tensor.n_elements) for tensor in smollm2_reader.tensors)
  assert sum(leaf.size for leaf in jax.tree.leaves(params)) == file_elements
  kinds = {tensor.tensor_type.name for tensor in smollm2_reader.tensors}
  assert kinds == {"Q4_1", "Q8_0", "F32"}


def test_english_is_far_more_likely_than_shuffled_tokens(smollm2, english, perplexity):
  _, params, _ = smollm2
  shuffled = np.random.default_rng(0).permutation(english)
  real, scrambled = perplexity(params, english), perplexity(params, shuffled)
  assert real <= 0.3 * scrambled, (real, scrambled)
  assert real < 60, real


def as_stored_in_gguf(params):
  """Q/K kernels with their head_dim in the GGUF file's order (interleaved RoPE pairs).

  The loader moved row ``2i + c`` of each head to ``c * head_dim/2 + i``; this moves it back.
  """
  def interleave(kernel):  # [d_model, heads, head_dim]
    d, heads, head_dim = kernel.shape
    return kernel.reshape(d, heads, 2, head_dim // 2).swapaxes(2, 3).reshape(d, heads, head_dim)

  return jax.tree_util.tree_map_with_path(
      lambda path, x: interleave(x) if re.search(r"'(query|key)'", jax.tree_util.keystr(path))
      else x, params)


def test_unpermuted_qk_rows_are_the_right_layout(smollm2, english, perplexity):
  _, params, _ = smollm2
  right, wrong = perplexity(params, english), perplexity(as_stored_in_gguf(params), english)
  assert right <= 0.3 * wrong, (right, wrong)


def test_greedy_generation_with_the_whole_model(smollm2):
  model, params, tokenizer = smollm2
  [completion] = generate(model, params, [tokenizer.encode("The capital of France is")],
                          max_new_tokens=3, pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id)
  assert "Paris" in tokenizer.decode(completion)


def test_apply_maps_int_tokens_to_float32_logits(smollm2_2layers):
  # load_smollm2 itself runs in test_experiments.py (both experiments call it).
  model, params, tokenizer = smollm2_2layers
  tokens = jnp.asarray([tokenizer.encode("Hello world"), tokenizer.encode("Good day")])
  logits = jax.jit(model.apply)(params, tokens)
  assert logits.shape == (2, tokens.shape[1], tokenizer.vocab_size)
  assert logits.dtype == jnp.float32
