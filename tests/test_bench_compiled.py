"""The ``compiled_memory`` suite: memory of each op compiled for TPU v5e and H100 on this host."""

from __future__ import annotations

import json

import pytest

from experiments import bench, bench_compiled
from pallas_kernels import aot


def _broken_device():
  raise RuntimeError("no such device here\nsecond line")


def test_a_target_without_a_device_gives_error_rows(monkeypatch):
  monkeypatch.setitem(bench_compiled.TARGETS, "broken", ("gpu", _broken_device))
  cases = list(bench_compiled.long_conv_cases("broken", (256,), ("xla_fft",)))
  rows, skipped = bench_compiled.measure(cases)
  assert skipped == [] and [row["pass"] for row in rows] == ["forward", "forward+backward"]
  for row in rows:
    assert not row["compiled"] and row["temp_bytes"] is None
    assert row["error"] == "RuntimeError: no such device here"


def test_budget_skips_groups_not_started():
  cases = list(bench_compiled.long_conv_cases("h100", (256, 512), ("xla_fft",)))
  rows, skipped = bench_compiled.measure(cases, budget_s=0.0)
  assert rows == [] and skipped == ["long_conv h100 S=256", "long_conv h100 S=512"]


def test_an_implementation_for_another_platform_is_an_error_row_naming_its_reason():
  if not (aot.cuda_plugin_available() and aot.ptxas_available()):
    pytest.skip("jax's CUDA plugin or ptxas is not installed")
  cases = list(bench_compiled.long_conv_cases("h100", (256,), ("pallas_tpu",)))
  rows, _ = bench_compiled.measure(cases)
  assert len(rows) == 2 and not any(row["compiled"] for row in rows)
  assert all(row["error"].startswith("pallas_tpu: Pallas TPU kernel needs a TPU") for row in rows)


def test_summary_share_of_naive_and_growth():
  def row(implementation, seq_len, temp):
    return {"op": "attention", "target": "h100", "implementation": implementation,
            "causal": True, "seq_len": seq_len, "pass": "forward+backward", "compiled": True,
            "temp_bytes": temp}
  rows = [row("pallas_gpu", 1024, 2**20), row("pallas_gpu", 2048, 2**21),
          row("pallas_gpu", 4096, 2**22), row(bench_compiled.JAX_NN, 1024, 2**24),
          row(bench_compiled.JAX_NN, 2048, 2**26),
          {**row("xla", 1024, None), "compiled": False}]
  summary = bench_compiled._summary(rows)
  assert "| pallas_gpu | 1.00 MiB | 2.00 MiB | 4.00 MiB |" in summary
  assert "| jax.nn xla | 16.00 MiB | 64.00 MiB | - |" in summary and "| xla |" not in summary
  assert ("- `pallas_gpu`: 3.12% of `jax.nn xla` at S=2048; S=2048 -> 4096 multiplies temp by "
          "2.00x.") in summary
  assert "- `jax.nn xla`: S=1024 -> 2048 multiplies temp by 4.00x." in summary


@pytest.mark.slow
def test_quick_suite(tmp_path):
  """About 80 s: attention at S=1k causal on both targets, the GPU long-conv kernel at N=1k."""
  if not (aot.libtpu_available() and aot.cuda_plugin_available() and aot.ptxas_available()):
    pytest.skip("libtpu, jax's CUDA plugin or ptxas is not installed")
  assert bench.main(["compiled_memory", "--quick", "--out", str(tmp_path)]) == 0
  assert {p.name for p in tmp_path.iterdir()} == {
      "compiled_memory.json", "compiled_memory.md", "compiled_memory.png"}
  rows = json.loads((tmp_path / "compiled_memory.json").read_text())["rows"]
  assert all(row["compiled"] and row["error"] is None for row in rows), rows
  implementations = {(row["op"], row["target"], row["implementation"]) for row in rows}
  assert implementations == {
      *(("attention", "v5e", name) for name in ("pallas_tpu", "xla", "reference", "jax.nn xla")),
      *(("attention", "h100", name)
        for name in ("pallas_gpu", "mosaic_gpu", "xla", "reference", "jax.nn xla")),
      ("long_conv", "h100", "pallas_gpu")}
  temp = {(row["target"], row["implementation"]): row["temp_bytes"] for row in rows
          if row["op"] == "attention" and row["pass"] == "forward+backward"}
  # The H100 kernels never hold the 8 x 1k x 1k logits (32 MiB in float32); XLA's naive does.
  assert temp["h100", "pallas_gpu"] < 8 * 2**20
  assert temp["h100", "jax.nn xla"] >= 32 * 2**20
  markdown = (tmp_path / "compiled_memory.md").read_text()
  for heading in ("## attention, v5e", "## attention, h100", "## long_conv, h100"):
    assert heading in markdown
