"""The optax head that releases DP-SGD's noised gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax import privacy


def test_restores_the_sum_adds_fresh_noise_each_step_and_divides_by_expected_batch():
  clipped_sum = {"w": jnp.full((50_000,), 6.0)}
  # A trainer averaging 4 local sums passes the sum / 4.
  head = privacy.add_dp_noise(1.5, 2.0, 8.0, jax.random.key(0), gradient_scale=4.0)
  state = head.init(clipped_sum)
  mean_of_sums = jax.tree.map(lambda g: g / 4.0, clipped_sum)
  first, state = head.update(mean_of_sums, state)
  second, state = head.update(mean_of_sums, state)
  for released in (first["w"], second["w"]):
    assert float(released.mean()) == pytest.approx(6.0 / 8.0, abs=0.01)
    assert float(released.std()) == pytest.approx(1.5 * 2.0 / 8.0, rel=0.02)
  assert abs(float(jnp.corrcoef(first["w"], second["w"])[0, 1])) < 0.05
  silent = privacy.add_dp_noise(0.0, 2.0, 8.0, jax.random.key(0), gradient_scale=4.0)
  quiet, _ = silent.update(mean_of_sums, silent.init(clipped_sum))
  np.testing.assert_allclose(quiet["w"], 0.75)


def test_chains_before_an_optimizer_under_jit():
  params = {"w": jnp.zeros(3)}
  optimizer = optax.chain(privacy.add_dp_noise(1.0, 1.0, 2.0, jax.random.key(1)), optax.sgd(1.0))
  state = optimizer.init(params)
  updates, state = jax.jit(optimizer.update)({"w": jnp.ones(3)}, state, params)
  assert updates["w"].shape == (3,) and int(state[0].count) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_multiplier=-1.0), "noise_multiplier is -1.0; expected >= 0"),
    (dict(clip_norm=0.0), "clip_norm is 0.0; expected > 0"),
    (dict(expected_batch_size=0), "expected_batch_size is 0; expected > 0"),
    (dict(gradient_scale=-2), "gradient_scale is -2; expected > 0"),
])
def test_bad_input_names_the_argument(kwargs, message):
  arguments = dict(noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=4.0,
                   key=jax.random.key(0)) | kwargs
  with pytest.raises(ValueError, match=message):
    privacy.add_dp_noise(**arguments)
