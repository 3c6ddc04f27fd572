"""Activation checkpointing (rematerialization) policies for :class:`effjax.nn.DecoderLM`.

``DecoderLM(remat=...)`` wraps every block in ``jax.checkpoint`` with one of these policies:

* ``"none"``: no checkpointing; the backward reads every activation the forward kept.
* ``"full"``: only each block's input is kept; the backward reruns the whole block first,
  attention forward included (activation memory ``O(layers * batch * seq * d_model)``).
* ``"dots"``: keep the results of matrix multiplications without batch dimensions (the
  projections and MLP matmuls); the backward recomputes the elementwise work and the attention.
* ``"save_attention"``: LightSeq's rematerialization-aware checkpointing (Li et al. 2023): each
  block also keeps its attention output and LSE (tagged by every flash attention implementation
  and by ring attention, :mod:`pallas_kernels.flash_attention.residuals`), so the rerun block
  recomputes the projections, norms and MLP but never the attention forward: the FlashAttention
  backward needs only q, k, v (cheap to recompute) and those two. Memory over ``"full"``: the
  output ``[batch, seq, heads, head_dim]`` in the compute dtype and the float32 LSE
  ``[batch, heads, seq]`` per layer. LightSeq reports 1.24-2.01x faster training than
  Megatron-LM with this and its ring; the saving grows with the attention's share of the step.
* ``"offload_attention"``: as ``"save_attention"``, but the attention output and LSE are copied
  to host memory (``pinned_host``) in the forward and back in the backward, so the device keeps
  only block inputs (``jax.checkpoint_policies.save_and_offload_only_these_names``; the copies
  show as ``<host>`` residuals in the step's jaxpr). Worth it where the host link is fast next to
  the attention forward it saves (TPU, GH200). On the CPU backend host and device memory are one,
  so there it changes nothing but the copies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jex_core

from pallas_kernels.flash_attention import residuals

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names(residuals.OUTPUT,
                                                                     residuals.LSE),
    "offload_attention": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[residuals.OUTPUT,
                                                                    residuals.LSE],
        offload_src="device", offload_dst="pinned_host"),
}


def remat_policy(name: str) -> Callable[..., bool] | None:
  """The ``jax.checkpoint`` policy called ``name`` (None: do not checkpoint)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat is {name!r}; expected one of {list(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


def _subjaxprs(value: Any):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _subjaxprs(item)


def _eqns(jaxpr: jex_core.Jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs in its equations' parameters, depth first
  (a sub-jaxpr used twice is walked twice; a loop body once)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in (s for value in eqn.params.values() for s in _subjaxprs(value)):
      yield from _eqns(sub)


def count_attention_forwards(fn: Callable[..., Any], *args: Any) -> int:
  """Attention forward passes that one call ``fn(*args)`` runs (e.g. a training step's
  ``jax.grad``), counted in its jaxpr, recomputations included.

  Every flash / ring attention forward under differentiation ends in its tagged output
  (:func:`pallas_kernels.flash_attention.residuals.tag_residuals`), and a checkpointed block's
  recomputation replays that tag only when it reruns the forward; so this counts the tags.
  """
  return sum(eqn.primitive.name == "name" and eqn.params.get("name") == residuals.OUTPUT
             for eqn in _eqns(jax.make_jaxpr(fn)(*args).jaxpr))


def host_residual_bytes(fn: Callable[..., Any], *args: Any) -> int:
  """Bytes that one call ``fn(*args)`` copies to host memory: the residuals an offloading
  policy (``"offload_attention"``) moves out of device memory, from the jaxpr's ``device_put``
  equations into ``jax.memory.Space.Host``."""
  return sum(var.aval.size * var.aval.dtype.itemsize
             for eqn in _eqns(jax.make_jaxpr(fn)(*args).jaxpr)
             if eqn.primitive.name == "device_put" for var in eqn.outvars
             if getattr(var.aval, "memory_space", None) == jax.memory.Space.Host)
