"""Names on the output and LSE that flash attention saves for its backward.

Every implementation's ``custom_vjp`` forward (XLA, Pallas GPU/TPU, Mosaic GPU, and the ring)
returns its output and log-sum-exp through :func:`tag_residuals`. Under ``jax.checkpoint`` a
policy that saves these two names (``effjax.nn.remat_policy("save_attention")``) keeps them from
the forward pass, and since the backward needs nothing else from the attention forward (q, k, v
come from the cheap projections), the checkpointed layer's recomputation skips the attention
forward: LightSeq's rematerialization-aware checkpointing (Li et al. 2023). Cost: the output (``[b, s, h, dv]``, the
activation dtype) and the LSE (``[b, h, s]`` float32) kept per layer. Outside ``jax.checkpoint``
the names change nothing.
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

OUTPUT = "flash_attention_output"
LSE = "flash_attention_lse"


def tag_residuals(out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(out, lse)`` tagged with :data:`OUTPUT` and :data:`LSE` for remat policies."""
  return checkpoint_name(out, OUTPUT), checkpoint_name(lse, LSE)
