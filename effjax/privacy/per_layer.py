"""Per-layer clipping of any Flax model, in one backward: a method interceptor.

``with per_layer_clipping(thresholds, example_mask): model.apply(...)`` routes every call of a
``nn.Dense``, ``nn.DenseGeneral``, ``nn.Embed`` (lookup and ``attend``) and ``nn.RMSNorm`` through
the clipped ops of :mod:`effjax.privacy.clipping`: the forward is unchanged, and differentiating
the SUM of the examples' losses gives every parameter's gradient as the sum of per-example
gradients, each clipped to its layer's threshold inside the layer's own backward. No model code
changes and no per-example gradient exists. :func:`layer_uses` traces the model once to find the
uses and refuses a parameter that no rule covers (a layer type without a norm rule would leak
unclipped gradients).

A use is one (module, method) call site, e.g. a tied embedding's lookup and its ``attend`` are
two uses of one table. Thresholds come per module from :func:`effjax.privacy.layer_thresholds`
(``sum_l C_l^2 = C^2``) and are split evenly over a module's uses, so every example's whole
clipped gradient has norm at most ``C`` (the uses of one parameter add, so their thresholds must
sum to the module's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool

from effjax.privacy import clipping

Use = tuple[tuple[str, ...], str]  # (module path, method name)
RULES = (nn.Dense, nn.DenseGeneral, nn.Embed, nn.RMSNorm)
"""Module types with a per-example norm rule (their exact types: a subclass may compute
something else)."""


def _rule_applies(module: nn.Module, method: str) -> bool:
  return type(module) in RULES and (method == "__call__" or
                                    (type(module) is nn.Embed and method == "attend"))


@dataclasses.dataclass(frozen=True)
class LayerUses:
  """What :func:`layer_uses` found: the uses of every clipped module and each module's
  parameter count."""
  uses: dict[tuple[str, ...], tuple[str, ...]]
  parameter_counts: dict[tuple[str, ...], int]

  def thresholds(self, clip_norm: float, split: str = "equal") -> dict[Use, float]:
    """Per-use thresholds: the module's ``C_l`` (:func:`effjax.privacy.layer_thresholds`)
    divided evenly among its uses."""
    per_module = clipping.layer_thresholds(
        {"/".join(path): count for path, count in self.parameter_counts.items()}, clip_norm,
        split)
    return {(path, method): per_module["/".join(path)] / len(methods)
            for path, methods in self.uses.items() for method in methods}


def layer_uses(apply_fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any) -> LayerUses:
  """Traces ``apply_fn(params, *args, **kwargs)`` (shapes only) and records every clipped use.

  Raises ``ValueError`` naming the parameters that no rule covers (e.g. a ``nn.Conv`` kernel, a
  custom ``self.param``), and for a Dense/DenseGeneral with a bias or batch dimensions.
  """
  found: dict[tuple[str, ...], list[str]] = {}

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if _rule_applies(module, context.method_name):
      if isinstance(module, nn.DenseGeneral) and module.batch_dims:
        raise ValueError(f"{'/'.join(module.path)}: DenseGeneral with batch_dims has no "
                         "per-example norm rule")
      methods = found.setdefault(tuple(module.path), [])
      if context.method_name not in methods:
        methods.append(context.method_name)
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda p: apply_fn(p, *args, **kwargs), params)
  counts: dict[tuple[str, ...], int] = {path: 0 for path in found}
  uncovered = []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(str(getattr(k, "key", k)) for k in key_path)
    names = names[1:] if names and names[0] == "params" else names
    owner = names[:-1]
    if owner in counts and names[-1] in ("kernel", "embedding", "scale"):
      counts[owner] += math.prod(leaf.shape)
    else:
      uncovered.append("/".join(names))
  if uncovered:
    raise ValueError(
        f"parameters without a per-example norm rule: {', '.join(uncovered)}; per-layer "
        f"clipping covers the kernels of Dense/DenseGeneral (no bias), Embed tables and RMSNorm "
        f"scales; an unclipped parameter would break the privacy guarantee")
  return LayerUses({path: tuple(methods) for path, methods in found.items()}, counts)


def _positions(x: Array, features: int) -> Array:
  """``[batch, ..., features]`` -> ``[batch, positions, features]``."""
  return x.reshape(x.shape[0], -1, features)


def _row_mask(example_mask: Array, x: Array) -> Array:
  return jnp.broadcast_to(example_mask[:, None], (x.shape[0], x.shape[1])).astype(jnp.float32)


def _clipped_call(module: nn.Module, method: str, args: tuple, threshold: float,
                  example_mask: Array) -> Array:
  params = module.variables["params"]
  dtype = module.dtype
  if isinstance(module, nn.Embed):
    table = params["embedding"].astype(dtype or params["embedding"].dtype)
    if method == "attend":
      query = args[0].astype(table.dtype)
      flat = _positions(query, query.shape[-1])
      out = clipping.clipped_dense(flat, table.T, _row_mask(example_mask, flat), threshold)
      return out.reshape(*query.shape[:-1], table.shape[0])
    tokens = args[0]
    flat_tokens = tokens.reshape(tokens.shape[0], -1)
    out = clipping.clipped_embedding(table, flat_tokens, _row_mask(example_mask, flat_tokens),
                                     threshold)
    return out.reshape(*tokens.shape, table.shape[1])
  if isinstance(module, nn.RMSNorm):
    if module.reduction_axes not in (-1, (-1,)) or module.feature_axes not in (-1, (-1,)):
      raise ValueError(f"{'/'.join(module.path)}: RMSNorm over axes other than the last has no "
                       "per-example norm rule")
    x = args[0]
    x32 = x.astype(jnp.float32)
    normalized = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + module.epsilon)
    flat = _positions(normalized, x.shape[-1])
    out = clipping.clipped_scale(flat, params["scale"].astype(jnp.float32),
                                 _row_mask(example_mask, flat), threshold)
    return out.reshape(x.shape).astype(dtype or x.dtype)
  kernel = params["kernel"]
  x = args[0]
  contracted = (1 if isinstance(module, nn.Dense) else
                len(module.axis) if isinstance(module.axis, (tuple, list)) else 1)
  axes = (-1,) if isinstance(module, nn.Dense) else (
      tuple(module.axis) if isinstance(module.axis, (tuple, list)) else (module.axis,))
  if sorted(a % x.ndim for a in axes) != list(range(x.ndim - contracted, x.ndim)):
    raise ValueError(f"{'/'.join(module.path)}: DenseGeneral contracting axes {axes} that are not "
                     "the trailing ones has no per-example norm rule")
  in_features = math.prod(kernel.shape[:contracted])
  out_shape = kernel.shape[contracted:]
  compute = dtype or jnp.result_type(x.dtype, kernel.dtype)
  flat = x.astype(compute).reshape(x.shape[0], -1, in_features)
  out = clipping.clipped_dense(flat, kernel.astype(compute).reshape(in_features, -1),
                               _row_mask(example_mask, flat), threshold)
  return out.reshape(*x.shape[:x.ndim - contracted], *out_shape)


@contextlib.contextmanager
def per_layer_clipping(thresholds: Mapping[Use, float],
                       example_mask: Bool[Array, "batch"]) -> Iterator[None]:
  """Within the block, every clipped use (:func:`layer_uses`) of a Flax model computes its
  forward as usual and clips each example's parameter gradient to ``thresholds[use]`` in its
  backward; rows with ``example_mask == False`` (Poisson padding) contribute nothing.
  A use missing from ``thresholds`` is a ``KeyError`` naming it."""

  def clip(next_fun, args, kwargs, context):
    module = context.module
    if not _rule_applies(module, context.method_name):
      return next_fun(*args, **kwargs)
    use = (tuple(module.path), context.method_name)
    if use not in thresholds:
      raise KeyError(f"no threshold for {'/'.join(use[0])}.{use[1]}; build them with "
                     "layer_uses(...).thresholds(clip_norm)")
    if kwargs:
      raise ValueError(f"{'/'.join(use[0])}.{use[1]} called with keyword arguments "
                       f"{sorted(kwargs)}; per-layer clipping supports the positional input only")
    return _clipped_call(module, context.method_name, args, thresholds[use], example_mask)

  with nn.intercept_methods(clip):
    yield
