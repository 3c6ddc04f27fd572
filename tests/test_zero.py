"""ZeRO stages 0-3: per-device bytes, parity with plain optax, accumulation, resharded resume."""

from __future__ import annotations

import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from effjax import benchmarking, sharding
from effjax.optim import zero

STEPS = 20
BATCH = 16


def _mlp_params(key):
  """Leaves of every kind: divisible matrices, a divisible bias, an indivisible bias, a scalar."""
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (16, 32)) / 4, "b1": jnp.zeros((32,)),
          "w2": jax.random.normal(k2, (32, 5)) / 6, "b2": jnp.zeros((5,)), "scale": jnp.ones(())}


def _mlp_loss(params, batch):
  hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  out = (hidden @ params["w2"] + params["b2"]) * params["scale"]
  return jnp.mean((out - batch["y"]) ** 2)


def _batches(steps, batch=BATCH, seed=0):
  """Inputs x [batch, 16] and targets y [batch, 5] of a fixed random linear teacher."""
  rng = np.random.default_rng(seed)
  teacher = np.random.default_rng(99).normal(size=(16, 5)).astype(np.float32) / 4
  xs = [rng.normal(size=(batch, 16)).astype(np.float32) for _ in range(steps)]
  return [{"x": x, "y": x @ teacher} for x in xs]


def _optimizer():
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))


def _mesh(names=("data",), sizes=(-1,), devices=None):
  return sharding.make_mesh(sharding.MeshConfig(names, sizes), devices)


def _train(trainer, params, batches):
  state = trainer.init(params)
  losses = []
  for batch in batches:
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, np.array(losses)


@pytest.fixture(scope="module")
def reference():
  """Plain unsharded optax: losses of 20 steps and the final parameters."""
  params, optimizer = _mlp_params(jax.random.key(0)), _optimizer()
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(_mlp_loss)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for batch in _batches(STEPS):
    params, opt_state, loss = step(params, opt_state, batch)
    losses.append(float(loss))
  return np.array(losses), params


@pytest.mark.parametrize("stage", zero.STAGES)
def test_trajectory_equals_unsharded_optax(stage, reference):
  trainer = zero.zero_trainer(_mlp_loss, _optimizer(), _mlp_params(jax.random.key(0)), _mesh(),
                              stage=stage)
  state, losses = _train(trainer, _mlp_params(jax.random.key(0)), _batches(STEPS))
  ref_losses, ref_params = reference
  assert losses[-1] < losses[0] - 0.1  # it trains
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
  for name, leaf in state.params.items():
    np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref_params[name]), rtol=1e-5,
                               atol=1e-6, err_msg=name)
  # The layout each stage promises (w1 is [16, 32]: split along 32; b2 [5] stays replicated).
  mu = state.opt_state[1][0].mu
  assert mu["w1"].sharding.spec == (jax.sharding.PartitionSpec(None, "data") if stage >= 1
                                    else jax.sharding.PartitionSpec())
  assert mu["b2"].sharding.spec == jax.sharding.PartitionSpec()
  assert state.params["w1"].sharding.is_fully_replicated == (stage < 3)


def test_two_axis_mesh_with_micro_batches_equals_unsharded(reference):
  """data=2 x fsdp=4, stage 3, 2 micro-batches of 8: the same 20-step trajectory."""
  mesh = _mesh(("data", "fsdp"), (2, 4))
  trainer = zero.zero_trainer(_mlp_loss, _optimizer(), _mlp_params(jax.random.key(0)), mesh,
                              stage=3, micro_batches=2)
  state, losses = _train(trainer, _mlp_params(jax.random.key(0)), _batches(STEPS))
  np.testing.assert_allclose(losses, reference[0], rtol=1e-5, atol=1e-6)
  assert state.params["w1"].sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"))


@pytest.mark.parametrize("stage", [1, 2])
def test_accumulated_micro_batches_equal_the_full_batch(stage):
  params, batches = _mlp_params(jax.random.key(1)), _batches(3, batch=32, seed=1)
  results = {}
  for micro in (1, 4):
    trainer = zero.zero_trainer(_mlp_loss, _optimizer(), params, _mesh(), stage=stage,
                                micro_batches=micro)
    results[micro] = _train(trainer, params, batches)
  np.testing.assert_allclose(results[4][1], results[1][1], rtol=1e-6, atol=1e-7)
  for a, b in zip(jax.tree.leaves(results[4][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_master_weights(reference):
  trainer = zero.zero_trainer(_mlp_loss, _optimizer(), _mlp_params(jax.random.key(0)), _mesh(),
                              stage=3, compute_dtype=jnp.bfloat16)
  state, losses = _train(trainer, _mlp_params(jax.random.key(0)), _batches(5))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.opt_state[1][0].mu))
  np.testing.assert_allclose(losses, reference[0][:5], rtol=3e-2)
  assert not np.allclose(losses, reference[0][:5], rtol=1e-6, atol=0)  # bf16 really ran


def test_optimizer_state_offloaded_to_host(reference):
  trainer = zero.zero_trainer(_mlp_loss, _optimizer(), _mlp_params(jax.random.key(0)), _mesh(),
                              stage=1, offload_optimizer=True)
  state, losses = _train(trainer, _mlp_params(jax.random.key(0)), _batches(4))
  kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state.opt_state)}
  assert kinds == {"pinned_host"}
  assert state.params["w1"].sharding.memory_kind == "device"
  np.testing.assert_allclose(losses, reference[0][:4], rtol=1e-5, atol=1e-6)


# --- Per-device bytes against the ZeRO formulas ------------------------------------------------

LAYERS, WIDTH = 8, 512   # P = 2M float32 parameters in 8 leaves; activations of 8 rows are tiny


def _deep_loss(params, batch):
  x = batch
  for name in sorted(params):
    x = jnp.tanh(x @ params[name])
  return jnp.mean(x ** 2)


@pytest.mark.parametrize("stage", zero.STAGES)
def test_per_device_bytes_match_the_zero_formulas(stage):
  """Counted from memory_analysis() of the compiled, donated train step and gradient program.

  * state = step argument bytes (params + optimizer state, donated: the outputs alias them) minus
    the batch and the step counter;
  * grads = output bytes of the compiled gradient program in the stage's gradient layout, minus
    the loss scalar (the fused stage-2 step never holds them all at once, see below);
  * state + grads must match 16P, 8P + 8P/N, 4P + 12P/N, 16P/N (fp32 Adam) within 2%.
  """
  devices = 8
  params = {f"layer{i}": jax.ShapeDtypeStruct((WIDTH, WIDTH), jnp.float32) for i in range(LAYERS)}
  batch = jax.ShapeDtypeStruct((devices, WIDTH), jnp.float32)
  trainer = zero.zero_trainer(_deep_loss, optax.adam(1e-3), params, _mesh(), stage=stage)
  lowered = trainer.jit_step.lower(trainer.abstract_state, batch)
  compiled = lowered.compile()
  step = benchmarking.memory_of(compiled)
  grads = benchmarking.memory_of(
      trainer.gradients.lower(trainer.abstract_state.params, batch).compile())
  p = 4 * LAYERS * WIDTH * WIDTH
  batch_bytes, scalars = WIDTH * 4, 4 + 4   # local batch rows; step counter and Adam count
  state_bytes = step.argument_bytes - batch_bytes - scalars
  grad_bytes = grads.output_bytes - 4
  formula = [4 * p, 2 * p + 2 * p / devices, p + 3 * p / devices, 4 * p / devices][stage]
  assert state_bytes + grad_bytes == pytest.approx(formula, rel=0.02)
  assert step.alias_bytes >= state_bytes  # donated: updated in place
  hlo = compiled.as_text()
  if stage >= 2:
    assert "reduce-scatter" in hlo
  if stage == 3:
    # Each leaf gathered in the forward pass and again in the backward (remat), except the first
    # layer's: its backward needs no input gradient, so no weight.
    assert lowered.as_text().count("stablehlo.all_gather") == 2 * LAYERS - 1
  if stage == 2:
    # Each gradient leaf is scattered as the backward pass produces it: the full gradient (p
    # bytes) never exists. (Stage 3 holds gathered parameter leaves instead; see zero.py.)
    assert step.temp_bytes < p / 4
  if stage < 2:
    assert "all-reduce" in hlo and "reduce-scatter" not in hlo
    assert step.temp_bytes >= p  # the full all-reduced gradient


# --- Checkpoints: resharded restore and bitwise resume ------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A ZeRO-3 state on 8 devices after 2 steps, and the directory it was saved to."""
  trainer = zero.zero_trainer(_mlp_loss, _optimizer(), _mlp_params(jax.random.key(0)), _mesh(),
                              stage=3)
  state, _ = _train(trainer, _mlp_params(jax.random.key(0)), _batches(2))
  path = tmp_path_factory.mktemp("zero") / "ckpt"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, state)
  return state, path


@pytest.mark.parametrize("names, sizes, devices", [
    (("data",), (4,), 4), (("data", "fsdp"), (2, 4), 8), (("data",), (8,), 8)])
def test_restore_onto_another_mesh(checkpoint, names, sizes, devices):
  saved, path = checkpoint
  mesh = _mesh(names, sizes, jax.devices()[:devices])
  trainer = zero.zero_trainer(_mlp_loss, _optimizer(), _mlp_params(jax.random.key(0)), mesh,
                              stage=3)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, trainer.abstract_state)
  for a, b, target in zip(jax.tree.leaves(restored), jax.tree.leaves(saved),
                          jax.tree.leaves(trainer.abstract_state)):
    assert a.sharding == target.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  trainer.step(restored, _batches(1)[0])  # and it trains on the new mesh


def test_resume_is_bitwise_identical(tmp_path):
  params, batches = _mlp_params(jax.random.key(0)), _batches(6)
  trainer = zero.zero_trainer(_mlp_loss, _optimizer(), params, _mesh(), stage=2)
  straight, straight_losses = _train(trainer, params, batches)
  first, first_losses = _train(trainer, params, batches[:3])
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", first)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(tmp_path / "ckpt", trainer.abstract_state)
  losses = list(first_losses)
  for batch in batches[3:]:
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
  np.testing.assert_array_equal(losses, straight_losses)
  assert int(state.step) == 6
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- Bad input ----------------------------------------------------------------------------------

def test_bad_input_is_a_clear_error(monkeypatch):
  params = _mlp_params(jax.random.key(0))
  build = lambda mesh=None, **kw: zero.zero_trainer(_mlp_loss, _optimizer(), params,
                                                    mesh or _mesh(), **kw)
  with pytest.raises(ValueError, match=r"stage=4 must be one of \(0, 1, 2, 3\)"):
    build(stage=4)
  with pytest.raises(ValueError, match=r"micro_batches=0 must be a positive integer"):
    build(stage=1, micro_batches=0)
  with pytest.raises(ValueError,
                     match=r"mesh axes \('tensor',\) include none of \('data', 'fsdp'\)"):
    build(_mesh(("tensor",)), stage=1)
  trainer = build(stage=1, micro_batches=2)
  state = trainer.init(params)
  batch = _batches(1, batch=24)[0]
  with pytest.raises(ValueError, match=r"batch size=24 must be a multiple of the 8 devices on the "
                                       r"'data' mesh axis times 2 micro-batches"):
    trainer.step(state, batch)
  monkeypatch.setattr(zero, "OFFLOAD_MEMORY_KIND", "no_such_memory")
  with pytest.raises(ValueError, match=r"needs memory kind 'no_such_memory', but cpu devices "
                                       r"offer \['device', 'pinned_host', 'unpinned_host'\]"):
    build(stage=1, offload_optimizer=True)
  with pytest.raises(ValueError, match=r"axis_sizes=\(3,\) for axes \('data',\) must multiply to "
                                       r"the 8 devices"):
    _mesh(sizes=(3,))


@pytest.mark.parametrize("kwargs, match", [
    (dict(stage=True), r"stage=True must be one of \(0, 1, 2, 3\)"),  # bool is an int
    (dict(stage=1.0), r"stage=1.0 must be one of \(0, 1, 2, 3\)"),
    (dict(stage=1, micro_batches=True), r"micro_batches=True must be a positive integer"),
    (dict(stage=1, micro_batches=2.0), r"micro_batches=2.0 must be a positive integer"),
    (dict(stage=1, compute_dtype=jnp.int8), r"compute_dtype=.*int8.* must be None or a floating"),
    (dict(stage=1, compute_dtype="fast"), r"compute_dtype='fast' must be None or a floating"),
    (dict(stage=1, offload_optimizer="yes"), r"offload_optimizer='yes' must be a bool"),
])
def test_wrong_types_are_clear_errors(kwargs, match):
  params = _mlp_params(jax.random.key(0))
  with pytest.raises((TypeError, ValueError), match=match):
    zero.zero_trainer(_mlp_loss, _optimizer(), params, _mesh(), **kwargs)


def test_choose_stage_takes_the_least_communication_that_fits():
  params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}   # 4 MiB
  optimizer = optax.adam(1e-3)

  class Device:
    def __init__(self, limit):
      self.limit = limit

    def memory_stats(self):
      return {"bytes_limit": self.limit}

  mib = 2 ** 20
  # Budget is half the limit; model state per stage on 8 devices: 16, 9, 5.5, 2 MiB (+ a scalar).
  expected = {40 * mib: 0, 24 * mib: 1, 16 * mib: 2, 8 * mib: 3, 2 * mib: 3}
  for limit, stage in expected.items():
    assert zero.choose_stage(params, optimizer, [Device(limit)] * 8) == stage, limit
  assert zero.choose_stage(params, optimizer, jax.devices()) == 0  # CPU reports no limit
  assert zero.model_state_bytes(params, jax.eval_shape(optimizer.init, params), 8,
                                3) == pytest.approx(16 * 4 * mib / 4 / 8, rel=1e-5)
  assert math.isclose(zero.model_state_bytes(params, {}, 8, 0), 8 * mib)


# --- The quickstart pipeline with ZeRO, in one process and in two -------------------------------

MULTIPROCESS_STEPS = 4


def quickstart_overrides(stage, output_dir):
  """A tiny quickstart run (4 steps, held-out perplexity, no sample) at ZeRO ``stage``."""
  from experiments import train_lm  # pylint: disable=g-import-not-at-top
  return [*train_lm.smoke_overrides(train_lm.Config()), "--data.source=news", "--steps=4", "--sample_tokens=0",
          "--optim.warmup_steps=1", f"--zero_stage={stage}", f"--output_dir={output_dir}"]


def _quickstart(stage, output_dir):
  """Runs the tiny quickstart; returns (summary, logged losses)."""
  from experiments import run  # pylint: disable=g-import-not-at-top
  summary = run.run("configs/quickstart.yaml", quickstart_overrides(stage, output_dir))
  return summary, _logged_losses(output_dir)


def _logged_losses(output_dir):
  records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in records if "loss" in r]


def _run_two_processes(mode, out):
  """Runs tests/zero_multiprocess_worker.py as 2 local processes x 4 CPU devices (gloo)."""
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    port = probe.getsockname()[1]
  here = pathlib.Path(__file__).parent
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)])}
  workers = [subprocess.Popen([sys.executable, str(here / "zero_multiprocess_worker.py"), str(i),
                               str(port), str(out), mode], env=env, cwd=here.parent,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (0, 1)]
  logs = [worker.communicate(timeout=300)[0] for worker in workers]
  assert all(worker.returncode == 0 for worker in workers), "\n".join(l[-3000:] for l in logs)


@pytest.mark.slow  # two quickstart runs: about a minute on 2 cores
def test_quickstart_zero3_matches_stage0(tmp_path):
  pytest.importorskip("tokenizers")
  pytest.importorskip("gensim")
  from experiments import run  # pylint: disable=g-import-not-at-top
  zero0, losses0 = _quickstart(0, tmp_path / "stage0")
  zero3, losses3 = _quickstart(3, tmp_path / "stage3")
  assert zero3["zero_stage"] == 3 and len(losses3) == 4
  np.testing.assert_allclose(losses3, losses0, rtol=1e-5)
  assert zero3["heldout_perplexity"] == pytest.approx(zero0["heldout_perplexity"], rel=1e-4)
  assert run.load("configs/quickstart.yaml")[1].zero_stage is None  # default: best that fits


def test_two_processes_match_one(tmp_path):
  """ZeRO-3 on 2 processes x 4 CPU devices (gloo) == 1 process x 8 devices."""
  _run_two_processes("mlp", tmp_path / "losses.json")
  trainer = zero.zero_trainer(_mlp_loss, _optimizer(), _mlp_params(jax.random.key(0)), _mesh(),
                              stage=3)
  _, losses = _train(trainer, _mlp_params(jax.random.key(0)), _batches(MULTIPROCESS_STEPS))
  np.testing.assert_allclose(json.loads((tmp_path / "losses.json").read_text()), losses,
                             rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # three quickstart processes: about a minute on 2 cores
def test_quickstart_two_processes_match_one(tmp_path):
  pytest.importorskip("tokenizers")
  pytest.importorskip("gensim")
  _run_two_processes("quickstart", tmp_path / "two")
  one, losses = _quickstart(3, tmp_path / "one")
  np.testing.assert_allclose(_logged_losses(tmp_path / "two"), losses, rtol=1e-5)
  two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
  assert two[-1]["heldout_perplexity"] == pytest.approx(one["heldout_perplexity"], rel=1e-5)
