"""Activation memory of a DecoderLM training step by remat policy, and reversible blocks.

One training step (``jax.value_and_grad`` of ``experiments.train_lm``'s next-token loss) of a
DecoderLM with d_model 512, 8 query / 4 KV heads of width 64, SwiGLU 1536, float32, batch 1, per
``DecoderLM(remat=...)`` policy (:mod:`effjax.nn.remat`) and for ``ReversibleDecoderLM``. The
vocabulary is 1024 tokens so that the float32 logits (which no layer policy touches) stay a small
share of the step; at SmolLM2's 49k they alone would fill the budget below from 4k tokens.

* memory: compiled for a compile-only NVIDIA H100 (:mod:`pallas_kernels.aot`: jax's CUDA
  plugin, the Triton flash attention kernel), ``memory_analysis()`` of the step: device temp
  bytes, host temp bytes (where offloaded activations live) and the peak (arguments + outputs +
  temp), vs depth (4..48 layers at 4k tokens) and vs sequence length (1k..32k at 8 layers); the
  longest power-of-two sequence whose peak fits 2 GiB, at 8 layers. Part of the temp is sized by
  the weights, not the tokens (per layer about twice its weights: gradients and weights in the
  layouts the GEMMs want; ``ReversibleDecoderLM`` stacks the layers' weights and gradients for
  its scans), and it grows with depth under every policy; ``activation_temp_bytes`` subtracts
  the temp of the same step at 128 tokens to show what the activations alone take. XLA:CPU
  ignores most of what a policy asks (its temp barely moves), so no CPU memory is reported.
* step time: on this CPU, 4 layers of d_model 256 at 1024 tokens, the median over interleaved
  repeats as a ratio to ``none`` in the same run.
* reversible reconstruction: the largest error of the inputs that the backward's walk down the
  stack recovers, relative to ``max |x|`` (:func:`effjax.nn.reversible.reconstruction_error`),
  vs depth, with float32 streams (the model's) and float32 or bfloat16 branches, and with
  bfloat16 streams.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from effjax import benchmarking  # noqa: E402
from effjax.nn import DecoderLM, ReversibleDecoderLM, TransformerConfig  # noqa: E402
from effjax.nn.remat import DECODER_ACTIVATIONS  # noqa: E402
from effjax.nn.reversible import AttentionBranch, MlpBranch, reconstruction_error  # noqa: E402
from effjax.ops.attention import flash_attention  # noqa: E402
from experiments.train_lm import make_loss  # noqa: E402
from pallas_kernels import aot  # noqa: E402

REVERSIBLE = "reversible"
OFFLOAD_ALL = f"offload_names({', '.join(DECODER_ACTIVATIONS)})"
# Label -> DecoderLM remat spec (``reversible``: ReversibleDecoderLM without remat).
POLICIES: dict[str, str] = {
    "none": "none", "dots": "dots", "tokenwise(0.5)": "tokenwise(0.5)",
    "save_attention": "save_attention", "full": "full",
    "offload_attention": "offload_attention", "offload_all": OFFLOAD_ALL,
    REVERSIBLE: "none"}
CONFIG = TransformerConfig(vocab_size=1024, d_model=512, num_layers=8, num_heads=8,
                           num_kv_heads=4, d_ff=1536)
DEPTHS = (4, 12, 24, 48)
WEIGHTS_ONLY_SEQ_LEN = 128
DEPTH_SEQ_LEN = 4096
SEQ_LENS = tuple(1024 << i for i in range(6))  # 1k .. 32k
BUDGET_BYTES = 2 << 30
LONGEST_UP_TO = 1 << 20
TIME_CONFIG = TransformerConfig(vocab_size=1024, d_model=256, num_layers=4, num_heads=4,
                                num_kv_heads=2, d_ff=768)
TIME_SEQ_LEN = 1024
ERROR_DEPTHS = (1, 4, 16, 48)


def model_for(label: str, config: TransformerConfig) -> DecoderLM:
  model_type = ReversibleDecoderLM if label == REVERSIBLE else DecoderLM
  return model_type(config, remat=POLICIES[label])


def step_and_params(label: str, config: TransformerConfig) -> tuple[Callable, object]:
  """The training step's gradient function and the shapes of its parameters."""
  model = model_for(label, config)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  return jax.value_and_grad(make_loss(model)), params


def h100_memory(device: jax.Device, label: str, config: TransformerConfig,
                seq_len: int) -> dict:
  grad, params = step_and_params(label, config)
  windows = jax.ShapeDtypeStruct((1, seq_len + 1), jnp.int32)
  start = time.perf_counter()
  stats = aot.compile_for(device, grad, params, windows).memory_analysis()
  return {"policy": label, "layers": config.num_layers, "seq_len": seq_len,
          "temp_bytes": stats.temp_size_in_bytes,
          "host_temp_bytes": stats.host_temp_size_in_bytes,
          "peak_bytes": (stats.argument_size_in_bytes + stats.output_size_in_bytes
                         + stats.temp_size_in_bytes),
          "compile_s": time.perf_counter() - start}


def with_ratios(rows: list[dict], same: Sequence[str]) -> list[dict]:
  """Adds ``temp_vs_none``: temp over the ``none`` row that agrees on ``same``."""
  none = {tuple(r[c] for c in same): r["temp_bytes"] for r in rows if r["policy"] == "none"}
  return [{**r, "temp_vs_none": r["temp_bytes"] / none[tuple(r[c] for c in same)]} for r in rows]


def memory_rows(device: jax.Device, quick: bool) -> list[dict]:
  depths, seq_lens = ((2, 4), (256, 512)) if quick else (DEPTHS, SEQ_LENS)
  depth_seq = 256 if quick else DEPTH_SEQ_LEN
  rows = []
  for layers in depths:
    config = TransformerConfig(**{**vars(CONFIG), "num_layers": layers})
    for label in POLICIES:
      found = h100_memory(device, label, config, depth_seq)
      weights_only = h100_memory(device, label, config, WEIGHTS_ONLY_SEQ_LEN)["temp_bytes"]
      rows.append({"sweep": "depth", **found,
                   "activation_temp_bytes": found["temp_bytes"] - weights_only})
  for seq_len in seq_lens:
    rows += [{"sweep": "seq_len", **h100_memory(device, label, CONFIG, seq_len)}
             for label in POLICIES]
  return with_ratios(rows, ("sweep", "layers", "seq_len"))


def longest_rows(device: jax.Device, quick: bool) -> list[dict]:
  """Per policy, the longest power-of-two sequence whose compiled peak fits the budget."""
  budget = (64 << 20) if quick else BUDGET_BYTES
  rows = []
  for label in POLICIES:
    seq_len, fits = 1024 if not quick else 256, None
    while seq_len <= LONGEST_UP_TO:
      found = h100_memory(device, label, CONFIG, seq_len)
      if found["peak_bytes"] > budget:
        break
      fits, seq_len = found, seq_len * 2
    rows.append({"policy": label, "budget_bytes": budget,
                 "longest_seq_len": fits and fits["seq_len"],
                 "peak_bytes": fits and fits["peak_bytes"],
                 "host_temp_bytes": fits and fits["host_temp_bytes"]})
  return rows


def time_rows(quick: bool) -> list[dict]:
  config, seq_len, repeats = ((TransformerConfig(**{**vars(TIME_CONFIG), "d_model": 64,
                                                    "d_ff": 128}), 128, 1) if quick else
                              (TIME_CONFIG, TIME_SEQ_LEN, 7))
  windows = np.random.default_rng(0).integers(0, config.vocab_size, (1, seq_len + 1),
                                              dtype=np.int32)
  calls = {}
  for label in POLICIES:
    model = model_for(label, config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    compiled = jax.jit(jax.value_and_grad(make_loss(model))).lower(params, windows).compile()
    calls[label] = lambda c=compiled, p=params: jax.block_until_ready(c(p, windows))
    calls[label]()  # warm-up
  medians = benchmarking.interleaved_medians(calls, repeats)
  return [{"policy": label, "layers": config.num_layers, "seq_len": seq_len,
           "step_ms": medians[label] * 1e3, "time_vs_none": medians[label] / medians["none"]}
          for label in POLICIES]


def error_rows(quick: bool) -> list[dict]:
  """Reconstruction error of reversible stacks of random DecoderBlock halves vs depth."""
  config, seq_len = (TransformerConfig(**{**vars(CONFIG), "d_model": 64, "d_ff": 128}), 64) \
      if quick else (CONFIG, 512)
  rows = []
  for streams, branches in ((jnp.float32, jnp.float32), (jnp.float32, jnp.bfloat16),
                            (jnp.bfloat16, jnp.bfloat16)):
    f_def = AttentionBranch(config, flash_attention, branches)
    g_def = MlpBranch(config, branches)
    positions = jnp.arange(seq_len, dtype=jnp.int32)[None]
    x = jax.random.normal(jax.random.key(1), (1, seq_len, config.d_model), streams)
    f = lambda p, h, context, f_def=f_def: f_def.apply({"params": p}, h, *context)
    g = lambda p, h, context, g_def=g_def: g_def.apply({"params": p}, h)
    for depth in ERROR_DEPTHS[:2] if quick else ERROR_DEPTHS:
      keys = jax.random.split(jax.random.key(2), 2 * depth)
      params = [(f_def.init(keys[2 * i], x, positions)["params"],
                 g_def.init(keys[2 * i + 1], x)["params"]) for i in range(depth)]
      error = reconstruction_error(f, g, params, x, x, (positions, None))
      rows.append({"streams": jnp.dtype(streams).name, "branches": jnp.dtype(branches).name,
                   "layers": depth, "relative_error": float(error)})
  return rows


def run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]:
  device = aot.gpu_device("h100")
  memory = memory_rows(device, quick)
  longest = longest_rows(device, quick)
  timing = time_rows(quick)
  errors = error_rows(quick)
  rows = ([{"table": "memory", **r} for r in memory] + [{"table": "longest", **r} for r in longest]
          + [{"table": "time", **r} for r in timing] + [{"table": "reconstruction", **r}
                                                         for r in errors])
  fmt_bytes, ratio = benchmarking.format_bytes, lambda v: f"{v:.2f}x"
  formatters = {"temp_bytes": fmt_bytes, "activation_temp_bytes": fmt_bytes,
                "host_temp_bytes": fmt_bytes, "peak_bytes": fmt_bytes,
                "budget_bytes": fmt_bytes, "temp_vs_none": ratio, "time_vs_none": ratio,
                "step_ms": lambda v: f"{v:.0f}", "relative_error": lambda v: f"{v:.2e}",
                "compile_s": lambda v: f"{v:.1f}"}
  tables = [
      ("Compiled H100 memory vs depth ({} tokens)".format(memory[0]["seq_len"]),
       [r for r in memory if r["sweep"] == "depth"],
       ["layers", "policy", "temp_bytes", "temp_vs_none", "activation_temp_bytes",
        "host_temp_bytes", "peak_bytes"]),
      ("Compiled H100 memory vs sequence length ({} layers)".format(CONFIG.num_layers),
       [r for r in memory if r["sweep"] == "seq_len"],
       ["seq_len", "policy", "temp_bytes", "temp_vs_none", "host_temp_bytes", "peak_bytes"]),
      ("Step time on this CPU vs none", timing,
       ["policy", "layers", "seq_len", "step_ms", "time_vs_none"]),
      ("Reversible reconstruction error vs depth", errors,
       ["streams", "branches", "layers", "relative_error"])]
  markdown = "\n\n".join(f"## {title}\n\n" + benchmarking.markdown_table(part, columns, formatters)
                         for title, part, columns in tables)
  paths = list(benchmarking.write_results(
      "activations", rows, directory=out_dir, markdown_rows=longest,
      columns=["policy", "budget_bytes", "longest_seq_len", "peak_bytes", "host_temp_bytes"],
      title="Activation memory: remat and offload policies, reversible blocks",
      notes=__doc__.split("\n\n", 1)[1] + "\n\nLongest sequence under the budget (H100, "
      "compile-only, {} layers):".format(CONFIG.num_layers),
      formatters=formatters, extra_markdown=markdown))
  return paths + write_plots(memory, out_dir)


def write_plots(memory: list[dict], out_dir: pathlib.Path) -> list[pathlib.Path]:
  """``activations.png``: activation temp (weight-sized buffers subtracted) vs depth;
  ``activations_seq_len.png``: device temp vs sequence length."""
  paths = []
  for sweep, x_column, value, png, ylabel in (
      ("depth", "layers", "activation_temp_bytes", "activations.png", "activation temp (MiB)"),
      ("seq_len", "seq_len", "temp_bytes", "activations_seq_len.png", "device temp (MiB)")):
    rows = [r for r in memory if r["sweep"] == sweep]
    series = {label: ([r[x_column] for r in rows if r["policy"] == label],
                      [r[value] / 2**20 for r in rows if r["policy"] == label])
              for label in POLICIES}
    paths.append(benchmarking.plot_lines(
        out_dir / png, series, xlabel=x_column, ylabel=ylabel,
        title=f"training step on H100 (compile-only) vs {x_column}"))
  return paths
