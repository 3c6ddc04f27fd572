"""FRUGAL and GaLore: a state-full optimizer on a subspace, a state-free one on the rest.

FRUGAL (Zmushko et al., ICML 2025, arXiv 2411.07837) splits each projectable matrix gradient
``G`` ``[m, n]`` with a projection ``P`` into a part in a small subspace, updated by a state-full
optimizer (Adam), and the residual, updated by a state-free one (signSGD)::

    update = -lr * (P Adam(P^T G) + inactive_lr_scale * sign(G - P P^T G)) - lr * wd * W

Every other leaf (embeddings, norms, logits, biases) gets the state-full optimizer at full size.
GaLore (Zhao et al., ICML 2024) is the special case without the residual update
(``state_free=None``), hence :func:`galore`.

Projections (refreshed from the current gradient every ``update_gap`` steps, inside the jitted
update with ``lax.cond``; the state-full moments and their step count restart then):

* ``"svd"`` (GaLore-like): the 2-D view ``[m, n]`` of a leaf is projected on its smaller side
  ``s = min(m, n)`` to rank ``r = max(1, round(rho * s))``: left ``U[:, :r]`` of the SVD of ``G``
  when ``m < n`` (coordinates ``P^T G``: ``[r, n]``), else right ``Vh[:r]`` (``G P``:
  ``[m, r]``).
* ``"random"``: the same shapes with a random semi-orthogonal basis (QR of a Gaussian matrix)
  drawn from ``seed``, the refresh index and the leaf's position; the gradient is not used.
* ``"blocks"`` (BAdam-like): whole tensors are active. With static shapes, moments can only be
  kept for a fixed number of tensors of a fixed shape, so the projectable leaves are grouped by
  shape and dtype, and each group of ``n`` tensors keeps ``k = max(1, round(rho * n))`` slots
  of moments ``[k, *shape]`` plus the int32 indices of the ``k`` active tensors, drawn at random
  (a fresh random subset at each refresh, as the paper's code does). Active tensors get the
  state-full update, the others the state-free update of their whole gradient. The saving is
  real (moments for ``k`` of ``n`` tensors) but is per shape group: the paper draws
  ``round(rho * #tensors)`` from all projectable tensors together, which needs dynamic shapes.

A projection that is the identity is skipped: a matrix whose rank ``r`` equals its side, or a
blocks group whose every tensor is active, is updated by the state-full optimizer at full size
with no refresh or reset. So ``rho=1`` is exactly ``state_full`` (the paper's code would rotate
Adam into the SVD basis, and reset BAdam's moments at every refresh).

State (:class:`FrugalState`, a pytree of arrays only, so ZeRO (:func:`effjax.optim.zero_trainer`)
shards each leaf along its largest divisible dimension and orbax checkpoints it): ``count``
int32 ``[]``; ``dense``: ``state_full``'s state over the full-size leaves; ``low``:
``state_full``'s state over the subspace coordinates (``[r, n]`` or ``[m, r]`` per matrix, or
``[k, *shape]`` per blocks group); ``bases``: ``[s, r]`` orthonormal columns per projected
matrix (svd, random); ``active``: int32 ``[k]`` per blocks group. All keyed by leaf name (path
keys joined by ``/``, e.g. ``params/layer_0/mlp/up/kernel``) or blocks group name.

Memory (Adam as ``state_full``, ``W = m * n`` elements of a projected matrix): moments ``2 * r *
max(m, n) ~= 2 * rho * W`` plus the basis ``s * r ~= rho * s^2``, against AdamW's ``2 * W``; a
blocks group ``2 * k * W``. The residual costs no state. Full-size leaves keep ``2 * W``, so in
small models whose (tied) embedding holds much of the parameters the ratio to AdamW stays well
above ``rho``. Transients: the residual ``G - P P^T G`` is one gradient-sized array per matrix;
blocks mode stacks each group's gradients ``[n, *shape]``; at a refresh the SVD or QR of each
matrix runs on the whole matrix (under ZeRO the partitioner gathers it on every device).

Paper claims (arXiv 2411.07837): at ``rho=0.25`` FRUGAL beats GaLore and BAdam at equal memory
when pre-training LLaMA 60M-1B on C4 and approaches AdamW's perplexity; even ``rho=0`` (state
only on embeddings, norms and logits) beats them; logits are the most sensitive to signSGD.
Defaults follow the paper: ``rho=0.25``, ``update_gap=200``, signSGD residual,
``inactive_lr_scale`` 1.0 for pre-training (0.1 for fine-tuning).

Departures from the paper's code: ranks are at least 1 (its ``round`` may give 0); the
identity projections above are skipped; blocks are drawn per shape group; on a square matrix the
right side is projected (``m < n`` is false) which, on Flax ``[in, out]`` kernels, is the output
side, whereas PyTorch's ``[out, in]`` weights make its code project the input side; a
``proj_params_lr_scale`` is folded into ``learning_rate``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jaxtyping import PyTree

PROJECTIONS = ("svd", "random", "blocks")
STATE_FREE = ("sign", "sgd", None)

MatrixFn = Callable[[PyTree], "Mapping[str, int] | Iterable[str]"]

# DecoderLM leaf-name suffix -> number of leading axes forming the rows of the 2-D view.
_DECODER_LM_MATRICES = (
    (re.compile(r"(^|/)attention/(query|key|value)/kernel$"), 1),  # [d_model, heads, head_dim]
    (re.compile(r"(^|/)attention/out/kernel$"), 2),                # [heads, head_dim, d_model]
    (re.compile(r"(^|/)mlp/(gate|up|down)/kernel$"), 1),           # [d_model, d_ff], [d_ff, d]
)


class FrugalState(NamedTuple):
  """FRUGAL's optimizer state: arrays only (see the module docstring for shapes and memory).

  Attributes:
    count: int32 ``[]``, steps taken; the subspace is refreshed when ``count % update_gap == 0``.
    dense: ``state_full``'s state over the leaves updated at full size, keyed by leaf name.
    low: ``state_full``'s state over the subspace coordinates, keyed by leaf (svd, random) or
      group (blocks) name; re-initialized at every refresh.
    bases: per projected matrix, ``[side, rank]`` with orthonormal columns (svd, random).
    active: per blocks group, int32 ``[k]`` indices (in flatten order) of its active tensors.
  """
  count: jax.Array
  dense: optax.OptState
  low: optax.OptState
  bases: dict[str, jax.Array]
  active: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class _Matrix:
  """A projected leaf: its 2-D view ``[rows, cols]`` and the rank of its subspace."""
  shape: tuple[int, ...]
  rows: int
  cols: int
  rank: int

  @property
  def left(self) -> bool:
    return self.rows < self.cols

  @property
  def side(self) -> int:
    return min(self.rows, self.cols)

  @property
  def low_shape(self) -> tuple[int, int]:
    return (self.rank, self.cols) if self.left else (self.rows, self.rank)

  def down(self, basis: jax.Array, grad: jax.Array) -> jax.Array:
    """Subspace coordinates: ``P^T G`` ``[r, n]`` (left) or ``G P`` ``[m, r]`` (right)."""
    view = grad.reshape(self.rows, self.cols)
    return _matmul(basis.T, view) if self.left else _matmul(view, basis)

  def up(self, basis: jax.Array, low: jax.Array) -> jax.Array:
    """Back to the leaf's shape: ``P X`` (left) or ``X P^T`` (right)."""
    full = _matmul(basis, low) if self.left else _matmul(low, basis.T)
    return full.reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Which leaf gets what, from the tree's structure and shapes (static)."""
  names: tuple[str, ...]
  dense: tuple[str, ...]
  matrices: dict[str, _Matrix]
  groups: dict[str, tuple[str, ...]]   # blocks: group name -> member leaf names
  active_count: dict[str, int]         # blocks: group name -> k


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  # Full float32 precision on every backend: the residual must be exactly G - P P^T G.
  return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def leaf_name(path: tuple[Any, ...]) -> str:
  """A leaf's name: its path keys joined by ``/`` (``params/layer_0/mlp/up/kernel``)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def decoder_lm_matrices(params: PyTree) -> dict[str, int]:
  """The default ``matrix_fn``: the attention and MLP kernels of :class:`effjax.nn.DecoderLM`.

  Returns ``{leaf name: row axes}``: query/key/value ``[d_model, heads, head_dim]`` are viewed as
  ``[d_model, heads * head_dim]`` (1 row axis), out ``[heads, head_dim, d_model]`` as
  ``[heads * head_dim, d_model]`` (2), MLP gate/up/down as themselves (1). Embeddings, norms and
  an untied ``lm_head`` are never selected.
  """
  selected = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = leaf_name(path)
    for pattern, row_axes in _DECODER_LM_MATRICES:
      if pattern.search(name):
        selected[name] = row_axes
  return selected


def frugal(learning_rate: optax.ScalarOrSchedule, *, rho: float = 0.25, update_gap: int = 200,
           projection: str = "svd", state_full: optax.GradientTransformation | None = None,
           state_free: str | None = "sign", inactive_lr_scale: float = 1.0,
           weight_decay: float = 0.0, weight_decay_mask: Any = None,
           matrix_fn: MatrixFn | None = None, seed: int = 0) -> optax.GradientTransformation:
  """FRUGAL (Zmushko et al., ICML 2025) as an optax GradientTransformation.

  Projected leaves get ``-lr * (P S(P^T g) + inactive_lr_scale * F(g - P P^T g))``, other leaves
  ``-lr * S(g)``, all leaves ``- lr * weight_decay * w`` (decoupled, masked by
  ``weight_decay_mask``); ``S`` is ``state_full``, ``F`` the ``state_free`` rule. Semantics,
  state shapes and memory: see the module docstring.

  Args:
    learning_rate: a float or an optax schedule of the step count (0 at the first update).
    rho: the subspace's share, in (0, 1]: rank ``max(1, round(rho * side))`` per matrix (svd,
      random), or active tensors ``max(1, round(rho * n))`` per shape group of n (blocks).
    update_gap: steps between subspace refreshes (>= 1); the first update refreshes.
    projection: ``"svd"`` (GaLore-like), ``"random"`` (semi-orthogonal) or ``"blocks"``
      (BAdam-like whole tensors).
    state_full: a gradient-scaling transformation without learning rate that does not read the
      parameters (default ``optax.scale_by_adam()``); its state must depend only on the shapes
      it is initialized with (it is re-initialized at every refresh).
    state_free: ``"sign"`` (signSGD of the residual, FRUGAL's default), ``"sgd"`` (the residual
      itself) or None (no residual update: GaLore).
    inactive_lr_scale: factor (>= 0) of the state-free update (the paper: 1.0 for pre-training,
      0.1 for fine-tuning).
    weight_decay: decoupled weight decay (>= 0), applied to every leaf the mask allows.
    weight_decay_mask: None (all leaves), a pytree of bools like the parameters, or a callable
      ``params -> pytree of bools``.
    matrix_fn: ``params -> {leaf name: row axes}`` (or an iterable of names, meaning 1 row axis)
      choosing the projectable leaves; a leaf ``[a0, .., ak]`` with ``row axes = j`` is viewed
      as ``[a0 * .. * a(j-1), aj * .. * ak]``. Names are path keys joined by ``/``
      (:func:`leaf_name`). None: :func:`decoder_lm_matrices`.
    seed: seeds the random bases and block choices (with the refresh index: reproducible and
      resumable without a key in the state).

  Raises:
    ValueError: an option out of range or unknown (at construction); at ``init``/``update``, a
      ``matrix_fn`` naming a leaf the parameters lack or a leaf that is not a matrix, or the
      default selecting nothing.
  """
  return _frugal(learning_rate, rho=rho, rank=None, update_gap=update_gap, projection=projection,
                 state_full=state_full, state_free=state_free,
                 inactive_lr_scale=inactive_lr_scale, weight_decay=weight_decay,
                 weight_decay_mask=weight_decay_mask, matrix_fn=matrix_fn, seed=seed)


def galore(learning_rate: optax.ScalarOrSchedule, *, rank: int | None = None,
           rho: float | None = None, update_gap: int = 200, projection: str = "svd",
           state_full: optax.GradientTransformation | None = None, weight_decay: float = 0.0,
           weight_decay_mask: Any = None, matrix_fn: MatrixFn | None = None,
           seed: int = 0) -> optax.GradientTransformation:
  """GaLore (Zhao et al., ICML 2024): :func:`frugal` with ``state_free=None``.

  Projected leaves get ``-lr * P Adam(P^T g)`` only (the residual is not updated), with the
  moments reset at every refresh. GaLore's paper reports matching full-rank pre-training of
  LLaMA up to 1B on C4 with 65.5% less optimizer-state memory (rank 128-512 of 256-2048,
  ``update_gap`` 200, an update scale alpha=0.25 that here belongs in ``learning_rate``).

  Args:
    rank: a fixed rank for every matrix (``min(rank, side)``), GaLore's parametrisation; or
    rho: the rank's share of each matrix's side (default 0.25 when neither is given).
    Others: as :func:`frugal`.

  Raises:
    ValueError: both ``rank`` and ``rho`` given, ``rank`` not a positive int or given with
      ``projection="blocks"``, or as :func:`frugal`.
  """
  if rank is not None and rho is not None:
    raise ValueError(f"galore takes rank={rank!r} or rho={rho!r}, not both")
  if rank is not None:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
      raise ValueError(f"rank={rank!r} must be a positive integer")
    if projection == "blocks":
      raise ValueError("rank applies to projection='svd' or 'random'; projection='blocks' "
                       "takes rho (the share of active tensors)")
  return _frugal(learning_rate, rho=0.25 if rho is None else rho, rank=rank,
                 update_gap=update_gap, projection=projection, state_full=state_full,
                 state_free=None, inactive_lr_scale=1.0, weight_decay=weight_decay,
                 weight_decay_mask=weight_decay_mask, matrix_fn=matrix_fn, seed=seed)


def _frugal(learning_rate, *, rho, rank, update_gap, projection, state_full, state_free,
            inactive_lr_scale, weight_decay, weight_decay_mask, matrix_fn, seed):
  _check_options(learning_rate, rho, update_gap, projection, state_full, state_free,
                 inactive_lr_scale, weight_decay, weight_decay_mask, matrix_fn, seed)
  state_full = optax.scale_by_adam() if state_full is None else state_full
  plan_of = lambda tree: _plan(tree, matrix_fn, projection, rho, rank)

  def init_fn(params):
    plan = plan_of(params)
    leaves = _named_leaves(params)
    dense = state_full.init({name: leaves[name] for name in plan.dense})
    return FrugalState(count=jnp.zeros((), jnp.int32), dense=dense,
                       **_fresh_subspace(plan, leaves, state_full))

  def update_fn(updates, state, params=None):
    if weight_decay and params is None:
      raise ValueError(f"frugal with weight_decay={weight_decay} needs params in update()")
    plan = plan_of(updates)
    grads = _named_leaves(updates)
    count = state.count
    dense_updates, dense = state_full.update({name: grads[name] for name in plan.dense},
                                             state.dense, None)
    out = dict(dense_updates)
    low, bases, active = state.low, state.bases, state.active
    if plan.matrices or plan.groups:
      epoch = count // update_gap

      def refresh():
        fresh = _fresh_subspace(plan, grads, state_full)
        fresh["bases"] = {name: _basis(plan.matrices[name], grads[name], projection,
                                       _key(seed, epoch, plan.names.index(name)))
                          for name in plan.matrices}
        fresh["active"] = {
            group: _draw_active(len(members), plan.active_count[group],
                                _key(seed, epoch, index))
            for index, (group, members) in enumerate(plan.groups.items())}
        return fresh

      keep = lambda: {"low": state.low, "bases": state.bases, "active": state.active}
      new = lax.cond(count % update_gap == 0, refresh, keep)
      bases, active = new["bases"], new["active"]
      coordinates = {name: matrix.down(bases[name], grads[name])
                     for name, matrix in plan.matrices.items()}
      stacks = {group: jnp.stack([grads[name] for name in members])
                for group, members in plan.groups.items()}
      coordinates.update({group: stacks[group][active[group]] for group in plan.groups})
      low_updates, low = state_full.update(coordinates, new["low"], None)
      for name, matrix in plan.matrices.items():
        out[name] = matrix.up(bases[name], low_updates[name])
        if state_free is not None:
          residual = grads[name] - matrix.up(bases[name], coordinates[name])
          out[name] = out[name] + inactive_lr_scale * _state_free(state_free, residual)
      for group, members in plan.groups.items():
        stack = stacks[group]
        rest = (jnp.zeros_like(stack) if state_free is None else
                inactive_lr_scale * _state_free(state_free, stack))
        stack_updates = rest.at[active[group]].set(low_updates[group].astype(rest.dtype))
        out.update({name: stack_updates[i] for i, name in enumerate(members)})
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    decay = _decay_mask(weight_decay_mask, params, plan.names) if weight_decay else {}
    weights = _named_leaves(params) if decay else {}
    named = {}
    for name in plan.names:
      update = -lr * out[name]
      if decay.get(name, False):
        update = update - lr * weight_decay * weights[name]
      named[name] = update.astype(grads[name].dtype)
    new_updates = jax.tree.unflatten(jax.tree.structure(updates),
                                     [named[name] for name in plan.names])
    return new_updates, FrugalState(count=optax.safe_int32_increment(count), dense=dense,
                                    low=low, bases=bases, active=active)

  return optax.GradientTransformation(init_fn, update_fn)


def _named_leaves(tree: PyTree) -> dict[str, Any]:
  return {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def selected_matrices(tree: PyTree, matrix_fn: MatrixFn | None = None) -> dict[str, int]:
  """``matrix_fn(tree)`` as ``{leaf name: row axes}``, validated against ``tree``.

  Args:
    tree: the parameters (or gradients; arrays or ShapeDtypeStructs).
    matrix_fn: ``tree -> {leaf name: row axes}`` or an iterable of names (1 row axis each);
      None: :func:`decoder_lm_matrices`.

  Raises:
    TypeError: ``matrix_fn`` returned neither a mapping nor an iterable of names.
    ValueError: a name ``tree`` lacks; a leaf that is not a floating matrix (ndim >= 2 and
      1 <= row axes < ndim); the default selecting nothing.
  """
  leaves = _named_leaves(tree)
  names = tuple(leaves)
  selected = (decoder_lm_matrices if matrix_fn is None else matrix_fn)(tree)
  if isinstance(selected, Mapping):
    selected = dict(selected)
  elif isinstance(selected, Iterable) and not isinstance(selected, str):
    selected = {name: 1 for name in selected}
  else:
    raise TypeError(f"matrix_fn returned {selected!r}; expected a mapping {{leaf name: row "
                    "axes}} or an iterable of leaf names")
  if matrix_fn is None and not selected:
    raise ValueError(
        f"matrix_fn=None selects DecoderLM attention and MLP kernels, but the parameters have "
        f"none (leaves: {_preview(names)}); pass matrix_fn naming the matrices to project")
  for name, row_axes in selected.items():
    if name not in leaves:
      raise ValueError(f"matrix_fn named leaf {name!r}, which the parameters do not have; "
                       f"leaves are named {_preview(names)}")
    shape = tuple(np.shape(leaves[name]))
    if (isinstance(row_axes, bool) or not isinstance(row_axes, numbers.Integral)
        or not 1 <= row_axes < len(shape)):
      raise ValueError(
          f"matrix_fn named leaf {name!r} of shape {shape} with row axes {row_axes!r}; a "
          "projectable leaf is a matrix: it needs >= 2 dimensions and 1 <= row axes < ndim")
    if not jnp.issubdtype(leaves[name].dtype, jnp.floating):
      raise ValueError(f"matrix_fn named leaf {name!r} of dtype {leaves[name].dtype}; "
                       "projectable leaves must be floating")
  return {name: int(row_axes) for name, row_axes in selected.items()}


def _plan(tree: PyTree, matrix_fn: MatrixFn | None, projection: str, rho: float,
          rank: int | None) -> _Plan:
  """Assigns each leaf of ``tree`` its update: full size, projected matrix, or blocks group."""
  leaves = _named_leaves(tree)
  names = tuple(leaves)
  shapes = {name: tuple(np.shape(leaf)) for name, leaf in leaves.items()}
  selected = selected_matrices(tree, matrix_fn)
  dense, matrices, members = [], {}, {}
  for name in names:
    if name not in selected:
      dense.append(name)
    elif projection == "blocks":
      members.setdefault(f"{leaves[name].dtype}_{'x'.join(map(str, shapes[name]))}",
                         []).append(name)
    else:
      shape, row_axes = shapes[name], selected[name]
      rows, cols = math.prod(shape[:row_axes]), math.prod(shape[row_axes:])
      side = min(rows, cols)
      r = min(rank, side) if rank is not None else max(1, round(rho * side))
      if r == side:   # the whole space: the identity projection, skipped
        dense.append(name)
      else:
        matrices[name] = _Matrix(shape, rows, cols, r)
  groups, active_count = {}, {}
  for group, names_in in members.items():
    k = max(1, round(rho * len(names_in)))
    if k == len(names_in):   # every tensor active: the identity, skipped
      dense.extend(names_in)
    else:
      groups[group], active_count[group] = tuple(names_in), k
  dense = tuple(name for name in names if name in set(dense))
  return _Plan(names, dense, matrices, groups, active_count)


def _preview(names: tuple[str, ...], most: int = 8) -> str:
  shown = ", ".join(repr(name) for name in names[:most])
  return f"[{shown}{', ...' if len(names) > most else ''}] ({len(names)} leaves)"


def _fresh_subspace(plan: _Plan, leaves: dict[str, Any],
                    state_full: optax.GradientTransformation) -> dict[str, Any]:
  """Zero bases, the first active tensors, and ``state_full`` initialized on the coordinates."""
  dtype = lambda name: leaves[name].dtype
  coordinates = {name: jnp.zeros(m.low_shape, dtype(name)) for name, m in plan.matrices.items()}
  coordinates.update({
      group: jnp.zeros((plan.active_count[group], *np.shape(leaves[members[0]])),
                       dtype(members[0])) for group, members in plan.groups.items()})
  return {"low": state_full.init(coordinates),
          "bases": {name: jnp.zeros((m.side, m.rank), dtype(name))
                    for name, m in plan.matrices.items()},
          "active": {group: jnp.arange(plan.active_count[group], dtype=jnp.int32)
                     for group in plan.groups}}


def _key(seed: int, epoch: jax.Array, index: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), index)


def _basis(matrix: _Matrix, grad: jax.Array, projection: str, key: jax.Array) -> jax.Array:
  """``[side, rank]`` orthonormal columns: top singular vectors of the gradient on the projected
  side (svd), or a random semi-orthogonal basis (random)."""
  if projection == "random":
    gaussian = jax.random.normal(key, (matrix.side, matrix.rank), jnp.float32)
    basis = jnp.linalg.qr(gaussian, mode="reduced")[0]
  else:
    u, _, vh = jnp.linalg.svd(grad.reshape(matrix.rows, matrix.cols).astype(jnp.float32),
                              full_matrices=False)
    basis = u[:, :matrix.rank] if matrix.left else vh[:matrix.rank].T
  return basis.astype(grad.dtype)


def _draw_active(n: int, k: int, key: jax.Array) -> jax.Array:
  """``k`` distinct indices of ``0..n-1``, sorted: a uniformly random subset."""
  return jnp.sort(jax.random.permutation(key, n)[:k]).astype(jnp.int32)


def _state_free(rule: str, residual: jax.Array) -> jax.Array:
  return jnp.sign(residual) if rule == "sign" else residual


def _decay_mask(mask: Any, params: PyTree, names: tuple[str, ...]) -> dict[str, bool]:
  if mask is None:
    return dict.fromkeys(names, True)
  tree = mask(params) if callable(mask) else mask
  flags = jax.tree.leaves(tree)
  if len(flags) != len(names):
    raise ValueError(f"weight_decay_mask has {len(flags)} leaves; expected one bool per "
                     f"parameter leaf ({len(names)})")
  return {name: bool(flag) for name, flag in zip(names, flags)}


def _check_options(learning_rate, rho, update_gap, projection, state_full, state_free,
                   inactive_lr_scale, weight_decay, weight_decay_mask, matrix_fn, seed) -> None:
  """Raises ValueError/TypeError naming the first bad option, its value and what is expected."""
  is_real = lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool)
  if not (callable(learning_rate) or is_real(learning_rate)):
    raise TypeError(f"learning_rate={learning_rate!r} must be a number or a schedule")
  if not is_real(rho) or not 0 < rho <= 1:
    raise ValueError(f"rho={rho!r} must be in (0, 1]")
  if isinstance(update_gap, bool) or not isinstance(update_gap, numbers.Integral) or update_gap < 1:
    raise ValueError(f"update_gap={update_gap!r} must be an integer >= 1")
  if projection not in PROJECTIONS:
    raise ValueError(f"projection={projection!r} must be one of {PROJECTIONS}")
  if state_free not in STATE_FREE:
    raise ValueError(f"state_free={state_free!r} must be one of {STATE_FREE}")
  if state_full is not None and not isinstance(state_full, optax.GradientTransformation):
    raise TypeError(f"state_full={state_full!r} must be an optax GradientTransformation or None")
  for name, value in (("inactive_lr_scale", inactive_lr_scale), ("weight_decay", weight_decay)):
    if not is_real(value) or value < 0:
      raise ValueError(f"{name}={value!r} must be a number >= 0")
  if matrix_fn is not None and not callable(matrix_fn):
    raise TypeError(f"matrix_fn={matrix_fn!r} must be None or a callable params -> "
                    "{leaf name: row axes}")
  if isinstance(weight_decay_mask, (str, numbers.Number)):
    raise TypeError(f"weight_decay_mask={weight_decay_mask!r} must be None, a pytree of bools "
                    "or a callable")
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
    raise TypeError(f"seed={seed!r} must be an integer")
