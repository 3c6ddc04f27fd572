"""pyproject.toml's lower bounds cover what the code uses: a feature that needs a newer Python or
jax than the declared minimum fails here (lowering a bound, or using a newer feature, must update
the other)."""

import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).parent.parent
SOURCES = ("effjax", "pallas_kernels", "experiments", "tests")

# Feature -> (the lowest version that has it, a regex finding it in the sources).
PYTHON_FEATURES = {
    "typing.Self": ((3, 11), r"from typing import [^\n]*\bSelf\b|typing\.Self\b"),
    "tomllib": ((3, 11), r"^\s*import tomllib|^\s*from tomllib "),
    "except*": ((3, 11), r"^\s*except\*"),
    "itertools.batched": ((3, 12), r"itertools\.batched|from itertools import [^\n]*\bbatched\b"),
    "typing.override": ((3, 12), r"from typing import [^\n]*\boverride\b|typing\.override\b"),
}
# jax 0.9.x lacks both (checked against the 0.9.0 wheel); jax 0.10 also needs Python >= 3.11.
JAX_FEATURES = {
    "Mosaic GPU interpreter (jax._src.pallas.mosaic_gpu.interpret)":
        ((0, 10, 0), r"jax\._src\.pallas\.mosaic_gpu\.interpret"),
    "plgpu.wgmma_accumulator_load": ((0, 10, 0), r"\bwgmma_accumulator_load\b"),
    "jax.shard_map": ((0, 7, 0), r"\bjax\.shard_map\b"),
}


def _project() -> dict:
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _lower_bound(spec: str, name: str) -> tuple[int, ...]:
  match = re.search(r">=\s*([0-9][0-9.]*)", spec)
  assert match, f"{name} has no '>=' lower bound in {spec!r}"
  return tuple(int(part) for part in match.group(1).split("."))


def _used(pattern: str) -> list[str]:
  compiled = re.compile(pattern, re.MULTILINE)
  return [str(path.relative_to(ROOT)) for folder in SOURCES
          for path in sorted((ROOT / folder).rglob("*.py"))
          if path.name != "test_packaging.py" and compiled.search(path.read_text())]


def _dependency_bound(package: str, requirements: list[str]) -> tuple[int, ...]:
  for requirement in requirements:
    if re.match(rf"{re.escape(package)}(\[[^\]]*\])?\s*[<>=!~]", requirement):
      return _lower_bound(requirement, package)
  raise AssertionError(f"{package} is not among {requirements}")


def test_features_in_use_are_found():
  assert _used(PYTHON_FEATURES["typing.Self"][1]), "typing.Self no longer used: update the table"


@pytest.mark.parametrize("feature", sorted(PYTHON_FEATURES))
def test_requires_python_covers_the_features_used(feature):
  minimum, pattern = PYTHON_FEATURES[feature]
  declared = _lower_bound(_project()["requires-python"], "requires-python")
  users = _used(pattern)
  assert not users or declared >= minimum, (
      f"requires-python allows {declared} but {feature} needs {minimum}: {users[:3]}")


@pytest.mark.parametrize("feature", sorted(JAX_FEATURES))
def test_jax_lower_bound_covers_the_features_used(feature):
  minimum, pattern = JAX_FEATURES[feature]
  project = _project()
  users = _used(pattern)
  bounds = {"dependencies": _dependency_bound("jax", project["dependencies"])}
  for extra, requirements in project["optional-dependencies"].items():
    if any(re.match(r"jax\b", requirement) for requirement in requirements):
      bounds[f"[{extra}]"] = _dependency_bound("jax", requirements)
  for where, declared in bounds.items():
    assert not users or declared >= minimum, (
        f"jax>={declared} in {where}, but {feature} needs {minimum}: {users[:3]}")


def test_flax_lower_bound_supports_the_jax_lower_bound():
  # flax 0.12.7 is the first release built for jax 0.10 (it requires jax>=0.10.0).
  project = _project()
  if _dependency_bound("jax", project["dependencies"]) >= (0, 10, 0):
    assert _dependency_bound("flax", project["dependencies"]) >= (0, 12, 7)


def test_the_package_ships_the_configs_folder(monkeypatch):
  # What setup.py hands setuptools (a wheel built from it holds experiments/configs/*.yaml, which
  # effjax-run resolves by name; checked by hand with `pip wheel --no-deps .` + `unzip -l`).
  import setuptools  # pylint: disable=g-import-not-at-top
  captured = {}
  monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
  monkeypatch.chdir(ROOT)
  exec(compile((ROOT / "setup.py").read_text(), "setup.py", "exec"), {"__name__": "__main__"})
  assert "experiments.configs" in captured["packages"]
  assert captured["package_dir"] == {"experiments.configs": "configs"}
  assert captured["package_data"]["experiments.configs"] == ["*.yaml"]
  expected = setuptools.find_packages(include=["effjax*", "pallas_kernels*", "experiments*"])
  assert set(expected) <= set(captured["packages"])
  assert list((ROOT / "configs").glob("*.yaml"))
