"""FRUGAL and GaLore (effjax.optim.frugal): semantics against a NumPy reference, Adam at rho=1,
optax.contrib.galore, the refresh schedule, blocks mode, ZeRO-3 parity, resume, state size."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from effjax import optim, sharding
from effjax.nn.transformer import DecoderLM, TransformerConfig
from effjax.optim import zero

LR = 0.1
B1, B2, EPS = 0.9, 0.999, 1e-8


def _toy_params(seed=0):
  """A wide matrix (left projection), a tall one (right), a dense vector; named w, t, b."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"w": jax.random.normal(k1, (8, 12)), "t": jax.random.normal(k2, (12, 6)),
          "b": jnp.ones((5,))}


def _toy_grads(steps, seed=1):
  keys = jax.random.split(jax.random.key(seed), steps)
  return [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape), _toy_params()) for k in keys]


TOY_MATRICES = lambda params: ["w", "t"]


def _run(optimizer, grads, params=None):
  """Jitted updates for a sequence of gradients; returns (updates per step, states per step)."""
  params = _toy_params() if params is None else params
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  updates, states = [], []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    updates.append(u)
    states.append(state)
  return updates, states


def _numpy_frugal(grads, *, rho, gap, state_free, scale=1.0):
  """FRUGAL with SVD projection and Adam, in float64 NumPy, written from the paper's algorithm."""
  ranks = {name: max(1, round(rho * min(g.shape))) for name, g in grads[0].items() if name != "b"}
  moments, out = {}, []
  dense = {"m": 0.0, "v": 0.0}
  for step, g in enumerate(grads):
    g = {name: np.asarray(x, np.float64) for name, x in g.items()}
    updates = {}
    for name, r in ranks.items():
      x = g[name]
      left = x.shape[0] < x.shape[1]
      if step % gap == 0:   # refresh the projection from this gradient; restart the moments
        u, _, vh = np.linalg.svd(x, full_matrices=False)
        moments[name] = {"P": u[:, :r] if left else vh[:r].T, "m": 0.0, "v": 0.0, "t": 0}
      s = moments[name]
      c = s["P"].T @ x if left else x @ s["P"]
      s["t"] += 1
      s["m"] = B1 * s["m"] + (1 - B1) * c
      s["v"] = B2 * s["v"] + (1 - B2) * c * c
      a = (s["m"] / (1 - B1 ** s["t"])) / (np.sqrt(s["v"] / (1 - B2 ** s["t"])) + EPS)
      update = s["P"] @ a if left else a @ s["P"].T
      residual = x - (s["P"] @ c if left else c @ s["P"].T)
      if state_free == "sign":
        update = update + scale * np.sign(residual)
      elif state_free == "sgd":
        update = update + scale * residual
      updates[name] = -LR * update
    dense["m"] = B1 * dense["m"] + (1 - B1) * g["b"]
    dense["v"] = B2 * dense["v"] + (1 - B2) * g["b"] ** 2
    t = step + 1
    updates["b"] = -LR * (dense["m"] / (1 - B1 ** t)) / (np.sqrt(dense["v"] / (1 - B2 ** t)) + EPS)
    out.append(updates)
  return out


@pytest.mark.parametrize("state_free", ["sign", "sgd", None])
def test_svd_frugal_and_galore_follow_the_algorithm(state_free):
  """Projection on the smaller side, Adam on P^T g, residual rule, refresh + reset every 3 steps
  (state_free=None is GaLore)."""
  grads = _toy_grads(7)
  optimizer = optim.frugal(LR, rho=0.25, update_gap=3, state_free=state_free,
                           inactive_lr_scale=0.5, matrix_fn=TOY_MATRICES)
  updates, _ = _run(optimizer, grads)
  expected = _numpy_frugal(grads, rho=0.25, gap=3, state_free=state_free, scale=0.5)
  for step, (got, want) in enumerate(zip(updates, expected)):
    for name in want:
      np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-4, atol=1e-6,
                                 err_msg=f"step {step} leaf {name}")


@pytest.mark.parametrize("projection", ["svd", "random", "blocks"])
def test_rho_one_is_adam(projection):
  """rho=1: every projection is the identity, so FRUGAL is AdamW (with its schedule and decay)."""
  schedule = optax.linear_schedule(LR, LR / 10, 6)
  grads = _toy_grads(6)
  adamw = optax.adamw(schedule, weight_decay=0.1)
  ours = optim.frugal(schedule, rho=1.0, update_gap=2, projection=projection, weight_decay=0.1,
                      matrix_fn=TOY_MATRICES)
  for got, want in zip(_run(ours, grads)[0], _run(adamw, grads)[0]):
    for name in want:
      np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-6,
                                 atol=1e-7, err_msg=name)


def test_rho_one_is_adam_on_a_decoder_lm():
  """The default selection's 3-D attention kernels too."""
  normal = lambda tree, key: jax.tree.map(lambda p: jax.random.normal(key, p.shape), tree)
  params = normal(_lm_params(abstract=True), jax.random.key(2))
  grads = [normal(params, k) for k in jax.random.split(jax.random.key(3), 3)]
  for got, want in zip(_run(optim.galore(LR, rho=1.0, update_gap=1), grads, params)[0],
                       _run(optax.adam(LR), grads, params)[0]):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_residual_update_is_exactly_sign_of_the_residual():
  """With a state-full rule that contributes nothing, the update is -lr * s * sign(g - P P^T g)."""
  grads = _toy_grads(2)
  optimizer = optim.frugal(LR, rho=0.25, update_gap=5, state_full=optax.set_to_zero(),
                           inactive_lr_scale=0.5, matrix_fn=TOY_MATRICES)
  updates, states = _run(optimizer, grads)
  for step in range(2):
    for name in ("w", "t"):
      g = np.asarray(grads[step][name], np.float64)
      basis = np.asarray(states[step].bases[name], np.float64)
      residual = g - basis @ (basis.T @ g) if g.shape[0] < g.shape[1] else g - g @ basis @ basis.T
      update = np.asarray(updates[step][name])
      clear = np.abs(residual) > 1e-5   # entries whose sign float32 rounding cannot flip
      assert clear.mean() > 0.95
      np.testing.assert_array_equal(np.sign(update)[clear], -np.sign(residual)[clear])
      np.testing.assert_allclose(np.abs(update), LR * 0.5, rtol=1e-7)
      # ... and it is not sign(g): the projected part was removed.
      assert (np.sign(update) != -np.sign(g)).any()


def test_projection_refreshed_only_every_update_gap_and_moments_reset():
  grads = _toy_grads(7)
  _, states = _run(optim.galore(LR, rho=0.25, update_gap=3, matrix_fn=TOY_MATRICES), grads)
  for step, state in enumerate(states):
    for name in ("w", "t"):
      basis = np.asarray(state.bases[name])
      np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-5)
      g = np.asarray(grads[step - step % 3][name], np.float64)   # the last refresh's gradient
      u, _, vh = np.linalg.svd(g, full_matrices=False)
      top = u[:, :basis.shape[1]] if g.shape[0] < g.shape[1] else vh[:basis.shape[1]].T
      np.testing.assert_allclose(basis @ basis.T, top @ top.T, atol=1e-5,
                                 err_msg=f"step {step} {name}")
      if step % 3:
        np.testing.assert_array_equal(basis, np.asarray(states[step - 1].bases[name]))
    # The low-rank Adam restarts at each refresh; the dense leaf's Adam never does.
    assert int(state.low.count) == step % 3 + 1
    assert int(state.dense.count) == step + 1
    if step % 3 == 0:   # first moment = (1 - b1) * this step's coordinates only
      g, basis = np.asarray(grads[step]["w"]), np.asarray(state.bases["w"])
      np.testing.assert_allclose(np.asarray(state.low.mu["w"]), (1 - B1) * basis.T @ g,
                                 rtol=1e-5, atol=1e-6)
  assert int(states[-1].count) == 7


def test_galore_equals_optax_contrib_galore_until_the_first_refresh():
  """Same projection on a square matrix (optax given the transposed view, see below) and the
  same Adam: equal updates until the first refresh, where our moments restart and optax's do not.

  Where they differ by design: optax projects the larger side of a rectangular matrix (left if
  m >= n) where GaLore projects the smaller one; optax never resets the moments; neither has
  FRUGAL's residual update.
  """
  key = jax.random.key(5)
  params = {"w": jax.random.normal(key, (16, 16)), "b": jnp.ones((5,))}
  grads = [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape), params)
           for k in jax.random.split(key, 6)]
  dims = {"w": optax.contrib.GaLoreDimensionNumbers(reduction_axis=1, output_axis=0), "b": None}
  reference = optax.contrib.galore(LR, rank=4, update_proj_gap=4, weight_decay=0.1,
                                   weight_dimension_numbers=dims)
  ours = optim.galore(LR, rank=4, update_gap=4, weight_decay=0.1, matrix_fn=lambda p: ["w"])
  got, want = _run(ours, grads, params)[0], _run(reference, grads, params)[0]
  for step in range(4):
    for name in ("w", "b"):
      np.testing.assert_allclose(np.asarray(got[step][name]), np.asarray(want[step][name]),
                                 rtol=1e-4, atol=1e-6, err_msg=f"step {step} {name}")
  assert not np.allclose(got[4]["w"], want[4]["w"], rtol=1e-2)   # reset vs no reset
  np.testing.assert_allclose(got[4]["b"], want[4]["b"], rtol=1e-5)
  # A wide [8, 12] matrix: optax projects its larger side (moments [8, r]); GaLore and we project
  # the smaller one (moments [r, 12]).
  wide = {"w": jnp.ones((8, 12)), "b": jnp.ones((5,))}
  optax_mu = optax.contrib.galore(LR, rank=4).init(wide)[0].base_optimizer_state.mu["w"]
  assert (optax_mu.shape, ours.init(wide).low.mu["w"].shape) == ((8, 4), (4, 12))


@pytest.mark.parametrize("state_free", [None, "sign"])
def test_blocks_update_exactly_the_chosen_tensors_with_adam(state_free):
  """4 tensors of one shape, rho=0.5: 2 active per refresh get Adam started at the refresh; the
  other 2 get the state-free update (nothing for state_free=None, i.e. BAdam)."""
  key = jax.random.key(7)
  params = {f"m{i}": jax.random.normal(jax.random.fold_in(key, i), (6, 4)) for i in range(4)}
  params["b"] = jnp.ones((3,))
  grads = [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape), params)
           for k in jax.random.split(key, 6)]
  members = [f"m{i}" for i in range(4)]
  optimizer = optim.frugal(LR, rho=0.5, update_gap=3, projection="blocks", state_free=state_free,
                           matrix_fn=lambda p: members, seed=3)
  updates, states = _run(optimizer, grads, params)
  group = "float32_6x4"
  assert states[0].low.mu[group].shape == (2, 6, 4)   # moments for 2 of the 4 tensors only
  chosen_sets = []
  for start in (0, 3):
    active = [int(i) for i in states[start].active[group]]
    assert len(set(active)) == 2 and all(0 <= i < 4 for i in active)
    chosen_sets.append(active)
    adam = {i: optax.adam(LR) for i in active}
    adam_state = {i: adam[i].init(params[members[i]]) for i in active}
    for step in range(start, start + 3):
      np.testing.assert_array_equal(np.asarray(states[step].active[group]), active)
      for i, name in enumerate(members):
        if i in active:
          want, adam_state[i] = adam[i].update(grads[step][name], adam_state[i])
        elif state_free is None:
          want = np.zeros((6, 4))
        else:
          want = -LR * np.sign(grads[step][name])
        np.testing.assert_allclose(np.asarray(updates[step][name]), np.asarray(want), rtol=1e-5,
                                   atol=1e-7, err_msg=f"step {step} {name}")
  # Different refreshes draw different tensors (for this seed), from seed and refresh index.
  assert chosen_sets[0] != chosen_sets[1]
  again = _run(optimizer, grads, params)[1]
  assert [list(np.asarray(s.active[group])) for s in again] == [
      list(np.asarray(s.active[group])) for s in states]


# --- On a DecoderLM: default selection, state size, ZeRO-3 parity, resume ------------------------

TINY = TransformerConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                         d_ff=32)
SMOLLM2 = TransformerConfig(vocab_size=49152, d_model=576, num_layers=30, num_heads=9,
                            num_kv_heads=3, d_ff=1536, head_dim=64)


def _lm_params(config=TINY, abstract=False):
  init = lambda: DecoderLM(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return jax.eval_shape(init) if abstract else jax.jit(init)()


def _lm_loss(params, windows):
  logits = DecoderLM(TINY).apply(params, windows[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


def _windows(steps, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.integers(0, TINY.vocab_size, (8, 9), dtype=np.int32)   # a repeated batch: learnable
  return [base for _ in range(steps)]


def test_default_matrices_are_the_attention_and_mlp_kernels():
  chosen = optim.decoder_lm_matrices(_lm_params(abstract=True))
  layer = {"attention/query/kernel": 1, "attention/key/kernel": 1, "attention/value/kernel": 1,
           "attention/out/kernel": 2, "mlp/gate/kernel": 1, "mlp/up/kernel": 1,
           "mlp/down/kernel": 1}
  assert chosen == {f"params/layer_{i}/{k}": v for i in range(2) for k, v in layer.items()}


def _adam_elements(shape):
  return 2 * math.prod(shape)


@pytest.mark.parametrize("projection", ["svd", "blocks"])
def test_state_is_subspace_sized_on_smollm2_geometry(projection):
  """Optimizer-state elements (abstract init, SmolLM2-135M shapes) equal the formula: Adam on the
  embedding and norms, moments r * max(m, n) plus a basis s * r per projected matrix (svd), or
  moments for k = round(rho * n) tensors per shape group (blocks); and fewer than AdamW's."""
  params = _lm_params(SMOLLM2, abstract=True)
  state = jax.eval_shape(optim.frugal(1e-3, rho=0.25, projection=projection).init, params)
  d, hd, f, layers = 576, 64, 1536, 30
  views = {"q": (d, 9 * hd), "k": (d, 3 * hd), "v": (d, 3 * hd), "o": (9 * hd, d),
           "gate": (d, f), "up": (d, f), "down": (f, d)}
  dense = _adam_elements((49152, d)) + layers * 2 * _adam_elements((d,)) + _adam_elements((d,))
  if projection == "svd":
    rank = lambda m, n: round(0.25 * min(m, n))
    projected = layers * sum(2 * rank(m, n) * max(m, n) + min(m, n) * rank(m, n)
                             for m, n in views.values())
  else:   # shape groups of 30 tensors (q, o, down: k = 8, round half to even) and of 60 (k
    # and v, gate and up: k = 15); plus the int32 indices of the active tensors
    projected = sum(8 * _adam_elements(views[k]) for k in ("q", "o", "down"))
    projected += sum(15 * _adam_elements(views[k]) for k in ("k", "up")) + 3 * 8 + 2 * 15
  elements = sum(math.prod(x.shape) for x in jax.tree.leaves(state))
  assert elements == dense + projected + 3   # + the three step counts
  adamw = sum(math.prod(x.shape) for x in jax.tree.leaves(jax.eval_shape(
      optax.adamw(1e-3).init, params)))
  assert elements < 0.46 * adamw


def test_frugal_under_zero3_equals_unsharded(tmp_path):
  """8 devices, ZeRO stage 3 (parameters, gradients and FRUGAL state sharded) == a plain jitted
  loop, over 5 steps with refreshes at steps 0, 2, 4; then orbax save/restore of the sharded
  state and a bitwise-identical continuation."""
  params = _lm_params()
  optimizer = optim.frugal(3e-2, rho=0.25, update_gap=2, weight_decay=0.01)
  windows = _windows(6)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(_lm_loss)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  ref_params, opt_state, ref_losses = params, optimizer.init(params), []
  for batch in windows[:5]:
    ref_params, opt_state, loss = step(ref_params, opt_state, batch)
    ref_losses.append(float(loss))

  mesh = sharding.make_mesh(sharding.MeshConfig(("data",), (-1,)))
  trainer = zero.zero_trainer(_lm_loss, optimizer, params, mesh, stage=3)
  state, losses = trainer.init(params), []
  for batch in windows[:3]:
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", state)
  for batch in windows[3:5]:
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
  assert ref_losses[-1] < ref_losses[0] - 0.1   # it trains
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  name = "params/layer_0/mlp/up/kernel"   # [16, 32]: moments [r=4, 32], split 8 ways
  assert state.opt_state.low.mu[name].sharding.spec == jax.sharding.PartitionSpec(None, "data")

  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "ckpt", trainer.abstract_state)
  for batch in windows[3:5]:
    restored, _ = trainer.step(restored, batch)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- Bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(rho=0.0), r"rho=0.0 must be in \(0, 1\]"),
    (dict(rho=1.5), r"rho=1.5 must be in \(0, 1\]"),
    (dict(rho=-0.25), r"rho=-0.25 must be in \(0, 1\]"),
    (dict(update_gap=0), r"update_gap=0 must be an integer >= 1"),
    (dict(update_gap=2.5), r"update_gap=2.5 must be an integer >= 1"),
    (dict(projection="qr"), r"projection='qr' must be one of \('svd', 'random', 'blocks'\)"),
    (dict(state_free="adam"), r"state_free='adam' must be one of \('sign', 'sgd', None\)"),
    (dict(inactive_lr_scale=-1.0), r"inactive_lr_scale=-1.0 must be a number >= 0"),
    (dict(weight_decay=-0.1), r"weight_decay=-0.1 must be a number >= 0"),
    (dict(state_full="adam"), r"state_full='adam' must be an optax GradientTransformation"),
])
def test_bad_options_are_clear_errors(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    optim.frugal(LR, **kwargs)


def test_bad_matrix_choices_are_clear_errors():
  lm = _lm_params(abstract=True)
  with pytest.raises(ValueError, match=r"matrix_fn named leaf 'params/final_norm/scale' of shape "
                                       r"\(16,\) with row axes 1; a projectable leaf is a matrix"):
    optim.frugal(LR, matrix_fn=lambda p: ["params/final_norm/scale"]).init(lm)
  with pytest.raises(ValueError, match=r"matrix_fn named leaf 'params/layer_0/mlp/up/kernel' of "
                                       r"shape \(16, 32\) with row axes 2"):
    optim.frugal(LR, matrix_fn=lambda p: {"params/layer_0/mlp/up/kernel": 2}).init(lm)
  with pytest.raises(ValueError, match=r"matrix_fn named leaf 'params/layer_9/mlp/up/kernel', "
                                       r"which the parameters do not have; leaves are named "
                                       r"\['params/embed/embedding', "):
    optim.frugal(LR, matrix_fn=lambda p: ["params/layer_9/mlp/up/kernel"]).init(lm)
  with pytest.raises(ValueError, match=r"matrix_fn=None selects DecoderLM attention and MLP "
                                       r"kernels, but the parameters have none "
                                       r"\(leaves: \['b', 't', 'w'\]"):
    optim.frugal(LR).init(_toy_params())
  with pytest.raises(ValueError, match=r"galore takes rank=4 or rho=0.5, not both"):
    optim.galore(LR, rank=4, rho=0.5)
  with pytest.raises(ValueError, match=r"rank=0 must be a positive integer"):
    optim.galore(LR, rank=0)
  with pytest.raises(ValueError, match=r"needs params in update\(\)"):
    optimizer = optim.frugal(LR, weight_decay=0.1, matrix_fn=TOY_MATRICES)
    optimizer.update(_toy_grads(1)[0], optimizer.init(_toy_params()))
