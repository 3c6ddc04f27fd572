"""Honest measurements: compiled memory, median wall time against a baseline, committed tables.

* Memory comes from the compiled executable's ``memory_analysis()``: argument, output and temp
  (scratch) bytes per device. It needs only a compile, so arguments may be
  ``jax.ShapeDtypeStruct``: a 64k-token attention costs nothing to measure. On CPU it is
  deterministic; for a sharded program it is per device.
* Time is the median of ``repeats`` calls after ``warmup`` calls, with ``block_until_ready``; report
  it as a ratio to a baseline measured in the same run (absolute CPU times mean little).
* :func:`write_results` writes ``benchmarks/<name>.json`` and ``benchmarks/<name>.md``; the markdown
  header is the exact command and the machine (CPU model, cores, jax version, backend).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class MemoryStats:
  """Bytes per device of one compiled program (from ``Compiled.memory_analysis()``)."""
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  generated_code_bytes: int

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs + scratch, counting donated (aliased) buffers once."""
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def compiled_memory(fn: Callable[..., Any], *args: Any, **jit_kwargs: Any) -> MemoryStats:
  """Compiles ``jax.jit(fn, **jit_kwargs)`` for ``args`` (arrays or ShapeDtypeStructs), no run."""
  return memory_of(jax.jit(fn, **jit_kwargs).lower(*args).compile())


def memory_of(compiled: Any) -> MemoryStats:
  """Per-device bytes of a compiled executable (``jitted.lower(...).compile()``)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    raise NotImplementedError(f"backend {jax.default_backend()!r} gives no memory_analysis()")
  return MemoryStats(
      argument_bytes=int(analysis.argument_size_in_bytes),
      output_bytes=int(analysis.output_size_in_bytes),
      temp_bytes=int(analysis.temp_size_in_bytes),
      alias_bytes=int(analysis.alias_size_in_bytes),
      generated_code_bytes=int(analysis.generated_code_size_in_bytes),
  )


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall-clock seconds of ``repeats`` calls (after warm-up)."""
  median_s: float
  min_s: float
  max_s: float
  repeats: int


def time_call(fn: Callable[..., Any], *args: Any, warmup: int = 2, repeats: int = 7) -> Timing:
  """Times ``fn(*args)`` (jit it first); each call is synchronized with ``block_until_ready``."""
  if repeats < 1 or warmup < 0:
    raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - start)
  return Timing(statistics.median(samples), min(samples), max(samples), repeats)


def interleaved_medians(calls: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Median seconds of each no-argument call, the calls alternating within every repeat (so a
  slow phase of the machine hits them all alike). Warm them up (compile) first."""
  if repeats < 1:
    raise ValueError(f"repeats is {repeats!r}; expected >= 1")
  samples: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      samples[name].append(time_call(call, warmup=0, repeats=1).median_s)
  return {name: statistics.median(values) for name, values in samples.items()}


def random_inputs(specs: Sequence[jax.ShapeDtypeStruct], seed: int = 0) -> list[jax.Array]:
  """Standard-normal arrays (or random ints) for ``specs``, to time what was measured for memory."""
  keys = jax.random.split(jax.random.key(seed), len(specs))
  arrays = []
  for key, spec in zip(keys, specs):
    if np.issubdtype(spec.dtype, np.integer):
      arrays.append(jax.random.randint(key, spec.shape, 0, 4, spec.dtype))
    else:
      arrays.append(jax.random.normal(key, spec.shape, spec.dtype))
  return arrays


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
  """What the figures were measured on."""
  devices = jax.devices()
  return {
      "cpu": cpu_model(),
      "cores": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
      "backend": jax.default_backend(),
      "devices": f"{len(devices)} x {devices[0].device_kind}",
      "date": datetime.date.today().isoformat(),
  }


def invocation() -> str:
  """The command line that started this process, as a user would type it."""
  program = pathlib.Path(sys.argv[0]).name
  if program in ("__main__.py", "-m") or program.endswith(".py"):
    module = (sys.modules["__main__"].__spec__ or None)
    program = f"python -m {module.name}" if module is not None else f"python {sys.argv[0]}"
  return " ".join([program, *map(shlex.quote, sys.argv[1:])])


def format_bytes(n: float | None) -> str:
  if n is None:
    return "-"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                   formatters: Mapping[str, Callable[[Any], str]] | None = None) -> str:
  """A GitHub markdown table of ``rows`` restricted to ``columns``."""
  formatters = formatters or {}

  def cell(row, column):
    value = row.get(column)
    if value is None:
      return "-"
    if column in formatters:
      return formatters[column](value)
    if isinstance(value, float):
      return f"{value:.3g}"
    return str(value)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def write_results(name: str, rows: Sequence[Mapping[str, Any]], *, title: str,
                  columns: Sequence[str], directory: str | os.PathLike = "benchmarks",
                  command: str | None = None, notes: str = "",
                  formatters: Mapping[str, Callable[[Any], str]] | None = None,
                  extra_markdown: str = "",
                  group_by: Sequence[str] = (),
                  markdown_rows: Sequence[Mapping[str, Any]] | None = None
                  ) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes ``<directory>/<name>.json`` and ``<directory>/<name>.md``; returns both paths.

  The JSON holds every row; the markdown table shows ``markdown_rows`` (default: ``rows``), e.g.
  one part of a suite whose other parts go in ``extra_markdown``.

  ``group_by`` (column names) splits the markdown into one table per distinct value of those
  columns, in order of first appearance, each under a heading naming the values.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  command = invocation() if command is None else command
  machine = machine_info()
  json_path = directory / f"{name}.json"
  json_path.write_text(json.dumps(
      {"name": name, "title": title, "command": command, "machine": machine, "notes": notes,
       "rows": list(rows)}, indent=1, default=_json_default) + "\n")
  machine_line = ", ".join(f"{key}: {value}" for key, value in machine.items())
  groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
  shown_rows = rows if markdown_rows is None else markdown_rows
  for row in shown_rows:
    groups.setdefault(tuple(row.get(column) for column in group_by), []).append(row)
  shown = [column for column in columns if column not in group_by]
  tables = "\n\n".join(
      (f"## {', '.join(map(str, key))}\n\n" if group_by else "")
      + markdown_table(group, shown, formatters) for key, group in groups.items()
  ) or markdown_table(shown_rows, shown, formatters)
  markdown = (f"# {title}\n\nCommand: `{command}`\n\nMachine: {machine_line}\n\n"
              f"{notes.strip()}\n\n{tables}\n")
  if extra_markdown:
    markdown += f"\n{extra_markdown.strip()}\n"
  md_path = directory / f"{name}.md"
  md_path.write_text(markdown)
  return json_path, md_path


def plot_lines(path: str | os.PathLike,
               series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
               xlabel: str, ylabel: str, logx: bool = True,
               logy: bool = True) -> pathlib.Path:
  """Writes a PNG line plot, e.g. memory vs sequence length on log-log axes.

  Args:
    series: label -> (x values, y values); points with a None/non-positive y are dropped on log
      axes.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
  for label, (xs, ys) in series.items():
    points = [(x, y) for x, y in zip(xs, ys) if y is not None and (not logy or y > 0)]
    axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
  if logx:
    axes.set_xscale("log", base=2)
  if logy:
    axes.set_yscale("log", base=2)
  axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
  axes.grid(True, which="both", alpha=0.3)
  axes.legend()
  figure.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path)
  plt.close(figure)
  return path


def _json_default(value: Any) -> Any:
  if dataclasses.is_dataclass(value):
    return dataclasses.asdict(value)
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  raise TypeError(f"cannot serialize {type(value).__name__}")
