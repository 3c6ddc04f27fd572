"""Ahead-of-time compilation of the kernels for a TPU or an NVIDIA GPU this host does not have.

Lowering (``jax.export``, ``.lower(lowering_platforms=...)``) proves that every op of a kernel
has a Mosaic or Triton lowering, but the compilers behind them run only when the program is
compiled: Mosaic TPU's (vector layouts, supported dtypes per generation, VMEM, the tiling of
every load and store), Triton's and ptxas' (shared memory per block, registers and spills), and
Mosaic GPU's. Both can run without the hardware:

* TPU: libtpu (``pip install 'jax[tpu]'``, the version jax pins) builds *compile-only* devices of
  a named topology on any Linux x86-64 host (:func:`tpu_device`). One process at a time may
  load libtpu unless ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` (``tests/conftest.py`` sets it for the
  pytest-xdist workers).
* NVIDIA GPU: the CUDA plugin (``pip install 'jax[cuda12-local]'``, no CUDA libraries needed)
  builds a compile-only device from a target description (:data:`GPU_SPECS`, the figures of
  ``cudaGetDeviceProperties`` for that card), and XLA runs ``ptxas`` from a CUDA toolkit found
  on the host (``/usr/local/cuda`` or ``nvidia-cuda-nvcc``) to build the cubins
  (:func:`gpu_device`). On a host without CUDA's runtime the plugin's version check must be
  skipped before jax starts: ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` (``tests/conftest.py`` sets
  it) or ``JAX_PLATFORMS=cpu``; otherwise the plugin never registers.

:func:`compile_for` compiles a function for such a device with the real kernels
(:func:`pallas_kernels.interpret.compile_target`), so a kernel that would not compile on that
hardware fails here, and ``memory_analysis()`` of the result gives the device program's memory.
Nothing compiled this way can run on the host; timing still needs the hardware.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

from pallas_kernels.interpret import compile_target

# Generation -> the smallest libtpu topology name of that generation. v4 and v5p are megacore
# chips (a "parallel" grid axis is split over two TensorCores); v5e and v6e have one core.
TPU_TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


def libtpu_available() -> bool:
  """Whether libtpu (Mosaic TPU's compiler) is installed."""
  return importlib.util.find_spec("libtpu") is not None


@functools.cache
def tpu_device(generation: str) -> jax.Device:
  """A compile-only device of a TPU ``generation`` (a key of :data:`TPU_TOPOLOGIES`).

  Raises:
    ValueError: an unknown generation.
    RuntimeError: libtpu is not installed.
  """
  if generation not in TPU_TOPOLOGIES:
    raise ValueError(f"generation must be one of {sorted(TPU_TOPOLOGIES)}, got {generation!r}")
  if not libtpu_available():
    raise RuntimeError("compiling for a TPU without one needs libtpu: pip install 'jax[tpu]'")
  return topologies.get_topology_desc(TPU_TOPOLOGIES[generation], "tpu").devices[0]


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """What XLA and Triton need to know of an NVIDIA GPU to compile for it without one (the
  fields of ``cudaDeviceProp`` that XLA's ``GpuDeviceInfoProto`` holds)."""
  description: str
  compute_capability: tuple[int, int]
  core_count: int  # streaming multiprocessors
  fpus_per_core: int
  shared_memory_per_core: int  # bytes
  shared_memory_per_block_optin: int  # bytes a kernel may opt in to
  l2_cache_size: int
  memory_bandwidth: int  # bytes/s
  clock_rate_ghz: float
  device_memory_size: int

  def target_config(self) -> str:
    """The ``GpuTargetConfigProto`` text XLA compiles against."""
    major, minor = self.compute_capability
    fields = dict(
        threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
        shared_memory_per_core=self.shared_memory_per_core, threads_per_core_limit=2048,
        core_count=self.core_count, fpus_per_core=self.fpus_per_core,
        block_dim_limit_x=2**31 - 1, block_dim_limit_y=65535, block_dim_limit_z=65535,
        memory_bandwidth=self.memory_bandwidth, l2_cache_size=self.l2_cache_size,
        clock_rate_ghz=self.clock_rate_ghz, device_memory_size=self.device_memory_size,
        shared_memory_per_block_optin=self.shared_memory_per_block_optin,
        registers_per_core_limit=65536, registers_per_block_limit=65536)
    info = "\n".join(f"  {name}: {value}" for name, value in fields.items())
    return (f"gpu_device_info {{\n{info}\n  cuda_compute_capability {{ major: {major} minor: "
            f"{minor} }}\n}}\nplatform_name: \"CUDA\"\ndnn_version_info {{ major: 9 minor: 8 }}\n"
            f"device_description_str: \"{self.description}\"\n")


_H100 = GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), core_count=132, fpus_per_core=128,
                shared_memory_per_core=233472, shared_memory_per_block_optin=232448,
                l2_cache_size=52428800, memory_bandwidth=3352320000000, clock_rate_ghz=1.98,
                device_memory_size=84942979072)
GPU_SPECS = {
    # Ada (sm_89: RTX 4090, L4, L40S): the least shared memory per block of the three families.
    "l4": GpuSpec("NVIDIA L4", (8, 9), core_count=58, fpus_per_core=128,
                  shared_memory_per_core=102400, shared_memory_per_block_optin=101376,
                  l2_cache_size=50331648, memory_bandwidth=300000000000,
                  clock_rate_ghz=2.04, device_memory_size=23034052608),
    "a100": GpuSpec("NVIDIA A100-SXM4-80GB", (8, 0), core_count=108, fpus_per_core=64,
                    shared_memory_per_core=167936, shared_memory_per_block_optin=166912,
                    l2_cache_size=41943040, memory_bandwidth=2039000000000,
                    clock_rate_ghz=1.41, device_memory_size=85197848576),
    "h100": _H100,
    # The H100's chip with more and faster HBM.
    "h200": dataclasses.replace(_H100, description="NVIDIA H200", memory_bandwidth=4800000000000,
                                device_memory_size=150754820096),
}


def cuda_plugin_available() -> bool:
  """Whether jax's CUDA plugin is installed (it need not find a GPU or CUDA's runtime)."""
  return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


def ptxas_path() -> str | None:
  """Where XLA will find ``ptxas`` (``PATH``, ``/usr/local/cuda`` or ``nvidia-cuda-nvcc``)."""
  candidates = [shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"]
  try:
    from nvidia import cuda_nvcc  # pylint: disable=g-import-not-at-top
    candidates += [os.path.join(path, "bin", "ptxas") for path in cuda_nvcc.__path__]
  except ImportError:
    pass
  return next((path for path in candidates if path and os.path.exists(path)), None)


def ptxas_available() -> bool:
  """Whether XLA will find ``ptxas`` (:func:`ptxas_path`)."""
  return ptxas_path() is not None


@functools.cache
def gpu_device(name: str) -> jax.Device:
  """A compile-only device of the NVIDIA GPU ``name`` (a key of :data:`GPU_SPECS`).

  Raises:
    ValueError: an unknown name.
    RuntimeError: the CUDA plugin or ``ptxas`` is not installed, or the plugin did not register
      (CUDA's version check failed before jax started: see the module docstring).
  """
  if name not in GPU_SPECS:
    raise ValueError(f"name must be one of {sorted(GPU_SPECS)}, got {name!r}")
  if not cuda_plugin_available():
    raise RuntimeError("compiling for a GPU without one needs jax's CUDA plugin: "
                       "pip install 'jax[cuda12-local]'")
  if not ptxas_available():
    raise RuntimeError("compiling for a GPU without one needs ptxas: a CUDA toolkit in "
                       "/usr/local/cuda or pip install nvidia-cuda-nvcc-cu12")
  try:
    topology = topologies.get_topology_desc(
        "", "cuda", target_config=GPU_SPECS[name].target_config(), topology="1x1x1")
  except NotImplementedError as e:
    raise RuntimeError("jax's CUDA plugin did not register: set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 "
                       "(or JAX_PLATFORMS=cpu) before jax starts on a host without CUDA") from e
  return topology.devices[0]


def compile_for(device: jax.Device, fn: Callable[..., Any], *args: Any,
                compiler_options: dict[str, Any] | None = None,
                **kwargs: Any) -> jax.stages.Compiled:
  """Compiles ``jax.jit(fn)(*args, **kwargs)`` for ``device`` with the real Pallas kernels.

  Args:
    device: a compile-only device (:func:`tpu_device`, :func:`gpu_device`).
    fn: the function; its Pallas kernels must resolve ``interpret`` through
      :mod:`pallas_kernels.interpret` (every kernel here does).
    *args, **kwargs: pytrees of arrays or ``jax.ShapeDtypeStruct`` (shape and dtype only: they
      are placed on ``device``).
    compiler_options: XLA options for this compilation, e.g.
      ``{"xla_gpu_fail_ptx_compilation_on_register_spilling": True}`` (a kernel that spills
      registers fails to compile).

  Returns:
    The compiled program (``memory_analysis()``, ``as_text()``); it cannot run here.
  """
  sharding = SingleDeviceSharding(device)
  place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  args, kwargs = jax.tree.map(place, (args, kwargs))
  # A fresh function to trace: jax's trace cache keys on the function, not on the compile
  # target, and the kernels a wrapper builds depend on the target (e.g. the GPU generation).
  fresh = lambda *args, **kwargs: fn(*args, **kwargs)
  with compile_target(device.platform, device):
    traced = jax.jit(fresh).trace(*args, **kwargs)
    platform = "cuda" if device.platform == "gpu" else device.platform
    return traced.lower(lowering_platforms=(platform,)).compile(compiler_options)


@dataclasses.dataclass(frozen=True)
class KernelResources:
  """What ptxas reports for one GPU kernel of a compiled program (per thread)."""
  kernel: str  # the PTX entry: a Pallas kernel's name, or an XLA fusion's
  registers: int
  spill_store_bytes: int
  spill_load_bytes: int
  stack_frame_bytes: int


_PTXAS_ENTRY = re.compile(
    r"Compiling entry function '(?P<kernel>\w+)'.*?(?P<stack>\d+) bytes stack frame, "
    r"(?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads.*?"
    r"Used (?P<registers>\d+) registers", re.DOTALL)


def gpu_kernel_resources(device: jax.Device, fn: Callable[..., Any], *args: Any,
                         **kwargs: Any) -> list[KernelResources]:
  """Registers and spills of every GPU kernel of ``fn`` compiled for the GPU ``device``.

  Compiles as :func:`compile_for` with XLA's dump of the PTX it generated (Triton kernels and
  XLA's fusions), each of which ``ptxas -v`` then reports at the device's architecture; Mosaic
  GPU kernels report their own ptxas run (``MOSAIC_GPU_DUMP_PTXAS``, printed on the process'
  standard output, captured here). Register spills are the first thing that makes a kernel slow,
  and they are visible here without a GPU.
  """
  major, minor = GPU_SPECS[_spec_name(device)].compute_capability
  arch = f"sm_{major}{minor}" + ("a" if major >= 9 else "")
  with tempfile.TemporaryDirectory() as dump:
    with _mosaic_gpu_ptxas_report() as reports:  # filled on exit
      compile_for(device, fn, *args, compiler_options={"xla_dump_to": dump}, **kwargs)
    for ptx in sorted(glob.glob(os.path.join(dump, "*.ptx"))):
      with open(ptx) as f:
        if ".entry" not in f.read():  # a module without kernels (e.g. constants only)
          continue
      reports.append(subprocess.run([ptxas_path(), f"-arch={arch}", "-v", ptx, "-o", os.devnull],
                                    capture_output=True, text=True, check=True).stderr)
  return [KernelResources(m["kernel"], int(m["registers"]), int(m["stores"]), int(m["loads"]),
                          int(m["stack"]))
          for report in reports for m in _PTXAS_ENTRY.finditer(report)]


@contextlib.contextmanager
def _mosaic_gpu_ptxas_report() -> Iterator[list[str]]:
  """Mosaic GPU's ptxas report of what compiles inside, appended on exit to the yielded list:
  the process' file descriptor 1 goes to a temporary file meanwhile (C++ prints there, past
  Python's ``sys.stdout``)."""
  reports: list[str] = []
  sys.stdout.flush()
  saved, previous = os.dup(1), os.environ.get("MOSAIC_GPU_DUMP_PTXAS")
  os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
  with tempfile.TemporaryFile("w+") as captured:
    os.dup2(captured.fileno(), 1)
    try:
      yield reports
    finally:
      os.dup2(saved, 1)
      os.close(saved)
      if previous is None:
        del os.environ["MOSAIC_GPU_DUMP_PTXAS"]
      else:
        os.environ["MOSAIC_GPU_DUMP_PTXAS"] = previous
      captured.seek(0)
      reports.append(captured.read())


def _spec_name(device: jax.Device) -> str:
  """The :data:`GPU_SPECS` key of a compile-only GPU device."""
  return next(name for name, spec in GPU_SPECS.items() if spec.description == device.device_kind)
