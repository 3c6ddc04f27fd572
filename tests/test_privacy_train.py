"""DP-SGD in train_lm: calibration, budget refusal, sharded == unsharded, an end-to-end run."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax import nn as enn
from effjax import sharding
from effjax.optim import zero
from experiments import privacy_config, run, train_lm
from experiments.config import ConfigError

WINDOWS = np.random.default_rng(0).integers(0, 64, (400, 17)).astype(np.int32)


def _private(**overrides):
  config = privacy_config.PrivacyConfig(**{"target_epsilon": 4.0, **overrides})
  return privacy_config.private_training(config, WINDOWS, batch_size=8, steps=20, devices=8)


def test_calibrated_sigma_spends_the_target_and_batches_are_poisson_samples():
  private = _private()
  assert private.sampling.rate == 8 / 400 and private.sampling.max_batch_size == 16
  assert private.delta == 1 / 400
  assert 3.99 <= private.epsilon(20) <= 4.0 < private.epsilon(21)
  batch = private.batch(step=3, seed=0)
  assert batch["tokens"].shape == (16, 17) and batch["example_mask"].shape == (16,)
  real = batch["tokens"][batch["example_mask"]]
  assert all((row == WINDOWS).all(1).any() for row in real)
  np.testing.assert_array_equal(private.batch(3, 0)["tokens"], batch["tokens"])  # resumable
  sizes = [private.batch(s, 0)["example_mask"].sum() for s in range(40)]
  assert len(set(sizes)) > 2  # Poisson: the batch size varies


def test_a_fixed_sigma_that_would_cross_the_budget_is_refused():
  with pytest.raises(ConfigError, match="'steps': got 20, expected at most 14: "
                                        "privacy.noise_multiplier 0.45 spends"):
    _private(noise_multiplier=0.45)
  assert _private(noise_multiplier=5.0).noise_multiplier == 5.0
  with pytest.raises(ConfigError, match="privacy.target_epsilon: target_epsilon 1e-05 is "
                                        "unreachable"):
    _private(target_epsilon=1e-5, delta=1e-9)
  with pytest.raises(ConfigError, match="'privacy.clip_norm': got 0.0"):
    _private(clip_norm=0.0)
  with pytest.raises(ConfigError, match="invalid value for 'privacy'"):
    train_lm.Config(privacy=privacy_config.PrivacyConfig(target_epsilon=1.0),
                    data=train_lm.DataConfig(packing=True))


def test_clipped_gradient_is_the_same_on_one_device_sharded_zero3_and_in_micro_batches():
  """Each device (and micro-batch) clips its own rows; the trainer's mean of local sums times
  ``devices * micro_batches`` (add_dp_noise's gradient_scale) is the same clipped sum."""
  private = _private()
  model = enn.DecoderLM(enn.TransformerConfig(vocab_size=64, d_model=16, num_layers=2,
                                              num_heads=4, num_kv_heads=2, d_ff=24))
  params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
  abstract = jax.eval_shape(lambda: params)
  loss = private.loss(model, abstract, seq_len=16)
  batch = private.batch(step=0, seed=1)
  grads = []
  for devices, stage, micro_batches in ((1, 0, 1), (8, 3, 1), (4, 2, 2)):
    mesh = sharding.make_mesh(sharding.MeshConfig(("data",), (devices,)),
                              jax.devices()[:devices])
    trainer = zero.zero_trainer(loss, private.optimizer(optax.sgd(1.0), 0), abstract, mesh,
                                stage=stage, micro_batches=micro_batches)
    placed = jax.device_put(params, trainer.state_sharding.params)
    _, mean_of_sums = trainer.gradients(placed, jax.device_put(batch, trainer.batch_sharding))
    grads.append(jax.tree.map(lambda g: np.asarray(g) * devices * micro_batches, mean_of_sums))
  for other in grads[1:]:
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), other,
                 grads[0])


def test_train_lm_runs_dp_sgd_and_logs_the_epsilon_spent(tmp_path):
  tiny = [*train_lm.smoke_overrides(train_lm.Config()), "--data.source=news",
          "--sample_tokens=0"]
  summary = run.run("configs/quickstart.yaml", [
      *tiny, "--privacy.target_epsilon=8", "--steps=3", "--log_every=3",
      f"--output_dir={tmp_path}"])
  assert 7.9 < summary["epsilon"] <= 8.0 and summary["noise_multiplier"] > 0
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [row["epsilon"] for row in logged if "epsilon" in row and "loss" in row] == [
      pytest.approx(summary["epsilon"])]
  assert np.isfinite(summary["heldout_perplexity"])
