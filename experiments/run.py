"""``effjax-run CONFIG [--dotted.key=value ...]``: runs the experiment a config names.

CONFIG is a YAML file's path, or the name of a shipped config (``effjax-run quickstart``, also
``quickstart.yaml``): the repository's ``configs/`` folder, which the package ships as
``experiments/configs``, so names work from any directory; a file at that path wins over a name.
Also ``python -m experiments.run``. ``effjax-run CONFIG --help`` lists every key with its help.
Each experiment module defines ``Config`` (a frozen dataclass deriving from
:class:`experiments.config.ExperimentConfig`), ``main(config) -> dict`` (a summary of results) and
``smoke_overrides(config)`` (the overrides that make a run of that config tiny, for the tests).
"""

from __future__ import annotations

import importlib
import pathlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import draccus

from experiments.config import ConfigError, parse_config, read_experiment_name, running

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


def shipped_configs_dir() -> pathlib.Path | None:
  """The folder of shipped configs: ``experiments/configs`` in an installed wheel, the
  repository's ``configs/`` in a source checkout (editable install); None if neither."""
  package = pathlib.Path(__file__).resolve().parent
  if (package / "configs").is_dir():
    return package / "configs"
  checkout = package.parent
  if (checkout / "configs").is_dir() and (checkout / "pyproject.toml").is_file():
    return checkout / "configs"
  return None


def shipped_configs() -> dict[str, pathlib.Path]:
  """Name (file stem) -> path of every shipped config."""
  folder = shipped_configs_dir()
  return {} if folder is None else {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def resolve_config(config: str | pathlib.Path) -> pathlib.Path:
  """The config file ``config`` names: an existing path, else a shipped config's name (with or
  without ``.yaml``).

  Raises:
    ConfigError: neither, listing the shipped configs.
  """
  path = pathlib.Path(config)
  if path.is_file():
    return path
  shipped = shipped_configs()
  name = path.name.removesuffix(".yaml").removesuffix(".yml")
  if path.parent == pathlib.Path(".") and name in shipped:
    return shipped[name]
  raise ConfigError(f"config file {str(config)!r} does not exist, and it is not the name of a "
                    f"shipped config; shipped configs: {sorted(shipped)} "
                    f"(run one by name: effjax-run quickstart)")


def load(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> tuple[ModuleType, Any]:
  """Loads a config (a path or a shipped config's name, see :func:`resolve_config`) with
  overrides; returns (experiment module, config)."""
  path = resolve_config(path)
  name = read_experiment_name(path)
  module = experiment_module(name)
  config = parse_config(module.Config, path, overrides)
  if config.experiment != name:
    raise ConfigError(f"config key 'experiment' cannot be overridden "
                      f"(file says {name!r}, got {config.experiment!r})")
  return module, config


def run(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Runs the experiment ``path`` names; returns its summary."""
  module, config = load(path, overrides)
  with running(path, overrides):
    return module.main(config)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0].startswith("-"):
    print("usage: effjax-run CONFIG [--key.sub=value ...] [--help]\n"
          "CONFIG: a YAML file, or a shipped config's name: "
          f"{', '.join(shipped_configs()) or '(none found)'}\n"
          f"experiments: {', '.join(sorted(EXPERIMENTS))}", file=sys.stderr)
    return 2
  name, overrides = argv[0], argv[1:]
  try:
    path = resolve_config(name)
    if "--help" in overrides or "-h" in overrides:
      module = experiment_module(read_experiment_name(path))
      try:
        draccus.parse(module.Config, config_path=str(path), args=["--help"],
                      prog=f"effjax-run {name}")
      except SystemExit as done:  # argparse exits after printing help
        return int(done.code or 0)
      return 0
    run(name, overrides)
  except ConfigError as error:
    print(f"effjax-run: config error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
