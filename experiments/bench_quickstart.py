"""The quickstart pipeline end to end: loss curve, held-out perplexity, throughput, wall time.

Runs ``configs/quickstart.yaml`` in a fresh temporary output directory (so nothing resumes) and
records what a user of ``effjax-run configs/quickstart.yaml`` sees.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

from effjax import benchmarking
from experiments import run as run_lib

CONFIG = "quickstart"


def run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]:
  with tempfile.TemporaryDirectory() as output_dir:
    overrides = [f"--output_dir={output_dir}"]
    if quick:
      overrides += ["--steps=4", "--log_every=2", "--data.source=news", "--eval_windows=8",
                    "--sample_tokens=4"]
    start = time.perf_counter()
    summary = run_lib.run(CONFIG, overrides)
    wall_s = time.perf_counter() - start
    records = [json.loads(line) for line in
               (pathlib.Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
  curve = [r for r in records if "loss" in r]
  every = max(1, len(curve) // 10)
  rows = [{"step": r["step"], "train_loss": r["loss"], "grad_norm": r["grad_norm"],
           "tokens_per_s": r["tokens_per_s"]} for r in curve[::every]]
  if rows[-1]["step"] != curve[-1]["step"]:
    rows.append({"step": curve[-1]["step"], "train_loss": curve[-1]["loss"],
                 "grad_norm": curve[-1]["grad_norm"], "tokens_per_s": curve[-1]["tokens_per_s"]})
  notes = (f"Config `{CONFIG}` (overrides: {' '.join(overrides[1:]) or 'none'}). "
           f"Parameters: {summary['parameters']:,}. Wall time (load, compile, train, eval, sample): "
           f"{wall_s:.0f} s. Held-out perplexity: **{summary['heldout_perplexity']:.1f}** over "
           f"{summary['heldout_windows']} windows; the unigram perplexity of the same windows "
           f"(token frequencies of the training split, add-one smoothed: the floor of a model "
           f"that learned no context) is {summary['unigram_perplexity']:.1f}. Greedy sample: "
           f"`{summary.get('sample', '')!r}`. Initial loss is about ln(49152) = 10.8.")
  paths = list(benchmarking.write_results(
      "quickstart", rows, title="Quickstart: small Llama-style LM trained from scratch on CPU",
      columns=["step", "train_loss", "grad_norm", "tokens_per_s"], directory=out_dir,
      notes=notes, formatters={"tokens_per_s": lambda v: f"{v:.0f}",
                               "train_loss": lambda v: f"{v:.3f}",
                               "grad_norm": lambda v: f"{v:.2f}"}))
  paths.append(benchmarking.plot_lines(
      out_dir / "quickstart_loss.png",
      {"train loss": ([r["step"] for r in curve], [r["loss"] for r in curve])},
      title="Quickstart training loss", xlabel="step", ylabel="loss", logx=False, logy=False))
  return paths
