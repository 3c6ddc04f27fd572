"""Each op's memory on the real targets (TPU v5e, NVIDIA H100), compiled on this CPU host.

Every implementation that serves a target is compiled for a compile-only device of that target
(:mod:`pallas_kernels.aot`: libtpu's Mosaic TPU and XLA TPU compilers; jax's CUDA plugin with
Triton, Mosaic GPU and ptxas) with the real kernels, and ``memory_analysis()`` of the device
program gives its argument, output and temp (scratch) bytes on that chip; nothing runs. A
program that does not compile is a row with its error's first line, never a crash.

* attention (``effjax.flash_attention``): B=1, H=8, D=128, bfloat16, causal and not, S = 1k..32k;
  the naive rows (effjax's float32 ``reference`` and ``jax.nn.dot_product_attention`` on XLA,
  both materializing the ``[B, H, S, S]`` logits) up to ``NAIVE_UP_TO``.
* long conv (``effjax.long_conv``): B=1, H=768 channels, bfloat16 u, float32 kernel of length N,
  causal, N = 1k..64k.

Forward and forward+backward (the gradient of the float32 sum of squares with respect to every
input). ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK`` and ``ALLOW_MULTIPLE_LIBTPU_LOAD`` are set here in case
this module is imported before jax starts (as ``effjax-bench`` does); see :mod:`pallas_kernels.aot`.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses  # noqa: E402
import functools  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from effjax import benchmarking, dispatch  # noqa: E402
from effjax.ops.attention import flash_attention  # noqa: E402
from effjax.ops.long_conv import long_conv  # noqa: E402
from experiments import bench_attention, bench_long_conv  # noqa: E402
from pallas_kernels import aot  # noqa: E402

# Target name -> (platform, compile-only device factory).
TARGETS: dict[str, tuple[str, Callable[[], jax.Device]]] = {
    "v5e": ("tpu", functools.partial(aot.tpu_device, "v5e")),
    "h100": ("gpu", functools.partial(aot.gpu_device, "h100")),
}
JAX_NN = "jax.nn xla"  # jax.nn.dot_product_attention(implementation="xla")
NAIVE = ("reference", JAX_NN)
# Platform -> implementations compiled, the fused kernels first.
ATTENTION_IMPLEMENTATIONS = {"tpu": ("pallas_tpu", "xla", "reference", JAX_NN),
                             "gpu": ("pallas_gpu", "mosaic_gpu", "xla", "reference", JAX_NN)}
LONG_CONV_IMPLEMENTATIONS = {"tpu": ("pallas_tpu", "butterfly", "xla_fft"),
                             "gpu": ("pallas_gpu", "butterfly", "xla_fft")}
ATTENTION_SEQ_LENS = tuple(1024 << i for i in range(6))  # 1k .. 32k
NAIVE_UP_TO = 16384
# 1k, 64k and 16k first: the time budget drops 4k first.
LONG_CONV_SEQ_LENS = (1024, 65536, 16384, 4096)
LONG_CONV_CHANNELS = bench_long_conv.GPU_CHANNELS
BUDGET_S = 30 * 60.0  # no new (op, target, size) is started after this long in the full run
PASSES = ("forward", "forward+backward")


@dataclasses.dataclass(frozen=True)
class Case:
  """One (op, target, implementation, mode, size) to compile, forward and forward+backward."""
  op: str
  target: str
  implementation: str
  causal: bool
  seq_len: int
  forward: Callable[..., Any]
  forward_backward: Callable[..., Any]
  args: tuple[jax.ShapeDtypeStruct, ...]


def attention_cases(target: str, seq_lens: Sequence[int],
                    causals: Sequence[bool]) -> Iterator[Case]:
  """Attention with q, k, v ``[1, S, 8, 128]`` bfloat16 (naive rows up to ``NAIVE_UP_TO``)."""
  platform = TARGETS[target][0]
  for causal in causals:
    for seq_len in seq_lens:
      spec = jax.ShapeDtypeStruct((bench_attention.BATCH, seq_len, bench_attention.HEADS,
                                   bench_attention.HEAD_DIM), jnp.bfloat16)
      for name in ATTENTION_IMPLEMENTATIONS[platform]:
        if name in NAIVE and seq_len > NAIVE_UP_TO:
          continue
        forward = (functools.partial(bench_attention._jax_xla, causal=causal) if name == JAX_NN
                   else functools.partial(flash_attention, causal=causal, implementation=name))
        yield Case("attention", target, name, causal, seq_len, forward,
                   bench_attention._forward_backward(forward), (spec,) * 3)


def long_conv_cases(target: str, seq_lens: Sequence[int],
                    implementations: Sequence[str] | None = None) -> Iterator[Case]:
  """Causal long conv, u ``[1, N, 768]`` bfloat16, kernel ``[768, N]`` float32."""
  platform = TARGETS[target][0]
  for seq_len in seq_lens:
    args = (jax.ShapeDtypeStruct((1, seq_len, LONG_CONV_CHANNELS), jnp.bfloat16),
            jax.ShapeDtypeStruct((LONG_CONV_CHANNELS, seq_len), jnp.float32))
    for name in implementations or LONG_CONV_IMPLEMENTATIONS[platform]:
      forward = functools.partial(long_conv, mode="causal", implementation=name)
      yield Case("long_conv", target, name, True, seq_len, forward,
                 bench_long_conv._forward_backward(forward), args)


def _error_line(error: Exception) -> str:
  """The error's first line (for dispatch's error, each implementation's first reason line)."""
  if isinstance(error, dispatch.NoImplementationError):
    text = "; ".join(f"{name}: {reason.strip().splitlines()[0]}"
                     for name, reason in error.reasons.items())
  else:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return text[:200]


def measure(cases: Sequence[Case], budget_s: float | None = None) -> tuple[list[dict], list[str]]:
  """Compiles every case for its target; returns the rows and the groups the budget skipped.

  A group is ``(op, target, seq_len)``: once ``budget_s`` seconds have passed no new group is
  started (its cases are listed, not compiled).
  """
  rows, skipped, devices, started = [], [], {}, set()
  start = time.perf_counter()
  for case in cases:
    group = (case.op, case.target, case.seq_len)
    if group not in started:
      if budget_s is not None and time.perf_counter() - start > budget_s:
        if f"{case.op} {case.target} S={case.seq_len}" not in skipped:
          skipped.append(f"{case.op} {case.target} S={case.seq_len}")
        continue
      started.add(group)
    if case.target not in devices:
      try:
        devices[case.target] = TARGETS[case.target][1]()
      except Exception as error:  # pylint: disable=broad-except  (rows, not a crash)
        devices[case.target] = error
    device = devices[case.target]
    for pass_name, fn in zip(PASSES, (case.forward, case.forward_backward)):
      row = {"op": case.op, "target": case.target, "implementation": case.implementation,
             "causal": case.causal, "seq_len": case.seq_len, "pass": pass_name,
             "compiled": False, "argument_bytes": None, "output_bytes": None,
             "temp_bytes": None, "compile_s": None, "error": None}
      tic = time.perf_counter()
      try:
        if isinstance(device, Exception):
          raise device
        memory = benchmarking.memory_of(aot.compile_for(device, fn, *case.args))
        row.update(compiled=True, argument_bytes=memory.argument_bytes,
                   output_bytes=memory.output_bytes, temp_bytes=memory.temp_bytes)
      except Exception as error:  # pylint: disable=broad-except  (a row, not a crash)
        row["error"] = _error_line(error)
        print(f"{case.op} {case.target} {case.implementation} S={case.seq_len} {pass_name}: "
              f"{row['error']}")
      row["compile_s"] = round(time.perf_counter() - tic, 1)
      rows.append(row)
  order = {name: i for i, name in enumerate(TARGETS)}
  rows.sort(key=lambda r: (r["op"], order[r["target"]], not r["causal"], r["pass"],
                           _implementation_rank(r), r["seq_len"]))
  return rows, skipped


def _implementation_rank(row: dict) -> int:
  """Position of the row's implementation in its op's list for its target (others last)."""
  table = ATTENTION_IMPLEMENTATIONS if row["op"] == "attention" else LONG_CONV_IMPLEMENTATIONS
  names = table[TARGETS[row["target"]][0]]
  return names.index(row["implementation"]) if row["implementation"] in names else len(names)


def run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]:
  if quick:  # attention: one size, causal, both targets; long conv: the GPU kernel (a TPU
    # long-conv compile takes about a minute here)
    cases = [case for target in TARGETS for case in attention_cases(target, (1024,), (True,))]
    cases += long_conv_cases("h100", (1024,), ("pallas_gpu",))
  else:
    # The GPU first: its compiles are fast, so the budget cuts the slow TPU long convs.
    targets = sorted(TARGETS, key=lambda target: TARGETS[target][0] != "gpu")
    cases = [case for target in targets
             for case in attention_cases(target, ATTENTION_SEQ_LENS, (True, False))]
    cases += [case for target in targets for case in long_conv_cases(target, LONG_CONV_SEQ_LENS)]
  rows, skipped = measure(cases, budget_s=None if quick else BUDGET_S)
  notes = (
      "Compiled on this CPU host for compile-only devices (`pallas_kernels.aot`): TPU v5e "
      "(libtpu) and NVIDIA H100 (jax's CUDA plugin, Triton / Mosaic GPU, ptxas); nothing ran. "
      "Bytes per device from `memory_analysis()` of the device program (TPU: HBM; a 0 B temp "
      "means the compiler reported no HBM scratch). Attention: B=1, H=8, D=128, bfloat16; "
      f"naive = effjax `reference` (float32) and `{JAX_NN}` "
      "(`jax.nn.dot_product_attention(implementation='xla')`), which materialize the S x S "
      f"logits, compiled up to S={NAIVE_UP_TO} only. cuDNN attention cannot compile here (no "
      "cuDNN library on this host), so it has no rows. Long conv: B=1, H=768, bfloat16 u, "
      "float32 kernel of length N, causal. forward+backward = gradient of the float32 sum of "
      "squares w.r.t. every input. compile_s = wall seconds of the compile on this shared "
      "2-core host.")
  if skipped:
    notes += f" Not compiled (time budget of {BUDGET_S / 60:.0f} min): {', '.join(skipped)}."
  formatters = {key: benchmarking.format_bytes
                for key in ("argument_bytes", "output_bytes", "temp_bytes")}
  formatters["error"] = lambda v: "" if v is None else v.replace("|", "/")
  paths = list(benchmarking.write_results(
      "compiled_memory", rows, title="Compiled memory on TPU v5e and H100 (compiled on CPU)",
      columns=["op", "target", "implementation", "causal", "pass", "seq_len", "compiled",
               "argument_bytes", "output_bytes", "temp_bytes", "compile_s", "error"],
      directory=out_dir, notes=notes, formatters=formatters, group_by=("op", "target"),
      extra_markdown=_summary(rows)))
  series = {}
  for row in rows:
    if row["op"] == "attention" and row["causal"] and row["pass"] == "forward+backward":
      xs, ys = series.setdefault(f"{row['target']} {row['implementation']}", ([], []))
      xs.append(row["seq_len"])
      ys.append(row["temp_bytes"])
  paths.append(benchmarking.plot_lines(
      out_dir / "compiled_memory.png", series,
      title="Causal attention fwd+bwd, compiled for v5e / H100: temp bytes",
      xlabel="sequence length S", ylabel="temp bytes per device"))
  return paths


def _temps(rows: list[dict], op: str, target: str, causal: bool) -> dict[str, dict[int, int]]:
  """Implementation -> S -> forward+backward temp bytes of the compiled rows."""
  temps: dict[str, dict[int, int]] = {}
  for row in rows:
    if (row["op"], row["target"], row["causal"], row["pass"]) == (
        op, target, causal, "forward+backward") and row["compiled"]:
      temps.setdefault(row["implementation"], {})[row["seq_len"]] = row["temp_bytes"]
  return temps


def _summary(rows: list[dict]) -> str:
  """Forward+backward temp per S (causal), each kernel's share of naive and growth with S."""
  lines = ["## Summary: forward+backward temp bytes"]
  for op, causals in (("attention", (True, False)), ("long_conv", (True,))):
    for target in TARGETS:
      for causal in causals:
        temps = _temps(rows, op, target, causal)
        seq_lens = sorted({n for by_len in temps.values() for n in by_len})
        if not seq_lens:
          continue
        lines += ["", f"{op}, {target}, causal={causal}:", "",
                  "| implementation | " + " | ".join(f"S={n}" for n in seq_lens) + " |",
                  "|---|" + "---|" * len(seq_lens)]
        lines += [f"| {name} | " + " | ".join(benchmarking.format_bytes(by_len.get(n))
                                              for n in seq_lens) + " |"
                  for name, by_len in temps.items()]
        headlines = _headlines(temps)
        lines += ["", *headlines] if headlines else []
  return "\n".join(lines)


def _headlines(temps: dict[str, dict[int, int]]) -> list[str]:
  """Each non-naive implementation's temp as a share of naive (jax.nn) at the largest size both
  have, and every implementation's growth between its two largest sizes."""
  lines = []
  naive = temps.get(JAX_NN, {})
  for name, by_len in temps.items():
    parts = []
    common = sorted(set(by_len) & set(naive))
    if name not in NAIVE and common and naive[common[-1]]:
      parts.append(f"{100 * by_len[common[-1]] / naive[common[-1]]:.2f}% of `{JAX_NN}` at "
                   f"S={common[-1]}")
    sizes = sorted(by_len)
    if len(sizes) >= 2 and by_len[sizes[-2]]:
      parts.append(f"S={sizes[-2]} -> {sizes[-1]} multiplies temp by "
                   f"{by_len[sizes[-1]] / by_len[sizes[-2]]:.2f}x")
    if parts:
      lines.append(f"- `{name}`: " + "; ".join(parts) + ".")
  return lines
