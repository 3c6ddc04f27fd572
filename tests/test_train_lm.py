"""The quickstart pipeline: data-parallel training, exact resume, metrics, held-out perplexity."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import run, train_lm

pytest.importorskip("tokenizers")
pytest.importorskip("gensim")

TINY = [*train_lm.SMOKE_OVERRIDES, "--data.source=news", "--checkpoint_every=2",
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


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="batch_size=12 must be a multiple of the 8 devices"):
    run.run("configs/quickstart.yaml", [*TINY, "--batch_size=12", f"--output_dir={tmp_path}"])


def test_stop_at_must_be_within_steps(tmp_path):
  with pytest.raises(ValueError, match="'stop_at': got 9"):
    run.load("configs/quickstart.yaml", ["--steps=4", "--stop_at=9"])
