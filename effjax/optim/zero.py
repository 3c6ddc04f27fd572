"""ZeRO stages 0-3 for any loss function and optax optimizer, as jitted ``init`` and ``step``.

ZeRO (Rajbhandari et al., SC'20) removes the redundancy of data parallelism: each of the N
data-parallel devices keeps only 1/N of the optimizer state (stage 1), also of the gradients
(stage 2), and also of the parameters (stage 3). The paper's per-device model-state bytes for P
float32 parameters under Adam (4 bytes of parameters, 4 of gradients, 8 of moments per
parameter): stage 0 (plain data parallel) 16P, stage 1 8P + 8P/N, stage 2 4P + 12P/N, stage 3
16P/N; communication 2P per step for stages 0-2 and 3P for stage 3.

How each stage runs here (N = devices on the mesh's ``"state"`` axes, data then fsdp):

* Layout: a leaf is split along its largest dimension that N divides
  (:func:`effjax.sharding.state_partition_spec`); scalars and indivisible leaves are replicated.
  Optimizer-state leaves get the layout of their own shape, so any optax transformation whose
  state is param-shaped leaves plus scalars shards correctly.
* Gradients are computed inside ``jax.shard_map`` with explicit collectives:
  stages 0-1 all-reduce them (``psum``); stage 2 reduce-scatters each leaf's gradient as the
  backward pass produces it (``psum_scatter``, through a custom VJP that reuses the replicated
  parameter in the forward pass); stage 3 all-gathers each parameter leaf where the loss uses it,
  whose transpose is the same reduce-scatter (FSDP), and gathers it again in the backward pass
  (a remat policy) rather than keeping it. The optimizer update then runs under jit on
  the sharded state; the partitioner all-gathers updated parameters where they are replicated.
* The state is donated, so the step updates it in place. Micro-batches accumulate gradients in
  their final layout under ``lax.scan``. ``compute_dtype`` runs the loss in e.g. bfloat16 while
  parameters (the master copy) and optimizer state stay float32; stage 3 gathers in the compute
  dtype. ``offload_optimizer`` keeps optimizer state in ``pinned_host`` memory between steps.

Memory cost (per device): the state above, plus the step's transients: stages 0-1 hold the full
local and all-reduced gradients (about 8P); stage 2 frees each gradient leaf once scattered;
stage 3 holds a parameter leaf only from its gather to its use, but XLA:CPU removes remat's
optimization barriers and merges the backward gather with the forward one, so on CPU the gathered
parameters (4P) stay live through the step (measured in benchmarks/zero.md). A parameter leaf is
gathered whole: stacked (scanned) layers are gathered all at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, PyTree

from effjax import sharding

STAGES = (0, 1, 2, 3)
OFFLOAD_MEMORY_KIND = "pinned_host"
# Fraction of a device's memory the model state may take when choosing a stage (the rest is left
# for activations and transients).
STATE_MEMORY_FRACTION = 0.5

LossFn = Callable[[PyTree, PyTree], Float[Array, ""]]


class ZeroState(flax.struct.PyTreeNode):
  """Training state: step counter, float32 master parameters, optimizer state."""
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class ZeroTrainer:
  """Jitted ZeRO training functions for one model, optimizer, mesh and stage.

  Attributes:
    init: ``params -> ZeroState`` placed in ``state_sharding`` (floating params cast to float32).
    gradients: ``(params, batch) -> (loss, grads)``, grads in the stage's gradient layout.
    state_sharding: a ZeroState of NamedShardings.
    batch_sharding: leading axis split over the state axes.
    abstract_state: ShapeDtypeStructs with shardings, the restore target for orbax (restoring a
      checkpoint written on any mesh onto this one).
    jit_step: the jitted step without argument checks (lower and compile it to read its memory
      or HLO); prefer :meth:`step`.
  """
  mesh: Mesh
  stage: int
  micro_batches: int
  init: Callable[[PyTree], ZeroState]
  gradients: Callable[[PyTree, PyTree], tuple[jax.Array, PyTree]]
  state_sharding: ZeroState
  batch_sharding: NamedSharding
  abstract_state: ZeroState
  jit_step: Callable[[ZeroState, PyTree], tuple[ZeroState, dict[str, jax.Array]]]

  def step(self, state: ZeroState, batch: PyTree) -> tuple[ZeroState, dict[str, jax.Array]]:
    """One optimizer step on ``batch`` (leaves ``[global_batch, ...]``); ``state`` is donated.

    Returns the new state and ``{"loss", "grad_norm"}`` (mean loss over the batch).
    """
    for leaf in jax.tree.leaves(batch):
      if not np.shape(leaf):
        raise ValueError(f"batch leaves need a leading batch axis, got shape {np.shape(leaf)}")
      sharding.check_batch_divisible(np.shape(leaf)[0], self.mesh, "batch size",
                                     self.micro_batches)
    return self.jit_step(state, batch)


def zero_trainer(loss_fn: LossFn, optimizer: optax.GradientTransformation, params: PyTree,
                 mesh: Mesh, *, stage: int, micro_batches: int = 1,
                 compute_dtype: Any | None = None,
                 offload_optimizer: bool = False) -> ZeroTrainer:
  """Builds jitted ZeRO ``init`` / ``step`` with explicit in/out shardings and donated state.

  Args:
    loss_fn: ``(params, batch) -> scalar`` mean loss over the batch's leading axis (means over
      equal shards and micro-batches then equal the full-batch mean).
    optimizer: any optax GradientTransformation whose state is param-shaped leaves + scalars.
    params: the parameters (arrays or ShapeDtypeStructs); only shapes and dtypes are read.
    mesh: a mesh with a ``"data"`` and/or ``"fsdp"`` axis (see effjax.sharding); other axes
      (``"tensor"``) replicate.
    stage: 0 (data parallel), 1 (+ optimizer state sharded), 2 (+ gradients reduce-scattered),
      3 (+ parameters sharded, FSDP).
    micro_batches: gradient accumulation steps per optimizer step.
    compute_dtype: dtype the loss runs in (e.g. jnp.bfloat16); None keeps the parameter dtype.
    offload_optimizer: keep optimizer state in host memory (``pinned_host``) between steps.

  Raises:
    ValueError: stage out of range, micro_batches < 1, a mesh without data/fsdp axes, or host
      offload on a backend without ``pinned_host`` memory.
    TypeError: compute_dtype not None or a floating dtype, offload_optimizer not a bool.
  """
  if isinstance(stage, bool) or not isinstance(stage, int) or stage not in STAGES:
    raise ValueError(f"stage={stage!r} must be one of {STAGES}")
  if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
    raise ValueError(f"micro_batches={micro_batches!r} must be a positive integer")
  _check_compute_dtype(compute_dtype)
  if not isinstance(offload_optimizer, bool):
    raise TypeError(f"offload_optimizer={offload_optimizer!r} must be a bool")
  axes = sharding.mesh_axes(mesh, "state")
  if offload_optimizer:
    _check_memory_kind(mesh, OFFLOAD_MEMORY_KIND)
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p), _master_dtype(p.dtype)),
                        params)
  specs = jax.tree.map(lambda p: sharding.state_partition_spec(p.shape, mesh, axes), params)
  opt_state = jax.eval_shape(optimizer.init, params)
  host = OFFLOAD_MEMORY_KIND if offload_optimizer else None
  state_sharding = ZeroState(
      step=sharding.replicated(mesh),
      params=sharding.tree_shardings(params, mesh, shard=stage == 3, axes=axes),
      opt_state=sharding.tree_shardings(opt_state, mesh, shard=stage >= 1, axes=axes,
                                        memory_kind=host))
  opt_on_device = sharding.tree_shardings(opt_state, mesh, shard=stage >= 1, axes=axes)
  grad_sharding = sharding.tree_shardings(params, mesh, shard=stage >= 2, axes=axes)
  batch_sharding = NamedSharding(mesh, PartitionSpec(axes))
  gradients = _gradient_fn(loss_fn, specs, mesh, axes, stage, micro_batches, compute_dtype)

  def init(params):
    params = jax.tree.map(lambda p: p.astype(_master_dtype(p.dtype)), params)
    return ZeroState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

  def step(state, batch):
    loss, grads = gradients(state.params, batch)
    opt_state = state.opt_state
    if offload_optimizer:
      opt_state = jax.device_put(opt_state, opt_on_device)
    updates, opt_state = optimizer.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if offload_optimizer:
      opt_state = jax.device_put(opt_state, state_sharding.opt_state)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return ZeroState(state.step + 1, params, opt_state), metrics

  abstract = jax.tree.map(lambda s, shard: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shard),
                          ZeroState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_state),
                          state_sharding)
  replicated = sharding.replicated(mesh)
  return ZeroTrainer(
      mesh=mesh, stage=stage, micro_batches=micro_batches,
      init=jax.jit(init, out_shardings=state_sharding),
      gradients=jax.jit(gradients, in_shardings=(state_sharding.params, batch_sharding),
                        out_shardings=(replicated, grad_sharding)),
      state_sharding=state_sharding, batch_sharding=batch_sharding, abstract_state=abstract,
      jit_step=jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, replicated), donate_argnums=0))


def _gradient_fn(loss_fn: LossFn, specs: PyTree, mesh: Mesh, axes: tuple[str, ...], stage: int,
                 micro_batches: int, compute_dtype: Any | None):
  """``(params, batch) -> (mean loss, mean grads)`` as a shard_map with explicit collectives."""
  devices = sharding.axes_size(mesh, axes)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  param_specs = specs if stage == 3 else jax.tree.map(lambda _: PartitionSpec(), specs,
                                                      is_leaf=is_spec)
  grad_specs = specs if stage >= 2 else param_specs

  def cast(x):
    return x if compute_dtype is None else x.astype(compute_dtype)

  def micro_step(params, micro):
    """Loss and gradient of one local micro-batch; sharded leaves are already summed over devices
    (reduce-scattered), replicated-layout leaves are still local."""
    if stage == 3:   # params are local shards; gather each where used (transpose: reduce-scatter)
      def materialize(local, spec):
        dim = sharding.sharded_dim(spec)
        return cast(local) if dim is None else lax.all_gather(cast(local), axes, axis=dim,
                                                               tiled=True)
      loss_of = jax.checkpoint(lambda p: loss_fn(jax.tree.map(materialize, p, specs), micro),
                               policy=_regather_policy)
      loss, grads = jax.value_and_grad(loss_of)(params)
    elif stage == 2:   # differentiate w.r.t. this device's shards, forward with the full params
      shards = jax.tree.map(_local_shard(axes, devices), params, specs)
      restore = lambda shard, full, spec: cast(
          shard if sharding.sharded_dim(spec) is None else
          _reuse_full(axes, sharding.sharded_dim(spec), shard, full))
      loss, grads = jax.value_and_grad(
          lambda s: loss_fn(jax.tree.map(restore, s, params, specs), micro))(shards)
    else:
      loss, grads = jax.value_and_grad(lambda p: loss_fn(jax.tree.map(cast, p), micro))(params)
    return loss, grads

  def local(params, batch):
    if micro_batches == 1:
      loss, grads = micro_step(params, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), batch)
      first = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           jax.eval_shape(micro_step, params, first))

      def body(carry, one):
        return jax.tree.map(jnp.add, carry, micro_step(params, one)), None
      (loss, grads), _ = lax.scan(body, zeros, micro)
    # Replicated-layout leaves hold local sums: all-reduce them once, after accumulation.
    grads = jax.tree.map(lambda g, spec: lax.psum(g, axes) if sharding.sharded_dim(spec) is None
                         else g, grads, grad_specs)
    scale = devices * micro_batches
    loss = lax.psum(loss, axes) / scale
    return loss, jax.tree.map(lambda g: g / scale, grads)

  # Manual over the ZeRO axes only: other mesh axes (e.g. 'seq' for sequence parallelism) stay
  # automatic inside the loss, where the model may shard_map over them itself.
  return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, PartitionSpec(axes)),
                       out_specs=(PartitionSpec(), grad_specs), axis_names=set(axes),
                       check_vma=False)


def _regather_policy(primitive: Any, *_: Any, **__: Any) -> bool:
  """Remat policy of stage 3: save every residual except gathered parameters, which the backward
  pass gathers again (ZeRO-3's 3P communication) instead of keeping them from the forward pass."""
  return primitive.name != "all_gather"


def _local_shard(axes: tuple[str, ...], devices: int):
  """This device's slice of a replicated leaf along its ZeRO dimension (the whole leaf if none)."""
  def take(full, spec):
    dim = sharding.sharded_dim(spec)
    if dim is None:
      return full
    size = full.shape[dim] // devices
    return lax.dynamic_slice_in_dim(full, lax.axis_index(axes) * size, size, dim)
  return take


def _reuse_full(axes: tuple[str, ...], dim: int, shard: jax.Array, full: jax.Array) -> jax.Array:
  """``full`` in the forward pass; the backward pass reduce-scatters the cotangent to ``shard``.

  Stage 2's collective: the gradient w.r.t. this device's shard is the sum over devices of the
  matching slice of each device's local gradient, i.e. ``psum_scatter`` along ``dim``.
  """
  @jax.custom_vjp
  def reuse(shard, full):
    del shard
    return full

  def forward(shard, full):
    del shard
    return full, None

  def backward(_, cotangent):
    return lax.psum_scatter(cotangent, axes, scatter_dimension=dim, tiled=True), None

  reuse.defvjp(forward, backward)
  return reuse(shard, full)


def _master_dtype(dtype: Any) -> Any:
  """Floating parameters are kept (and optimized) in float32; others unchanged."""
  return jnp.float32 if jnp.issubdtype(dtype, jnp.floating) else dtype


def _check_compute_dtype(compute_dtype: Any) -> None:
  """Raises TypeError unless ``compute_dtype`` is None or a floating dtype."""
  if compute_dtype is None:
    return
  try:
    floating = jnp.issubdtype(jnp.dtype(compute_dtype), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise TypeError(f"compute_dtype={compute_dtype!r} must be None or a floating dtype "
                    "(e.g. jnp.bfloat16)")


def _check_memory_kind(mesh: Mesh, kind: str) -> None:
  device = mesh.devices.flat[0]
  kinds = sorted(m.kind for m in device.addressable_memories())
  if kind not in kinds:
    raise ValueError(f"offload_optimizer=True needs memory kind {kind!r}, but {device.platform} "
                     f"devices offer {kinds}")


def model_state_bytes(params: PyTree, opt_state: PyTree, devices: int, stage: int) -> float:
  """Per-device bytes of parameters + gradients + optimizer state at ``stage`` (ZeRO accounting).

  Gradients take the parameters' bytes. Sharded parts are divided by ``devices`` (leaves the
  devices do not divide count as divided too: a small error for real models).
  """
  if stage not in STAGES:
    raise ValueError(f"stage={stage!r} must be one of {STAGES}")
  size = lambda tree: sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                          for x in jax.tree.leaves(tree))
  p, o = size(params), size(opt_state)
  shares = [(p + p + o, 0), (p + p, o), (p, p + o), (0, p + p + o)][stage]
  return shares[0] + shares[1] / devices


def choose_stage(params: PyTree, optimizer: optax.GradientTransformation,
                 devices: Sequence[jax.Device]) -> int:
  """The lowest ZeRO stage (least communication) whose model state fits on ``devices``.

  The rule: the smallest stage whose :func:`model_state_bytes` is at most
  ``STATE_MEMORY_FRACTION`` of the smallest device memory limit (``memory_stats()['bytes_limit']``),
  else 3. Backends that report no limit (CPU) get stage 0: host memory is not the constraint.
  """
  limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
  if any(limit is None for limit in limits):
    return 0
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p), _master_dtype(p.dtype)),
                        params)
  opt_state = jax.eval_shape(optimizer.init, params)
  budget = STATE_MEMORY_FRACTION * min(limits)
  for stage in STAGES:
    if model_state_bytes(params, opt_state, len(devices), stage) <= budget:
      return stage
  return STAGES[-1]
