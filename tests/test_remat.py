"""Remat policies of effjax.nn.remat on DecoderLM and LongConvLM: gradients equal no remat,
what each policy keeps (named, offloaded, token-wise), spec errors, and the memory planner."""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from effjax import benchmarking
from effjax import nn as enn
from effjax.nn import remat as remat_lib
from pallas_kernels.flash_attention import residuals

SEQ = 13  # not a multiple of anything
TOKENS = (jnp.arange(2 * SEQ, dtype=jnp.int32).reshape(2, SEQ) * 7) % 64
DECODER = enn.DecoderLM(enn.TransformerConfig(vocab_size=64, d_model=32, num_layers=2,
                                              num_heads=4, num_kv_heads=2, d_ff=48))
LONG_CONV = {mixer: enn.LongConvLM(enn.LongConvLMConfig(
    vocab_size=64, d_model=16, num_layers=2, d_ff=32, kernel_len=SEQ, mixer=mixer))
             for mixer in ("long_conv", "h3")}


def _loss(model):
  return lambda params: jnp.mean(model.apply(params, TOKENS) ** 2)


def _saved(model, params):
  """(description, shape, on host) of every activation the backward of ``model`` reads."""
  return [(description, aval.shape, getattr(aval, "memory_space", None) == jax.memory.Space.Host)
          for aval, description in saved_residuals(_loss(model), params)
          if not description.startswith("from the argument")]


def _named(model, params):
  return collections.Counter((d.split("'")[1], shape[1]) for d, shape, _ in _saved(model, params)
                             if d.startswith("named"))


@pytest.fixture(scope="module")
def decoder_params():
  return DECODER.init(jax.random.key(0), TOKENS)


@pytest.mark.parametrize("remat", [
    "full", "dots", "save_attention", "offload_attention", "tokenwise(0)", "tokenwise(0.25)",
    "tokenwise(1)", "save_names(query, value, mlp_hidden)",
    "offload_names(attention_norm, mlp_gate, to=pinned_host)"])
def test_decoder_policies_keep_loss_and_gradients(decoder_params, remat):
  model = DECODER.clone(remat=remat)
  want_loss, want = jax.value_and_grad(_loss(DECODER))(decoder_params)
  got_loss, got = jax.jit(jax.value_and_grad(_loss(model)))(decoder_params)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got, want)


@pytest.mark.parametrize("alpha, kept", [("0.25", 4), ("0.7", 10), ("1/3", 5), ("0.5", 7)])
def test_tokenwise_keeps_exactly_ceil_alpha_seq_positions_and_never_reruns_attention(
    decoder_params, alpha, kept):
  assert kept == math.ceil(float(eval(alpha)) * SEQ - 1e-9)  # 0.7 * 13 = 9.1 -> 10
  model = DECODER.clone(remat=f"tokenwise({alpha})")
  named = _named(model, decoder_params)
  layers = DECODER.config.num_layers
  assert named == {(name + remat_lib.KEPT_SUFFIX, kept): layers
                   for name in remat_lib.TOKEN_LOCAL_ACTIVATIONS}
  # Besides the kept positions: block inputs, and the attention output / LSE of every position.
  assert enn.count_attention_forwards(jax.grad(_loss(model)), decoder_params) == layers


def test_save_names_keeps_only_those_names(decoder_params):
  named = _named(DECODER.clone(remat="save_names(query, mlp_hidden)"), decoder_params)
  assert named == {("query", SEQ): 2, ("mlp_hidden", SEQ): 2}
  assert not _named(DECODER.clone(remat="full"), decoder_params)


def test_offload_names_puts_exactly_the_named_activations_in_host_memory(decoder_params):
  model = DECODER.clone(remat="offload_names(mlp_gate, query)")
  on_host = sorted(shape for _, shape, host in _saved(model, decoder_params) if host)
  config = DECODER.config
  assert on_host == sorted([(2, SEQ, config.d_ff), (2, SEQ, config.num_heads,
                                                    config.resolved_head_dim)] * 2)
  assert enn.host_residual_bytes(jax.grad(_loss(model)), decoder_params) == 4 * sum(
      math.prod(shape) for shape in on_host)


def _emitted(model, params):
  jaxpr = jax.make_jaxpr(jax.grad(_loss(model)))(params).jaxpr
  return {eqn.params["name"] for eqn in remat_lib._eqns(jaxpr) if eqn.primitive.name == "name"}


def test_every_declared_name_is_emitted(decoder_params):
  assert _emitted(DECODER, decoder_params) == set(enn.DECODER_ACTIVATIONS)
  for model in LONG_CONV.values():
    params = model.init(jax.random.key(0), TOKENS)
    assert _emitted(model, params) == set(enn.LONG_CONV_ACTIVATIONS)


@pytest.mark.parametrize("mixer", ["long_conv", "h3"])
def test_long_conv_policies_keep_gradients(mixer):
  base = LONG_CONV[mixer]
  params = base.init(jax.random.key(1), TOKENS)
  want = jax.grad(_loss(base))(params)
  for remat in ("full", "dots", "save_names(mixer_input, long_conv_output)",
                "offload_names(long_conv_output)"):
    got = jax.jit(jax.grad(_loss(base.clone(remat=remat))))(params)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got, want)
  assert _named(base.clone(remat="save_names(long_conv_output)"), params) == {
      ("long_conv_output", SEQ): 2}


@pytest.mark.parametrize("spec, words", [
    ("everything", "remat is 'everything'; expected one of none, full, dots"),
    ("tokenwise(1.5)", r"alpha in \[0, 1\], got alpha=1.5"),
    ("tokenwise(-0.1)", r"alpha in \[0, 1\], got alpha=-0.1"),
    ("tokenwise(half)", "one number alpha"),
    ("tokenwise(0.1, 0.2)", "one number alpha"),
    ("tokenwise", "one number alpha"),
    ("full(2)", "'full' without arguments"),
    ("save_names()", "at least one activation name"),
    ("save_names(query, to=pinned_host)", r"save_names\(name, ...\) with no options"),
    ("offload_names(query, to=device)", "to=pinned_host"),
    ("offload_names(query, at=host)", "no options but to="),
])
def test_bad_specs_are_refused_by_name(spec, words):
  with pytest.raises(ValueError, match=words):
    enn.parse_remat(spec)


@pytest.mark.parametrize("model, spec, words", [
    (DECODER, "save_names(query, nowhere)", "DecoderLM.remat names 'nowhere', which no DecoderLM"),
    (DECODER, "offload_names(long_conv_output)", "names 'long_conv_output'"),
    (LONG_CONV["h3"], "save_attention", "names 'flash_attention_output', which no LongConvLM"),
    (LONG_CONV["long_conv"], "tokenwise(0.5)", "tokenwise.*long-convolution blocks lack"),
    (DECODER, "tokenwise(2)", r"DecoderLM.remat is 'tokenwise\(2\)'"),
])
def test_models_refuse_names_their_blocks_do_not_emit(model, spec, words):
  with pytest.raises(ValueError, match=words):
    model.clone(remat=spec).init(jax.random.key(0), TOKENS)


def test_plan_picks_the_first_candidate_that_fits_and_explains_a_miss():
  peaks = {"none": 900, "tokenwise(0.75)": 700, "tokenwise(0.5)": 500, "full": 100}
  compiled = []
  def peak(spec):
    compiled.append(spec)
    return peaks[spec]
  plan = enn.plan_remat(peak, 600, ["none", "tokenwise(0.75)", "tokenwise(0.5)", "full"])
  assert plan.choice == "tokenwise(0.5)"
  assert compiled == ["none", "tokenwise(0.75)", "tokenwise(0.5)"]  # stops at the first fit
  assert "over budget" in plan.table() and "fits" in plan.table()
  skipped = enn.plan_remat(peak, 2000, ["offload_attention", "full"])  # no host memory on CPU
  assert skipped.choice == "full" and list(skipped.peak_bytes) == ["full"]
  with pytest.raises(ValueError, match="no remat policy fits the budget"):
    enn.plan_remat(peak, 50, ["none", "full"])
  with pytest.raises(ValueError, match="budget_bytes is 0"):
    enn.plan_remat(peak, 0)


def test_plan_on_compiled_training_steps_lands_between_none_and_full(decoder_params):
  """On real compiled steps. (XLA:CPU recomputes less than the policy allows, so CPU peaks
  differ less between policies than a GPU's; benchmarks/activations.md has both.)"""
  model = DECODER.clone(config=enn.TransformerConfig(vocab_size=64, d_model=64, num_layers=4,
                                                     num_heads=4, num_kv_heads=2, d_ff=512))
  tokens = jnp.zeros((4, 128), jnp.int32)
  params = model.init(jax.random.key(0), tokens[:, :8])

  def peak(spec):
    step = jax.value_and_grad(lambda p: model.clone(remat=spec).apply(p, tokens).mean())
    return benchmarking.compiled_memory(step, params).peak_bytes

  none, full = peak("none"), peak("full")
  assert full < none
  plan = enn.plan_remat(peak, (none + full) // 2)
  assert plan.choice not in ("none", "full")
  assert plan.peak_bytes[plan.choice] <= (none + full) // 2 < plan.peak_bytes["none"]
