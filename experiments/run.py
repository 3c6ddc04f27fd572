"""``effjax-run CONFIG.yaml [--dotted.key=value ...]``: runs the experiment a config names.

Also ``python -m experiments.run``. ``effjax-run CONFIG.yaml --help`` lists every key with its help.
Each experiment module defines ``Config`` (a frozen dataclass deriving from
:class:`experiments.config.ExperimentConfig`) and ``main(config) -> dict`` (a summary of results).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import draccus

from experiments.config import ConfigError, parse_config, read_experiment_name

# Experiment name (the `experiment:` key of a config) -> module defining Config and main.
EXPERIMENTS: dict[str, str] = {
    "train_lm": "experiments.train_lm",
    "generate": "experiments.generate",
    "eval_perplexity": "experiments.eval_perplexity",
    "eval_kvcache": "experiments.eval_kvcache",
    "train_synthetic": "experiments.train_synthetic",
}


def experiment_module(name: str) -> ModuleType:
  if name not in EXPERIMENTS:
    raise ConfigError(f"unknown experiment {name!r}; known experiments: {sorted(EXPERIMENTS)}")
  return importlib.import_module(EXPERIMENTS[name])


def load(path: str, overrides: Sequence[str] = ()) -> tuple[ModuleType, Any]:
  """Loads a config file with overrides; returns (experiment module, config)."""
  name = read_experiment_name(path)
  module = experiment_module(name)
  config = parse_config(module.Config, path, overrides)
  if config.experiment != name:
    raise ConfigError(f"config key 'experiment' cannot be overridden "
                      f"(file says {name!r}, got {config.experiment!r})")
  return module, config


def run(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Runs the experiment ``path`` names; returns its summary."""
  module, config = load(path, overrides)
  return module.main(config)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0].startswith("-"):
    print("usage: effjax-run CONFIG.yaml [--key.sub=value ...] [--help]\n"
          f"experiments: {', '.join(sorted(EXPERIMENTS))}", file=sys.stderr)
    return 2
  path, overrides = argv[0], argv[1:]
  try:
    if "--help" in overrides or "-h" in overrides:
      module = experiment_module(read_experiment_name(path))
      try:
        draccus.parse(module.Config, config_path=path, args=["--help"], prog=f"effjax-run {path}")
      except SystemExit as done:  # argparse exits after printing help
        return int(done.code or 0)
      return 0
    run(path, overrides)
  except ConfigError as error:
    print(f"effjax-run: config error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
