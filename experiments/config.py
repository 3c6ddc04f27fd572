"""YAML experiment configs loaded into frozen dataclasses with draccus, with clear errors.

A config file names its experiment (``experiment: train_lm``); the experiment's module declares the
schema, a frozen dataclass deriving from :class:`ExperimentConfig`, whose field docstrings are the
``--help`` text. Command-line overrides use dotted keys: ``--optim.learning_rate=1e-3``.

Every problem is a :class:`ConfigError` that names the key: an unknown key (in the file or on the
command line), a value of the wrong type, or a value rejected by the schema's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

import draccus
import yaml

T = TypeVar("T")


class ConfigError(ValueError):
  """A config file or override is invalid; the message names the key and what was expected."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Fields every experiment has."""

  experiment: str = ""
  """Name of the experiment this config runs (a key of experiments.run.EXPERIMENTS)."""
  output_dir: str = "runs/default"
  """Directory for metrics, logs and checkpoints. Re-running with the same directory resumes."""
  seed: int = 0
  """Seed of every random choice (initialization, data order, sampling)."""


def require(condition: bool, key: str, value: Any, expected: str) -> None:
  """Raises ConfigError naming ``key`` unless ``condition``; for schemas' ``__post_init__``."""
  if not condition:
    raise ConfigError(f"invalid value for {key!r}: got {value!r}, expected {expected}")


def read_experiment_name(path: str | pathlib.Path) -> str:
  """The ``experiment`` key of a YAML config file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {str(path)!r} does not exist")
  try:
    data = yaml.safe_load(path.read_text())
  except yaml.YAMLError as error:
    raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
  if not isinstance(data, dict) or not isinstance(data.get("experiment"), str):
    raise ConfigError(f"config file {str(path)!r} must be a mapping with a string key "
                      "'experiment' naming the experiment to run")
  return data["experiment"]


def parse_config(schema: type[T], path: str | pathlib.Path | None,
                 overrides: Sequence[str] = ()) -> T:
  """Loads ``path`` (YAML) into ``schema`` and applies ``--dotted.key=value`` overrides.

  Raises:
    ConfigError: unknown key, wrong type or invalid value, naming the key.
  """
  if path is not None:
    _check_keys(schema, yaml.safe_load(pathlib.Path(path).read_text()) or {}, prefix="")
  for key in _override_keys(overrides):
    _check_dotted_key(schema, key)
  try:
    return draccus.parse(schema, config_path=path, args=list(overrides), exit_on_error=False)
  except (draccus.ParsingError, draccus.utils.DecodingError, ValueError, TypeError) as error:
    cause = _innermost_config_error(error)
    if cause is not None:
      raise cause from error
    raise ConfigError(f"invalid config: {error}") from error


def _override_keys(overrides: Sequence[str]) -> list[str]:
  keys = []
  for override in overrides:
    if override.startswith("--"):
      keys.append(override[2:].split("=", 1)[0])
  return keys


def _check_dotted_key(schema: type, dotted: str) -> None:
  current: Any = schema
  for depth, part in enumerate(dotted.split(".")):
    fields = _fields(current)
    if fields is None or part not in fields:
      parent = ".".join(dotted.split(".")[:depth]) or "<top level>"
      valid = sorted(fields) if fields else []
      raise ConfigError(f"unknown config key {dotted!r} (valid keys under {parent}: {valid})")
    current = fields[part]


def _check_keys(schema: type, data: Any, prefix: str) -> None:
  fields = _fields(schema)
  if fields is None or not isinstance(data, dict):
    return
  for key, value in data.items():
    dotted = f"{prefix}{key}"
    if key not in fields:
      raise ConfigError(f"unknown config key {dotted!r} (valid keys under "
                        f"{prefix.rstrip('.') or '<top level>'}: {sorted(fields)})")
    if _fields(fields[key]) is not None and not isinstance(value, dict) and value is not None:
      raise ConfigError(f"config key {dotted!r} must be a mapping of "
                        f"{sorted(_fields(fields[key]))}, got {value!r}")
    _check_keys(fields[key], value, prefix=f"{dotted}.")


def _fields(schema: Any) -> dict[str, Any] | None:
  """Field name -> type of a dataclass type (through Optional), else None."""
  if isinstance(schema, types.UnionType) or typing.get_origin(schema) is typing.Union:
    options = [arg for arg in typing.get_args(schema) if arg is not type(None)]
    schema = options[0] if len(options) == 1 else None
  if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
    return None
  hints = typing.get_type_hints(schema)
  return {field.name: hints[field.name] for field in dataclasses.fields(schema)}


def _innermost_config_error(error: BaseException) -> ConfigError | None:
  """The ConfigError raised by a schema's __post_init__, if draccus wrapped one."""
  seen = error
  while seen is not None:
    if isinstance(seen, ConfigError):
      return seen
    seen = seen.__cause__ or seen.__context__
  if isinstance(error, draccus.utils.DecodingError):
    return ConfigError(f"invalid config: {error}")
  return None
