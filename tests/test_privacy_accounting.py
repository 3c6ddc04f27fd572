"""DP-SGD accounting: epsilon equals dp-accounting called directly, the inverses are tight."""

import dp_accounting
import numpy as np
import pytest

from effjax import privacy

Q, DELTA = 0.01, 1e-5


def _direct(accountant, sigma, q, steps, delta):
  ledger = accountant()
  ledger.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                 steps)
  return ledger.get_epsilon(delta)


@pytest.mark.parametrize("name, accountant", [
    ("rdp", dp_accounting.rdp.RdpAccountant),
    ("pld", lambda: dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3))])
def test_epsilon_equals_dp_accounting_called_directly(name, accountant):
  ours = privacy.epsilon_spent(1.2, Q, 300, DELTA, name)
  assert ours == pytest.approx(_direct(accountant, 1.2, Q, 300, DELTA), rel=1e-9)
  assert 0.1 < ours < 10


def test_pld_is_tighter_than_rdp_and_epsilon_grows_with_steps_and_rate():
  rdp = privacy.epsilon_spent(1.0, Q, 500, DELTA, "rdp")
  assert privacy.epsilon_spent(1.0, Q, 500, DELTA, "pld") < rdp
  assert privacy.epsilon_spent(1.0, Q, 250, DELTA) < rdp < privacy.epsilon_spent(1.0, 2 * Q, 500,
                                                                               DELTA)
  assert privacy.epsilon_spent(1.0, Q, 0, DELTA) == 0.0


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_noise_multiplier_for_is_the_smallest_that_meets_the_target(target):
  sigma = privacy.noise_multiplier_for(target, Q, 1000, DELTA)
  assert privacy.epsilon_spent(sigma, Q, 1000, DELTA) <= target
  assert privacy.epsilon_spent(sigma * (1 - 1e-3), Q, 1000, DELTA) > target


def test_steps_within_budget_is_the_last_step_under_the_target():
  steps = privacy.steps_within_budget(2.0, 1.0, Q, DELTA)
  assert privacy.epsilon_spent(1.0, Q, steps, DELTA) <= 2.0 < privacy.epsilon_spent(
      1.0, Q, steps + 1, DELTA)
  assert privacy.steps_within_budget(0.01, 0.5, 1.0, DELTA) == 0


@pytest.mark.parametrize("call, message", [
    (lambda: privacy.epsilon_spent(0.0, Q, 10, DELTA), "noise_multiplier is 0.0; expected > 0"),
    (lambda: privacy.epsilon_spent(1.0, 1.5, 10, DELTA), "sampling is 1.5; expected"),
    (lambda: privacy.epsilon_spent(1.0, Q, -1, DELTA), "steps is -1; expected an integer"),
    (lambda: privacy.epsilon_spent(1.0, Q, 10, 1.0), "delta is 1.0; expected a probability"),
    (lambda: privacy.epsilon_spent(1.0, Q, 10, DELTA, "gdp"), "accountant is 'gdp'; expected"),
    (lambda: privacy.noise_multiplier_for(0.0, Q, 10, DELTA), "target_epsilon is 0.0"),
    (lambda: privacy.noise_multiplier_for(1e-4, 1.0, 10**6, DELTA),
     "target_epsilon 0.0001 is unreachable: 1000000 steps at sampling rate 1 "),
])
def test_bad_input_names_the_argument(call, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
    call()


def test_poisson_batches_have_one_shape_a_mask_and_the_expected_size():
  sampling = privacy.PoissonSampling(dataset_size=1000, expected_batch_size=20, max_batch_size=40)
  rng = np.random.default_rng(0)
  sizes = []
  for _ in range(300):
    indices, mask = sampling.sample(rng)
    assert indices.shape == mask.shape == (40,)
    real = indices[mask]
    assert len(set(real)) == real.size and (indices[~mask] == 0).all() and (real < 1000).all()
    assert mask[:real.size].all()  # real rows first
    sizes.append(real.size)
  assert np.mean(sizes) == pytest.approx(20, rel=0.05) and np.std(sizes) > 3  # not fixed-size
  truncated = privacy.PoissonSampling(1000, 20, max_batch_size=20)
  assert max(truncated.sample(rng)[1].sum() for _ in range(100)) == 20


def test_truncated_sampling_is_accounted_by_pld_as_dp_accounting_does():
  sampling = privacy.PoissonSampling(dataset_size=1000, expected_batch_size=10, max_batch_size=16)
  ours = privacy.epsilon_spent(1.2, sampling, 50, DELTA, "pld")
  ledger = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
  ledger.compose(dp_accounting.TruncatedSubsampledGaussianDpEvent(1000, 0.01, 16, 1.2), 50)
  assert ours == pytest.approx(ledger.get_epsilon(DELTA), rel=1e-9)
  # Truncating at 1.6x the expected size costs 5x the epsilon; at 4x, nothing measurable.
  untruncated = privacy.epsilon_spent(1.2, sampling.rate, 50, DELTA, "pld")
  assert ours > 5 * untruncated
  roomy = privacy.PoissonSampling(dataset_size=1000, expected_batch_size=10, max_batch_size=40)
  assert privacy.epsilon_spent(1.2, roomy, 50, DELTA, "pld") == pytest.approx(untruncated,
                                                                               rel=1e-6)
  with pytest.raises(ValueError, match="truncated Poisson sampling .* is accounted by 'pld' only"):
    privacy.epsilon_spent(1.2, sampling, 50, DELTA, "rdp")


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset_size=0, expected_batch_size=1), "dataset_size is 0"),
    (dict(dataset_size=10, expected_batch_size=20), "expected_batch_size is 20"),
    (dict(dataset_size=10, expected_batch_size=4, max_batch_size=3), "max_batch_size is 3"),
])
def test_bad_sampling_names_the_argument(kwargs, message):
  with pytest.raises(ValueError, match=message):
    privacy.PoissonSampling(**kwargs)
  with pytest.raises(ValueError, match="max_batch_size is None"):
    privacy.PoissonSampling(10, 2).sample(np.random.default_rng(0))
