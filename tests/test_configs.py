"""Configs and the CLI: every shipped config runs (tiny), and bad configs fail naming the key."""

import pathlib
import re

import numpy as np
import pytest

from experiments import run
from experiments.config import ConfigError, results_directory

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))
CONFIGS_BY_NAME = {path.stem: path for path in CONFIGS}


def test_there_are_configs():
  assert any(path.name == "quickstart.yaml" for path in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_into_its_frozen_schema(path):
  module, config = run.load(str(path))
  assert isinstance(config, module.Config)
  with pytest.raises(AttributeError):
    config.seed = 1  # frozen


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_runs_tiny(path, tmp_path):
  pytest.importorskip("tokenizers")
  pytest.importorskip("gensim")
  module, config = run.load(str(path))
  overrides = [*module.smoke_overrides(config), f"--output_dir={tmp_path}"]
  summary = run.run(str(path), overrides)
  numbers = [value for value in summary.values() if isinstance(value, float)]
  assert summary and all(np.isfinite(numbers)), summary
  # A results table names the command that reproduces it, with every override.
  for table in tmp_path.rglob("*.md"):
    command = re.search(r"^Command: `(.*)`$", table.read_text(), re.MULTILINE).group(1)
    assert command.startswith(f"effjax-run {path}") and f"--output_dir={tmp_path}" in command


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_shipped_config_writes_under_runs_by_default(path):
  # The committed benchmarks/ tables are refreshed on purpose (--results_dir=benchmarks), never
  # by running a config as shipped.
  _, config = run.load(str(path))
  for where in (config.output_dir, results_directory(config)):
    assert pathlib.PurePath(where).parts[0] == "runs", (path.name, where)


def _write(tmp_path, text):
  path = tmp_path / "config.yaml"
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("text, overrides, match", [
    ("experiment: train_lm\nstepz: 3\n", [], r"unknown config key 'stepz'"),
    ("experiment: train_lm\nmodel:\n  d_modell: 3\n", [], r"unknown config key 'model.d_modell'"),
    ("experiment: train_lm\n", ["--optim.lr=1"], r"unknown config key 'optim.lr'.*learning_rate"),
    ("experiment: train_lm\n", ["--nope=1"], r"unknown config key 'nope'"),
    ("experiment: train_lm\nsteps: many\n", [], r"`steps`: Couldn't parse 'many' into an int"),
    ("experiment: train_lm\n", ["--optim.learning_rate=fast"], r"optim.learning_rate"),
    ("experiment: train_lm\nmodel: 3\n", [], r"'model' must be a mapping"),
    ("experiment: train_lm\nsteps: 0\n", [], r"invalid value for 'steps': got 0"),
    ("experiment: train_lm\n", ["--model.num_kv_heads=3"],
     r"invalid value for 'model.num_kv_heads': got 3, expected a divisor of model.num_heads=4"),
    ("experiment: train_lm\ndata:\n  source: poems\n", [], r"'data.source': got 'poems'"),
    ("experiment: train_lm\n", ["--experiment=other"], r"'experiment' cannot be overridden"),
    ("experiment: no_such_experiment\n", [], r"unknown experiment 'no_such_experiment'"),
    ("steps: 3\n", [], r"must be a mapping with a string key 'experiment'"),
    ("experiment: [unclosed\n", [], r"not valid YAML"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, overrides, match):
  with pytest.raises(ConfigError, match=match):
    run.load(_write(tmp_path, text), overrides)


def test_overrides_apply_with_dotted_keys(tmp_path):
  path = _write(tmp_path, "experiment: train_lm\nsteps: 7\noptim:\n  learning_rate: 0.1\n")
  _, config = run.load(path, ["--optim.learning_rate=0.5", "--model.num_layers", "3"])
  assert (config.steps, config.optim.learning_rate, config.model.num_layers) == (7, 0.5, 3)
  assert config.optim.warmup_steps == 25  # schema default where the file is silent


def test_missing_file(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    run.load(str(tmp_path / "nothing.yaml"))


def test_cli_reports_config_errors(tmp_path, capsys):
  path = _write(tmp_path, "experiment: train_lm\nsteps: -4\n")
  assert run.main([path]) == 2
  assert "config error: invalid value for 'steps': got -4" in capsys.readouterr().err
  assert run.main([]) == 2
  assert "usage: effjax-run" in capsys.readouterr().err


def test_cli_help_lists_keys(capsys):
  quickstart = next(path for path in CONFIGS if path.name == "quickstart.yaml")
  assert run.main([str(quickstart), "--help"]) == 0
  assert "learning_rate" in capsys.readouterr().out


# --- Shipped configs by name, from any directory --------------------------------------------------

@pytest.mark.parametrize("name", ["quickstart", "quickstart.yaml"])
def test_a_shipped_config_loads_by_name_from_any_directory(tmp_path, monkeypatch, name):
  monkeypatch.chdir(tmp_path)
  path = run.resolve_config(name)
  assert path.name == "quickstart.yaml" and path.read_text() == CONFIGS_BY_NAME[
      "quickstart"].read_text()
  module, config = run.load(name)
  assert config.experiment == "train_lm" and module.__name__ == "experiments.train_lm"


def test_every_shipped_config_is_found_by_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert sorted(run.shipped_configs()) == sorted(CONFIGS_BY_NAME)
  for name, path in CONFIGS_BY_NAME.items():
    assert run.resolve_config(name).read_text() == path.read_text()


def test_a_path_still_works_and_wins_over_a_shipped_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "quickstart.yaml").write_text("experiment: train_lm\nsteps: 3\n")
  assert run.resolve_config("quickstart.yaml") == pathlib.Path("quickstart.yaml")
  assert run.load("quickstart.yaml")[1].steps == 3
  assert run.load(str(CONFIGS_BY_NAME["smollm2_eval"]))[1].experiment == "eval_perplexity"


def test_an_unknown_name_lists_the_shipped_configs(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError, match=r"'quickstrat' does not exist.*shipped configs: "
                                        r"\[.*'quickstart'.*'smollm2_eval'.*\]"):
    run.load("quickstrat")
  assert run.main(["quickstrat"]) == 2
  assert "shipped configs" in capsys.readouterr().err


def test_cli_help_by_name_from_another_directory(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert run.main(["quickstart", "--help"]) == 0
  assert "learning_rate" in capsys.readouterr().out
  assert run.main([]) == 2
  assert "quickstart" in capsys.readouterr().err  # the usage lists the shipped configs
