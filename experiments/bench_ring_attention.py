"""Sequence parallelism: per-device memory of ring attention vs sequence length, causal load
balance of the layouts, and a training step split over a data x seq mesh.

Memory (compile only, 8 simulated CPU devices, float32, causal, GQA 8 query / 2 kv heads,
head_dim 64, batch 1): per-device temp bytes of one attention forward+backward from the compiled
program's ``memory_analysis()``, for ``ring_attention`` (each layout; the ``all_gather``
strategy) with the sequence sharded over the 8 devices, and for ``flash_attention`` on one
device. Goal (issue 17): ring per device <= 1/8 of one device's + one K/V block, linear in S.

Load balance: for each layout, the attention tiles (128 x 128 query x key) each device computes
under a causal mask, counted from the global positions it holds: a tile of a step is computed
when any of its (query, key) pairs is visible, as by a block-skipping kernel. max / min over the
8 devices: goal <= 1.05 for zigzag and striped; contiguous is about 2n - 1.

Training step: a small DecoderLM (ZeRO stage 0) on the same 8 devices, data parallel (8 x 1)
vs data x seq (2 x 4 and 1 x 8, zigzag ring): per-device temp bytes and the median step time as
a ratio to data parallel in the same run (CPU collectives are memory copies; for the record).
"""

from __future__ import annotations

import functools
import pathlib

from experiments import bench_zero  # noqa: I001  (sets XLA_FLAGS before jax starts)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from effjax import benchmarking, sharding  # noqa: E402
from effjax.nn import DecoderLM, SequenceParallel  # noqa: E402
from effjax.ops.attention import flash_attention  # noqa: E402
from effjax.ops.ring_attention import LAYOUTS, positions, ring_attention  # noqa: E402
from effjax.optim import zero  # noqa: E402
from experiments.train_lm import make_loss  # noqa: E402

DEVICES = bench_zero.DEVICES
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64
TILE = 128


def _grad_fn(attend):
  return jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))


def memory_rows(lengths) -> list[dict]:
  mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("seq",))
  split = NamedSharding(mesh, P(None, "seq"))
  variants = {f"ring {layout}": dict(layout=layout) for layout in LAYOUTS}
  variants["all_gather zigzag"] = dict(layout="zigzag", strategy="all_gather")
  rows = []
  for seq in lengths:
    shapes = [jax.ShapeDtypeStruct((1, seq, heads, HEAD_DIM), jnp.float32)
              for heads in (HEADS, KV_HEADS, KV_HEADS)]
    single = benchmarking.compiled_memory(
        _grad_fn(functools.partial(flash_attention, causal=True)), *shapes)
    rows.append({"seq": seq, "variant": "flash_attention, 1 device",
                 "temp_bytes": single.temp_bytes, "vs_single_over_8": 8.0})
    block_bytes = 2 * seq // DEVICES * KV_HEADS * HEAD_DIM * 4  # one K/V block, float32
    for name, options in variants.items():
      attend = functools.partial(ring_attention, mesh=mesh, causal=True, **options)
      stats = benchmarking.compiled_memory(_grad_fn(attend), *shapes,
                                           in_shardings=(split, split, split))
      rows.append({"seq": seq, "variant": name, "temp_bytes": stats.temp_bytes,
                   "vs_single_over_8": stats.temp_bytes / (single.temp_bytes / DEVICES),
                   "within_goal": stats.temp_bytes <= single.temp_bytes / DEVICES + block_bytes})
  return rows


def balance_rows(seq: int) -> list[dict]:
  rows = []
  chunk = seq // DEVICES
  for layout in LAYOUTS:
    held = np.asarray(positions(seq, DEVICES, layout)).reshape(DEVICES, -1, TILE)
    low, high = held.min(-1), held.max(-1)  # per device, per tile of its local sequence
    # Device i computes tile (a, b) of step j when some key position <= some query position.
    tiles = [int(sum((low[j][None, :] <= high[i][:, None]).sum() for j in range(DEVICES)))
             for i in range(DEVICES)]
    pairs = [int((held[i].reshape(-1) + 1).sum()) for i in range(DEVICES)]
    rows.append({"layout": layout, "seq": seq, "tokens_per_device": chunk,
                 "tiles_max": max(tiles), "tiles_min": min(tiles),
                 "tiles_max_over_min": max(tiles) / min(tiles),
                 "pairs_max_over_min": max(pairs) / min(pairs)})
  return rows


def step_rows(seq_len: int, batch: int, repeats: int) -> list[dict]:
  config = bench_zero.SMALL
  windows = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq_len + 1),
                                              dtype=np.int32)
  rows, steppers = [], {}
  for seq_devices in (1, 4, 8):
    mesh = sharding.make_mesh(sharding.MeshConfig((sharding.DATA_AXIS, sharding.SEQ_AXIS),
                                                  (DEVICES // seq_devices, seq_devices)),
                              jax.devices()[:DEVICES])
    model = DecoderLM(config)
    sequence_parallel = None
    if seq_devices > 1:
      sequence_parallel = SequenceParallel(mesh)
      model = model.clone(attention_fn=sequence_parallel.attention_fn())
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))
    trainer = zero.zero_trainer(make_loss(model, sequence_parallel), optax.adamw(1e-3),
                                params, mesh, stage=0)
    windows_spec = jax.ShapeDtypeStruct(windows.shape, jnp.int32)
    stats = benchmarking.memory_of(
        trainer.jit_step.lower(trainer.abstract_state, windows_spec).compile())
    label = f"{DEVICES // seq_devices} x {seq_devices}"
    state = trainer.init(DecoderLM(config).init(jax.random.key(0),
                                                jnp.zeros((1, seq_len), jnp.int32)))
    steppers[label] = bench_zero._stepper(trainer, state, windows)  # noqa: SLF001
    benchmarking.time_call(steppers[label], warmup=2, repeats=1)
    rows.append({"mesh": label, "seq_len": seq_len, "batch": batch,
                 "temp_bytes": stats.temp_bytes})
  medians = benchmarking.interleaved_medians(steppers, repeats)
  base = medians[rows[0]["mesh"]]
  for row in rows:
    row.update(step_ms=medians[row["mesh"]] * 1e3,
               time_vs_data_parallel=medians[row["mesh"]] / base)
  return rows


def run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]:
  if jax.device_count() < DEVICES:
    raise RuntimeError(f"needs {DEVICES} devices, jax has {jax.device_count()}")
  lengths = [2048, 4096] if quick else [8192 * 2**i for i in range(6)]  # 8k .. 256k
  memory = memory_rows(lengths)
  balance = balance_rows(4096 if quick else 65536)
  steps = step_rows(seq_len=256 if quick else 2048, batch=8, repeats=1 if quick else 5)
  byte_format = {"temp_bytes": benchmarking.format_bytes}
  paths = list(benchmarking.write_results(
      "ring_attention_memory", memory, directory=out_dir,
      title="Ring attention: per-device temp bytes of one forward+backward vs sequence length",
      notes=__doc__.split("\n\n")[1], columns=["seq", "variant", "temp_bytes",
                                               "vs_single_over_8", "within_goal"],
      formatters={**byte_format, "vs_single_over_8": lambda v: f"{v:.2f}"}))
  paths += benchmarking.write_results(
      "ring_attention_balance", balance, directory=out_dir,
      title="Ring attention: causal work per device by layout (8 devices)",
      notes=__doc__.split("\n\n")[2],
      columns=["layout", "seq", "tokens_per_device", "tiles_max", "tiles_min",
               "tiles_max_over_min", "pairs_max_over_min"],
      formatters={"tiles_max_over_min": lambda v: f"{v:.3f}",
                  "pairs_max_over_min": lambda v: f"{v:.3f}"})
  paths += benchmarking.write_results(
      "ring_attention_training", steps, directory=out_dir,
      title="Sequence-parallel training step (DecoderLM, 8 CPU devices)",
      notes=__doc__.split("\n\n")[3],
      columns=["mesh", "seq_len", "batch", "temp_bytes", "step_ms", "time_vs_data_parallel"],
      formatters={**byte_format, "step_ms": lambda v: f"{v:.1f}",
                  "time_vs_data_parallel": lambda v: f"{v:.2f}x"})
  series = {}
  for row in memory:
    xs, ys = series.setdefault(row["variant"], ([], []))
    xs.append(row["seq"])
    ys.append(row["temp_bytes"] / 2**20)
  paths.append(benchmarking.plot_lines(
      out_dir / "ring_attention_memory.png", series,
      title="causal attention fwd+bwd, per-device temp (8 devices)", xlabel="sequence length",
      ylabel="MiB"))
  return paths
