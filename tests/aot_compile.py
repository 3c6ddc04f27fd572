"""Compiling kernels for a TPU or an NVIDIA GPU on this host, with the real compilers (Mosaic
TPU from libtpu; Triton, Mosaic GPU and ptxas through jax's CUDA plugin) for compile-only
devices (:mod:`pallas_kernels.aot`); a test skips when its compiler is not installed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import pytest

from pallas_kernels import aot

# TPU generations: v5e in every default run; v6e and the megacore ones (v4, v5p) slow.
ALL_GENERATIONS = pytest.mark.parametrize("generation", [
    "v5e", *(pytest.param(name, marks=pytest.mark.slow) for name in ("v6e", "v4", "v5p"))])
# GPUs for the Triton kernels: Hopper in every default run, Ampere (less shared memory per
# block) slow.
TRITON_GPUS = pytest.mark.parametrize("gpu_name", [
    "h100", pytest.param("a100", marks=pytest.mark.slow)])
# The same and Ada (sm_89, L4: the least shared memory per block, 99 KB), slow: for kernels sized
# to fit every card (the quantized-cache decode kernels).
EVERY_TRITON_GPU = pytest.mark.parametrize("gpu_name", [
    "h100", *(pytest.param(name, marks=pytest.mark.slow) for name in ("a100", "l4"))])


def compile_for_tpu(generation: str, fn: Callable[..., Any], *args: Any,
                    **kwargs: Any) -> jax.stages.Compiled:
  """``fn`` compiled for a TPU ``generation`` with the real kernels (skips without libtpu)."""
  if not aot.libtpu_available():
    pytest.skip("libtpu is not installed (pip install -e '.[aot]')")
  return aot.compile_for(aot.tpu_device(generation), fn, *args, **kwargs)


def compile_for_gpu(gpu: str, fn: Callable[..., Any], *args: Any,
                    **kwargs: Any) -> jax.stages.Compiled:
  """``fn`` compiled for the NVIDIA ``gpu`` with the real kernels (skips without the CUDA
  plugin or ptxas)."""
  if not (aot.cuda_plugin_available() and aot.ptxas_available()):
    pytest.skip("jax's CUDA plugin or ptxas is not installed (pip install -e '.[aot]')")
  return aot.compile_for(aot.gpu_device(gpu), fn, *args, **kwargs)


def gpu_kernel_resources(gpu: str, fn: Callable[..., Any], *args: Any
                         ) -> dict[str, aot.KernelResources]:
  """ptxas' registers and spills of each kernel of ``fn`` compiled for the NVIDIA ``gpu``, by
  kernel name (skips without the CUDA plugin or ptxas)."""
  if not (aot.cuda_plugin_available() and aot.ptxas_available()):
    pytest.skip("jax's CUDA plugin or ptxas is not installed (pip install -e '.[aot]')")
  return {r.kernel: r for r in aot.gpu_kernel_resources(aot.gpu_device(gpu), fn, *args)}


def kernel_calls(compiled: jax.stages.Compiled) -> int:
  """Mosaic kernel launches in the compiled TPU program."""
  return compiled.as_text().count('custom_call_target="tpu_custom_call"')


def gpu_kernel_calls(compiled: jax.stages.Compiled, kind: str) -> int:
  """Launches of ``kind`` (``"triton"`` or ``"mosaic_gpu"``) kernels in the compiled GPU program."""
  target = {"triton": "__gpu$xla.gpu.triton", "mosaic_gpu": "mosaic_gpu"}[kind]
  return compiled.as_text().count(f'custom_call_target="{target}')
