"""Per-example gradient norms without per-example gradients, and per-layer clipping in one backward.

For a dense layer ``y_i = a_i @ W`` applied to the ``T`` positions of example ``i``
(``a_i: [T, d]``, output gradient ``g_i = dL/dy_i: [T, p]``), the example's weight gradient is
``G_i = a_i^T g_i`` (``[d, p]``). Its norm needs no ``G_i``:

* ghost norm (Goodfellow 2015; Li et al. 2022): ``||G_i||^2 = sum_{s,t} (a_s . a_t)(g_s . g_t)``,
  two ``[T, T]`` Gram matrices per example: ``O(T^2 (d + p))`` work, ``O(B T^2)`` memory;
* explicit: form ``G_i`` and take its norm: ``O(T d p)`` work, ``O(B d p)`` memory.

The Book-Keeping rule (Bu et al. 2023) picks the ghost norm when ``2 T^2 < d p``.

Per-layer clipping (McMahan et al. 2018; FlashDP, 2025) gives layer ``l`` its own threshold
``C_l`` with ``sum_l C_l^2 = C^2``, so every example's whole gradient has norm at most ``C``, and
clips inside the layer's backward: ``dW = sum_i min(1, C_l / ||G_i||) G_i = a^T (c * g)``, one
backward, no per-example gradient kept. The gradient passed to earlier layers, ``g W^T``, stays
unclipped (clipping changes parameter gradients only).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _masked(x: Array, mask: Array | None) -> Array:
  return x if mask is None else x * mask[..., None].astype(x.dtype)


def ghost_norm_is_cheaper(seq_len: int, in_features: int, out_features: int) -> bool:
  """The Book-Keeping rule: ghost norms (``T x T`` Gram matrices) when ``2 T^2 < d p``."""
  return 2 * seq_len**2 < in_features * out_features


def dense_example_norms(inputs: Float[Array, "batch seq d"],
                        output_grads: Float[Array, "batch seq p"],
                        mask: Float[Array, "batch seq"] | None = None,
                        method: str = "auto") -> Float[Array, "batch"]:
  """Per-example Frobenius norms of a dense layer's weight gradient, ``||a_i^T g_i||``, in float32.

  ``mask`` (1 = a real position) drops padding; ``method``: ``"ghost"``, ``"explicit"`` or
  ``"auto"`` (:func:`ghost_norm_is_cheaper`).
  """
  if inputs.ndim != 3 or output_grads.ndim != 3 or inputs.shape[:2] != output_grads.shape[:2]:
    raise ValueError(f"inputs and output_grads must be [batch, seq, features] with the same "
                     f"batch and seq, got {inputs.shape} and {output_grads.shape}")
  if method not in ("auto", "ghost", "explicit"):
    raise ValueError(f"method is {method!r}; expected 'auto', 'ghost' or 'explicit'")
  a = _masked(inputs.astype(jnp.float32), mask)
  g = _masked(output_grads.astype(jnp.float32), mask)
  if method == "auto":
    method = "ghost" if ghost_norm_is_cheaper(a.shape[1], a.shape[2], g.shape[2]) else "explicit"
  if method == "ghost":
    squared = jnp.einsum("bst,bst->b", a @ a.transpose(0, 2, 1), g @ g.transpose(0, 2, 1))
  else:
    squared = jnp.sum(jnp.einsum("bsd,bsp->bdp", a, g) ** 2, axis=(1, 2))
  return jnp.sqrt(jnp.maximum(squared, 0.0))


def clip_factors(norms: Float[Array, "batch"], threshold: float | Array) -> Float[Array, "batch"]:
  """``min(1, threshold / norm)`` per example (1 where the norm is 0)."""
  return jnp.minimum(1.0, threshold / jnp.maximum(norms, 1e-12))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def clipped_dense(inputs: Float[Array, "batch seq d"], kernel: Float[Array, "d p"],
                  mask: Float[Array, "batch seq"], threshold: float
                  ) -> Float[Array, "batch seq p"]:
  """``inputs @ kernel`` whose kernel gradient is the sum of per-example gradients, each clipped
  to norm ``threshold`` (padding positions, ``mask == 0``, contribute nothing); the input
  gradient is the ordinary one. Extra memory in the backward: the ``[batch]`` norms and either
  ``[batch, seq, seq]`` Gram matrices or one ``[batch, d, p]`` block, as the Book-Keeping rule
  picks."""
  del mask, threshold
  return inputs @ kernel


def _clipped_dense_fwd(inputs, kernel, mask, threshold):
  return inputs @ kernel, (inputs, kernel, mask)


def _clipped_dense_bwd(threshold, residuals, output_grads):
  inputs, kernel, mask = residuals
  factors = clip_factors(dense_example_norms(inputs, output_grads, mask), threshold)
  scaled = _masked(output_grads.astype(jnp.float32), mask) * factors[:, None, None]
  kernel_grad = jnp.einsum("bsd,bsp->dp", inputs.astype(jnp.float32), scaled)
  return (output_grads @ kernel.T).astype(inputs.dtype), kernel_grad.astype(kernel.dtype), None


clipped_dense.defvjp(_clipped_dense_fwd, _clipped_dense_bwd)


def embedding_example_norms(tokens: Int[Array, "batch seq"],
                            output_grads: Float[Array, "batch seq d"],
                            mask: Float[Array, "batch seq"] | None = None
                            ) -> Float[Array, "batch"]:
  """Per-example norms of an embedding table's gradient by token counts: example ``i``'s gradient
  adds ``g_t`` to row ``tokens_t``, so ``||G_i||^2 = sum_{s,t: tokens_s = tokens_t} g_s . g_t``
  (a ``[seq, seq]`` match matrix per example; the ``[vocab, d]`` rows are never formed)."""
  if tokens.shape != output_grads.shape[:2]:
    raise ValueError(f"tokens {tokens.shape} and output_grads {output_grads.shape} must share "
                     "[batch, seq]")
  g = _masked(output_grads.astype(jnp.float32), mask)
  same = (tokens[:, :, None] == tokens[:, None, :]).astype(jnp.float32)
  squared = jnp.einsum("bst,bst->b", same, g @ g.transpose(0, 2, 1))
  return jnp.sqrt(jnp.maximum(squared, 0.0))


def scale_example_norms(normalized: Float[Array, "batch seq d"],
                        output_grads: Float[Array, "batch seq d"],
                        mask: Float[Array, "batch seq"] | None = None) -> Float[Array, "batch"]:
  """Per-example norms of an elementwise scale's gradient (``y = x_hat * scale``, RMSNorm):
  ``G_i = sum_t x_hat_t * g_t``, ``[batch, d]``, formed explicitly (it is as small as the
  scale). With ``normalized`` all ones it is a bias's gradient."""
  products = _masked(normalized.astype(jnp.float32) * output_grads.astype(jnp.float32), mask)
  return jnp.linalg.norm(products.sum(axis=1), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def clipped_embedding(table: Float[Array, "vocab d"], tokens: Int[Array, "batch seq"],
                      mask: Float[Array, "batch seq"], threshold: float
                      ) -> Float[Array, "batch seq d"]:
  """``table[tokens]`` whose table gradient sums per-example gradients clipped to ``threshold``
  (norms by :func:`embedding_example_norms`); padding positions contribute nothing."""
  del mask, threshold
  return table[tokens]


def _clipped_embedding_fwd(table, tokens, mask, threshold):
  return table[tokens], (table, tokens, mask)  # the table is a parameter: alive anyway


def _clipped_embedding_bwd(threshold, residuals, output_grads):
  table, tokens, mask = residuals
  factors = clip_factors(embedding_example_norms(tokens, output_grads, mask), threshold)
  scaled = _masked(output_grads.astype(jnp.float32), mask) * factors[:, None, None]
  table_grad = jnp.zeros(table.shape, jnp.float32).at[tokens.reshape(-1)].add(
      scaled.reshape(-1, table.shape[1]))
  return table_grad.astype(table.dtype), None, None


clipped_embedding.defvjp(_clipped_embedding_fwd, _clipped_embedding_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def clipped_scale(normalized: Float[Array, "batch seq d"], scale: Float[Array, "d"],
                  mask: Float[Array, "batch seq"], threshold: float
                  ) -> Float[Array, "batch seq d"]:
  """``normalized * scale`` whose scale gradient sums per-example gradients clipped to
  ``threshold``; the input gradient is the ordinary one."""
  del mask, threshold
  return normalized * scale


def _clipped_scale_fwd(normalized, scale, mask, threshold):
  return normalized * scale, (normalized, scale, mask)


def _clipped_scale_bwd(threshold, residuals, output_grads):
  normalized, scale, mask = residuals
  factors = clip_factors(scale_example_norms(normalized, output_grads, mask), threshold)
  products = _masked(normalized.astype(jnp.float32) * output_grads.astype(jnp.float32), mask)
  scale_grad = jnp.einsum("bsd,b->d", products, factors)
  return ((output_grads * scale).astype(normalized.dtype), scale_grad.astype(scale.dtype), None)


clipped_scale.defvjp(_clipped_scale_fwd, _clipped_scale_bwd)


def layer_thresholds(parameter_counts: dict[str, int], clip_norm: float,
                     split: str = "equal") -> dict[str, float]:
  """Per-layer thresholds ``C_l`` with ``sum_l C_l^2 = clip_norm^2``: ``"equal"``
  (``C / sqrt(L)``) or ``"sqrt_params"`` (``C_l^2`` proportional to the layer's parameter count,
  so ``C_l`` to its square root)."""
  if not clip_norm > 0:
    raise ValueError(f"clip_norm is {clip_norm}; expected > 0")
  if not parameter_counts:
    raise ValueError("parameter_counts is empty; expected one entry per clipped layer")
  if split == "equal":
    weights = {name: 1.0 for name in parameter_counts}
  elif split == "sqrt_params":
    weights = {name: float(count) for name, count in parameter_counts.items()}
  else:
    raise ValueError(f"split is {split!r}; expected 'equal' or 'sqrt_params'")
  total = sum(weights.values())
  return {name: clip_norm * (weight / total) ** 0.5 for name, weight in weights.items()}


def noised_mean(clipped_sum: Any, key: Array, noise_multiplier: float, clip_norm: float,
                expected_batch_size: float) -> Any:
  """DP-SGD's released gradient: ``(sum of clipped gradients + N(0, (sigma C)^2)) / E[B]``, for
  an array or a pytree of them (independent noise per leaf).

  The noise is calibrated on the SUM (sensitivity ``C`` under add/remove-one) and then divided
  by the expected batch size of Poisson sampling, not by the realized one (which would leak the
  batch size) and not with a noise std scaled to the mean.
  """
  if not expected_batch_size > 0:
    raise ValueError(f"expected_batch_size is {expected_batch_size}; expected > 0")
  leaves, treedef = jax.tree.flatten(clipped_sum)
  keys = jax.random.split(key, len(leaves))

  def release(leaf, leaf_key):
    noise = jax.random.normal(leaf_key, leaf.shape, jnp.float32) * (noise_multiplier * clip_norm)
    return ((leaf.astype(jnp.float32) + noise) / expected_batch_size).astype(leaf.dtype)

  return jax.tree.unflatten(treedef, [release(leaf, k) for leaf, k in zip(leaves, keys)])
