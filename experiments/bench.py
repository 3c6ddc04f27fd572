"""``effjax-bench SUITE [--quick] [--out DIR]``: runs a benchmark suite, writes benchmarks/SUITE.*.

Also ``python -m experiments.bench``. Each suite is a module ``experiments/bench_*.py`` with
``run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]`` (the files it wrote), built on
:mod:`effjax.benchmarking`: compiled memory per device, median time as a ratio to a baseline
measured in the same run, and a markdown header naming the command and the machine.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
from collections.abc import Sequence

# Suite name -> module.
SUITES: dict[str, str] = {
    "attention_memory": "experiments.bench_attention",
    "attention_gpu": "experiments.bench_attention_gpu",
    "attention_tpu_blocks": "experiments.bench_attention_tpu",
    "compiled_memory": "experiments.bench_compiled",
    "gpu_kernel_resources": "experiments.bench_gpu_resources",
    "long_conv": "experiments.bench_long_conv",
    "prepacking": "experiments.bench_prepacking",
    "quickstart": "experiments.bench_quickstart",
    "remat": "experiments.bench_remat",
    "ring_attention": "experiments.bench_ring_attention",
    "kvcache_decode": "experiments.bench_kvcache",
    "optimizers": "experiments.bench_optimizers",
    "optimizer_curves": "experiments.bench_optimizer_curves",
    "activations": "experiments.bench_activations",
    "zero": "experiments.bench_zero",
}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="effjax-bench", description=__doc__.splitlines()[0])
  parser.add_argument("suite", choices=sorted(SUITES), help="which benchmark suite to run")
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes and few repeats (a smoke test; do not commit its figures)")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks"),
                      help="directory for the JSON, markdown and PNG results (default: benchmarks)")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  module = importlib.import_module(SUITES[args.suite])
  for path in module.run(quick=args.quick, out_dir=args.out):
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
