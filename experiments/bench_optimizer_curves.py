"""State-light optimizers in training: loss curves and held-out perplexity at equal steps.

Two tasks, each run through ``train_lm`` exactly as its config ships, once per optimizer and seed:
the quickstart (a small LM from scratch) and the SmolLM2-135M fine-tune (``smollm2_finetune``).
The optimizers are ``train_lm``'s (``optim.name``) with the settings below; everything else
(schedule, clipping, steps, batch) is the config's. A seed changes the data order and, from
scratch, the initialization and the held-out split; compare optimizers within a seed.
"""

from __future__ import annotations

import json
import pathlib
import tempfile

import numpy as np

from effjax import benchmarking
from experiments import run as run_lib

SEEDS = (0, 1, 2)

# Task -> (config, overrides per optimizer). Fine-tuning follows the papers' settings where they
# differ from pre-training: FRUGAL's residual at 0.1x (inactive_lr_scale), sparse methods at a
# larger learning rate on their few trainable values. SpIEL and SNELL are fine-tuning methods (a
# sparse delta or adapter on pretrained weights), so they run on the fine-tune only; from scratch
# the comparison is FRUGAL's paper's: AdamW, GaLore and FRUGAL at equal steps.
TASKS: dict[str, tuple[str, dict[str, list[str]]]] = {
    "smollm2_finetune": ("smollm2_finetune", {
        "adamw": [],
        "galore": ["--optim.name=galore"],
        "frugal": ["--optim.name=frugal", "--optim.frugal.inactive_lr_scale=0.1"],
        "spiel": ["--optim.name=spiel", "--optim.learning_rate=1e-3"],
        "snell": ["--optim.name=snell", "--optim.learning_rate=1e-3"],
    }),
    "quickstart": ("quickstart", {
        "adamw": [],
        "galore": ["--optim.name=galore"],
        "frugal": ["--optim.name=frugal"],
    }),
}
QUICK = ["--steps=4", "--log_every=1", "--data.source=news", "--eval_windows=8",
         "--sample_tokens=0", "--checkpoint_every=4"]


def _run(config: str, overrides: list[str]) -> tuple[dict, list[tuple[int, float]]]:
  with tempfile.TemporaryDirectory() as output_dir:
    summary = run_lib.run(config, [*overrides, f"--output_dir={output_dir}"])
    records = [json.loads(line) for line in
               (pathlib.Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
  return summary, [(r["step"], r["loss"]) for r in records if "loss" in r]


def _finished_runs(path: pathlib.Path) -> dict[tuple[str, str, int], dict]:
  if not path.exists():
    return {}
  records = [json.loads(line) for line in path.read_text().splitlines() if line]
  return {(r["task"], r["optimizer"], r["seed"]): r for r in records}


def run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Runs every (task, optimizer, seed) not yet in ``optimizer_curves_runs.jsonl``.

  Each finished run is appended to that file (its summary and training-loss curve) as soon as it
  ends, so an interrupted suite resumes where it stopped; delete the file to start over.
  """
  out_dir.mkdir(parents=True, exist_ok=True)
  runs_path = out_dir / ("optimizer_curves_quick_runs.jsonl" if quick else
                         "optimizer_curves_runs.jsonl")
  finished = _finished_runs(runs_path)
  rows, curves = [], {}
  for task, (config, optimizers) in TASKS.items():
    extra = [*QUICK, *(["--init_layers=1"] if config == "smollm2_finetune" else [])] if quick else []
    for name, overrides in optimizers.items():
      for seed in SEEDS[:1] if quick else SEEDS:
        record = finished.get((task, name, seed))
        if record is None:
          summary, curve = _run(config, [*overrides, f"--seed={seed}", *extra])
          record = {"task": task, "optimizer": name, "seed": seed, "curve": curve,
                    "initial_heldout_perplexity": summary.get("initial_heldout_perplexity"),
                    "heldout_perplexity": summary["heldout_perplexity"],
                    "unigram_perplexity": summary["unigram_perplexity"]}
          with runs_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        curve = record["curve"]
        curves.setdefault((task, name), []).append(curve)
        rows.append({"task": task, "optimizer": name, "seed": seed,
                     "final_train_loss": curve[-1][1],
                     "initial_heldout_perplexity": record["initial_heldout_perplexity"],
                     "heldout_perplexity": record["heldout_perplexity"],
                     "heldout_loss": float(np.log(record["heldout_perplexity"])),
                     "unigram_perplexity": record["unigram_perplexity"]})
  for row in rows:
    base = next(r for r in rows if (r["task"], r["seed"], r["optimizer"]) ==
                (row["task"], row["seed"], "adamw"))
    row["heldout_loss_vs_adamw"] = row["heldout_loss"] / base["heldout_loss"] - 1
  notes = ("Each row: one `effjax-run` of the task's shipped config with `optim.name` and the "
           "suite's per-optimizer settings (experiments/bench_optimizer_curves.py: FRUGAL's "
           "residual at 0.1x when fine-tuning; SpIEL/SNELL at lr 1e-3, on the fine-tune only). "
           "heldout_loss_vs_adamw: "
           "relative difference of the held-out loss (log perplexity) to AdamW's at the same "
           "seed (a seed also changes the held-out split). CPU, 2 cores.")
  formatters = {"final_train_loss": lambda v: f"{v:.3f}", "heldout_loss": lambda v: f"{v:.4f}",
                "initial_heldout_perplexity": lambda v: "-" if v is None else f"{v:.2f}",
                "heldout_perplexity": lambda v: f"{v:.2f}",
                "unigram_perplexity": lambda v: f"{v:.1f}",
                "heldout_loss_vs_adamw": lambda v: f"{100 * v:+.2f}%"}
  paths = list(benchmarking.write_results(
      "optimizer_curves", rows, title="State-light optimizers in training: held-out perplexity "
      "at equal steps", directory=out_dir, notes=notes, formatters=formatters, group_by=["task"],
      columns=["task", "optimizer", "seed", "final_train_loss", "initial_heldout_perplexity",
               "heldout_perplexity", "heldout_loss", "heldout_loss_vs_adamw",
               "unigram_perplexity"]))
  for task in TASKS:
    series = {}
    for (curve_task, name), runs in curves.items():
      if curve_task == task:
        steps = [step for step, _ in runs[0]]
        series[name] = (steps, list(np.mean([[loss for _, loss in r] for r in runs], axis=0)))
    paths.append(benchmarking.plot_lines(
        out_dir / f"optimizer_curves_{task}.png", series,
        title=f"{task}: training loss, mean of {len(SEEDS[:1] if quick else SEEDS)} seed(s)",
        xlabel="step", ylabel="loss", logx=False, logy=False))
  return paths
