"""The bench harness: compiled memory, timing, result files with command + machine, plots."""

import json

import jax
import jax.numpy as jnp
import pytest

from effjax import benchmarking
from experiments import bench
from pallas_kernels import aot


def _naive_attention(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def test_compiled_memory_sees_the_quadratic_buffer_without_allocating():
  def temp(seq_len):
    spec = jax.ShapeDtypeStruct((1, seq_len, 8, 64), jnp.float32)
    return benchmarking.compiled_memory(_naive_attention, spec, spec, spec)

  small, large = temp(4096), temp(65536)  # the large logits alone are 128 GiB: never allocated
  assert large.temp_bytes >= 8 * 65536 * 65536 * 4
  assert 200 < large.temp_bytes / small.temp_bytes < 300  # 16x longer -> ~256x the logits
  assert large.argument_bytes == 3 * 65536 * 8 * 64 * 4
  assert large.output_bytes == 65536 * 8 * 64 * 4
  assert large.peak_bytes == large.argument_bytes + large.output_bytes + large.temp_bytes


def test_compiled_memory_counts_donation():
  spec = jax.ShapeDtypeStruct((1024,), jnp.float32)
  donated = benchmarking.compiled_memory(lambda x: x * 2, spec, donate_argnums=0)
  assert donated.alias_bytes == 4096
  assert donated.peak_bytes == 4096


def test_time_call():
  timing = benchmarking.time_call(jax.jit(lambda x: x @ x), jnp.ones((64, 64)), repeats=3)
  assert 0 < timing.min_s <= timing.median_s <= timing.max_s and timing.repeats == 3
  with pytest.raises(ValueError, match="repeats >= 1"):
    benchmarking.time_call(lambda: None, repeats=0)


def test_interleaved_medians_alternate_the_calls():
  order = []
  medians = benchmarking.interleaved_medians(
      {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3)
  assert order == ["a", "b"] * 3 and set(medians) == {"a", "b"}
  assert all(value >= 0 for value in medians.values())
  with pytest.raises(ValueError, match="repeats is 0"):
    benchmarking.interleaved_medians({"a": lambda: None}, repeats=0)


def test_write_results_has_command_machine_and_table(tmp_path):
  rows = [{"seq_len": 1024, "temp_bytes": 3 * 2**20, "ratio": 0.5},
          {"seq_len": 2048, "temp_bytes": None, "ratio": 1.25}]
  json_path, md_path = benchmarking.write_results(
      "demo", rows, title="Demo", columns=["seq_len", "temp_bytes", "ratio"], directory=tmp_path,
      command="effjax-bench demo", notes="Some notes.",
      formatters={"temp_bytes": benchmarking.format_bytes})
  record = json.loads(json_path.read_text())
  assert record["command"] == "effjax-bench demo" and record["rows"] == rows
  assert record["machine"]["backend"] == "cpu" and record["machine"]["jax"] == jax.__version__
  markdown = md_path.read_text()
  assert markdown.startswith("# Demo\n\nCommand: `effjax-bench demo`\n\nMachine: cpu: ")
  assert "| seq_len | temp_bytes | ratio |" in markdown
  assert "| 1024 | 3.00 MiB | 0.5 |" in markdown and "| 2048 | - | 1.25 |" in markdown


def test_write_results_group_by_writes_one_table_per_group(tmp_path):
  rows = [{"op": "a", "seq_len": 1}, {"op": "b", "seq_len": 2}, {"op": "a", "seq_len": 3}]
  _, md_path = benchmarking.write_results(
      "grouped", rows, title="G", columns=["op", "seq_len"], directory=tmp_path, command="c",
      group_by=("op",))
  markdown = md_path.read_text()
  assert "## a\n\n| seq_len |\n|---|\n| 1 |\n| 3 |\n\n## b\n\n| seq_len |\n|---|\n| 2 |\n" in (
      markdown)
  assert "| op |" not in markdown


def test_write_results_markdown_rows_shows_a_part_and_keeps_every_row_in_json(tmp_path):
  rows = [{"part": "a", "x": 1}, {"part": "b", "y": 2}]
  json_path, md_path = benchmarking.write_results(
      "parts", rows, title="P", columns=["x"], directory=tmp_path, command="c",
      markdown_rows=rows[:1], extra_markdown="| y |\n|---|\n| 2 |")
  assert json.loads(json_path.read_text())["rows"] == rows
  assert "| x |\n|---|\n| 1 |\n\n| y |" in md_path.read_text()


def test_plot_writes_png(tmp_path):
  path = benchmarking.plot_lines(tmp_path / "p.png", {"a": ([1, 2, 4], [1, 4, 16]),
                                                      "b": ([1, 2, 4], [1, None, 3])},
                                 title="t", xlabel="S", ylabel="bytes")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_effjax_bench_cli_quick(tmp_path, capsys):
  assert bench.main(["attention_memory", "--quick", "--out", str(tmp_path)]) == 0
  written = {p.name for p in tmp_path.iterdir()}
  assert written == {"attention_memory.json", "attention_memory.md", "attention_memory.png"}
  rows = json.loads((tmp_path / "attention_memory.json").read_text())["rows"]
  assert all(row["temp_bytes"] > 0 for row in rows)
  assert "wrote" in capsys.readouterr().out


def test_quickstart_suite_quick(tmp_path):
  pytest.importorskip("tokenizers")
  pytest.importorskip("gensim")
  assert bench.main(["quickstart", "--quick", "--out", str(tmp_path)]) == 0
  record = json.loads((tmp_path / "quickstart.json").read_text())
  assert [row["step"] for row in record["rows"]] == [2, 4]
  assert "Held-out perplexity" in (tmp_path / "quickstart.md").read_text()
  assert (tmp_path / "quickstart_loss.png").exists()


def test_remat_suite_quick(tmp_path):
  assert bench.main(["remat", "--quick", "--out", str(tmp_path)]) == 0
  rows = json.loads((tmp_path / "remat.json").read_text())["rows"]
  assert {row["remat"]: row["attention_forwards"] for row in rows} == {
      "none": 2, "full": 4, "dots": 4, "save_attention": 2, "offload_attention": 2}
  assert [row["remat"] for row in rows if row["host_bytes"]] == ["offload_attention"]
  assert all(row["temp_bytes"] > 0 and row["step_ms"] > 0 for row in rows)


def test_prepacking_suite_quick(tmp_path):
  pytest.importorskip("gguf")
  pytest.importorskip("gensim")
  assert bench.main(["prepacking", "--quick", "--out", str(tmp_path)]) == 0
  prefill = json.loads((tmp_path / "prepacking_prefill.json").read_text())["rows"]
  assert [(row["batch"], row["prefill"]) for row in prefill] == [
      (4, "padded"), (4, "packed"), (8, "padded"), (8, "packed")]
  assert all(row["flops"] > 0 and row["peak_bytes"] > 0 for row in prefill)
  training = json.loads((tmp_path / "prepacking_training.json").read_text())["rows"]
  padded, packed = training
  assert packed["non_padding_fraction"] >= padded["non_padding_fraction"]
  assert packed["rows_per_epoch"] <= padded["rows_per_epoch"] and packed["tokens_per_s"] > 0


@pytest.mark.slow
def test_optimizer_suites_quick(tmp_path):
  pytest.importorskip("tokenizers")
  pytest.importorskip("gensim")
  assert bench.main(["optimizers", "--quick", "--out", str(tmp_path)]) == 0
  rows = json.loads((tmp_path / "optimizers.json").read_text())["rows"]
  adamw = [row for row in rows if row["optimizer"] == "AdamW"]
  assert [row["opt_state_vs_adamw"] for row in adamw] == [1.0, 1.0]
  assert all(row["opt_state_bytes"] > 0 and row["time_vs_adamw"] > 0 for row in rows)
  assert bench.main(["optimizer_curves", "--quick", "--out", str(tmp_path)]) == 0
  rows = json.loads((tmp_path / "optimizer_curves.json").read_text())["rows"]
  assert {(row["task"], row["optimizer"]) for row in rows} == {
      *(("smollm2_finetune", name) for name in ("adamw", "galore", "frugal", "spiel", "snell")),
      *(("quickstart", name) for name in ("adamw", "galore", "frugal"))}
  assert (tmp_path / "optimizer_curves_smollm2_finetune.png").exists()


@pytest.mark.slow
def test_activations_suite_quick(tmp_path):
  """Compiles for an H100 on this host (about 4 minutes)."""
  if not (aot.cuda_plugin_available() and aot.ptxas_available()):
    pytest.skip("needs jax's CUDA plugin and ptxas")
  assert bench.main(["activations", "--quick", "--out", str(tmp_path)]) == 0
  rows = json.loads((tmp_path / "activations.json").read_text())["rows"]
  memory = [row for row in rows if row["table"] == "memory"]
  policies = {row["policy"] for row in memory}
  assert policies == {"none", "dots", "tokenwise(0.5)", "save_attention", "full",
                      "offload_attention", "offload_all", "reversible"}
  assert all(row["host_temp_bytes"] > 0 for row in memory if row["policy"].startswith("offload"))
  assert all(row["host_temp_bytes"] == 0 for row in memory
             if not row["policy"].startswith("offload"))
  errors = [row for row in rows if row["table"] == "reconstruction"]
  assert max(r["relative_error"] for r in errors if r["streams"] == "float32") < 1e-5 < min(
      r["relative_error"] for r in errors if r["streams"] == "bfloat16")
  assert (tmp_path / "activations.png").exists() and (tmp_path / "activations_seq_len.png").exists()
