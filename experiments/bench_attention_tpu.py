"""Block skipping of the Pallas TPU FlashAttention kernels versus sequence length.

What the kernels' grids do, from the same schedule tables and index maps the kernels use
(:func:`pallas_kernels.flash_attention.pallas_tpu.schedule_counts`; exact, no TPU needed): the share
of (query block, key block) grid steps that compute, that compute without the mask arithmetic, and
that start a K/V (forward, dq) or Q/dO (dk/dv) block DMA. A kernel without skipping computes and
fetches on every step (100%). Causal, a 1024-token sliding window and packed 1024-token documents
show how the work follows the mask instead of S^2. Time needs a TPU: none was available when
these figures were produced, so none is reported.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp

from effjax import benchmarking
from pallas_kernels.flash_attention import pallas_tpu

HEAD_DIM = 128
WINDOW = DOCUMENT = 1024
MASKS = ("dense", "causal", f"causal, window {WINDOW}", f"causal, packed {DOCUMENT}-token docs")


def _options(mask: str, seq_len: int) -> dict:
  if mask == "dense":
    return {}
  if mask == "causal":
    return dict(causal=True)
  if mask.startswith("causal, window"):
    return dict(causal=True, window=(WINDOW, None))
  ids = (jnp.arange(seq_len) // DOCUMENT)[None].astype(jnp.int32)
  return dict(causal=True, q_segment_ids=ids, kv_segment_ids=ids)


def measure(seq_lens) -> list[dict]:
  rows = []
  for mask in MASKS:
    for seq_len in seq_lens:
      counts = pallas_tpu.schedule_counts(seq_len, seq_len, head_dim=HEAD_DIM,
                                          **_options(mask, seq_len))
      blocks = pallas_tpu.default_block_sizes(seq_len, seq_len, HEAD_DIM)
      row = {"mask": mask, "seq_len": seq_len, "blocks": f"{blocks.block_q}x{blocks.block_kv}"}
      for kernel in ("forward", "dkv"):
        steps = counts[f"{kernel}_steps"]
        row[f"{kernel}_steps"] = steps
        for count in ("computed", "unmasked", "fetched"):
          row[f"{kernel}_{count}"] = counts[f"{kernel}_{count}"] / steps
      rows.append(row)
  return rows


def run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]:
  seq_lens = (1024, 2048) if quick else (1024, 2048, 4096, 8192, 16384, 32768)
  rows = measure(seq_lens)
  percent = lambda value: f"{100 * value:.1f}%"
  formatters = {f"{kernel}_{count}": percent for kernel in ("forward", "dkv")
                for count in ("computed", "unmasked", "fetched")}
  notes = ("Per (batch row, head), default blocks, head_dim 128. computed / unmasked / fetched: "
           "share of grid steps that run the block (FLOPs follow it), run it without mask "
           "arithmetic, and start a DMA of the streamed operand (K/V in forward and dq, Q/dO in "
           "dk/dv). dq matches forward. No TPU was available: no times.")
  paths = list(benchmarking.write_results(
      "attention_tpu_blocks", rows, title="Pallas TPU attention: block skipping vs sequence length",
      columns=["mask", "seq_len", "blocks", "forward_steps", "forward_computed",
               "forward_unmasked", "forward_fetched", "dkv_computed", "dkv_fetched"],
      directory=out_dir, notes=notes, formatters=formatters))
  series = {mask: ([row["seq_len"] for row in rows if row["mask"] == mask],
                   [row["forward_computed"] for row in rows if row["mask"] == mask])
            for mask in MASKS}
  paths.append(benchmarking.plot_lines(
      out_dir / "attention_tpu_blocks.png", series,
      title="Pallas TPU attention: share of grid steps computed (forward)",
      xlabel="sequence length S", ylabel="share of (q block, kv block) steps"))
  return paths
