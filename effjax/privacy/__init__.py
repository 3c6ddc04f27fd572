"""Differentially private training (issue 19, in progress).

* :mod:`effjax.privacy.accounting`: epsilon spent by DP-SGD with Poisson sampling, the noise
  multiplier for a target epsilon and the steps a budget allows (``dp-accounting``'s RDP and PLD).
* :mod:`effjax.privacy.sampling`: Poisson-sampled batches padded (or truncated) to one shape.
* :mod:`effjax.privacy.clipping`: per-example gradient norms of dense layers without per-example
  gradients (ghost or explicit, by the Book-Keeping rule), of embeddings (by token matches) and of
  elementwise scales; dense, embedding and scale ops whose backward clips each example's
  parameter gradient (per-layer clipping in one backward); per-layer thresholds; the noise
  calibrated on the sum.
* :mod:`effjax.privacy.per_layer`: the clipped ops applied to every Dense, DenseGeneral, Embed
  and RMSNorm of any Flax model (``DecoderLM`` included) through a method interceptor, with the
  per-use thresholds; parameters without a rule are refused.
* :mod:`effjax.privacy.transform`: the noise as the head of an optax chain.
"""

from effjax.privacy.accounting import (ACCOUNTANTS, dp_sgd_event, epsilon_spent,
                                       noise_multiplier_for, steps_within_budget)
from effjax.privacy.clipping import (clip_factors, clipped_dense, clipped_embedding,
                                     clipped_scale, dense_example_norms, embedding_example_norms,
                                     ghost_norm_is_cheaper, layer_thresholds, noised_mean,
                                     scale_example_norms)
from effjax.privacy.per_layer import LayerUses, layer_uses, per_layer_clipping
from effjax.privacy.sampling import PoissonSampling
from effjax.privacy.transform import DpNoiseState, add_dp_noise

__all__ = ["ACCOUNTANTS", "DpNoiseState", "LayerUses", "PoissonSampling",
           "add_dp_noise", "clip_factors", "clipped_dense", "clipped_embedding",
           "clipped_scale", "dense_example_norms", "dp_sgd_event",
           "embedding_example_norms", "epsilon_spent", "ghost_norm_is_cheaper",
           "layer_thresholds", "layer_uses", "noise_multiplier_for", "noised_mean",
           "per_layer_clipping", "scale_example_norms", "steps_within_budget"]
