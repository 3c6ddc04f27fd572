"""Privacy accounting of DP-SGD with Poisson-sampled batches, through ``dp-accounting``.

One DP-SGD step samples every example independently with probability ``q`` (the sampling rate,
expected batch size / dataset size), clips each sampled example's gradient to norm ``C``, sums
them and adds Gaussian noise of standard deviation ``sigma * C`` (``sigma``: the noise
multiplier). ``steps`` such steps are the DpEvent
``SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps)``, and an accountant bounds its
``(epsilon, delta)``:

* ``"rdp"``: Rényi DP (Mironov 2017; the sampled Gaussian of Mironov et al. 2019), converted to
  ``(epsilon, delta)``; fast, slightly loose.
* ``"pld"``: privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022), tighter
  (a smaller epsilon for the same run), slower for many steps.

The guarantee holds only for Poisson sampling (the data pipeline must sample each example
independently, not shuffle into fixed-size batches) and for the add-or-remove-one neighbouring
relation these accountants use.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import dp_accounting

from effjax.privacy.sampling import PoissonSampling

Sampling = float | PoissonSampling
"""The probability ``q`` that an example joins a batch, or a :class:`PoissonSampling` (whose
``max_batch_size``, if set, makes it truncated Poisson sampling: PLD accounting only)."""

PLD_DISCRETIZATION = 1e-3
"""The PLD accountant's grid of privacy-loss values. Its discretization is pessimistic (the
epsilon an upper bound); 1e-3 instead of dp-accounting's default 1e-4 runs about 10x faster and
adds 0.01-0.2% to epsilon at the sampling rates of ``train_lm``."""
ACCOUNTANTS: dict[str, Callable[[], dp_accounting.PrivacyAccountant]] = {
    "rdp": dp_accounting.rdp.RdpAccountant,
    "pld": functools.partial(dp_accounting.pld.PLDAccountant,
                             value_discretization_interval=PLD_DISCRETIZATION),
}
MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER = 0.1, 1e3
"""The range :func:`noise_multiplier_for` searches (below 0.1 the PLD accountant's grid explodes,
and the epsilon such noise buys is in the hundreds; above 1e3 nothing is learned)."""


def _rate(sampling: Sampling) -> float:
  return sampling.rate if isinstance(sampling, PoissonSampling) else sampling


def _check(noise_multiplier: float | None, sampling: Sampling, steps: int | None, delta: float,
           accountant: str) -> None:
  if noise_multiplier is not None and not noise_multiplier > 0:
    raise ValueError(f"noise_multiplier is {noise_multiplier}; expected > 0 (without noise "
                     "there is no privacy guarantee)")
  if not 0 < _rate(sampling) <= 1:
    raise ValueError(f"sampling is {sampling}; expected the probability of sampling an example "
                     "in (0, 1] or a PoissonSampling")
  if (isinstance(sampling, PoissonSampling) and sampling.max_batch_size is not None
      and accountant != "pld"):
    raise ValueError(f"accountant is {accountant!r}; truncated Poisson sampling (max_batch_size "
                     f"{sampling.max_batch_size}) is accounted by 'pld' only")
  if steps is not None and (not isinstance(steps, int) or steps < 0):
    raise ValueError(f"steps is {steps!r}; expected an integer >= 0")
  if not 0 < delta < 1:
    raise ValueError(f"delta is {delta}; expected a probability in (0, 1), typically below "
                     "1 / dataset size")
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant is {accountant!r}; expected one of {sorted(ACCOUNTANTS)}")


def dp_sgd_event(noise_multiplier: float, sampling: Sampling,
                 steps: int) -> dp_accounting.DpEvent:
  """``steps`` Poisson-sampled (or truncated Poisson-sampled) Gaussian steps, as a
  ``dp_accounting`` DpEvent."""
  if isinstance(sampling, PoissonSampling) and sampling.max_batch_size is not None:
    step = dp_accounting.TruncatedSubsampledGaussianDpEvent(
        sampling.dataset_size, sampling.rate, sampling.max_batch_size, noise_multiplier)
  else:
    step = dp_accounting.PoissonSampledDpEvent(_rate(sampling),
                                               dp_accounting.GaussianDpEvent(noise_multiplier))
  return dp_accounting.SelfComposedDpEvent(step, steps)


def epsilon_spent(noise_multiplier: float, sampling: Sampling, steps: int, delta: float,
                  accountant: str = "rdp") -> float:
  """The ``epsilon`` of ``steps`` DP-SGD steps at ``delta`` (0 for no steps)."""
  _check(noise_multiplier, sampling, steps, delta, accountant)
  if steps == 0:
    return 0.0
  ledger = ACCOUNTANTS[accountant]()
  ledger.compose(dp_sgd_event(noise_multiplier, sampling, steps))
  return float(ledger.get_epsilon(delta))


def noise_multiplier_for(target_epsilon: float, sampling: Sampling, steps: int, delta: float,
                         accountant: str = "rdp") -> float:
  """The smallest noise multiplier whose ``steps`` steps spend at most ``target_epsilon``, to a
  tolerance of 1e-4 (then rounded up until the target holds), searched in
  [``MIN_NOISE_MULTIPLIER``, ``MAX_NOISE_MULTIPLIER``].

  Raises ``ValueError`` when even :data:`MAX_NOISE_MULTIPLIER` spends more (a target too small
  for the number of steps and the sampling rate).
  """
  _check(None, sampling, steps, delta, accountant)
  if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
    raise ValueError(f"target_epsilon is {target_epsilon}; expected a finite number > 0")
  worst = epsilon_spent(MAX_NOISE_MULTIPLIER, sampling, max(steps, 1), delta, accountant)
  if worst > target_epsilon:
    raise ValueError(
        f"target_epsilon {target_epsilon} is unreachable: {steps} steps at sampling rate "
        f"{_rate(sampling):g} spend epsilon {worst:.3g} even with noise multiplier "
        f"{MAX_NOISE_MULTIPLIER:g} (fewer steps or a smaller sampling rate)")
  spend = lambda sigma: epsilon_spent(sigma, sampling, max(steps, 1), delta, accountant)
  if spend(MIN_NOISE_MULTIPLIER) <= target_epsilon:
    return MIN_NOISE_MULTIPLIER
  sigma = float(dp_accounting.calibrate_dp_mechanism(
      ACCOUNTANTS[accountant],
      lambda sigma: dp_sgd_event(sigma, sampling, max(steps, 1)), target_epsilon, delta,
      bracket_interval=dp_accounting.ExplicitBracketInterval(MIN_NOISE_MULTIPLIER,
                                                             MAX_NOISE_MULTIPLIER),
      tol=1e-4))
  while spend(sigma) > target_epsilon:  # the root finder may stop on the wrong side of it
    sigma *= 1 + 1e-4
  return sigma


def steps_within_budget(target_epsilon: float, noise_multiplier: float, sampling: Sampling,
                        delta: float, accountant: str = "rdp") -> int:
  """The most steps that spend at most ``target_epsilon`` (0 if one step already spends more)."""
  _check(noise_multiplier, sampling, 0, delta, accountant)
  spend = lambda steps: epsilon_spent(noise_multiplier, sampling, steps, delta, accountant)
  low, high = 0, 1  # spend(low) <= target < spend(high) once the doubling stops
  while spend(high) <= target_epsilon:
    low, high = high, 2 * high
  while high - low > 1:
    middle = (low + high) // 2
    low, high = (middle, high) if spend(middle) <= target_epsilon else (low, middle)
  return low
