"""Sparse fine-tuning as optax transformations: SpIEL (:func:`sparse_finetune`), SNELL
(:func:`snell`).

Both fine-tune a pretrained model by changing few entries of its weight matrices, and both are
plain ``optax.GradientTransformation``s over the dense parameters: ``update(grads, state, params)``
takes the dense gradient of every parameter (what ``jax.grad`` of the loss, or
:func:`effjax.optim.zero_trainer`, produces) and returns dense updates that are exactly zero
outside the entries being fine-tuned, so after ``optax.apply_updates`` the parameter itself is the
fine-tuned weight ``W0 + delta``. No training-loop change is needed, and the optimizer state is a
pytree of arrays only (no Python-side bookkeeping), which ZeRO shards (every leaf along its largest
divisible dimension) and orbax checkpoints like Adam's.

Which leaves are fine-tuned: ``matrix_fn(params) -> {leaf name: row axes}`` (or an iterable of
names, meaning 1 row axis), the convention of :func:`effjax.optim.frugal`; a leaf's name is its
path keys joined by ``/`` (``params/layer_0/mlp/up/kernel``), and ``row axes`` ``s`` makes it the
row-major 2-D matrix ``[prod(shape[:s]), prod(shape[s:])]``. The default,
:func:`effjax.optim.decoder_lm_matrices`, picks the linear layers of :class:`effjax.nn.DecoderLM`
blocks, as both papers fine-tune the linear layers: attention query/key/value kernels
``[d_model, heads, head_dim]`` -> ``[d_model, heads*head_dim]``, the attention output
``[heads, head_dim, d_model]`` -> ``[heads*head_dim, d_model]``, MLP gate/up ``[d_model, d_ff]``
and down ``[d_ff, d_model]``. Other leaves (embeddings, norms, an untied ``lm_head``) are frozen
-- zero update, no state -- unless ``others`` gives them an optax transformation (e.g.
``optax.adamw(1e-4)``).

Memory (per selected ``m x n`` matrix, float32, AdamW keeping ``8 m n`` bytes):

* SpIEL: ``24 k`` bytes (index, W0 value, delta, two Adam moments, age of k entries) plus the
  regrowth statistics: ``4 (m + n)`` (SM3) or ``12 k`` (gradient candidates). Transients of a step:
  the dense gradient the loop already holds, a dense update, and at reselection steps dense
  ``[m*n]`` scores and a slot map.
* SNELL: ``12 r (m + n)`` bytes (A, B and their Adam moments). Transients: a few dense ``[m, n]``
  arrays (the merged delta before and after the step, its mask, the kernel's cotangent).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jaxtyping import Array, Float, PyTree

from effjax.optim.frugal import MatrixFn, decoder_lm_matrices, leaf_name, selected_matrices

REGROW = ("sm3", "gradient")
KERNELS = ("piecewise_linear", "linear")
# Flat indices are int32: a selected matrix must have fewer entries than this.
MAX_MATRIX_SIZE = 2**31 - 1
# SpIEL's k from a density is rounded to a multiple of this once it is that large.
K_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class _Matrix:
  """A selected leaf: its position among the flattened leaves and its 2-D view."""
  leaf: int
  name: str
  shape: tuple[int, ...]
  rows: int
  cols: int

  @property
  def size(self) -> int:
    return self.rows * self.cols


def _select(tree: PyTree, matrix_fn: MatrixFn | None, caller: str) -> list[_Matrix]:
  """The leaves ``matrix_fn`` names (:func:`effjax.optim.frugal.selected_matrices`), in flatten
  order, as 2-D views."""
  try:
    selected = selected_matrices(tree, matrix_fn)
  except (TypeError, ValueError) as error:
    raise type(error)(f"{caller}: {error}") from error
  if not selected:
    raise ValueError(f"{caller}: matrix_fn selected no leaf; expected at least one matrix")
  position = {leaf_name(path): i for i, (path, _) in
              enumerate(jax.tree_util.tree_flatten_with_path(tree)[0])}
  leaves = jax.tree.leaves(tree)
  matrices = []
  for name, row_axes in selected.items():
    shape = tuple(int(d) for d in jnp.shape(leaves[position[name]]))
    rows, cols = math.prod(shape[:row_axes]), math.prod(shape[row_axes:])
    if rows * cols > MAX_MATRIX_SIZE:
      raise ValueError(f"{caller}: {name!r} has {rows * cols} entries; at most "
                       f"{MAX_MATRIX_SIZE} are supported (int32 indices)")
    matrices.append(_Matrix(position[name], name, shape, rows, cols))
  return sorted(matrices, key=lambda m: m.leaf)


def _others(others: optax.GradientTransformation | None, matrix_fn: MatrixFn, caller: str):
  """The transformation of the leaves that are not fine-tuned (None: frozen)."""
  if others is None:
    return None

  def unselected(params):
    positions = {m.leaf for m in _select(params, matrix_fn, caller)}
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [i not in positions for i in range(len(leaves))])
  return optax.masked(others, unselected)


def _combine(grads: PyTree, matrices: list[_Matrix], matrix_updates: list[jax.Array],
             others, others_state, params: PyTree | None):
  """Dense updates: the matrices' own, the others' transformation (or zeros) elsewhere."""
  if others is None:
    leaves = [jnp.zeros_like(g) for g in jax.tree.leaves(grads)]
    others_state = optax.EmptyState()
  else:
    updates, others_state = others.update(grads, others_state, params)
    leaves = jax.tree.leaves(updates)
  for spec, update in zip(matrices, matrix_updates):
    leaves[spec.leaf] = update.reshape(spec.shape)
  return jax.tree.unflatten(jax.tree.structure(grads), leaves), others_state


def _learning_rate(learning_rate: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
  return learning_rate(count) if callable(learning_rate) else jnp.asarray(learning_rate)


# --- argument checks --------------------------------------------------------------------------

def _check_int(name: str, value: Any, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def _check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value > low if low_open else value >= low)
  ok = ok and (value < high if high_open else value <= high)
  if not ok:
    interval = ("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]")
    raise ValueError(f"{name}={value!r} must be a number in {interval}")


def _check_adam(b1: float, b2: float, eps: float, weight_decay: float) -> None:
  _check_range("b1", b1, 0.0, 1.0, high_open=True)
  _check_range("b2", b2, 0.0, 1.0, high_open=True)
  _check_range("eps", eps, 0.0, math.inf, high_open=True)
  _check_range("weight_decay", weight_decay, 0.0, math.inf, high_open=True)


def _check_matrix_fn(matrix_fn: Any) -> MatrixFn:
  if matrix_fn is None:
    return decoder_lm_matrices
  if not callable(matrix_fn):
    raise TypeError(f"matrix_fn={matrix_fn!r} must be None or a callable params -> "
                    "{leaf name: row axes}")
  return matrix_fn


def _check_others(others: Any) -> None:
  if others is not None and not isinstance(others, optax.GradientTransformation):
    raise TypeError(f"others={others!r} must be None (frozen) or an optax "
                    "GradientTransformation")


# --- SpIEL --------------------------------------------------------------------------------------

class SM3Stats(NamedTuple):
  """SM3 accumulators of one matrix (SpIEL-MA's regrowth statistics)."""
  row: Float[Array, "rows"]
  col: Float[Array, "cols"]


class CandidateStats(NamedTuple):
  """Regrowth candidates of one matrix (SpIEL-AG): k flat indices and their gradient sums."""
  indices: jax.Array        # int32 [k]
  grad_sum: jax.Array       # float32 [k]
  grad_sq_sum: jax.Array    # float32 [k]


class SparseDeltaState(NamedTuple):
  """The k fine-tuned entries of one matrix, slot by slot.

  The parameter holds ``W0 + scatter(delta)``: at ``indices`` (flat, into the row-major 2-D view,
  distinct and ascending)
  it equals ``base + delta`` with ``base`` the pretrained value ``W0`` there, elsewhere it is
  ``W0`` untouched. ``mu``/``nu`` are Adam's moments of the k values and ``age`` each slot's Adam
  step count since its entry was (re)grown (bias correction per entry).
  """
  indices: jax.Array        # int32 [k]
  base: jax.Array           # [k], the parameter's dtype
  delta: jax.Array          # float32 [k]
  mu: jax.Array             # float32 [k]
  nu: jax.Array             # float32 [k]
  age: jax.Array            # int32 [k]
  stats: SM3Stats | CandidateStats


class SparseFinetuneState(NamedTuple):
  """:func:`sparse_finetune`'s state: step count, one SparseDeltaState per selected matrix (in
  parameter-leaf order) and the state of ``others``."""
  count: jax.Array
  matrices: tuple[SparseDeltaState, ...]
  others: optax.OptState


@dataclasses.dataclass(frozen=True)
class _SpielConfig:
  k: int | None
  density: float | None
  reselection_steps: int
  reselection_rate: float
  total_steps: int
  regrow: str
  accumulation_steps: int
  b1: float
  b2: float
  eps: float
  weight_decay: float


def sparse_finetune(learning_rate: optax.ScalarOrSchedule, *, total_steps: int,
                    density: float | None = None, k: int | None = None,
                    reselection_steps: int = 100, reselection_rate: float = 0.2,
                    regrow: str = "sm3", accumulation_steps: int = 5,
                    matrix_fn: MatrixFn | None = None, b1: float = 0.9, b2: float = 0.999,
                    eps: float = 1e-8, weight_decay: float = 0.0, seed: int = 0,
                    others: optax.GradientTransformation | None = None
                    ) -> optax.GradientTransformation:
  """SpIEL sparse fine-tuning (Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large Language
  Models"): each selected matrix changes in exactly ``k`` entries, which move over training.

  Semantics. Per selected matrix (2-D view ``[m, n]``, ``N = m n`` entries) the state keeps k
  distinct flat indices, the pretrained values ``W0`` there and the deltas; the parameter is
  ``W0 + scatter(delta)``. Initial indices are uniform without replacement (``seed``), deltas 0.
  Every step, with ``t`` the number of earlier updates:

  1. Adam (bias-corrected by each slot's own age, optional decoupled ``weight_decay`` pulling the
     delta toward 0) updates the k deltas from the gradient at their indices; the update returned
     for the parameter is nonzero only there.
  2. Regrowth statistics absorb the dense gradient ``G``: ``regrow="sm3"`` (SpIEL-MA) keeps SM3
     row/column accumulators ``nu = min(row_i, col_j) + G_ij^2``, ``row = max_j nu``,
     ``col = max_i nu``; ``regrow="gradient"`` (SpIEL-AG) picks, at the first step of each
     accumulation window (``t % reselection_steps == 0``), the k entries of largest ``|G|`` as
     candidates and sums their gradients and squared gradients over the window's
     ``accumulation_steps`` steps.
  3. Reselection, at the end of steps with ``t % reselection_steps == accumulation_steps - 1`` and
     ``t < total_steps`` (inside the jitted update, ``lax.cond``): with
     ``p = reselection_rate * (1 - (t + 1) / total_steps)`` (``p = 1`` at the first one, which
     replaces the random initial choice), the ``floor(p k)`` slots of smallest ``|delta|`` are
     pruned and as many entries outside the kept ones regrown, by the largest score:
     ``row_i * col_j`` (sm3) or ``|sum of gradients|`` over the candidates (gradient). A pruned
     entry that is regrown keeps its delta and moments; an entry that leaves reverts to ``W0``;
     a new entry starts at delta 0 with zero moments (sm3) or, as SpIEL-AG, moments seeded from
     the window's gradient means (scaled so their bias-corrected values equal those means). When
     fewer candidates than pruned slots qualify (gradient variant), only that many of the smallest
     are replaced. ``k`` never changes.

  Exactness: entries outside the k indices get an update of exactly 0, so they stay ``W0``
  bitwise. At the k indices every update targets the float nearest ``base + delta`` (``base``
  itself, ``W0``, when the entry leaves), computed from the stored ``W0`` value, so rounding
  never accumulates over steps. One float addition lands on the target whenever the old and new
  parameter values are within a factor 2 of each other (Sterbenz's lemma): always while
  ``|delta| <= |W0| / 3``, and for any entry leaving a ``W0`` of 0. Otherwise (a delta comparable
  to a tiny ``W0``) the parameter can sit one rounding of the step away from its target.

  Memory: ``24 k`` bytes per matrix plus ``4 (m + n)`` (sm3) or ``12 k`` (gradient), against AdamW's
  ``8 m n``: about ``3 * density`` (sm3) or ``4.5 * density`` (gradient) of AdamW's state.
  Reselection steps hold dense ``[N]`` scores and an int32 slot map per matrix as transients (like
  the gradient the loop already holds).

  Paper's claims: instruction-tuning LLaMA 2 (7B, 13B), SpIEL often outperforms LoRA and (IA)^3
  at comparable memory and run time, and stays compatible with quantized weights and with
  memory-efficient optimizers (SpIEL-MA uses SM3).

  Departures from SpIEL's code (AlanAnsell/peft, ``tuners/sft``): its SM3 statistics see only the
  k active gradients (its kernels never form the dense gradient); here the dense gradient is at
  hand (the optax interface), so they get SM3's full update and also measure inactive entries,
  which is what regrowth scores. Both variants train the deltas with Adam (SpIEL-MA also swaps
  Adam for SM3). SpIEL-AG's moment seeding is rescaled to agree with per-slot bias correction. k
  from a density is rounded to a multiple of 128 (below). Slots are kept sorted by index (SpIEL
  sorts only in its SM3 variant), which makes the state canonical.

  Args:
    learning_rate: Adam's step size, a float or an optax schedule of the step count.
    total_steps: T, the planned number of updates (the reselection rate decays to 0 at T and no
      reselection happens after it).
    density: k = max(1, round(density * N)) per matrix, rounded to a multiple of 128 when at
      least 128 (so ZeRO can split the k-slot state over up to 128 devices); default 0.01 when
      ``k`` is None.
    k: the same fixed k for every selected matrix (instead of ``density``).
    reselection_steps: steps between reselections (SpIEL: 100).
    reselection_rate: initial fraction of k changed per reselection (SpIEL: 0.2).
    regrow: ``"sm3"`` (SpIEL-MA) or ``"gradient"`` (SpIEL-AG).
    accumulation_steps: gradient steps per accumulation window, in [1, reselection_steps] (5).
    matrix_fn: ``params -> {leaf name: row axes}`` (or an iterable of names: 1 row axis)
      selecting the matrices (default :func:`effjax.optim.decoder_lm_matrices`).
    b1, b2, eps, weight_decay: Adam's hyper-parameters for the deltas.
    seed: PRNG seed of the initial indices.
    others: optax transformation for the leaves not selected; None freezes them.

  Raises:
    ValueError: an argument out of range (density outside (0, 1], both density and k, k larger
      than a selected matrix, a matrix_fn selecting a non-matrix or nothing, ...).
    TypeError: matrix_fn/others of the wrong kind, or matrix_fn returning neither a mapping nor
      an iterable of leaf names.
  """
  if density is not None and k is not None:
    raise ValueError(f"density={density!r} and k={k!r}: give one of them, not both")
  if k is not None:
    _check_int("k", k, 1)
  else:
    density = 0.01 if density is None else density
    _check_range("density", density, 0.0, 1.0, low_open=True)
  _check_int("total_steps", total_steps, 1)
  _check_int("reselection_steps", reselection_steps, 1)
  _check_range("reselection_rate", reselection_rate, 0.0, 1.0)
  if regrow not in REGROW:
    raise ValueError(f"regrow={regrow!r} must be one of {REGROW}")
  _check_int("accumulation_steps", accumulation_steps, 1)
  if accumulation_steps > reselection_steps:
    raise ValueError(f"accumulation_steps={accumulation_steps} must be <= "
                     f"reselection_steps={reselection_steps}")
  _check_adam(b1, b2, eps, weight_decay)
  _check_int("seed", seed, 0)
  matrix_fn = _check_matrix_fn(matrix_fn)
  _check_others(others)
  config = _SpielConfig(k, density, reselection_steps, reselection_rate, total_steps, regrow,
                        accumulation_steps, b1, b2, eps, weight_decay)
  caller = "sparse_finetune"
  others_tx = _others(others, matrix_fn, caller)

  def init(params):
    matrices = _select(params, matrix_fn, caller)
    leaves = jax.tree.leaves(params)
    key = jax.random.key(seed)
    states = tuple(
        _spiel_init(jax.random.fold_in(key, i), leaves[spec.leaf], spec, config)
        for i, spec in enumerate(matrices))
    others_state = optax.EmptyState() if others_tx is None else others_tx.init(params)
    return SparseFinetuneState(jnp.zeros((), jnp.int32), states, others_state)

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("sparse_finetune: update needs params (the current weights), got None")
    matrices = _select(params, matrix_fn, caller)
    g_leaves, w_leaves = jax.tree.leaves(grads), jax.tree.leaves(params)
    t = state.count
    lr = _learning_rate(learning_rate, t)
    stepped = []
    for spec, ms in zip(matrices, state.matrices):
      g = g_leaves[spec.leaf].reshape(-1).astype(jnp.float32)
      ms = _spiel_adam(ms, g[ms.indices], lr, config)
      stepped.append(ms._replace(stats=_spiel_stats(ms.stats, g, spec, t, config)))
    phase = t % config.reselection_steps
    reselect = (phase == config.accumulation_steps - 1) & (t < config.total_steps)
    first = t == config.accumulation_steps - 1
    rate = jnp.where(first, 1.0, config.reselection_rate
                     * (1.0 - (t + 1).astype(jnp.float32) / config.total_steps))
    w_flat = [w_leaves[spec.leaf].reshape(-1) for spec in matrices]

    unchanged = tuple(jnp.arange(ms.indices.shape[0], dtype=jnp.int32) for ms in stepped)
    new, moved = lax.cond(
        reselect, lambda states: _spiel_reselect_all(states, matrices, w_flat, rate, config),
        lambda states: (states, unchanged), tuple(stepped))
    matrix_updates = [_spiel_param_update(old, ms, to, w)
                      for old, ms, to, w in zip(state.matrices, new, moved, w_flat)]
    updates, others_state = _combine(grads, matrices, matrix_updates, others_tx, state.others,
                                     params)
    return updates, SparseFinetuneState(t + 1, new, others_state)

  return optax.GradientTransformation(init, update)


def _spiel_k(spec: _Matrix, config: _SpielConfig) -> int:
  if config.k is not None:
    if config.k > spec.size:
      raise ValueError(f"sparse_finetune: k={config.k} is larger than matrix {spec.name!r} "
                       f"({spec.rows}x{spec.cols} = {spec.size} entries); expected k <= the "
                       "size of every selected matrix")
    return config.k
  k = round(config.density * spec.size)
  if k >= K_MULTIPLE:   # divisible by any device count up to K_MULTIPLE: ZeRO splits the slots
    k = round(k / K_MULTIPLE) * K_MULTIPLE
  return max(1, min(spec.size, k))


def _spiel_init(key: jax.Array, weight: jax.Array, spec: _Matrix,
                config: _SpielConfig) -> SparseDeltaState:
  k = _spiel_k(spec, config)
  indices = jnp.sort(jax.random.choice(key, spec.size, (k,), replace=False)).astype(jnp.int32)
  zeros = jnp.zeros((k,), jnp.float32)
  if config.regrow == "sm3":
    stats = SM3Stats(jnp.zeros((spec.rows,), jnp.float32), jnp.zeros((spec.cols,), jnp.float32))
  else:
    stats = CandidateStats(jnp.zeros((k,), jnp.int32), zeros, zeros)
  return SparseDeltaState(indices, jnp.asarray(weight).reshape(-1)[indices], zeros, zeros, zeros,
                          jnp.zeros((k,), jnp.int32), stats)


def _spiel_adam(ms: SparseDeltaState, g: jax.Array, lr: jax.Array,
                config: _SpielConfig) -> SparseDeltaState:
  """One AdamW step of the k deltas, bias-corrected by each slot's age."""
  age = ms.age + 1
  mu = config.b1 * ms.mu + (1 - config.b1) * g
  nu = config.b2 * ms.nu + (1 - config.b2) * g * g
  steps = age.astype(jnp.float32)
  mu_hat = mu / (1 - config.b1 ** steps)
  nu_hat = nu / (1 - config.b2 ** steps)
  direction = mu_hat / (jnp.sqrt(nu_hat) + config.eps) + config.weight_decay * ms.delta
  return ms._replace(delta=ms.delta - lr * direction, mu=mu, nu=nu, age=age)


def _spiel_stats(stats: SM3Stats | CandidateStats, g: jax.Array, spec: _Matrix, t: jax.Array,
                 config: _SpielConfig) -> SM3Stats | CandidateStats:
  """Regrowth statistics after this step's dense gradient ``g`` (flat)."""
  if isinstance(stats, SM3Stats):
    g2 = g.reshape(spec.rows, spec.cols)
    nu = jnp.minimum(stats.row[:, None], stats.col[None, :]) + g2 * g2
    return SM3Stats(nu.max(axis=1), nu.max(axis=0))
  phase = t % config.reselection_steps

  def start(stats):
    _, indices = lax.top_k(jnp.abs(g), stats.indices.shape[0])
    return CandidateStats(indices.astype(jnp.int32), g[indices], g[indices] ** 2)

  def accumulate(stats):
    picked = g[stats.indices]
    return stats._replace(grad_sum=stats.grad_sum + picked,
                          grad_sq_sum=stats.grad_sq_sum + picked ** 2)
  branch = jnp.where(phase == 0, 0, jnp.where(phase < config.accumulation_steps, 1, 2))
  return lax.switch(branch, (start, accumulate, lambda stats: stats), stats)


def _spiel_reselect_all(states: tuple[SparseDeltaState, ...], matrices: list[_Matrix],
                        w_flat: list[jax.Array], rate: jax.Array, config: _SpielConfig
                        ) -> tuple[tuple[SparseDeltaState, ...], tuple[jax.Array, ...]]:
  """Reselection of every matrix, one ``lax.map`` per group of equal shapes: the compiled program
  holds one reselection per distinct shape, not per matrix, and the group's matrices run one
  after another (transients of one matrix at a time). Returns the new states and, per matrix,
  where each old slot's entry went (-1: it left)."""
  groups: dict[Any, list[int]] = {}
  for i, (spec, ms) in enumerate(zip(matrices, states)):
    key = (spec.size, tuple((x.shape, x.dtype) for x in jax.tree.leaves(ms)))
    groups.setdefault(key, []).append(i)
  new, moved = list(states), [None] * len(states)
  for (size, _), members in groups.items():
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[states[i] for i in members])
    n = jnp.floor(rate * stacked.indices.shape[1]).astype(jnp.int32)
    regrown, fresh, to = lax.map(lambda ms: _spiel_reselect(ms, size, n, config), stacked)
    for j, i in enumerate(members):
      ms = jax.tree.map(lambda x: x[j], regrown)
      new[i] = ms._replace(base=jnp.where(fresh[j], w_flat[i][ms.indices], ms.base))
      moved[i] = to[j]
  return tuple(new), tuple(moved)


def _spiel_reselect(ms: SparseDeltaState, size: int, n: jax.Array,
                    config: _SpielConfig) -> tuple[SparseDeltaState, jax.Array, jax.Array]:
  """Prunes the ``n`` smallest-|delta| slots and regrows entries by score (fixed shapes).

  Returns the new state (slots sorted by index), which new slots hold a new entry (whose ``base``
  the caller fills in from the weights) and, per old slot, its entry's new slot (-1: it left).
  """
  k = ms.indices.shape[0]
  slots = jnp.arange(k, dtype=jnp.int32)
  order = jnp.argsort(jnp.abs(ms.delta), stable=True)           # slots by ascending |delta|
  pruned = jnp.zeros((k,), jnp.int32).at[order].set(slots) < n
  slot_of = jnp.full((size,), -1, jnp.int32).at[ms.indices].set(slots)
  if isinstance(ms.stats, SM3Stats):
    scores = (ms.stats.row[:, None] * ms.stats.col[None, :]).reshape(-1)
    scores = scores.at[ms.indices].set(jnp.where(pruned, scores[ms.indices], -jnp.inf))
    score, candidates = lax.top_k(scores, k)
    seed_mu = seed_nu = jnp.zeros((k,), jnp.float32)
    seed_age = jnp.zeros((k,), jnp.int32)
  else:
    stats, steps = ms.stats, config.accumulation_steps
    held = slot_of[stats.indices]
    kept = (held >= 0) & ~pruned[jnp.maximum(held, 0)]
    score, pick = lax.top_k(jnp.where(kept, -jnp.inf, jnp.abs(stats.grad_sum)), k)
    candidates = stats.indices[pick]
    seed_mu = (1 - config.b1 ** steps) * stats.grad_sum[pick] / steps
    seed_nu = (1 - config.b2 ** steps) * stats.grad_sq_sum[pick] / steps
    seed_age = jnp.full((k,), steps, jnp.int32)
  valid = (slots < n) & (score > -jnp.inf)
  held = slot_of[candidates]
  regrown_slot = jnp.where(valid & (held >= 0), held, k)     # pruned entries chosen again stay
  fresh = valid & (held < 0)
  regrown = jnp.zeros((k,), bool).at[regrown_slot].set(True, mode="drop")
  free = (pruned & ~regrown)[order]                          # replaceable, ascending |delta|
  slot_for = jnp.full((k,), k, jnp.int32).at[jnp.where(free, jnp.cumsum(free) - 1, k)].set(
      order.astype(jnp.int32), mode="drop")
  target = jnp.where(fresh, slot_for[jnp.clip(jnp.cumsum(fresh) - 1, 0, k - 1)], k)
  indices = ms.indices.at[target].set(candidates.astype(jnp.int32), mode="drop")
  changed = indices != ms.indices

  def place(seed, old):
    return jnp.where(changed, jnp.zeros_like(seed).at[target].set(seed, mode="drop"), old)
  regrown_state = ms._replace(
      indices=indices, delta=jnp.where(changed, 0.0, ms.delta), mu=place(seed_mu, ms.mu),
      nu=place(seed_nu, ms.nu), age=place(seed_age, ms.age))
  # Slots in ascending index order: a canonical state (the same set gives the same arrays).
  by_index = jnp.argsort(indices)
  sorted_slot = jnp.zeros((k,), jnp.int32).at[by_index].set(slots)
  return (regrown_state._replace(**{field: getattr(regrown_state, field)[by_index]
                                    for field in _SLOT_FIELDS}),
          changed[by_index], jnp.where(changed, -1, sorted_slot))


_SLOT_FIELDS = ("indices", "base", "delta", "mu", "nu", "age")


def _spiel_param_update(old: SparseDeltaState, new: SparseDeltaState, moved: jax.Array,
                        w_flat: jax.Array) -> jax.Array:
  """Flat update: at the old indices, to ``base + delta`` (back to ``base`` for entries that left,
  ``moved == -1``); zero elsewhere (new entries start at their current value, ``W0``)."""
  at = jnp.maximum(moved, 0)
  merged = (new.base[at].astype(jnp.float32) + new.delta[at]).astype(w_flat.dtype)
  target = jnp.where(moved >= 0, merged, old.base)
  return jnp.zeros_like(w_flat).at[old.indices].set(_reach(w_flat[old.indices], target))


def _reach(w: jax.Array, target: jax.Array) -> jax.Array:
  """An update ``u`` with ``w + u == target`` in floating point where one exists near
  ``target - w``: the rounded difference, or its neighbour one ulp toward the target."""
  u = target - w
  landed = w + u
  nudged = jnp.where(landed < target, jnp.nextafter(u, jnp.inf),
                     jnp.where(landed > target, jnp.nextafter(u, -jnp.inf), u))
  return jnp.where((landed != target) & (w + nudged == target), nudged, u)


# --- SNELL --------------------------------------------------------------------------------------

class SnellFactors(NamedTuple):
  """Low-rank factors of one matrix: ``a`` [m, r] (one row per input row of the view), ``b``
  [r, n] (one column per output column)."""
  a: Float[Array, "m r"]
  b: Float[Array, "r n"]


class SnellState(NamedTuple):
  """:func:`snell`'s state: the factors of each selected matrix (parameter-leaf order), the
  factor optimizer's state (AdamW moments of every factor) and the state of ``others``."""
  factors: tuple[SnellFactors, ...]
  factor_state: optax.OptState
  others: optax.OptState


def snell_delta(a: Float[Array, "m r"], b: Float[Array, "r n"], *, sparsity: float,
                kernel: str = "piecewise_linear", kernel_scale: float = 0.1
                ) -> Float[Array, "m n"]:
  """SNELL's sparse delta ``sparsify(kernel(a, b))``, the explicit formula :func:`snell` applies.

  ``kernel="piecewise_linear"`` (SNELL's kernel): with ``r`` even, the rank splits in two halves,
  ``a = [a1 | a2]`` and ``b = [b1; b2]`` (``r/2`` each), and
  ``K_ij = kernel_scale * (||a1_i - b1_j||_2 - ||a2_i - b2_j||_2)``, a difference of Euclidean
  distances between row ``i`` of ``a`` and column ``j`` of ``b``; unlike ``a @ b`` its rank is not
  bounded by ``r``. ``kernel="linear"``: ``K = kernel_scale * a @ b`` (LoRA's merge).

  Sparsification (SNELL's competition): the ``keep = max(1, round((1 - sparsity) * m n))``
  entries of largest ``|K|`` survive, the rest are zeroed. The threshold (the keep-th largest
  ``|K|``) and the mask carry no gradient, so the gradient reaches surviving entries unchanged;
  entries tied with the threshold survive too (an all-zero K keeps every entry, which is what lets
  gradients reach ``a`` and ``b`` from a zero delta).

  Memory: O(m n) (distances through matmuls, float32, highest matmul precision; the difference of
  distances in a cancellation-free form); the threshold is found by bisection over the float bits
  (32 counting passes, no sort).
  """
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
    raise ValueError(f"snell_delta: a {a.shape} and b {b.shape} must be [m, r] and [r, n]")
  _check_snell_kernel(kernel, a.shape[1], kernel_scale)
  _check_range("sparsity", sparsity, 0.0, 1.0, high_open=True)
  return _snell_merge(a, b, _snell_keep(a.shape[0] * b.shape[1], sparsity), kernel,
                      kernel_scale)


def _distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """``[m, n]`` Euclidean distances between the rows of ``a`` [m, h] and columns of ``b`` [h, n],
  through ``|a|^2 + |b|^2 - 2 a.b`` (gradient 0 where the distance is 0)."""
  cross = jnp.dot(a, b, precision=lax.Precision.HIGHEST)
  squared = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=0)[None, :] - 2 * cross
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _snell_kernel(a: jax.Array, b: jax.Array, kernel: str, scale: float) -> jax.Array:
  """The merged ``[m, n]`` kernel matrix (float32).

  The piecewise-linear difference ``d1 - d2`` is computed as ``(d1^2 - d2^2) / (d1 + d2)`` with
  ``d1^2 - d2^2 = 4 <ea - eb, sa - sb>`` in the halves' mean ``s`` and half-difference ``e``
  (``a1 = s + e``, ``a2 = s - e``): accurate relative to the kernel value even when both distances
  are much larger than it (as near the tied start), where ``d1 - d2`` would cancel.
  """
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  dot = lambda x, y: jnp.dot(x, y, precision=lax.Precision.HIGHEST)
  if kernel == "linear":
    return scale * dot(a, b)
  half = a.shape[1] // 2
  a1, a2, b1, b2 = a[:, :half], a[:, half:], b[:half], b[half:]
  sa, ea, sb, eb = (a1 + a2) / 2, (a1 - a2) / 2, (b1 + b2) / 2, (b1 - b2) / 2
  squares = 4 * (jnp.sum(ea * sa, axis=1)[:, None] - dot(ea, sb) - dot(sa, eb)
                 + jnp.sum(eb * sb, axis=0)[None, :])
  total = _distances(a1, b1) + _distances(a2, b2)
  positive = total > 0
  return scale * jnp.where(positive, squares / jnp.where(positive, total, 1.0), 0.0)


def _kth_largest(x: jax.Array, k: int) -> jax.Array:
  """The k-th largest of the non-negative float32 ``x`` (flat), by bisection on its bit pattern
  (monotone for non-negative floats): 32 passes that count, no sort."""
  bits = lax.bitcast_convert_type(x, jnp.int32)

  def halve(_, bounds):
    low, high = bounds
    mid = low + (high - low + 1) // 2
    enough = jnp.sum(bits >= mid) >= k
    return jnp.where(enough, mid, low), jnp.where(enough, high, mid - 1)
  low, _ = lax.fori_loop(0, 32, halve, (jnp.int32(0), jnp.int32(0x7F800000)))
  return lax.bitcast_convert_type(low, jnp.float32)


def _snell_merge(a: jax.Array, b: jax.Array, keep: int, kernel: str, scale: float) -> jax.Array:
  delta = _snell_kernel(a, b, kernel, scale)
  magnitude = lax.stop_gradient(jnp.abs(delta))
  survive = magnitude >= _kth_largest(magnitude.reshape(-1), keep)
  return jnp.where(survive, delta, 0.0)


def _snell_keep(size: int, sparsity: float) -> int:
  return max(1, min(size, round((1.0 - sparsity) * size)))


def _check_snell_kernel(kernel: Any, rank: Any, kernel_scale: Any) -> None:
  if kernel not in KERNELS:
    raise ValueError(f"kernel={kernel!r} must be one of {KERNELS}")
  _check_int("rank", rank, 1)
  if kernel == "piecewise_linear" and rank % 2:
    raise ValueError(f"rank={rank} must be even for kernel='piecewise_linear' (two halves of "
                     "rank/2)")
  _check_range("kernel_scale", kernel_scale, 0.0, math.inf, low_open=True, high_open=True)


def _snell_init_factors(key: jax.Array, spec: _Matrix, rank: int, kernel: str) -> SnellFactors:
  """Factors whose kernel is exactly 0 but whose gradient is not.

  piecewise_linear: each half of ``a`` (of ``b``) is the same uniform draw, bound
  ``1/sqrt(m r/2)`` (``1/sqrt(n r/2)``) as in SNELL's code, so both distances are bitwise equal and
  cancel, while their gradients are opposite and nonzero. linear: LoRA's ``a`` uniform
  ``1/sqrt(m)``, ``b = 0``.
  """
  key_a, key_b = jax.random.split(key)
  m, n = spec.rows, spec.cols
  if kernel == "linear":
    bound = 1.0 / math.sqrt(m)
    return SnellFactors(jax.random.uniform(key_a, (m, rank), jnp.float32, -bound, bound),
                        jnp.zeros((rank, n), jnp.float32))
  half = rank // 2
  bound_a, bound_b = 1.0 / math.sqrt(m * half), 1.0 / math.sqrt(n * half)
  a = jax.random.uniform(key_a, (m, half), jnp.float32, -bound_a, bound_a)
  b = jax.random.uniform(key_b, (half, n), jnp.float32, -bound_b, bound_b)
  return SnellFactors(jnp.concatenate([a, a], axis=1), jnp.concatenate([b, b], axis=0))


def snell(learning_rate: optax.ScalarOrSchedule, *, rank: int = 8, sparsity: float = 0.9,
          kernel: str = "piecewise_linear", kernel_scale: float = 0.1,
          matrix_fn: MatrixFn | None = None, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.0, seed: int = 0,
          others: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
  """SNELL (Shen et al., NeurIPS 2024, "Expanding Sparse Tuning for Low Memory Usage"): sparse
  tuning through a kernelized low-rank adapter merged into the weight.

  Semantics. Per selected matrix (2-D view ``[m, n]``) the state holds factors ``A`` [m, rank]
  and ``B`` [rank, n]; the model's weight is ``W = W0 + snell_delta(A, B)`` (see
  :func:`snell_delta`: SNELL's piecewise-linear kernel merge, then its competition-based
  sparsification keeping the ``(1 - sparsity)`` fraction of largest ``|delta|``). ``update`` gets
  the dense gradient ``G`` of ``W``; the factors' gradients are the VJP of
  ``(A, B) -> snell_delta(A, B)`` at ``G`` (the chain rule through the formula), AdamW
  (``learning_rate``, ``b1``, ``b2``, ``eps``, ``weight_decay``) steps the factors, and the
  parameter update is ``snell_delta(new) - snell_delta(old)``, so ``W0`` is never stored. The
  factors start with a zero delta (:func:`snell_delta` documents why they still get gradients),
  so the model starts as the pretrained one. Entries that never survive keep ``W0`` bitwise (their
  update is exactly 0); elsewhere ``W`` tracks the formula up to the float rounding of each
  step's update (an entry that stops surviving returns to ``W0`` up to those roundings, as
  ``W0`` itself is not stored).

  Memory: ``12 rank (m + n)`` bytes per matrix against AdamW's ``8 m n``, i.e.
  ``1.5 rank (m + n) / (m n)`` of it; transient dense ``[m, n]`` arrays in the step.

  Paper's claims: SNELL reaches state-of-the-art accuracy among parameter-efficient methods on
  FGVC and VTAB-1k with ViT/Swin/ConvNeXt backbones at a memory footprint close to LoRA's, the
  nonlinear kernel raising the rank of the merged matrix and the competition selecting the
  weights to tune end to end, without storing their indices.

  The kernel and rule follow SNELL's official code (ssfgunner/SNELL, ``KLoRA``/``SNELL`` in
  ``model/vision_transformer_timm.py``): distances of two ``rank/2`` halves with coefficients
  ``+-kernel_scale`` (0.1 there), zeroing below the ``sparsity`` quantile of ``|delta|``.
  Departures: (1) the official code initialises the halves independently (a random nonzero delta
  at step 0); here they are tied so the delta starts at exactly 0 and the model as the pretrained
  one (what LoRA's ``B = 0`` does).
  (2) The official sparsifier also multiplies each survivor by its detached ``|delta|``
  (``delta * |delta|``), whose gradient vanishes at ``delta = 0``; with a zero start that would
  never train, so survivors keep their value (straight-through mask), and ties with the threshold
  survive. (3) The delta replaces a parallel adapter branch by an update merged into ``W``.

  Args:
    learning_rate: AdamW's step size for the factors (float or schedule).
    rank: r, even for the piecewise-linear kernel (SNELL uses 8 to 32).
    sparsity: fraction of delta entries zeroed, in [0, 1) (SNELL's scripts: 0.9).
    kernel: ``"piecewise_linear"`` (SNELL) or ``"linear"`` (LoRA's product, an ablation).
    kernel_scale: the kernel's coefficient (SNELL: 0.1).
    matrix_fn: ``params -> {leaf name: row axes}`` (or an iterable of names: 1 row axis)
      selecting the matrices (default :func:`effjax.optim.decoder_lm_matrices`).
    b1, b2, eps, weight_decay: AdamW's hyper-parameters for the factors.
    seed: PRNG seed of the factors.
    others: optax transformation for the leaves not selected; None freezes them.

  Raises:
    ValueError: an argument out of range (odd rank with the piecewise-linear kernel, sparsity
      outside [0, 1), a matrix_fn selecting a non-matrix or nothing, ...).
    TypeError: matrix_fn/others of the wrong kind, or matrix_fn returning neither a mapping nor
      an iterable of leaf names.
  """
  _check_snell_kernel(kernel, rank, kernel_scale)
  _check_range("sparsity", sparsity, 0.0, 1.0, high_open=True)
  _check_adam(b1, b2, eps, weight_decay)
  _check_int("seed", seed, 0)
  matrix_fn = _check_matrix_fn(matrix_fn)
  _check_others(others)
  caller = "snell"
  others_tx = _others(others, matrix_fn, caller)
  factor_tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

  def init(params):
    matrices = _select(params, matrix_fn, caller)
    key = jax.random.key(seed)
    factors = tuple(_snell_init_factors(jax.random.fold_in(key, i), spec, rank, kernel)
                    for i, spec in enumerate(matrices))
    others_state = optax.EmptyState() if others_tx is None else others_tx.init(params)
    return SnellState(factors, factor_tx.init(factors), others_state)

  def update(grads, state, params=None):
    matrices = _select(grads, matrix_fn, caller)
    leaves = jax.tree.leaves(grads)
    keeps = [_snell_keep(spec.size, sparsity) for spec in matrices]

    def merge_all(factors):
      return tuple(_snell_merge(f.a, f.b, keep, kernel, kernel_scale)
                   for f, keep in zip(factors, keeps))
    old, vjp = jax.vjp(merge_all, state.factors)
    (factor_grads,) = vjp(tuple(leaves[spec.leaf].reshape(spec.rows, spec.cols)
                                .astype(jnp.float32) for spec in matrices))
    factor_updates, factor_state = factor_tx.update(factor_grads, state.factor_state,
                                                    state.factors)
    factors = optax.apply_updates(state.factors, factor_updates)
    new = merge_all(factors)
    matrix_updates = [(after - before).astype(leaves[spec.leaf].dtype)
                      for spec, before, after in zip(matrices, old, new)]
    updates, others_state = _combine(grads, matrices, matrix_updates, others_tx, state.others,
                                     params)
    return updates, SnellState(factors, factor_state, others_state)

  return optax.GradientTransformation(init, update)
