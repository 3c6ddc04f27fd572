"""Synthetic long-range tasks: a long-convolution model against an equal-parameter transformer.

``effjax-run configs/longconv_recall.yaml`` (or ``longconv_listops.yaml``,
``longconv_copying.yaml``) trains each model of ``mixers`` on freshly generated batches of the task
(:mod:`effjax.data.synthetic`; batch ``s`` is drawn with seed ``(seed, s)``), then reports the
accuracy on held-out examples (another seed): per target token and per sequence (all targets
right). The models are :func:`experiments.train_lm.build_model` with ``model.mixer`` set; the
transformer's SwiGLU width is adjusted so its parameter count matches the long-convolution
model's (the counts are reported). The optimizer is train_lm's (``optim``), so the long-convolution
models' kernels get their own learning rate and no weight decay, as in the paper. ``num_seeds``
repeats every model with consecutive seeds. Results go to ``output_dir/results.json`` and, with
``results_name``, to a table ``<results_dir or output_dir>/<results_name>.{json,md}`` that names
the command reproducing it; ``--results_dir=benchmarks`` refreshes the committed one.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effjax import benchmarking
from effjax.data import synthetic
from experiments import optim_config, train_lm
from experiments.config import ExperimentConfig, command_line, require, results_directory


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  name: str = "associative_recall"
  """One of effjax.data.synthetic.TASKS: associative_recall, selective_copying, listops."""
  length: int = 31
  """Sequence length (selective_copying: positions before the markers)."""
  vocab_size: int = 40
  """Vocabulary (associative_recall, selective_copying; listops has its own 16 tokens)."""
  num_data: int = 8
  """Data tokens to copy (selective_copying)."""
  max_depth: int = 4
  """Deepest nesting (listops)."""

  def __post_init__(self):
    require(self.name in synthetic.TASKS, "task.name", self.name, f"one of {sorted(synthetic.TASKS)}")
    try:
      self.generate(1, seed=0)
    except ValueError as error:
      require(False, "task", dataclasses.asdict(self), str(error))

  def generate(self, n: int, seed: int) -> synthetic.SyntheticData:
    if self.name == "associative_recall":
      return synthetic.associative_recall(n, self.length, self.vocab_size, seed=seed)
    if self.name == "selective_copying":
      return synthetic.selective_copying(n, self.length, self.num_data, self.vocab_size, seed=seed)
    return synthetic.listops(n, self.length, max_depth=self.max_depth, seed=seed)


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
  experiment: str = "train_synthetic"
  output_dir: str = "runs/synthetic"
  task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
  model: train_lm.ModelConfig = dataclasses.field(
      default_factory=lambda: train_lm.ModelConfig(d_model=64, num_layers=2, num_heads=4,
                                                   num_kv_heads=4, d_ff=128))
  mixers: tuple[str, ...] = ("long_conv", "attention")
  """Models to train; the first sets the parameter budget the others are matched to."""
  steps: int = 400
  """Optimizer steps per model."""
  batch_size: int = 32
  """Sequences per step."""
  optim: optim_config.OptimConfig = dataclasses.field(default_factory=optim_config.OptimConfig)
  """train_lm's optimizer (AdamW, warm-up, cosine decay, weight decay on matrices); the
  long-convolution models' kernels get their own learning rate (optim.kernel_learning_rate) and
  no weight decay."""
  eval_examples: int = 512
  """Held-out examples for the final accuracy."""
  num_seeds: int = 1
  """Train every model with seeds seed, seed + 1, ... (initialization, batches, held-out set)."""
  results_name: str | None = None
  """Also write the table <results_dir or output_dir>/<results_name>.{json,md} (None: only
  output_dir/results.json)."""
  results_dir: str | None = None
  """Directory of that table if not output_dir; `benchmarks` refreshes the committed one."""
  notes: str = ""
  """A sentence added to the benchmark's notes (e.g. why these settings, why one seed)."""

  def __post_init__(self):
    for key in ("steps", "batch_size", "eval_examples", "num_seeds"):
      require(getattr(self, key) > 0, key, getattr(self, key), "a positive integer")
    require(len(self.mixers) > 0 and all(m in ("long_conv", "h3", "attention")
                                         for m in self.mixers),
            "mixers", self.mixers, "a non-empty list of 'long_conv', 'h3', 'attention'")


def smoke_overrides(config: Config) -> tuple[str, ...]:
  """Overrides that make this experiment tiny, for the config smoke test."""
  return ("--steps=2", "--batch_size=4", "--eval_examples=8", "--model.d_model=16",
          "--model.num_layers=1", "--model.d_ff=16", "--mixers=[h3,attention]",
          "--num_seeds=1")


def _count(params: Any) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def _build(config: Config, mixer: str, vocab_size: int, budget: int | None):
  """The model for ``mixer``; with a ``budget``, the SwiGLU width that comes closest to it."""
  model_config = dataclasses.replace(config.model, mixer=mixer)
  length = config.task.generate(1, 0).tokens.shape[1]
  dummy = jnp.zeros((1, length), jnp.int32)
  count = lambda c: _count(jax.eval_shape(
      train_lm.build_model(c, vocab_size, length).init, jax.random.key(0), dummy))
  if budget is not None:
    per_unit = 3 * model_config.d_model * model_config.num_layers  # SwiGLU params per d_ff unit
    d_ff = max(1, model_config.d_ff + round((budget - count(model_config)) / per_unit))
    model_config = dataclasses.replace(model_config, d_ff=d_ff)
  return train_lm.build_model(model_config, vocab_size, length), model_config, count(model_config)


def _loss_and_accuracy(model, params, tokens, targets):
  logits = model.apply(params, tokens)
  mask = targets >= 0
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
  correct = (jnp.argmax(logits, -1) == targets) | ~mask
  loss = jnp.sum(nll * mask) / jnp.sum(mask)
  return loss, (jnp.sum(correct & mask) / jnp.sum(mask), jnp.mean(correct.all(-1)))


def train_and_evaluate(config: Config, mixer: str, budget: int | None) -> dict[str, Any]:
  vocab = config.task.generate(1, 0).vocab_size
  model, model_config, num_params = _build(config, mixer, vocab, budget)
  length = config.task.generate(1, 0).tokens.shape[1]
  optimizer = optim_config.build_optimizer(config.optim, config.steps, mixer)
  params = jax.jit(model.init)(jax.random.key(config.seed), jnp.zeros((1, length), jnp.int32))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, tokens, targets):
    (loss, _), grads = jax.value_and_grad(
        lambda p: _loss_and_accuracy(model, p, tokens, targets), has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.perf_counter()
  for index in range(config.steps):
    batch = config.task.generate(config.batch_size, seed=hash((config.seed, index)) % 2**31)
    params, opt_state, loss = step(params, opt_state, batch.tokens, batch.targets)
  held_out = config.task.generate(config.eval_examples, seed=config.seed + 10**6)
  _, (token_accuracy, sequence_accuracy) = jax.jit(
      lambda p: _loss_and_accuracy(model, p, held_out.tokens, held_out.targets))(params)
  return {"task": config.task.name, "length": length, "mixer": mixer, "seed": config.seed,
          "parameters": num_params, "d_ff": model_config.d_ff, "final_train_loss": float(loss),
          "token_accuracy": float(token_accuracy), "sequence_accuracy": float(sequence_accuracy),
          "train_seconds": time.perf_counter() - start}


def majority_accuracy(data: synthetic.SyntheticData) -> float:
  """Token accuracy of always answering the most frequent target: the floor to beat."""
  targets = data.targets[data.targets >= 0]
  return float(np.bincount(targets).max() / targets.size)


def main(config: Config) -> dict[str, Any]:
  output_dir = pathlib.Path(config.output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  rows, budget = [], None
  for mixer in config.mixers:
    for seed in range(config.seed, config.seed + config.num_seeds):
      row = train_and_evaluate(dataclasses.replace(config, seed=seed), mixer, budget)
      budget = row["parameters"] if budget is None else budget
      print(f"{mixer} (seed {seed}): {row['parameters']:,} parameters, token accuracy "
            f"{row['token_accuracy']:.3f}, sequence accuracy {row['sequence_accuracy']:.3f}")
      rows.append(row)
  (output_dir / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
  summary = {f"{mixer}_token_accuracy": float(np.mean(
      [row["token_accuracy"] for row in rows if row["mixer"] == mixer])) for mixer in config.mixers}
  if config.results_name:
    floor = majority_accuracy(config.task.generate(config.eval_examples, config.seed + 10**6))
    optim = config.optim
    means = ", ".join(f"{key.removesuffix('_token_accuracy')} {value:.1%}"
                      for key, value in summary.items())
    benchmarking.write_results(
        config.results_name, rows, title=f"Synthetic task {config.task.name}: long conv vs "
        "equal-parameter transformer", columns=list(rows[0]),
        directory=results_directory(config), command=command_line(),
        notes=f"{config.steps} steps of {config.batch_size} fresh sequences (AdamW, lr "
        f"{optim.learning_rate:g}, long-conv kernels {optim_config.kernel_learning_rate(optim):g} "
        f"without weight decay, warm-up {optim.warmup_steps}, weight decay "
        f"{optim.weight_decay:g}); accuracy on "
        f"{config.eval_examples} held-out sequences; d_model={config.model.d_model}, "
        f"layers={config.model.num_layers}; {config.num_seeds} seed(s) per model. Mean token "
        f"accuracy: {means}; always answering the most frequent target: {floor:.1%}. "
        f"{config.notes}")
  return summary
