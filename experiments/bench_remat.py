"""Activation checkpointing of DecoderLM's blocks: memory, recomputation and step time by policy.

One training step (``jax.value_and_grad`` of the next-token loss of ``experiments.train_lm``) of
a DecoderLM with d_model 256, 4 layers, 4 query / 2 KV heads of width 64, SwiGLU 768, a 4096-token
vocabulary, batch 1, float32, causal flash attention (XLA implementation), on one CPU device.
Per ``DecoderLM(remat=...)`` policy (``effjax.nn.remat``): attention forward passes the step runs
(``effjax.nn.count_attention_forwards``: counted in the step's jaxpr, recomputation included),
the bytes an offloading policy copies to host memory (``effjax.nn.host_residual_bytes``; on the
CPU backend host and device memory are one, so its device temp cannot drop here), the compiled
step's temp bytes (``memory_analysis``) and the median step time over interleaved
repeats, as a ratio to ``none`` in the same run (XLA's ``cost_analysis`` counts a loop body once,
so its FLOPs miss most of the attention and are not reported). Goal (issue 17): with
``save_attention`` (LightSeq) one attention forward per layer, as without checkpointing, where
``full`` runs two; its temp between ``full``'s and ``none``'s.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from effjax import benchmarking
from effjax.nn import (REMAT_POLICIES, DecoderLM, TransformerConfig, count_attention_forwards,
                       host_residual_bytes)
from experiments.train_lm import make_loss

CONFIG = TransformerConfig(vocab_size=4096, d_model=256, num_layers=4, num_heads=4,
                           num_kv_heads=2, d_ff=768)


def step_rows(config: TransformerConfig, lengths, repeats: int) -> list[dict]:
  rows = []
  for seq_len in lengths:
    windows = np.random.default_rng(0).integers(0, config.vocab_size, (1, seq_len + 1),
                                                dtype=np.int32)
    params = DecoderLM(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    calls, found = {}, {}
    for remat in REMAT_POLICIES:
      grad = jax.value_and_grad(make_loss(DecoderLM(config, remat=remat)))
      compiled = jax.jit(grad).lower(params, windows).compile()
      calls[remat] = lambda c=compiled: jax.block_until_ready(c(params, windows))
      calls[remat]()  # warm-up
      found[remat] = {"attention_forwards": count_attention_forwards(grad, params, windows),
                      "host_bytes": host_residual_bytes(grad, params, windows),
                      "temp_bytes": benchmarking.memory_of(compiled).temp_bytes}
    medians = benchmarking.interleaved_medians(calls, repeats)
    for remat, stats in found.items():
      rows.append({"seq_len": seq_len, "remat": remat, "layers": config.num_layers, **stats,
                   "temp_vs_none": stats["temp_bytes"] / found["none"]["temp_bytes"],
                   "step_ms": medians[remat] * 1e3,
                   "time_vs_none": medians[remat] / medians["none"]})
  return rows


def run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]:
  config = CONFIG
  if quick:
    config = TransformerConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=2,
                               num_kv_heads=1, d_ff=64)
  rows = step_rows(config, (64,) if quick else (2048, 8192), 1 if quick else 5)
  ratio = lambda v: f"{v:.2f}x"
  return list(benchmarking.write_results(
      "remat", rows, directory=out_dir,
      title="DecoderLM training step by activation checkpointing policy",
      notes=__doc__.split("\n\n")[1], group_by=["seq_len"],
      columns=["seq_len", "remat", "layers", "attention_forwards", "host_bytes", "temp_bytes",
               "temp_vs_none", "step_ms", "time_vs_none"],
      formatters={"host_bytes": benchmarking.format_bytes, "temp_bytes": benchmarking.format_bytes, "temp_vs_none": ratio,
                  "step_ms": lambda v: f"{v:.0f}", "time_vs_none": ratio}))
