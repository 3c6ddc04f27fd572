"""Build hook: the package list, with the top-level configs/ folder shipped inside the package as
``experiments/configs`` (``effjax-run NAME`` finds a shipped config from any directory). Everything
else is declared in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["effjax*", "pallas_kernels*", "experiments*"]),
              "experiments.configs"],
    package_dir={"experiments.configs": "configs"},
    package_data={"experiments.configs": ["*.yaml"]},
)
