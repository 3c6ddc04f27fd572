"""The quickstart pipeline: data-parallel training, exact resume, metrics, held-out perplexity."""

import json

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from effjax import data, sharding
from effjax.nn.long_conv import KERNEL_LR_RATIO, KERNEL_PARAM
from effjax.optim import zero
from experiments import optim_config, run, train_lm

pytest.importorskip("tokenizers")
pytest.importorskip("gensim")

TINY = [*train_lm.smoke_overrides(train_lm.Config()), "--data.source=news", "--checkpoint_every=2",
        "--sample_tokens=0"]


def _final_state(output_dir, step):
  with ocp.CheckpointManager(output_dir / "checkpoints") as manager:
    return manager.restore(step)


def test_resume_is_bitwise_exact(tmp_path):
  steps = ["--steps=6", "--optim.warmup_steps=2"]
  run.run("configs/quickstart.yaml", [*TINY, *steps, f"--output_dir={tmp_path / 'straight'}"])
  resumed = tmp_path / "resumed"
  stopped = run.run("configs/quickstart.yaml", [*TINY, *steps, "--stop_at=3",
                                                f"--output_dir={resumed}"])
  assert stopped["stopped_at"] == 3
  run.run("configs/quickstart.yaml", [*TINY, *steps, f"--output_dir={resumed}"])

  straight_state = _final_state(tmp_path / "straight", 6)
  resumed_state = _final_state(resumed, 6)
  assert int(np.asarray(resumed_state["step"])) == 6
  leaves = jax.tree.leaves(straight_state)
  assert len(leaves) == len(jax.tree.leaves(resumed_state)) > 10
  for a, b in zip(leaves, jax.tree.leaves(resumed_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The resumed run logged steps 1..3 then 4..6, exactly once each, with the same losses.
  def losses(directory):
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}
  assert losses(tmp_path / "straight") == losses(resumed)


def test_data_parallel_over_eight_devices_and_loss_drops(tmp_path):
  assert jax.device_count() == 8
  summary = run.run("configs/quickstart.yaml", [
      *TINY, "--steps=12", "--optim.warmup_steps=2", "--optim.learning_rate=1e-2",
      f"--output_dir={tmp_path}"])
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 12
  assert losses[-1] < losses[0] - 0.3
  assert np.isfinite(summary["heldout_perplexity"])
  assert summary["heldout_perplexity"] < np.exp(losses[0])
  assert (tmp_path / "tb").is_dir() and any((tmp_path / "tb").iterdir())


def _losses(directory):
  records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("layout, strategy, packing, remat", [
    ("zigzag", "ring", False, "none"),
    ("striped", "ring", True, "save_attention"),
    pytest.param("striped", "all_gather", False, "full", marks=pytest.mark.slow),
    pytest.param("contiguous", "ring", False, "none", marks=pytest.mark.slow),
    pytest.param("zigzag", "all_gather", True, "save_attention", marks=pytest.mark.slow),
])
def test_sequence_parallel_run_matches_data_parallel(tmp_path, layout, strategy, packing, remat):
  """A 2 x 4 (data x seq) run: same losses and held-out perplexity as data parallel over 8
  (packed rows: documents crossing device borders; remat only in the split run)."""
  common = [*TINY, "--steps=3", "--optim.warmup_steps=1", "--optim.learning_rate=1e-2",
            f"--data.packing={str(packing).lower()}"]
  plain = run.run("configs/quickstart.yaml", [*common, f"--output_dir={tmp_path / 'data'}"])
  split = run.run("configs/quickstart.yaml", [
      *common, "--mesh.seq=4", f"--mesh.layout={layout}", f"--mesh.strategy={strategy}",
      f"--model.remat={remat}",
      f"--output_dir={tmp_path / 'seq'}"])
  np.testing.assert_allclose(_losses(tmp_path / "seq"), _losses(tmp_path / "data"),
                             rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(split["heldout_perplexity"], plain["heldout_perplexity"], rtol=1e-5)


@pytest.mark.parametrize("overrides, words", [
    (["--mesh.seq=3", "--data.seq_len=36"], "'mesh.seq': got 3, expected a divisor of the 8"),
    (["--mesh.seq=4", "--data.seq_len=36"], "'data.seq_len': got 36, expected a multiple of 8"),
    (["--mesh.seq=2", "--model.mixer=h3"], "'model.mixer'.*with mesh.seq > 1"),
    (["--mesh.layout=zig-zag"], "'mesh.layout'"),
    (["--mesh.strategy=ulysses"], "'mesh.strategy'"),
    (["--data.packing=true", "--model.mixer=long_conv"], "'data.packing'.*long_conv"),
    (["--model.remat=everything"], "model.remat is 'everything'; expected one of"),
    (["--model.remat=tokenwise(1.5)"], r"alpha in \[0, 1\], got alpha=1.5"),
    (["--model.remat=save_names(mlp_gate,nowhere)"], "names 'nowhere', which no DecoderLM"),
    (["--model.remat=save_attention", "--model.mixer=h3"], "no LongConvLM block emits"),
    (["--model.remat=tokenwise(0.5)", "--model.mixer=h3"], "'model.remat'.*long_conv / h3"),
    (["--model.remat=auto"], "'model.memory_budget_gib'"),
    (["--model.reversible=true", "--model.remat=full"], "'model.reversible': got True"),
])
def test_sequence_parallel_settings_are_checked(tmp_path, overrides, words):
  with pytest.raises(run.ConfigError, match=words):
    run.run("configs/quickstart.yaml", [*TINY, *overrides, f"--output_dir={tmp_path}"])


def test_remat_auto_plans_from_the_compiled_step(tmp_path, capsys):
  """model.remat auto: a budget every policy meets keeps 'none'; one none meets fails listing
  the compiled peaks (tests/test_remat.py checks a budget in between)."""
  auto = [*TINY, "--steps=1", "--model.remat=auto"]
  summary = run.run("configs/quickstart.yaml", [*auto, "--model.memory_budget_gib=64",
                                                f"--output_dir={tmp_path / 'roomy'}"])
  assert np.isfinite(summary["heldout_perplexity"])
  assert "model.remat auto -> 'none'" in capsys.readouterr().out
  with pytest.raises(ValueError, match="no remat policy fits the budget of 1.0 MiB(.|\n)*full"):
    run.run("configs/quickstart.yaml", [*auto, f"--model.memory_budget_gib={2**-10}",
                                        f"--output_dir={tmp_path / 'tight'}"])


def test_packed_loss_is_the_token_mean_of_documents_run_alone():
  """Packed rows under the ZeRO trainer on 8 devices: the loss equals the mean next-token loss of
  every document piece run through the model on its own (no attention or prediction crosses a
  boundary, and unequal token counts per shard are weighted right)."""
  model = train_lm.build_model(train_lm.ModelConfig(
      d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=32), 50, seq_len=15)
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 15), np.int32))
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 50, size=n) for n in rng.integers(2, 40, size=40)]
  rows = data.PackedRows(docs, seq_len=15)
  batch = rows.batch(0, 8, seed=0)
  batch["weights"] = train_lm.packed_loss_weights(batch["segment_ids"])
  chosen = {int(row): i for i, row in enumerate(data.epoch_order_indices(0, 8, rows.num_rows, 0))}
  nlls = []
  for row, start, length in rows.packed.placements:
    if row in chosen:
      piece = rows.packed.tokens[row, start:start + length]
      logits = model.apply(params, piece[None, :-1])
      nlls.append(optax.softmax_cross_entropy_with_integer_labels(logits, piece[None, 1:])[0])
  expected = float(np.mean(np.concatenate(nlls)))
  assert len(nlls) > 8  # several pieces share rows
  trainer = zero.zero_trainer(train_lm.make_loss(model), optax.sgd(0.0), params,
                              sharding.data_parallel_mesh(), stage=0)
  loss, _ = trainer.gradients(params, jax.device_put(batch, trainer.batch_sharding))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(train_lm.make_loss(model)(params, batch)), expected, rtol=1e-5)


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="batch_size=12 must be a multiple of the 8 devices"):
    run.run("configs/quickstart.yaml", [*TINY, "--batch_size=12", f"--output_dir={tmp_path}"])


def test_stop_at_must_be_within_steps(tmp_path):
  with pytest.raises(ValueError, match="'stop_at': got 9"):
    run.load("configs/quickstart.yaml", ["--steps=4", "--stop_at=9"])



def _first_update(mixer, optim, grads_of=lambda name, param: np.zeros(param.shape, np.float32)):
  """``{name: (param, update)}`` of one optimizer step from a fresh tiny model of ``mixer``."""
  model = train_lm.build_model(train_lm.ModelConfig(
      d_model=8, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=8, mixer=mixer), 11, seq_len=6)
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 6), np.int32))
  names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  grads = jax.tree.unflatten(jax.tree.structure(params), [
      grads_of(name, param) for name, param in zip(names, jax.tree.leaves(params))])
  optimizer = optim_config.build_optimizer(optim, 10, mixer)
  updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
  return {name: (np.asarray(p), np.asarray(u))
          for name, p, u in zip(names, jax.tree.leaves(params), jax.tree.leaves(updates))}


@pytest.mark.parametrize("mixer, kernel_lr, expected_kernel_lr",
                         [("long_conv", 1e-3, 1e-3), ("h3", None, 2e-3)])
def test_long_conv_kernels_get_their_own_lr_and_no_weight_decay(mixer, kernel_lr,
                                                                 expected_kernel_lr):
  assert KERNEL_LR_RATIO == 0.1  # so None gives 2e-2 * 0.1
  optim = optim_config.OptimConfig(learning_rate=2e-2, kernel_learning_rate=kernel_lr,
                               warmup_steps=0, weight_decay=0.5, grad_clip=1e6)
  # Gradient 1 on the kernels, 0 elsewhere: Adam's first step moves a kernel by -(its own lr),
  # with no decay term; a dense matrix only decays, by -lr * weight_decay * value.
  updates = _first_update(mixer, optim, lambda name, param: np.full(
      param.shape, float(KERNEL_PARAM in name), np.float32))
  kernels = [pair for name, pair in updates.items() if KERNEL_PARAM in name]
  dense = [pair for name, pair in updates.items() if "['out']['kernel']" in name]
  assert len(kernels) == len(dense) == 1
  for param, update in kernels:
    np.testing.assert_allclose(update, np.full(param.shape, -expected_kernel_lr), rtol=1e-4)
  for param, update in dense:
    np.testing.assert_allclose(update, -2e-2 * 0.5 * param, rtol=1e-5, atol=1e-9)


def test_attention_optimizer_decays_every_matrix_and_nothing_else():
  optim = optim_config.OptimConfig(learning_rate=2e-2, warmup_steps=0, weight_decay=0.5)
  for param, update in _first_update("attention", optim).values():
    expected = -2e-2 * 0.5 * param if param.ndim >= 2 else np.zeros(param.shape)
    np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("config, overrides, words", [
    ("smollm2_finetune", ["--model.d_model=64"], "model.d_model.*left unset with init: smollm2"),
    ("smollm2_finetune", ["--init_layers=0"], "'init_layers': got 0"),
    ("quickstart", ["--init=pretrained"], "invalid value for 'init'"),
    ("quickstart", ["--init_layers=2"], "init_layers.*with init: smollm2"),
])
def test_init_settings_that_do_not_apply_are_errors(config, overrides, words):
  with pytest.raises(run.ConfigError, match=words):
    run.load(f"configs/{config}.yaml", overrides)


def test_runs_report_the_unigram_floor(tmp_path):
  summary = run.run("configs/quickstart.yaml", [*TINY, f"--output_dir={tmp_path}"])
  assert summary["init"] == "scratch" and "initial_heldout_perplexity" not in summary
  # Two steps on a 49k vocabulary: still above the floor of a model that learned frequencies.
  assert 100 < summary["unigram_perplexity"] < summary["heldout_perplexity"]


@pytest.mark.parametrize("overrides, words", [
    (["--optim.name=lion"], "invalid value for 'optim.name'"),
    (["--optim.frugal.rho=0.5"], "optim.frugal.*unset with optim.name='adamw'"),
    (["--optim.name=frugal", "--optim.frugal.rho=1.5"], r"optim.frugal.rho.*in \(0, 1\]"),
    (["--optim.name=galore", "--optim.frugal.state_free=sgd"],
     "optim.frugal.state_free.*unset with optim.name='galore'"),
    (["--optim.name=spiel", "--optim.snell.rank=4"], "optim.snell.*unset with optim.name='spiel'"),
    (["--optim.name=spiel", "--optim.spiel.density=0"], r"optim.spiel.density.*in \(0, 1\]"),
    (["--optim.name=snell", "--optim.snell.kernel=rbf"], "optim.snell.kernel"),
])
def test_optimizer_settings_that_do_not_apply_are_errors(overrides, words):
  with pytest.raises(run.ConfigError, match=words):
    run.load("configs/quickstart.yaml", overrides)


@pytest.mark.parametrize("name, settings", [
    ("frugal", ["--optim.frugal.update_gap=2", "--optim.frugal.project_embedding=true"]),
    ("galore", ["--optim.frugal.update_gap=2", "--optim.frugal.project_embedding=true"]),
    ("spiel", ["--optim.spiel.density=0.05", "--optim.spiel.reselection_steps=2",
               "--optim.spiel.accumulation_steps=1"]),
    ("snell", ["--optim.snell.rank=4"]),
])
def test_state_light_optimizers_train_through_the_pipeline(tmp_path, name, settings):
  summary = run.run("configs/quickstart.yaml", [
      *TINY, "--steps=4", f"--optim.name={name}", *settings, f"--output_dir={tmp_path}"])
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 4 and all(np.isfinite(losses)) and np.isfinite(summary["heldout_perplexity"])
  state = _final_state(tmp_path, 4)
  size = lambda tree: sum(np.asarray(leaf).size for leaf in jax.tree.leaves(tree))
  assert size(state["opt_state"]) < size(state["params"])  # AdamW's would be twice the params
