"""Long convolution time and memory versus sequence length: effjax ``long_conv`` against the
plain ``jnp.fft`` convolution and the direct convolution.

Implementations, causal mode, kernel length N: ``plain jnp.fft`` (the baseline; safari's
``irfft(rfft(u, 2N) * rfft(k, 2N))[:N]`` with an autodiff backward), effjax ``xla_fft`` and
``butterfly`` (Monarch DFT), on GPU the fused Pallas kernel ``pallas_gpu`` (one pass up to
N = 2048, FlashButterfly's three passes above, up to ``PALLAS_MAX_SEQ``), on TPU the fused
Pallas kernel ``pallas_tpu`` (every N; on other backends its rows say it was not run),
and on CPU the direct depthwise convolution (effjax's float32 ``reference``, O(N^2) per channel;
timed only up to ``DIRECT_TIMED_UP_TO``).

* CPU: float32, B=2, H=32, N = 1k..64k. Temp bytes per device from the compiled program's
  ``memory_analysis()`` at every N; time as the median of repeats, as a ratio to the baseline in
  the same run.
* GPU or TPU (detected from the backend): bfloat16 inputs (float32 kernel and transforms), H=768,
  B*N = 2^17 tokens (B=128 at 1K, 2 at 64K), N = 1K..64K; absolute median ms and the ratio to the
  baseline. A time budget (no new size after ``GPU_BUDGET_S``) keeps the suite under 2 minutes.
  On GPU, at N = ``GATED_SEQ`` only, H3-style gated rows ``u * conv(u * u)`` (both gates, here
  the input itself, loaded once per gate as separate arrays would be): ``plain jnp.fft, gated``
  (their baseline), ``xla_fft`` and ``pallas_gpu`` (gates in the kernel's loads and stores).

Every timed row also records the relative error of its outputs (gradients for
forward+backward) against the baseline run in float32, so a fast but wrong configuration shows.
"""

from __future__ import annotations

import functools
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from effjax import benchmarking, dispatch
from effjax.ops.long_conv import long_conv
from effjax.ops.long_conv.reference import fft_conv
from pallas_kernels.long_conv import pallas_gpu

BASELINE = "plain jnp.fft"
DIRECT = "direct (reference f32)"
DIRECT_TIMED_UP_TO = 2048
PALLAS_MAX_SEQ = pallas_gpu.largest_size() // 2  # the fused GPU kernel's largest causal length
GPU_TOKENS, GPU_CHANNELS = 1 << 17, 768  # also the TPU setup
TPU_KERNEL = "effjax pallas_tpu"
CPU_BATCH, CPU_CHANNELS = 2, 32
# Sizes in the order measured: 1K, 64K and 16K first (pallas_gpu one- and three-pass), in case
# the time budget runs out.
SEQ_LENS = tuple(1024 << i for i in (0, 6, 4, 2, 1, 3, 5))
GATED = ", gated"  # suffix of the H3-style gated rows (GPU, N = GATED_SEQ)
GATED_SEQ = 1024
GPU_BUDGET_S = 70.0  # no new size is started after this long (the GPU check allows 2 minutes)


def implementations(platform: str, seq_len: int) -> dict[str, Callable[..., jax.Array]]:
  """Name -> ``conv(u, kernel)``, the baseline first (``pallas_tpu`` on every backend: off a TPU
  :func:`measure` records it as not run)."""
  names = ["xla_fft", "butterfly"]
  if platform == "gpu" and seq_len <= PALLAS_MAX_SEQ:
    names.append("pallas_gpu")
  names.append("pallas_tpu")
  impls = {BASELINE: functools.partial(fft_conv, mode="causal")}
  for name in names:
    impls[f"effjax {name}"] = functools.partial(long_conv, mode="causal", implementation=name)
  if platform == "cpu":
    impls[DIRECT] = functools.partial(long_conv, mode="causal", implementation="reference")
  if platform == "gpu" and seq_len == GATED_SEQ:
    gated = {BASELINE: fft_conv, "effjax xla_fft": functools.partial(long_conv,
                                                                    implementation="xla_fft"),
             "effjax pallas_gpu": functools.partial(long_conv, implementation="pallas_gpu")}
    for name, conv in gated.items():
      impls[name + GATED] = functools.partial(_gated, conv)
  return impls


def _gated(conv, u, kernel):
  """H3's ``q * conv(k * v)`` with ``q = k = v = u``."""
  return conv(u, kernel, mode="causal", pre_gate=u, post_gate=u)


def _forward_backward(conv):
  def loss(u, kernel):
    return jnp.sum(conv(u, kernel).astype(jnp.float32) ** 2)
  return jax.grad(loss, argnums=(0, 1))


def _relative_error(actual, expected) -> float:
  """max |actual - expected| / max |expected|, the worst over the leaves (y, or du and dk)."""
  return max(float(jnp.abs(a.astype(jnp.float32) - e).max() / jnp.abs(e).max())
             for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)))


def measure(seq_lens, *, batch_for: Callable[[int], int], channels: int, dtype, repeats: int,
            platform: str, budget_s: float | None = None) -> list[dict]:
  """One row per (N, implementation, pass); each program is compiled once, then timed."""
  rows, start = [], time.perf_counter()
  for seq_len in seq_lens:
    impls = implementations(platform, seq_len)
    if budget_s is not None and time.perf_counter() - start > budget_s:
      print(f"time budget of {budget_s:.0f} s spent: N >= {seq_len} not measured")
      break
    batch = batch_for(seq_len)
    specs = (jax.ShapeDtypeStruct((batch, seq_len, channels), dtype),
             jax.ShapeDtypeStruct((channels, seq_len), jnp.float32))
    u, kernel = benchmarking.random_inputs(specs)
    kernel = kernel * jnp.exp(-jnp.arange(seq_len, dtype=jnp.float32) / (seq_len / 8)) / 8
    baseline_times = {}
    for pass_name, wrap in (("forward", lambda f: f), ("forward+backward", _forward_backward)):
      expected = {baseline: jax.jit(wrap(impls[baseline]))(u.astype(jnp.float32), kernel)
                  for baseline in (BASELINE, BASELINE + GATED) if baseline in impls}
      for name, conv in impls.items():
        baseline = BASELINE + GATED if name.endswith(GATED) else BASELINE
        row = {"implementation": name, "seq_len": seq_len, "batch": batch, "pass": pass_name,
               "temp_bytes": None, "median_ms": None, "time_vs_baseline": None,
               "relative_error": None, "error": None}
        if name == TPU_KERNEL and platform != "tpu":
          row["error"] = f"not run: needs a TPU (backend is {platform})"
          rows.append(row)
          continue
        try:
          compiled = jax.jit(wrap(conv)).lower(*specs).compile()
          memory = compiled.memory_analysis()
          row["temp_bytes"] = None if memory is None else int(memory.temp_size_in_bytes)
          if name != DIRECT or seq_len <= DIRECT_TIMED_UP_TO:
            timing = benchmarking.time_call(compiled, u, kernel, repeats=repeats)
            # Each baseline runs before the rows compared with it.
            baseline_times.setdefault((pass_name, baseline), timing.median_s)
            row.update(median_ms=timing.median_s * 1e3,
                       time_vs_baseline=timing.median_s / baseline_times[pass_name, baseline],
                       relative_error=_relative_error(compiled(u, kernel), expected[baseline]))
        except Exception as error:  # pylint: disable=broad-except
          if name in (BASELINE, BASELINE + GATED):
            raise
          # One failing implementation (e.g. a kernel on a new GPU) must not lose the others' rows.
          row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
          print(f"{name} {pass_name} N={seq_len} failed: {row['error']}")
        rows.append(row)
      del expected
  return sorted(rows, key=lambda row: row["seq_len"])


def run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]:
  platform = dispatch.current_platform()
  if platform in ("gpu", "tpu"):
    seq_lens = (1024, 4096) if quick else SEQ_LENS
    setup = dict(batch_for=lambda n: max(1, GPU_TOKENS // n), channels=GPU_CHANNELS,
                 dtype=jnp.bfloat16, repeats=3 if quick else 10, budget_s=GPU_BUDGET_S)
    notes = (f"{platform.upper()}, bfloat16 u (float32 kernel and transforms), H={GPU_CHANNELS}, "
             f"B*N={GPU_TOKENS} tokens, causal, kernel length N.")
  else:
    seq_lens = (256, 1024) if quick else SEQ_LENS
    setup = dict(batch_for=lambda n: CPU_BATCH, channels=CPU_CHANNELS, dtype=jnp.float32,
                 repeats=2 if quick else 5)
    notes = (f"CPU, float32, B={CPU_BATCH}, H={CPU_CHANNELS}, causal, kernel length N; the direct "
             f"convolution is timed up to N={DIRECT_TIMED_UP_TO} only.")
  rows = measure(seq_lens, platform=platform, **setup)
  notes += (" temp = scratch bytes per device from `memory_analysis()` of the compiled program; "
            f"time = median of repeats and its ratio to `{BASELINE}` in the same run "
            "(< 1 is faster; gated rows against the gated baseline); relative_error = max abs "
            "difference of the outputs (forward) or of du, dk (forward+backward) from their "
            "baseline run in float32, over their max abs.")
  formatters = {"temp_bytes": benchmarking.format_bytes,
                "median_ms": lambda v: "-" if v is None else f"{v:.2f}",
                "time_vs_baseline": lambda v: "-" if v is None else f"{v:.2f}x",
                "relative_error": lambda v: "-" if v is None else f"{v:.1e}"}
  paths = list(benchmarking.write_results(
      "long_conv", rows, title="Long convolution: time and memory vs sequence length",
      columns=["implementation", "pass", "seq_len", "batch", "temp_bytes", "median_ms",
               "time_vs_baseline", "relative_error", "error"],
      directory=out_dir, notes=notes, formatters=formatters, extra_markdown=_summary(rows)))
  for key, label, filename in (("median_ms", "median ms", "long_conv.png"),
                               ("temp_bytes", "temp bytes", "long_conv_memory.png")):
    series = {}
    for row in rows:
      if row["pass"] == "forward+backward":
        xs, ys = series.setdefault(row["implementation"], ([], []))
        xs.append(row["seq_len"])
        ys.append(row[key])
    paths.append(benchmarking.plot_lines(
        out_dir / filename, series, title=f"Causal long conv, forward+backward: {label}",
        xlabel="sequence length N", ylabel=label))
  return paths


def _summary(rows: list[dict]) -> str:
  """Time ratio to the baseline at each N, one line per (implementation, pass)."""
  lines = ["Time vs plain jnp.fft (median; < 1 is faster):", ""]
  seq_lens = sorted({row["seq_len"] for row in rows})
  lines.append("| implementation | pass | " + " | ".join(f"N={n}" for n in seq_lens) + " |")
  lines.append("|---|---|" + "---|" * len(seq_lens))
  ratios: dict[tuple[str, str], dict[int, float | None]] = {}
  for row in rows:
    ratios.setdefault((row["implementation"], row["pass"]), {})[row["seq_len"]] = (
        row["time_vs_baseline"])
  for (name, pass_name), by_len in ratios.items():
    if name == BASELINE:
      continue
    cells = [("-" if by_len.get(n) is None else f"{by_len[n]:.2f}x") for n in seq_lens]
    lines.append(f"| {name} | {pass_name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
