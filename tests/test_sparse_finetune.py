"""Sparse fine-tuning (effjax.optim.sparse): SpIEL's fixed budget, pruning and regrowth, exact W0
restoration; SNELL's explicit formula and gradients; ZeRO-3 parity, orbax resume, bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from effjax import nn as enn
from effjax import sharding
from effjax.optim import snell, snell_delta, sparse_finetune, zero_trainer

B1, B2 = 0.9, 0.999


def _matrix_params(rows=4, cols=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(rows, cols)).astype(np.float32)),
          "b": jnp.asarray(rng.normal(size=(3,)).astype(np.float32))}


def _only_w(params):
  del params
  return {"w": 1}


def _step_fn(optimizer):
  @jax.jit
  def step(params, state, grad_w):
    grads = {"w": grad_w, "b": jnp.ones_like(params["b"])}
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates
  return step


def _flat(x):
  return np.asarray(x).reshape(-1)


# --- SpIEL: known prune / regrow cases ----------------------------------------------------------

def _rank_one_gradient():
  """|G_ij| = u_i v_j: the 4 largest products are at (3,7), (2,7), (3,6), (3,5), flat
  31, 23, 30, 29, so both SM3's row x col score and |G| rank these first."""
  u = np.array([1, 2, 3, 4], np.float32)
  v = np.array([0.5, 1, 1.5, 2, 2.5, 3, 3.5, 5], np.float32)
  return np.outer(u, v)


def test_spiel_sm3_prunes_the_smallest_and_regrows_the_largest_score():
  params = _matrix_params()
  # k=4 of 32; reselection at t=0 (p=1) and t=2 (p = 0.5 (1 - 3/1000): floor(1.99) = 1 slot).
  # eps=1 makes Adam's first step -lr g / (|g| + 1), so |delta| follows |g|. No step at t=2, so
  # pruning there sees the deltas of t=1.
  optimizer = sparse_finetune(lambda t: jnp.where(t == 2, 0.0, 0.1), k=4, total_steps=1000,
                              reselection_steps=2, accumulation_steps=1, reselection_rate=0.5,
                              regrow="sm3", matrix_fn=_only_w, eps=1.0)
  step = _step_fn(optimizer)
  state = optimizer.init(params)
  w0 = _flat(params["w"])

  params, state, _ = step(params, state, jnp.asarray(_rank_one_gradient()))
  (ms,) = state.matrices
  assert sorted(_flat(ms.indices)) == [23, 29, 30, 31]       # the top-4 SM3 scores
  fresh = [i for i, slot_age in zip(_flat(ms.indices), _flat(ms.age)) if slot_age == 0]
  assert all(_flat(params["w"])[i] == w0[i] for i in fresh)  # new entries start at W0

  grad = np.zeros((4, 8), np.float32)
  grad.reshape(-1)[[23, 29, 30, 31]] = [0.8, -0.2, 0.6, -0.4]
  params, state, _ = step(params, state, jnp.asarray(grad))
  (ms,) = state.matrices
  assert sorted(_flat(ms.indices)) == [23, 29, 30, 31]       # no reselection at t=1
  smallest = int(_flat(ms.indices)[np.argmin(np.abs(_flat(ms.delta)))])
  before = _flat(ms.indices).copy()

  grad = np.zeros((4, 8), np.float32)
  grad[0, 0] = 100.0   # SM3 row 0 and column 0 explode: entry 0 has the largest score
  params, state, updates = step(params, state, jnp.asarray(grad))
  (ms,) = state.matrices
  after = _flat(ms.indices)
  assert sorted(after) == sorted(set(before) - {smallest} | {0})
  w = _flat(params["w"])
  assert w[smallest] == w0[smallest]                          # pruned: back to W0, bitwise
  assert w[0] == w0[0] and _flat(ms.delta)[list(after).index(0)] == 0.0
  untouched = np.setdiff1d(np.arange(32), after)
  np.testing.assert_array_equal(w[untouched], w0[untouched])
  assert np.count_nonzero(_flat(updates["w"])) <= 4
  np.testing.assert_array_equal(np.asarray(updates["b"]), 0.0)  # unselected leaves are frozen


def test_spiel_gradient_regrows_the_largest_accumulated_gradients():
  params = _matrix_params()
  b1, b2 = B1, B2
  # Windows t=0..1 and t=3..4 (accumulation 2 of reselection 3): reselect at t=1 (p=1), t=4
  # (p = 0.75 (1 - 5/1000): floor(2.985) = 2 slots). No step at t=4.
  optimizer = sparse_finetune(lambda t: jnp.where(t == 4, 0.0, 0.1), k=4, total_steps=1000,
                              reselection_steps=3, accumulation_steps=2, reselection_rate=0.75,
                              regrow="gradient", matrix_fn=_only_w, eps=1.0)
  step = _step_fn(optimizer)
  state = optimizer.init(params)
  w0 = _flat(params["w"])
  g0 = _rank_one_gradient()
  params, state, _ = step(params, state, jnp.asarray(g0))
  params, state, _ = step(params, state, jnp.asarray(g0 / 2))
  (ms,) = state.matrices
  assert sorted(_flat(ms.indices)) == [23, 29, 30, 31]       # candidates = the top-4 |G| at t=0
  for slot, index in enumerate(_flat(ms.indices)):
    if _flat(ms.age)[slot] == 2:   # freshly grown: moments seeded from the window's gradients
      np.testing.assert_allclose(_flat(ms.mu)[slot], (1 - b1**2) * 1.5 * g0.reshape(-1)[index] / 2,
                                 rtol=1e-6)
      np.testing.assert_allclose(_flat(ms.nu)[slot],
                                 (1 - b2**2) * 1.25 * g0.reshape(-1)[index] ** 2 / 2, rtol=1e-5)

  grad = np.zeros((4, 8), np.float32)
  grad.reshape(-1)[[23, 29, 30, 31]] = [0.8, -0.2, 0.6, -0.4]
  params, state, _ = step(params, state, jnp.asarray(grad))          # t=2
  grad3 = grad / 4
  grad3.reshape(-1)[[0, 5, 10, 15]] = [8.0, -7.0, 6.0, 5.0]        # t=3: the candidates
  params, state, _ = step(params, state, jnp.asarray(grad3))
  (ms,) = state.matrices
  order = np.argsort(np.abs(_flat(ms.delta)), kind="stable")
  pruned = set(_flat(ms.indices)[order[:2]])
  before = set(_flat(ms.indices))
  grad4 = np.zeros((4, 8), np.float32)
  grad4.reshape(-1)[[0, 5, 10, 15]] = [1.0, -1.0, -0.5, 0.5]       # sums 9, -8, 5.5, 5.5
  params, state, _ = step(params, state, jnp.asarray(grad4))
  (ms,) = state.matrices
  assert set(_flat(ms.indices)) == (before - pruned) | {0, 5}
  w = _flat(params["w"])
  for index in pruned | {0, 5}:
    assert w[index] == w0[index]


@pytest.mark.parametrize("regrow", ["sm3", "gradient"])
def test_spiel_budget_and_exact_w0_over_many_reselections(regrow):
  """k stays fixed and distinct; outside the k indices W is W0 bitwise (pruned entries
  included); at them W = base + delta exactly and base = W0; indices move only at reselections.

  The documented conditions: |delta| <= |W0| / 3 (weights of magnitude 0.5 to 1.5, deltas below
  0.1) for every step; W0 = 0 (some exact zeros) for reverts.
  """
  rng = np.random.default_rng(1)
  w = rng.choice([-1, 1], size=(12, 20)) * rng.uniform(0.5, 1.5, size=(12, 20))
  w[rng.random((12, 20)) < 0.2] = 0.0
  params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.zeros((3,))}
  reselection_steps, accumulation, steps = 3, 2, 30
  optimizer = sparse_finetune(3e-3, density=0.1, total_steps=steps, reselection_steps=3,
                              accumulation_steps=accumulation, regrow=regrow, matrix_fn=_only_w,
                              weight_decay=0.1)
  step = _step_fn(optimizer)
  state = optimizer.init(params)
  w0 = _flat(params["w"])
  k = state.matrices[0].indices.shape[0]
  assert k == 24
  ever = set()
  for t in range(steps):
    before = _flat(state.matrices[0].indices).copy()
    grad = rng.normal(size=(12, 20)).astype(np.float32) * rng.uniform(0.1, 3, size=(12, 1))
    params, state, _ = step(params, state, jnp.asarray(grad, np.float32))
    ms = state.matrices[0]
    indices, w = _flat(ms.indices), _flat(params["w"])
    assert indices.shape == (k,) and len(set(indices)) == k
    if t % reselection_steps != accumulation - 1:
      np.testing.assert_array_equal(indices, before)
    ever |= set(before) - set(indices)
    outside = np.setdiff1d(np.arange(w.size), indices)
    np.testing.assert_array_equal(w[outside], w0[outside])
    np.testing.assert_array_equal(_flat(ms.base), w0[indices])
    nonzero = _flat(ms.base) != 0
    np.testing.assert_array_equal(w[indices][nonzero], (_flat(ms.base) + _flat(ms.delta))[nonzero])
    np.testing.assert_allclose(w[indices], _flat(ms.base) + _flat(ms.delta), rtol=0, atol=5e-10)
  assert len(ever) > k   # many entries were pruned (and checked back at W0) along the way
  assert any(w0[i] == 0 for i in ever)
  assert int(state.count) == steps


def test_spiel_others_get_their_transformation():
  params = _matrix_params()
  optimizer = sparse_finetune(0.1, k=3, total_steps=10, matrix_fn=_only_w, others=optax.sgd(0.5))
  _, state, updates = _step_fn(optimizer)(params, optimizer.init(params), jnp.ones((4, 8)))
  np.testing.assert_array_equal(np.asarray(updates["b"]), -0.5)
  assert np.count_nonzero(np.asarray(updates["w"])) == 3


# --- SNELL --------------------------------------------------------------------------------------

def _numpy_snell(a, b, sparsity, scale=0.1):
  """SNELL's delta written out: piecewise-linear kernel of the two halves, top-|.| survive."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  half = a.shape[1] // 2
  dist = lambda x, y: np.linalg.norm(x[:, None, :] - y.T[None, :, :], axis=-1)
  kernel = scale * (dist(a[:, :half], b[:half]) - dist(a[:, half:], b[half:]))
  keep = round((1 - sparsity) * kernel.size)
  threshold = np.sort(np.abs(kernel).reshape(-1))[-keep]
  return np.where(np.abs(kernel) >= threshold, kernel, 0.0), keep


def _quadratic_loss(target):
  return lambda w: 0.5 * jnp.sum((w - target) ** 2) + jnp.sum(jnp.sin(3 * w))


SNELL_SPARSITY = 0.75


@functools.cache
def _snell_step():
  """One compiled SNELL step on a [16, 24] matrix, shared by the SNELL tests. b1=0: Adam's first
  moment is then exactly the factors' last gradient."""
  optimizer = snell(0.05, rank=4, sparsity=SNELL_SPARSITY, b1=0.0, matrix_fn=_only_w)
  return optimizer, _step_fn(optimizer)


def test_snell_weight_is_w0_plus_the_sparsified_kernel():
  params = _matrix_params(rows=16, cols=24, seed=3)
  optimizer, step = _snell_step()
  state = optimizer.init(params)
  (factors,) = state.factors
  a = np.asarray(factors.a)
  np.testing.assert_array_equal(a[:, :2], a[:, 2:])       # tied halves ...
  np.testing.assert_array_equal(
      np.asarray(snell_delta(factors.a, factors.b, sparsity=SNELL_SPARSITY)), 0.0)  # ... cancel
  loss = _quadratic_loss(jnp.asarray(np.random.default_rng(4).normal(size=(16, 24)), jnp.float32))
  w0 = np.asarray(params["w"])
  never = np.ones((16, 24), bool)
  for _ in range(5):
    params, state, updates = step(params, state, jax.grad(loss)(params["w"]))
    (factors,) = state.factors
    expected, keep = _numpy_snell(factors.a, factors.b, SNELL_SPARSITY)
    assert np.count_nonzero(expected) == keep
    np.testing.assert_allclose(np.asarray(params["w"]), w0 + expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(snell_delta(factors.a, factors.b, sparsity=SNELL_SPARSITY)), expected,
        rtol=1e-5, atol=1e-7)
    never &= expected == 0
    np.testing.assert_array_equal(np.asarray(params["w"])[never], w0[never])
  assert never.sum() < never.size - keep   # the survivors moved over the steps
  np.testing.assert_array_equal(np.asarray(updates["b"]), 0.0)


def test_snell_factor_gradients_are_autodiff_through_the_formula():
  params = _matrix_params(rows=16, cols=24, seed=5)
  optimizer, step = _snell_step()
  state = optimizer.init(params)
  w0 = params["w"]
  loss = _quadratic_loss(jnp.asarray(np.random.default_rng(6).normal(size=(16, 24)), jnp.float32))

  def explicit(factors):   # W0 + sparsify(kernel(A, B)), written independently of the library
    half = factors.a.shape[1] // 2
    dist = lambda x, y: jnp.sqrt(jnp.sum((x[:, None, :] - y.T[None, :, :]) ** 2, axis=-1))
    kernel = 0.1 * (dist(factors.a[:, :half], factors.b[:half])
                    - dist(factors.a[:, half:], factors.b[half:]))
    keep = round((1 - SNELL_SPARSITY) * kernel.size)
    threshold = jnp.sort(jnp.abs(kernel).reshape(-1))[-keep]
    return loss(w0 + jnp.where(jnp.abs(kernel) >= threshold, kernel, 0.0))

  for _ in range(3):
    (factors,) = state.factors
    expected = jax.grad(explicit)(factors)
    params, state, _ = step(params, state, jax.grad(loss)(params["w"]))
    (got,) = optax.tree_utils.tree_get(state.factor_state, "mu")
    assert np.abs(np.asarray(expected.a)).max() > 0 and np.abs(np.asarray(expected.b)).max() > 0
    np.testing.assert_allclose(np.asarray(got.a), np.asarray(expected.a), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.b), np.asarray(expected.b), rtol=1e-4, atol=1e-6)


# --- ZeRO-3 on a DecoderLM, orbax resume --------------------------------------------------------

STEPS = 5
_CONFIG = enn.TransformerConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=4,
                                num_kv_heads=2, d_ff=32)
_OPTIMIZERS = {
    # k=16 divides over 8 devices: the k-slot state is sharded too. Reselections at t=0, 2, 4.
    "spiel_sm3": lambda: sparse_finetune(3e-2, k=16, total_steps=20, reselection_steps=2,
                                         accumulation_steps=1),
    "spiel_gradient": lambda: sparse_finetune(3e-2, k=16, total_steps=20, reselection_steps=3,
                                              accumulation_steps=2, regrow="gradient"),
    "snell": lambda: snell(3e-2, rank=4, sparsity=0.8),
}


def _lm():
  model = enn.DecoderLM(_CONFIG)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))

  def loss(params, tokens):
    logits = model.apply(params, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  return params, loss


def _token_batches(steps):
  rng = np.random.default_rng(7)
  return [jnp.asarray(rng.integers(0, 64, size=(16, 9)), jnp.int32) for _ in range(steps)]


def _reference(name):
  params, loss = _lm()
  optimizer = _OPTIMIZERS[name]()
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value
  losses = []
  for batch in _token_batches(STEPS):
    params, state, value = step(params, state, batch)
    losses.append(float(value))
  return params, state, np.array(losses)


def _zero3(name, tmp_path):
  """STEPS ZeRO-3 steps on 8 devices, checkpointing after 2; and a resumed run from there."""
  params, loss = _lm()
  mesh = sharding.make_mesh(sharding.MeshConfig(("data",), (-1,)))
  trainer = zero_trainer(loss, _OPTIMIZERS[name](), params, mesh, stage=3)
  batches = _token_batches(STEPS)
  state, losses = trainer.init(params), []
  for t, batch in enumerate(batches):
    if t == 2:
      with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", state)
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
  with ocp.StandardCheckpointer() as checkpointer:
    resumed = checkpointer.restore(tmp_path / "ckpt", trainer.abstract_state)
  resumed_losses = list(losses[:2])
  for batch in batches[2:]:
    resumed, metrics = trainer.step(resumed, batch)
    resumed_losses.append(float(metrics["loss"]))
  return state, np.array(losses), resumed, np.array(resumed_losses)


@pytest.mark.parametrize("name", [
    "spiel_sm3", pytest.param("spiel_gradient", marks=pytest.mark.slow),
    pytest.param("snell", marks=pytest.mark.slow)])
def test_zero3_equals_unsharded_and_resumes_bitwise(name, tmp_path):
  ref_params, ref_state, ref_losses = _reference(name)
  state, losses, resumed, resumed_losses = _zero3(name, tmp_path)
  assert losses[-1] < losses[0]   # it trains
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  # The state to 1e-5: the 8 devices reduce in another order, and Adam's m / sqrt(v) magnifies
  # that difference where a (SNELL factor's) gradient is near 0.
  for got, want in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(ref_state)):
    if jnp.issubdtype(want.dtype, jnp.integer):   # indices and ages: the same choices
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    else:
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  sharded = [leaf for leaf in jax.tree.leaves(state.opt_state)
             if not leaf.sharding.is_fully_replicated]
  assert sharded   # ZeRO-3 split the sparse state over the 8 devices
  # Resume from the checkpoint of step 2: the same losses and state, bitwise.
  np.testing.assert_array_equal(resumed_losses, losses)
  for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_default_selection_views_decoder_lm_kernels_as_matrices():
  """DecoderLM's linear layers, 2-D: query/key/value [d_model, heads*head_dim], out
  [heads*head_dim, d_model], MLP kernels as they are; embeddings and norms left out."""
  config = enn.TransformerConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=4,
                                 num_kv_heads=2, d_ff=24, head_dim=8)
  params = jax.eval_shape(enn.DecoderLM(config).init, jax.random.key(0),
                          jnp.zeros((1, 4), jnp.int32))
  state = jax.eval_shape(snell(0.1, rank=2).init, params)
  views = [(f.a.shape[0], f.b.shape[1]) for f in state.factors]
  per_layer = [(16, 16), (32, 16), (16, 32), (16, 16), (24, 16), (16, 24), (16, 24)]
  assert views == per_layer * 2   # key, out, query, value, down, gate, up (flatten order)
  # k from a density: rounded to a multiple of 128 once that large (ZeRO splits the slots).
  state = jax.eval_shape(sparse_finetune(0.1, total_steps=5, density=0.3).init, params)
  assert [ms.indices.shape[0] for ms in state.matrices[:7]] == [77, 128, 128, 77, 115, 115, 115]


# --- bad input ----------------------------------------------------------------------------------

def test_bad_input_is_a_clear_error():
  params = _matrix_params()
  spiel = lambda **kw: sparse_finetune(0.1, total_steps=10, **{"matrix_fn": _only_w, **kw})
  with pytest.raises(ValueError, match=r"k=33 is larger than matrix 'w' \(4x8 = 32 entries\)"):
    spiel(k=33).init(params)
  for density in (0, 1.5, -0.1):
    with pytest.raises(ValueError, match=rf"density={density} must be a number in \(0.0, 1.0\]"):
      spiel(density=density)
  with pytest.raises(ValueError, match="give one of them, not both"):
    spiel(density=0.1, k=2)
  with pytest.raises(ValueError, match=r"k=0 must be an integer >= 1"):
    spiel(k=0)
  with pytest.raises(ValueError, match=r"accumulation_steps=5 must be <= reselection_steps=3"):
    spiel(reselection_steps=3, accumulation_steps=5)
  with pytest.raises(ValueError, match=r"regrow='rigl' must be one of \('sm3', 'gradient'\)"):
    spiel(regrow="rigl")
  not_a_matrix = lambda p: {"b": 1}
  for build in (lambda: spiel(matrix_fn=not_a_matrix), lambda: snell(0.1, matrix_fn=not_a_matrix)):
    with pytest.raises(ValueError, match=r"named leaf 'b' of shape \(3,\) with row axes 1; a "
                                         r"projectable leaf is a matrix"):
      build().init(params)
  with pytest.raises(ValueError, match=r"named leaf 'v', which the parameters do not have"):
    spiel(matrix_fn=lambda p: ["v"]).init(params)
  with pytest.raises(ValueError, match="matrix_fn selected no leaf"):
    sparse_finetune(0.1, total_steps=10).init(params)   # DecoderLM names: none here
  with pytest.raises(ValueError, match=r"rank=3 must be even for kernel='piecewise_linear'"):
    snell(0.1, rank=3)
  with pytest.raises(ValueError, match=r"sparsity=1.0 must be a number in \[0.0, 1.0\)"):
    snell(0.1, sparsity=1.0)
  with pytest.raises(ValueError, match=r"kernel='rbf' must be one of"):
    snell(0.1, kernel="rbf")
  with pytest.raises(TypeError, match=r"others=.* must be None \(frozen\) or an optax"):
    snell(0.1, others="adam")
  with pytest.raises(ValueError, match="update needs params"):
    optimizer = spiel(k=2)
    optimizer.update({"w": jnp.ones((4, 8)), "b": jnp.ones(3)}, optimizer.init(params))
