"""Attention memory and time versus sequence length: effjax ``flash_attention`` against naive.

Memory: per-device bytes of the compiled forward and forward+backward programs (compile only, so
S = 32k costs nothing to measure). Time: median over repeats at the sizes that run quickly on
this machine, as a ratio to ``jax.nn.dot_product_attention`` (XLA) measured in the same run.

The naive rows (effjax's float32 ``reference`` and ``jax.nn.dot_product_attention``) materialize
the ``[batch, heads, S, S]`` logits, so their temp bytes grow as S^2; effjax's ``xla``
implementation (blockwise online softmax with a recomputing backward) grows as S.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from effjax import benchmarking
from effjax.ops.attention import flash_attention

BATCH, HEADS, HEAD_DIM = 1, 8, 128


def _jax_xla(q, k, v, *, causal):
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "jax.nn.dot_product_attention (xla)": _jax_xla,
    "effjax reference (naive f32)": functools.partial(flash_attention, implementation="reference"),
    "effjax xla (flash)": functools.partial(flash_attention, implementation="xla"),
}
BASELINE = "jax.nn.dot_product_attention (xla)"


def _forward_backward(attention):
  def loss(q, k, v):
    return jnp.sum(attention(q, k, v).astype(jnp.float32) ** 2)
  return jax.grad(loss, argnums=(0, 1, 2))


def measure(seq_lens, timed_up_to: int, repeats: int, dtype=jnp.float32) -> list[dict]:
  rows = []
  for causal in (True, False):
    for seq_len in seq_lens:
      spec = jax.ShapeDtypeStruct((BATCH, seq_len, HEADS, HEAD_DIM), dtype)
      inputs = benchmarking.random_inputs([spec] * 3) if seq_len <= timed_up_to else None
      baseline_times = {}
      for name, impl in IMPLEMENTATIONS.items():
        forward = functools.partial(impl, causal=causal)
        programs = {"forward": forward, "forward+backward": _forward_backward(forward)}
        for pass_name, program in programs.items():
          memory = benchmarking.compiled_memory(program, spec, spec, spec)
          row = {"implementation": name, "causal": causal, "seq_len": seq_len,
                 "pass": pass_name, "temp_bytes": memory.temp_bytes,
                 "argument_bytes": memory.argument_bytes, "output_bytes": memory.output_bytes,
                 "median_ms": None, "time_vs_baseline": None}
          if inputs is not None:
            timing = benchmarking.time_call(jax.jit(program), *inputs, repeats=repeats)
            row["median_ms"] = timing.median_s * 1e3
            if name == BASELINE:
              baseline_times[pass_name] = timing.median_s
            row["time_vs_baseline"] = timing.median_s / baseline_times[pass_name]
          rows.append(row)
  return rows


def run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]:
  seq_lens = (128, 256) if quick else (512, 1024, 2048, 4096, 8192, 16384, 32768)
  rows = measure(seq_lens, timed_up_to=256 if quick else 4096, repeats=2 if quick else 5)
  notes = (f"B={BATCH}, H={HEADS}, D={HEAD_DIM}, float32. temp = scratch bytes per device from "
           "`memory_analysis()` of the compiled program; time = median of repeats, as a ratio to "
           f"`{BASELINE}` in the same run ('-' = not timed at that size).")
  summary = _summary(rows, seq_lens[-2], seq_lens[-1])
  formatters = {key: benchmarking.format_bytes for key in ("temp_bytes", "argument_bytes")}
  formatters["median_ms"] = lambda v: "-" if v is None else f"{v:.1f}"
  formatters["time_vs_baseline"] = lambda v: "-" if v is None else f"{v:.2f}x"
  paths = list(benchmarking.write_results(
      "attention_memory", rows, title="Attention: compiled memory and time vs sequence length",
      columns=["implementation", "causal", "pass", "seq_len", "temp_bytes", "argument_bytes",
               "median_ms", "time_vs_baseline"],
      directory=out_dir, notes=notes, formatters=formatters, extra_markdown=summary))
  series = {}
  for row in rows:
    if row["causal"]:
      xs, ys = series.setdefault(f"{row['implementation']} {row['pass']}", ([], []))
      xs.append(row["seq_len"])
      ys.append(row["temp_bytes"])
  paths.append(benchmarking.plot_lines(
      out_dir / "attention_memory.png", series, title="Causal attention: temp bytes per device",
      xlabel="sequence length S", ylabel="temp bytes"))
  return paths


def _summary(rows: list[dict], seq_len: int, longer: int) -> str:
  """Headline: flash temp bytes as a share of naive at ``seq_len``, and growth to ``longer``."""
  temp = {(r["implementation"], r["causal"], r["seq_len"]): r["temp_bytes"]
          for r in rows if r["pass"] == "forward+backward"}
  flash, naive = "effjax xla (flash)", "effjax reference (naive f32)"
  lines = ["Summary (forward+backward temp bytes):", ""]
  for causal in (True, False):
    share = temp[flash, causal, seq_len] / temp[naive, causal, seq_len]
    growth = {impl: temp[impl, causal, longer] / temp[impl, causal, seq_len]
              for impl in (flash, naive)}
    lines.append(f"- causal={causal}: `xla` uses {100 * share:.2f}% of naive at S={seq_len}; "
                 f"S={seq_len} -> {longer} multiplies `xla` temp by {growth[flash]:.2f}x "
                 f"(naive: {growth[naive]:.2f}x).")
  return "\n".join(lines)
