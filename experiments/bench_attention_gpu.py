"""Attention throughput on a GPU: effjax's Pallas kernels against cuDNN and jax's Pallas.

For B=4, H=16, bf16, S in {2k, 4k, 8k, 16k}, D in {64, 128}, causal and not: TFLOP/s of the
forward and of forward+backward (one ``jax.vjp`` call: forward, then dq/dk/dv) for

* ``effjax pallas_gpu``: ``flash_attention(..., implementation="pallas_gpu")`` (Triton);
* ``effjax mosaic_gpu``: ``implementation="mosaic_gpu"``, the warp-specialized Hopper kernels;
  sm_90 only, the row records the error elsewhere;
* ``cuDNN``: ``jax.nn.dot_product_attention(..., implementation="cudnn")``;
* ``jax pallas (triton)``: ``jax.experimental.pallas.ops.gpu.attention.mha``.

FLOPs follow FlashAttention's convention: forward ``4 * B * H * S^2 * D`` (halved when causal),
forward+backward 3.5x that. The peak is a bf16 8192^3 ``jnp.dot`` measured in the same run. Each
figure is the median of repeats after warm-up; each row also records the compiled temp bytes and
the largest output difference to cuDNN (a sanity check; the tests are the correctness check).
A short block-size sweep of the effjax kernels (both) at S=8k follows. A wall-clock budget
(``EFFJAX_BENCH_BUDGET_S``, default 420 s) stops the suite early, keeping what was measured;
``EFFJAX_BENCH_SKIP`` (comma-separated implementation names) leaves implementations out, e.g.
after their GPU tests failed (a hung kernel would otherwise take the whole suite down).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from effjax import benchmarking
from effjax.ops.attention import flash_attention
from pallas_kernels.flash_attention import mosaic_gpu, pallas_gpu

BATCH, HEADS = 4, 16
SWEEP = {
    "128x64 / 64x64, 4 warps, 2 stages": pallas_gpu.BlockSizes(num_stages=2),
    "128x64 / 64x64, 4 warps, 3 stages": pallas_gpu.BlockSizes(num_stages=3, num_stages_bwd=3),
    "128x128 / 64x128, 4 warps": pallas_gpu.BlockSizes(block_kv=128, block_kv_dkv=128,
                                                       block_q_dq=128),
    "64x64 / 64x64, 4 warps, 3 stages": pallas_gpu.BlockSizes(block_q=64, num_stages=3),
    "128x64 / 128x64 dkv, 8 warps bwd": pallas_gpu.BlockSizes(block_kv_dkv=128, block_q_dq=128,
                                                               num_warps_bwd=8),
}
SWEEP_MOSAIC_GPU = {
    "mosaic_gpu fwd 64 keys, 3 stages": mosaic_gpu.BlockSizes(block_kv=64, stages=3),
    "mosaic_gpu bwd 128 keys (dq) / 128 queries (dkv)": mosaic_gpu.BlockSizes(block_kv_dq=128,
                                                                              block_q_dkv=128),
    "mosaic_gpu bwd 3 stages": mosaic_gpu.BlockSizes(stages=3, block_kv=64),
    "mosaic_gpu fwd ping-pong": mosaic_gpu.BlockSizes(ping_pong=True),
    "mosaic_gpu fwd overlap": mosaic_gpu.BlockSizes(overlap=True),
    "mosaic_gpu fwd overlap, 64 keys, 3 stages": mosaic_gpu.BlockSizes(block_kv=64, stages=3,
                                                                       overlap=True),
}


def _effjax(q, k, v, *, causal, block_sizes=None):
  if block_sizes is None:
    return flash_attention(q, k, v, causal=causal, implementation="pallas_gpu")
  return pallas_gpu.attention(q, k, v, causal=causal, scale=q.shape[-1] ** -0.5,
                              block_sizes=block_sizes)


def _effjax_mosaic_gpu(q, k, v, *, causal, block_sizes=None):
  if block_sizes is None:
    return flash_attention(q, k, v, causal=causal, implementation="mosaic_gpu")
  return mosaic_gpu.attention(q, k, v, causal=causal, scale=q.shape[-1] ** -0.5,
                              block_sizes=block_sizes)


def _cudnn(q, k, v, *, causal):
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


def _jax_pallas(q, k, v, *, causal):
  from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=g-import-not-at-top
  return attention.mha(q, k, v, segment_ids=None, sm_scale=q.shape[-1] ** -0.5, causal=causal)


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "effjax pallas_gpu": _effjax,
    "effjax mosaic_gpu": _effjax_mosaic_gpu,
    "cuDNN": _cudnn,
    "jax pallas (triton)": _jax_pallas,
}


def _programs(attention):
  def forward_backward(q, k, v, d_out):
    _, vjp = jax.vjp(attention, q, k, v)
    return vjp(d_out)
  return {"forward": jax.jit(lambda q, k, v, d_out: attention(q, k, v)),
          "forward+backward": jax.jit(forward_backward)}


def _flops(seq_len: int, head_dim: int, causal: bool, pass_name: str) -> float:
  forward = 4 * BATCH * HEADS * seq_len * seq_len * head_dim / (2 if causal else 1)
  return forward * (3.5 if pass_name == "forward+backward" else 1.0)


def peak_tflops(repeats: int) -> float:
  """bf16 TFLOP/s of an 8192^3 matmul: the card's practical ceiling."""
  a, b = benchmarking.random_inputs([jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16)] * 2)
  timing = benchmarking.time_call(jax.jit(jnp.dot), a, b, repeats=repeats)
  return 2 * 8192 ** 3 / timing.median_s / 1e12


@dataclasses.dataclass
class _Budget:
  seconds: float
  start: float = dataclasses.field(default_factory=time.perf_counter)

  def spent(self) -> bool:
    return time.perf_counter() - self.start > self.seconds


def _measure_one(name, attention, inputs, *, seq_len, head_dim, causal, repeats, reference):
  rows = []
  for pass_name, program in _programs(attention).items():
    row = {"implementation": name, "seq_len": seq_len, "head_dim": head_dim, "causal": causal,
           "pass": pass_name, "median_ms": None, "tflops": None, "temp_bytes": None,
           "max_diff_vs_cudnn": None, "error": None}
    try:
      row["temp_bytes"] = benchmarking.memory_of(program.lower(*inputs).compile()).temp_bytes
      timing = benchmarking.time_call(program, *inputs, repeats=repeats)
      row["median_ms"] = timing.median_s * 1e3
      row["tflops"] = _flops(seq_len, head_dim, causal, pass_name) / timing.median_s / 1e12
      if pass_name == "forward" and reference is not None:
        out = program(*inputs)
        row["max_diff_vs_cudnn"] = float(jnp.max(jnp.abs(
            out.astype(jnp.float32) - reference.astype(jnp.float32))))
    except Exception as error:  # pylint: disable=broad-except
      row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    rows.append(row)
  return rows


def _reference_output(inputs, causal: bool) -> jax.Array | None:
  """cuDNN's forward output, or None if cuDNN cannot run this configuration."""
  try:
    return jax.jit(functools.partial(_cudnn, causal=causal))(*inputs[:3])
  except Exception:  # pylint: disable=broad-except
    return None


def _skipped() -> set[str]:
  return {name.strip() for name in os.environ.get("EFFJAX_BENCH_SKIP", "").split(",")
          if name.strip()}


def measure(seq_lens, head_dims, repeats: int, budget: _Budget) -> list[dict]:
  rows = []
  implementations = {name: impl for name, impl in IMPLEMENTATIONS.items()
                     if name not in _skipped()}
  for head_dim in head_dims:
    for causal in (False, True):
      for seq_len in seq_lens:
        if budget.spent():
          return rows
        spec = jax.ShapeDtypeStruct((BATCH, seq_len, HEADS, head_dim), jnp.bfloat16)
        inputs = benchmarking.random_inputs([spec] * 4, seed=seq_len + head_dim)
        reference = _reference_output(inputs, causal)
        for name, impl in implementations.items():
          rows += _measure_one(name, functools.partial(impl, causal=causal), inputs,
                               seq_len=seq_len, head_dim=head_dim, causal=causal,
                               repeats=repeats, reference=reference)
  return rows


def sweep(seq_len: int, head_dims, repeats: int, budget: _Budget) -> list[dict]:
  rows = []
  for head_dim in head_dims:
    spec = jax.ShapeDtypeStruct((BATCH, seq_len, HEADS, head_dim), jnp.bfloat16)
    inputs = benchmarking.random_inputs([spec] * 4, seed=1)
    reference = _reference_output(inputs, causal=False)
    variants = [(label, functools.partial(_effjax, block_sizes=sizes))
                for label, sizes in SWEEP.items()]
    if "effjax mosaic_gpu" not in _skipped():
      variants += [(label, functools.partial(_effjax_mosaic_gpu, block_sizes=sizes))
                   for label, sizes in SWEEP_MOSAIC_GPU.items()]
    for label, attention in variants:
      if budget.spent():
        return rows
      rows += _measure_one(f"effjax {label}", functools.partial(attention, causal=False), inputs,
                           seq_len=seq_len, head_dim=head_dim, causal=False, repeats=repeats,
                           reference=reference)
  return rows


def run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]:
  if jax.default_backend() != "gpu":
    raise SystemExit("attention_gpu needs a GPU (see benchmarks/gpu_check.sh)")
  budget = _Budget(float(os.environ.get("EFFJAX_BENCH_BUDGET_S", 420)))
  repeats = 3 if quick else 10
  peak = peak_tflops(repeats)
  rows = measure((1024,) if quick else (2048, 4096, 8192, 16384), (64, 128), repeats, budget)
  sweep_rows = sweep(2048 if quick else 8192, (64, 128), repeats, budget)
  for row in rows + sweep_rows:
    row["percent_of_peak"] = None if row["tflops"] is None else 100 * row["tflops"] / peak
  formatters = {"median_ms": lambda v: "-" if v is None else f"{v:.3f}",
                "tflops": lambda v: "-" if v is None else f"{v:.0f}",
                "percent_of_peak": lambda v: "-" if v is None else f"{v:.0f}%",
                "temp_bytes": benchmarking.format_bytes,
                "max_diff_vs_cudnn": lambda v: "-" if v is None else f"{v:.3g}",
                "error": lambda v: v or ""}
  columns = ["implementation", "head_dim", "causal", "pass", "seq_len", "median_ms", "tflops",
             "percent_of_peak", "temp_bytes", "max_diff_vs_cudnn", "error"]
  notes = (f"B={BATCH}, H={HEADS}, bf16. Measured bf16 matmul peak: {peak:.0f} TFLOP/s "
           "(8192^3 jnp.dot). FLOPs: forward 4*B*H*S^2*D (/2 causal), forward+backward 3.5x. "
           "Median of repeats after warm-up.")
  summary = _summary(rows)
  paths = list(benchmarking.write_results(
      "attention_gpu", rows + sweep_rows, title="Attention on GPU: TFLOP/s vs cuDNN and jax Pallas",
      columns=columns, directory=out_dir, notes=notes, formatters=formatters,
      extra_markdown=summary))
  series = {}
  for row in rows:
    if row["head_dim"] == 128 and row["causal"] and row["tflops"] is not None:
      xs, ys = series.setdefault(f"{row['implementation']} {row['pass']}", ([], []))
      xs.append(row["seq_len"])
      ys.append(row["tflops"])
  if series:
    paths.append(benchmarking.plot_lines(
        out_dir / "attention_gpu.png", series, title="Causal attention, D=128, bf16 (TFLOP/s)",
        xlabel="sequence length S", ylabel="TFLOP/s", logy=False))
  return paths


def _summary(rows: list[dict]) -> str:
  """effjax's TFLOP/s as a ratio to cuDNN for each measured configuration."""
  key = lambda r: (r["seq_len"], r["head_dim"], r["causal"], r["pass"])
  cudnn = {key(r): r["tflops"] for r in rows if r["implementation"] == "cuDNN" and r["tflops"]}
  lines = []
  for name in ("effjax pallas_gpu", "effjax mosaic_gpu"):
    ratios = [f"- S={k[0]} D={k[1]} causal={k[2]} {k[3]}: {r['tflops'] / cudnn[k]:.2f}x"
              for r in rows
              if r["implementation"] == name and r["tflops"] and (k := key(r)) in cudnn]
    if ratios:
      lines += [f"{name} TFLOP/s / cuDNN TFLOP/s:", "", *ratios, ""]
  return "\n".join(lines)
