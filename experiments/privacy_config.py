"""The ``privacy:`` section of ``train_lm``: DP-SGD with per-layer clipping in one backward.

```yaml
privacy: {target_epsilon: 8.0}                                  # delta = 1 / training windows
privacy: {target_epsilon: 3.0, delta: 1.0e-6, clip_norm: 0.5, threshold_split: sqrt_params}
privacy: {noise_multiplier: 1.1}          # fixed sigma: refused if `steps` would cross the budget
```

The protected unit is one training window (``data.seq_len + 1`` tokens of the stream). Each step
Poisson-samples the windows (each joins with probability ``batch_size / windows``), padded to
``max_batch_size`` rows with a mask and truncated above it (:class:`effjax.privacy.PoissonSampling`,
accounted exactly by the PLD accountant). The loss is the SUM of the sampled windows' mean
next-token losses, computed under :func:`effjax.privacy.per_layer_clipping`, so the trainer's
gradient is the sum of per-example gradients clipped layer by layer; the optimizer chain starts
with :func:`effjax.privacy.add_dp_noise` (noise once per step, on the sum). ``noise_multiplier``
is calibrated so that ``steps`` spend exactly ``target_epsilon``; the epsilon spent so far is
logged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effjax import privacy
from experiments.config import ConfigError, require

SPLITS = ("equal", "sqrt_params")


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
  """DP-SGD settings (off unless ``target_epsilon`` or ``noise_multiplier`` is set)."""
  target_epsilon: float | None = None
  """The (epsilon, delta)-DP budget of the whole run; the noise is calibrated to spend it."""
  noise_multiplier: float | None = None
  """A fixed sigma instead of calibrating one (then `target_epsilon`, if set, is a ceiling that
  `steps` must not cross)."""
  delta: float | None = None
  """None: 1 / (number of training windows)."""
  clip_norm: float = 1.0
  """C: every window's whole clipped gradient has norm at most this."""
  threshold_split: str = "equal"
  """How C is split into per-layer thresholds: 'equal' or 'sqrt_params'."""
  max_batch_size: int | None = None
  """Rows of every step's padded batch (None: twice batch_size, rounded up to the devices)."""
  accountant: str = "pld"
  """'pld' (exact for the truncated sampling); 'rdp' is refused with truncation."""

  def __post_init__(self):
    require(self.target_epsilon is None or self.target_epsilon > 0, "privacy.target_epsilon",
            self.target_epsilon, "None or > 0")
    require(self.noise_multiplier is None or self.noise_multiplier > 0, "privacy.noise_multiplier",
            self.noise_multiplier, "None or > 0")
    require(self.delta is None or 0 < self.delta < 1, "privacy.delta", self.delta,
            "None or in (0, 1)")
    require(self.clip_norm > 0, "privacy.clip_norm", self.clip_norm, "> 0")
    require(self.threshold_split in SPLITS, "privacy.threshold_split", self.threshold_split,
            f"one of {list(SPLITS)}")
    require(self.max_batch_size is None or self.max_batch_size > 0, "privacy.max_batch_size",
            self.max_batch_size, "None or a positive integer")
    require(self.accountant == "pld", "privacy.accountant", self.accountant,
            "'pld' (the batches are truncated Poisson samples, which only PLD accounts)")

  @property
  def enabled(self) -> bool:
    return self.target_epsilon is not None or self.noise_multiplier is not None


@dataclasses.dataclass(frozen=True)
class PrivateTraining:
  """What a DP run needs: the sampling, sigma, delta, the thresholds and the devices' count."""
  config: PrivacyConfig
  windows: np.ndarray
  sampling: privacy.PoissonSampling
  noise_multiplier: float
  delta: float
  devices: int

  def batch(self, step: int, seed: int) -> dict[str, np.ndarray]:
    """Step ``step``'s Poisson sample (a pure function of ``(seed, step)``): ``tokens`` int32
    ``[max_batch_size, seq+1]`` and ``example_mask`` bool ``[max_batch_size]``."""
    indices, mask = self.sampling.sample(np.random.default_rng((seed, step, 0x0D1F)))
    return {"tokens": self.windows[indices], "example_mask": mask}

  def epsilon(self, steps: int) -> float:
    return privacy.epsilon_spent(self.noise_multiplier, self.sampling, steps, self.delta,
                                 self.config.accountant)

  def optimizer(self, optimizer: optax.GradientTransformation,
                seed: int) -> optax.GradientTransformation:
    """``optimizer`` after the noise (the trainer averages ``devices`` local sums)."""
    return optax.chain(privacy.add_dp_noise(
        self.noise_multiplier, self.config.clip_norm, self.sampling.expected_batch_size,
        jax.random.fold_in(jax.random.key(seed), 0x0D1F), gradient_scale=self.devices), optimizer)

  def loss(self, model: Any, abstract_params: Any, seq_len: int):
    """``(params, batch) -> sum of the real rows' mean next-token losses``, every layer's
    per-example gradient clipped to its threshold in the backward."""
    dummy = jnp.zeros((1, seq_len), jnp.int32)
    thresholds = privacy.layer_uses(model.apply, abstract_params, dummy).thresholds(
        self.config.clip_norm, self.config.threshold_split)

    def loss_fn(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
      tokens, real = batch["tokens"], batch["example_mask"]
      with privacy.per_layer_clipping(thresholds, real):
        logits = model.apply(params, tokens[:, :-1])
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(-1)
      return jnp.sum(jnp.where(real, nll, 0.0))
    return loss_fn


def private_training(config: PrivacyConfig, windows: np.ndarray, batch_size: int, steps: int,
                     devices: int) -> PrivateTraining:
  """Calibrates the run: sampling rate ``batch_size / windows``, delta, and sigma (from
  ``target_epsilon``, or the given one checked against it).

  Raises ConfigError for a budget that ``steps`` cannot meet or would cross.
  """
  count = len(windows)
  max_batch = config.max_batch_size or devices * math.ceil(2 * batch_size / devices)
  require(max_batch % devices == 0 and max_batch >= batch_size, "privacy.max_batch_size",
          max_batch, f"a multiple of the {devices} devices and >= batch_size={batch_size}")
  require(batch_size <= count, "batch_size", batch_size,
          f"at most the {count} training windows (the expected Poisson batch)")
  sampling = privacy.PoissonSampling(count, float(batch_size), max_batch)
  delta = config.delta if config.delta is not None else 1.0 / count
  if config.noise_multiplier is None:
    try:
      sigma = privacy.noise_multiplier_for(config.target_epsilon, sampling, steps, delta,
                                           config.accountant)
    except ValueError as e:
      raise ConfigError(f"privacy.target_epsilon: {e}") from e
  else:
    sigma = config.noise_multiplier
    if config.target_epsilon is not None:
      allowed = privacy.steps_within_budget(config.target_epsilon, sigma, sampling, delta,
                                            config.accountant)
      require(steps <= allowed, "steps", steps,
              f"at most {allowed}: privacy.noise_multiplier {sigma} spends "
              f"privacy.target_epsilon {config.target_epsilon} by then")
  return PrivateTraining(config, windows, sampling, sigma, delta, devices)
