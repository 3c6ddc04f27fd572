"""ZeRO stages 0-3: per-device bytes of a ~120M-parameter LM, and step time on 8 CPU devices.

Memory (compile only, 8 simulated devices, float32 AdamW): parameters, gradients and optimizer
state per device from the shardings the stage assigns (the sum of their per-device shard sizes;
the step's ``memory_analysis()`` argument bytes equal parameters + optimizer state + batch), and
the compiled step's temp (scratch) bytes and peak (arguments + outputs + temps, donated buffers
counted once). ZeRO paper (P parameters, N devices): 16P, 8P + 8P/N, 4P + 12P/N, 16P/N.

Time: a small LM on the same 8 CPU devices, median of repeats, as a ratio to stage 0 measured in
the same run (CPU collectives are memory copies: the ratio shows the extra work of each stage's
collectives and layout changes, not network time).

Needs 8 devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is added here unless
already set, which works when jax's backend has not started yet (``effjax-bench zero`` does so).
"""

from __future__ import annotations

import math
import os
import pathlib

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from effjax import benchmarking, sharding  # noqa: E402
from effjax.nn import DecoderLM, TransformerConfig  # noqa: E402
from effjax.optim import zero  # noqa: E402

DEVICES = 8
LARGE = TransformerConfig(vocab_size=49152, d_model=768, num_layers=12, num_heads=12,
                          num_kv_heads=4, d_ff=2048)
SMALL = TransformerConfig(vocab_size=4096, d_model=128, num_layers=4, num_heads=4,
                          num_kv_heads=2, d_ff=384)


def _lm_loss(model):
  def loss_fn(params, windows):
    logits = model.apply(params, windows[:, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]))
  return loss_fn


def _trainer(config: TransformerConfig, stage: int, seq_len: int):
  model = DecoderLM(config)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))
  mesh = sharding.data_parallel_mesh(jax.devices()[:DEVICES])
  trainer = zero.zero_trainer(_lm_loss(model), optax.adamw(1e-3), params, mesh, stage=stage)
  return trainer, model, params


def _per_device_bytes(tree, shardings) -> int:
  return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def memory_rows(config: TransformerConfig, batch: int, seq_len: int) -> list[dict]:
  rows = []
  for stage in zero.STAGES:
    trainer, _, params = _trainer(config, stage, seq_len)
    windows = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    step = benchmarking.memory_of(trainer.jit_step.lower(trainer.abstract_state, windows).compile())
    state = trainer.abstract_state
    grad_sharding = sharding.tree_shardings(params, trainer.mesh, shard=stage >= 2)
    num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    p, n = 4 * num_params, DEVICES
    rows.append({
        "stage": stage, "parameters": num_params,
        "params_bytes": _per_device_bytes(state.params, trainer.state_sharding.params),
        "grads_bytes": _per_device_bytes(params, grad_sharding),
        "opt_state_bytes": _per_device_bytes(state.opt_state, trainer.state_sharding.opt_state),
        "argument_bytes": step.argument_bytes, "temp_bytes": step.temp_bytes,
        "peak_bytes": step.peak_bytes,
        "zero_formula_bytes": [4 * p, 2 * p + 2 * p / n, p + 3 * p / n, 4 * p / n][stage],
    })
    row = rows[-1]
    row["model_state_bytes"] = row["params_bytes"] + row["grads_bytes"] + row["opt_state_bytes"]
  return rows


def time_rows(config: TransformerConfig, batch: int, seq_len: int, repeats: int) -> list[dict]:
  """Median step time per stage; stages alternate within each round, so load from other
  processes on the machine falls on every stage alike."""
  windows = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq_len + 1),
                                              dtype=np.int32)
  steppers = []
  for stage in zero.STAGES:
    trainer, model, _ = _trainer(config, stage, seq_len)
    state = trainer.init(model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32)))
    steppers.append(_stepper(trainer, state, windows))
    benchmarking.time_call(steppers[-1], warmup=2, repeats=1)  # compile and warm up
  samples = [[] for _ in steppers]
  for _ in range(repeats):
    for stepper, times in zip(steppers, samples):
      times.append(benchmarking.time_call(stepper, warmup=0, repeats=1).median_s)
  medians = [float(np.median(times)) for times in samples]
  return [{"stage": stage, "median_ms": median * 1e3, "time_vs_stage0": median / medians[0]}
          for stage, median in zip(zero.STAGES, medians)]


def _stepper(trainer: zero.ZeroTrainer, state: zero.ZeroState, windows: np.ndarray):
  """A no-argument callable running one step on the (donated, carried) state."""
  box = [state]

  def one_step():
    box[0], metrics = trainer.step(box[0], windows)
    return metrics["loss"]
  return one_step


def _summary(rows: list[dict]) -> str:
  """Measured peak against stage 0, and what the transients (temps) are."""
  base = rows[0]["peak_bytes"]
  shares = ", ".join(f"stage {r['stage']} {100 * r['peak_bytes'] / base:.0f}%" for r in rows)
  return (f"Measured peak per device relative to stage 0: {shares}. model_state matches the ZeRO "
          "formula by construction of the layouts (tests/test_zero.py checks it against the "
          "compiled programs' argument and output bytes). The temps are what the formula leaves "
          "out: stages 0-1 hold the local and the all-reduced gradient (2 x 4P); stage 2 "
          "reduce-scatters each gradient leaf as it is produced (activations and logits "
          "remain); stage 3 holds the gathered parameters, because XLA:CPU drops the remat "
          "barrier that would let the backward pass gather them again layer by layer.")


def run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]:
  if jax.device_count() < DEVICES:
    raise RuntimeError(f"needs {DEVICES} devices, jax has {jax.device_count()}: run "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=8 effjax-bench zero")
  large = SMALL if quick else LARGE
  memory = memory_rows(large, batch=8, seq_len=32 if quick else 128)
  timing = time_rows(SMALL, batch=16, seq_len=32 if quick else 64, repeats=2 if quick else 15)
  for row, timed in zip(memory, timing):
    row.update(timed)
  notes = (f"Memory: {memory[0]['parameters'] / 1e6:.1f}M-parameter DecoderLM "
           f"(d_model={large.d_model}, {large.num_layers} layers, vocab {large.vocab_size}), "
           f"float32 AdamW, batch 8, {DEVICES} devices, compile only; params/grads/opt state = "
           "per-device shard bytes of each stage's layout; temp and peak from the compiled "
           "step's `memory_analysis()` (peak = arguments + outputs + temps, donated state counted "
           "once). Time: DecoderLM d_model=128, 4 layers, vocab 4096, batch 16 x 64 tokens, median "
           "of 15 rounds (stages alternate within a round) as a ratio to stage 0; a shared "
           "2-core machine, so ratios within about 10% are noise.")
  formatters = {key: benchmarking.format_bytes for key in (
      "params_bytes", "grads_bytes", "opt_state_bytes", "model_state_bytes",
      "zero_formula_bytes", "temp_bytes", "peak_bytes")}
  formatters["median_ms"] = lambda v: f"{v:.1f}"
  formatters["time_vs_stage0"] = lambda v: f"{v:.2f}x"
  paths = list(benchmarking.write_results(
      "zero", memory, title="ZeRO stages: per-device bytes and step time", directory=out_dir,
      columns=["stage", "params_bytes", "grads_bytes", "opt_state_bytes", "model_state_bytes",
               "zero_formula_bytes", "temp_bytes", "peak_bytes", "median_ms", "time_vs_stage0"],
      notes=notes, formatters=formatters, extra_markdown=_summary(memory)))
  stages = [row["stage"] for row in memory]
  series = {label: (stages, [row[key] / 2 ** 20 for row in memory]) for label, key in (
      ("parameters", "params_bytes"), ("gradients", "grads_bytes"),
      ("optimizer state", "opt_state_bytes"), ("temps", "temp_bytes"),
      ("peak (measured)", "peak_bytes"), ("ZeRO formula", "zero_formula_bytes"))}
  paths.append(benchmarking.plot_lines(
      out_dir / "zero.png", series, title=f"ZeRO per-device MiB, {DEVICES} devices",
      xlabel="ZeRO stage", ylabel="MiB per device", logx=False))
  return paths
