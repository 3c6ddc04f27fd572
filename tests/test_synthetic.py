"""Synthetic long-range tasks: generators checked against independent readings of their rules,
and the long-conv vs transformer experiment's parameter matching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from effjax.data import synthetic
from experiments import optim_config, train_synthetic


def test_associative_recall_targets_are_the_query_values():
  data = synthetic.associative_recall(64, 21, 30, seed=3)
  assert data.tokens.shape == data.targets.shape == (64, 21)
  for tokens, targets in zip(data.tokens, data.targets):
    pairs = dict(zip(tokens[0:-1:2].tolist(), tokens[1:-1:2].tolist()))
    assert len(pairs) == 10 and all(1 <= k < 15 <= v < 30 for k, v in pairs.items())
    assert targets[-1] == pairs[int(tokens[-1])] and (targets[:-1] == -1).all()


def test_selective_copying_targets_are_the_data_in_order():
  data = synthetic.selective_copying(32, 50, 6, 12, seed=1)
  assert data.tokens.shape == (32, 56)
  for tokens, targets in zip(data.tokens, data.targets):
    body = tokens[:50]
    np.testing.assert_array_equal(targets[50:], body[body > 2])
    assert (tokens[50:] == 2).all() and (targets[:50] == -1).all()


def test_listops_targets_are_the_values():
  data = synthetic.listops(40, 64, max_depth=4, min_length=10, seed=2)
  for tokens, targets in zip(data.tokens, data.targets):
    expression = tokens[:-1][tokens[:-1] != 0]
    assert 10 <= len(expression) <= 63 and tokens[-1] == 0
    assert targets[-1] == synthetic.evaluate_listops(expression) + 1
  assert len(set(data.targets[:, -1].tolist())) > 3  # not a constant answer


def test_listops_evaluator_on_a_known_expression():
  words = "[MAX 2 9 [MIN 4 7 ] 0 ]".split()
  tokens = [synthetic.LISTOPS_VOCAB.index(w) for w in words]
  assert synthetic.evaluate_listops(tokens) == 9
  words = "[SM 8 [MED 1 5 3 ] 9 ]".split()
  assert synthetic.evaluate_listops([synthetic.LISTOPS_VOCAB.index(w) for w in words]) == 0


@pytest.mark.parametrize("task", sorted(synthetic.TASKS))
def test_generators_are_seeded(task):
  options = {"vocab_size": 40} if task == "associative_recall" else {}
  make = lambda seed: synthetic.TASKS[task](8, 31, seed=seed, **options)
  np.testing.assert_array_equal(make(0).tokens, make(0).tokens)
  assert not np.array_equal(make(0).tokens, make(1).tokens)


@pytest.mark.parametrize("call, match", [
    (lambda: synthetic.associative_recall(2, 30, 20), "odd"),
    (lambda: synthetic.associative_recall(2, 41, 20), "vocab_size / 2 - 1 = 9"),
    (lambda: synthetic.selective_copying(2, 5, 6), "num_data <= length"),
    (lambda: synthetic.listops(2, 3), "length must be >= 4"),
])
def test_bad_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_transformer_is_matched_to_the_long_conv_parameter_count():
  config = train_synthetic.Config()
  _, _, budget = train_synthetic._build(config, "long_conv", 20, None)
  _, matched, count = train_synthetic._build(config, "attention", 20, budget)
  assert matched.d_ff != config.model.d_ff or count == budget
  assert abs(count - budget) <= 3 * config.model.d_model * config.model.num_layers


@pytest.mark.parametrize("mixer", ["h3", "long_conv", "attention"])
def test_driver_trains_with_train_lms_optimizer_for_its_mixer(monkeypatch, mixer):
  class Built(Exception):
    pass

  def build_optimizer(*args):
    raise Built(*args)

  monkeypatch.setattr(optim_config, "build_optimizer", build_optimizer)
  config = train_synthetic.Config(optim=optim_config.OptimConfig(kernel_learning_rate=1e-4))
  with pytest.raises(Built) as built:  # long convs: kernels own lr, no weight decay
    train_synthetic.train_and_evaluate(config, mixer, None)
  assert built.value.args == (config.optim, config.steps, mixer)


def test_driver_repeats_every_mixer_per_seed(monkeypatch, tmp_path):
  def train_and_evaluate(config, mixer, budget):
    return {"mixer": mixer, "seed": config.seed, "parameters": 7 if budget is None else budget,
            "token_accuracy": config.seed / 10, "sequence_accuracy": 0.0}

  monkeypatch.setattr(train_synthetic, "train_and_evaluate", train_and_evaluate)
  config = train_synthetic.Config(output_dir=str(tmp_path), mixers=("h3", "attention"), seed=3,
                                  num_seeds=2)
  summary = train_synthetic.main(config)
  rows = json.loads((tmp_path / "results.json").read_text())
  assert [(row["mixer"], row["seed"]) for row in rows] == [
      ("h3", 3), ("h3", 4), ("attention", 3), ("attention", 4)]
  assert summary == pytest.approx({"h3_token_accuracy": 0.35, "attention_token_accuracy": 0.35})


def test_majority_accuracy_counts_only_targets():
  targets = np.array([[-1, 3], [-1, 3], [-1, 5]], np.int32)
  data = synthetic.SyntheticData(np.zeros_like(targets), targets, 6)
  assert train_synthetic.majority_accuracy(data) == pytest.approx(2 / 3)
