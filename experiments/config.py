"""YAML experiment configs loaded into frozen dataclasses with draccus, with clear errors.

A config file names its experiment (``experiment: train_lm``); the experiment's module declares the
schema, a frozen dataclass deriving from :class:`ExperimentConfig`, whose field docstrings are the
``--help`` text. Command-line overrides use dotted keys: ``--optim.learning_rate=1e-3``.

Every problem is a :class:`ConfigError` that names the key: an unknown key (in the file or on the
command line), a value of the wrong type, or a value rejected by the schema's ``__post_init__``.
"""

from __future__ import annotations

import collections.abc
import contextlib
import contextvars
import dataclasses
import pathlib
import shlex
import types
import typing
from collections.abc import Iterator, Sequence
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


def results_directory(config: Any) -> pathlib.Path:
  """Where an experiment writes its results table: the config's ``results_dir`` when it has one
  and it is set, else its ``output_dir``. Shipped configs write under runs/; the committed tables
  in benchmarks/ are refreshed with ``--results_dir=benchmarks``."""
  results_dir = getattr(config, "results_dir", None)
  return pathlib.Path(config.output_dir if results_dir is None else results_dir)


_COMMAND: contextvars.ContextVar[str | None] = contextvars.ContextVar("effjax_run_command",
                                                                       default=None)


@contextlib.contextmanager
def running(config: str | pathlib.Path, overrides: Sequence[str]) -> Iterator[None]:
  """Within: :func:`command_line` is ``effjax-run CONFIG OVERRIDES...`` (set by
  :func:`experiments.run.run`)."""
  token = _COMMAND.set(shlex.join(["effjax-run", str(config), *overrides]))
  try:
    yield
  finally:
    _COMMAND.reset(token)


def command_line() -> str:
  """The ``effjax-run`` command that reproduces the running experiment (config and overrides as
  given), for its results table; outside :func:`experiments.run.run`, this process's command."""
  command = _COMMAND.get()
  if command is None:
    from effjax import benchmarking  # pylint: disable=g-import-not-at-top
    return benchmarking.invocation()
  return command


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

  A field whose type is a draccus choice type (``cache: {type: kivi, bits: 2}``) takes the keys of
  the class its ``type`` selects (from an override ``--cache.type=...``, else the file, else the
  choice type's ``default_choice_name()``, as draccus decodes it); a key of another choice is an
  unknown key.

  Raises:
    ConfigError: unknown key, wrong type or invalid value, naming the key.
  """
  keys = _override_keys(overrides)
  choices = {key[:-len(".type")]: value for key, value in keys
             if key.endswith(".type") and value is not None}
  data = {}
  if path is not None:
    data = yaml.safe_load(pathlib.Path(path).read_text()) or {}
    _check_keys(schema, data, prefix="", choices=choices)
  for key, value in keys:
    _check_dotted_key(schema, key, data, value, choices)
  try:
    return draccus.parse(schema, config_path=path, args=list(overrides), exit_on_error=False)
  except (draccus.ParsingError, draccus.utils.DecodingError, ValueError, TypeError) as error:
    cause = _innermost_config_error(error)
    if cause is not None:
      raise cause from error
    raise ConfigError(f"invalid config: {error}") from error


def _override_keys(overrides: Sequence[str]) -> list[tuple[str, str | None]]:
  """(dotted key, value or None when the value is the next argument) of each ``--key=value``."""
  keys = []
  for override in overrides:
    if override.startswith("--"):
      key, *value = override[2:].split("=", 1)
      keys.append((key, value[0] if value else None))
  return keys


def _check_dotted_key(schema: type, dotted: str, data: Any, value: str | None,
                      choices: dict[str, str]) -> None:
  """``dotted`` names a field of ``schema``; a mapping or list ``value`` has valid keys."""
  current: Any = schema
  parts = dotted.split(".")
  for depth, part in enumerate(parts):
    prefix = ".".join(parts[:depth])
    current = _resolve_choice(current, data, prefix, choices)
    if _is_choice(current) and part == "type" and depth == len(parts) - 1:
      return  # the name is checked by _resolve_choice
    fields = _fields(current)
    if fields is None or part not in fields:
      parent = prefix or "<top level>"
      valid = sorted(fields or ())
      if _is_choice(current):
        parent += f" (type: {_choice_name(current)})"
        valid = sorted([*valid, "type"])
      raise ConfigError(f"unknown config key {dotted!r} (valid keys under {parent}: {valid})")
    current = fields[part]
    data = data.get(part) if isinstance(data, dict) else None
  if value is not None and (_fields(current) is not None or _list_item(current) is not None):
    try:
      parsed = yaml.safe_load(value)
    except yaml.YAMLError:
      return  # draccus reports it
    _check_keys(current, parsed, prefix=f"{dotted}.", choices=choices)


def _check_keys(schema: type, data: Any, prefix: str, choices: dict[str, str]) -> None:
  item = _list_item(schema)
  if item is not None and isinstance(data, list):
    for index, value in enumerate(data):
      _check_keys(item, value, prefix=f"{prefix.rstrip('.')}[{index}].", choices={})
    return
  schema = _resolve_choice(schema, data, prefix.rstrip("."), choices)
  fields = _fields(schema)
  if fields is None or not isinstance(data, dict):
    return
  parent = prefix.rstrip(".") or "<top level>"
  if _is_choice(schema):
    fields = {**fields, "type": str}
    parent += f" (type: {_choice_name(schema)})"
  for key, value in data.items():
    dotted = f"{prefix}{key}"
    if key not in fields:
      raise ConfigError(f"unknown config key {dotted!r} (valid keys under {parent}: "
                        f"{sorted(fields)})")
    if (_fields(fields[key]) is not None and not isinstance(value, dict) and value is not None
        and not _is_choice(fields[key])):
      raise ConfigError(f"config key {dotted!r} must be a mapping of "
                        f"{sorted(_fields(fields[key]))}, got {value!r}")
    if _is_choice(fields[key]) and not isinstance(value, (dict, type(None))):
      raise ConfigError(f"config key {dotted!r} must be a mapping with a 'type' key (one of "
                        f"{sorted(fields[key].get_known_choices())}), got {value!r}")
    _check_keys(fields[key], value, prefix=f"{dotted}.", choices=choices)


def _is_choice(schema: Any) -> bool:
  return isinstance(schema, type) and issubclass(schema, draccus.ChoiceRegistry)


def _choice_name(schema: type) -> str:
  return schema.get_choice_name(schema)


def _resolve_choice(schema: Any, data: Any, dotted: str, choices: dict[str, str]) -> Any:
  """The registered class a choice-type ``schema`` selects at key ``dotted``, else ``schema``.

  The name comes from ``choices`` (``--dotted.type=`` overrides), else ``data['type']``, else
  the choice type's default.
  """
  schema = _unwrap_optional(schema)
  if not _is_choice(schema):
    return schema
  known = schema.get_known_choices()
  if schema in known.values():
    return schema
  name = choices.get(dotted)
  if name is None and isinstance(data, dict):
    name = data.get("type")
  if name is None:
    name = schema.default_choice_name()
  if name not in known:
    key = f"{dotted}.type" if dotted else "type"
    raise ConfigError(f"invalid value for {key!r}: got {name!r}, expected one of {sorted(known)}")
  return known[name]


def _unwrap_optional(schema: Any) -> Any:
  if isinstance(schema, types.UnionType) or typing.get_origin(schema) is typing.Union:
    options = [arg for arg in typing.get_args(schema) if arg is not type(None)]
    return options[0] if len(options) == 1 else None
  return schema


def _list_item(schema: Any) -> Any:
  """The item type of ``list[X]`` / ``Sequence[X]`` / ``tuple[X, ...]``, else None."""
  schema = _unwrap_optional(schema)
  origin = typing.get_origin(schema)
  args = typing.get_args(schema)
  if origin in (list, collections.abc.Sequence) and len(args) == 1:
    return args[0]
  if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
    return args[0]
  return None


def _fields(schema: Any) -> dict[str, Any] | None:
  """Field name -> type of a dataclass type (through Optional), else None."""
  schema = _unwrap_optional(schema)
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
