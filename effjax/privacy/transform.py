"""DP-SGD's noise as the head of an optax chain, so any optimizer (and ZeRO) can follow it."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from effjax.privacy.clipping import noised_mean


class DpNoiseState(NamedTuple):
  """The step count, folded into ``key`` for each step's noise (fresh noise every step)."""
  count: jax.Array
  key: jax.Array


def add_dp_noise(noise_multiplier: float, clip_norm: float, expected_batch_size: float,
                 key: jax.Array, gradient_scale: float = 1.0) -> optax.GradientTransformation:
  """Turns the clipped gradient into DP-SGD's release ``(sum + N(0, (sigma C)^2)) / E[B]``.

  The incoming gradient is the sum of the per-example clipped gradients divided by
  ``gradient_scale`` (a trainer that averages over ``devices * micro_batches`` local sums, as
  :func:`effjax.optim.zero_trainer` does, passes that product), so the sum is restored, noised
  once per step with the standard calibration and divided by the expected batch size of Poisson
  sampling. Chain it first: ``optax.chain(add_dp_noise(...), optax.adamw(...))``.
  """
  for name, value in (("clip_norm", clip_norm), ("expected_batch_size", expected_batch_size),
                      ("gradient_scale", gradient_scale)):
    if not value > 0:
      raise ValueError(f"{name} is {value}; expected > 0")
  if not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier is {noise_multiplier}; expected >= 0")

  def init(params):
    del params
    return DpNoiseState(jnp.zeros((), jnp.int32), key)

  def update(updates, state, params=None):
    del params
    summed = jax.tree.map(lambda g: g * gradient_scale, updates)
    step_key = jax.random.fold_in(state.key, state.count)
    released = noised_mean(summed, step_key, noise_multiplier, clip_norm, expected_batch_size)
    return released, DpNoiseState(state.count + 1, state.key)

  return optax.GradientTransformation(init, update)
