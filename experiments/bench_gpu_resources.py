"""Registers and spills of the Triton kernels on NVIDIA GPUs, compiled here without a GPU.

Each op's default configuration is compiled for an H100 and an A100 (compile-only devices of jax's
CUDA plugin, :mod:`pallas_kernels.aot`) and ``ptxas -v`` reports every kernel's registers per
thread and spill traffic. A kernel that spills moves registers through local memory (L1/L2) on
every access: the first thing to look at when a Triton kernel is slow, visible before any timing.
The Mosaic GPU (Hopper) kernels report their own ptxas run (H100 only: sm_90a). Set
``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` before jax starts (this module does it when imported first,
as ``effjax-bench`` does).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses  # noqa: E402
import functools  # noqa: E402
import pathlib  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from effjax import benchmarking  # noqa: E402
from effjax.ops.attention import flash_attention  # noqa: E402
from effjax.ops.long_conv import long_conv  # noqa: E402
from pallas_kernels import aot  # noqa: E402

ATTENTION_SEQ, ATTENTION_HEADS = 4096, 8
LONG_CONV_CHANNELS = 768


@dataclasses.dataclass(frozen=True)
class Config:
  """One program to compile: ``op`` and ``setting`` label the rows."""
  op: str
  setting: str
  fn: Callable[..., Any]
  args: tuple[jax.ShapeDtypeStruct, ...]
  hopper_only: bool = False


def _gradient(fn: Callable[..., Any], argnums: tuple[int, ...]) -> Callable[..., Any]:
  """The forward and backward of ``fn`` (the gradient of the float32 sum of squares)."""
  return jax.grad(lambda *args: jnp.sum(fn(*args).astype(jnp.float32) ** 2), argnums=argnums)


def _attention(dtype, head_dim: int, implementation: str = "pallas_gpu") -> Config:
  spec = jax.ShapeDtypeStruct((1, ATTENTION_SEQ, ATTENTION_HEADS, head_dim), dtype)
  fn = functools.partial(flash_attention, causal=True, implementation=implementation)
  return Config(f"flash_attention {implementation} fwd+bwd",
                f"{jnp.dtype(dtype).name} d={head_dim} causal S={ATTENTION_SEQ}",
                _gradient(fn, (0, 1, 2)), (spec,) * 3, hopper_only=implementation == "mosaic_gpu")


def _long_conv(seq: int, gated: bool) -> Config:
  u = jax.ShapeDtypeStruct((1, seq, LONG_CONV_CHANNELS), jnp.bfloat16)
  kernel = jax.ShapeDtypeStruct((LONG_CONV_CHANNELS, seq), jnp.float32)
  if gated:
    fn = lambda u, kernel, gate: long_conv(u, kernel, pre_gate=gate, post_gate=gate,
                                           implementation="pallas_gpu")
    args = (u, kernel, u)
  else:
    fn, args = functools.partial(long_conv, implementation="pallas_gpu"), (u, kernel)
  return Config("long_conv fwd+bwd", f"bf16 causal N={seq}{' gated' if gated else ''}",
                _gradient(fn, tuple(range(len(args)))), args)


def configs(quick: bool) -> list[Config]:
  if quick:
    return [_attention(jnp.bfloat16, 64)]
  return ([_attention(jnp.bfloat16, d) for d in (64, 128, 256)] + [_attention(jnp.float32, 128)]
          + [_attention(jnp.bfloat16, d, "mosaic_gpu") for d in (64, 128)]
          + [_long_conv(seq, False) for seq in (512, 2048, 8192)] + [_long_conv(2048, True)])


def measure(gpus: tuple[str, ...], quick: bool) -> list[dict]:
  rows = []
  for gpu_name in gpus:
    device = aot.gpu_device(gpu_name)
    for config in configs(quick):
      if config.hopper_only and aot.GPU_SPECS[gpu_name].compute_capability[0] != 9:
        continue
      base = {"gpu": gpu_name, "op": config.op, "setting": config.setting}
      try:
        resources = aot.gpu_kernel_resources(device, config.fn, *config.args)
      except Exception as e:  # pylint: disable=broad-except  (a row, not a crash)
        rows.append({**base, "kernel": "-", "error": str(e).splitlines()[0][:160]})
        continue
      rows += [{**base, **dataclasses.asdict(r), "error": ""} for r in resources
               if not r.kernel.startswith(("loop_", "input_", "wrapped_"))]  # XLA's fusions
  return rows


def run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]:
  gpus = ("h100",) if quick else ("h100", "a100")
  rows = measure(gpus, quick)
  notes = ("Compiled on a CPU host for compile-only GPU devices (pallas_kernels.aot: jax's CUDA "
           "plugin, Triton, ptxas of CUDA 13 for sm_90a / sm_80); the Pallas kernels of each op's "
           "default configuration, XLA's own fusions left out. registers = per thread (255 is the "
           "limit); spill stores/loads = bytes per thread moved to local memory by ptxas; "
           "stack_frame_bytes = local memory per thread. Not a timing: nothing ran on a GPU.")
  paths = list(benchmarking.write_results(
      "gpu_kernel_resources", rows, title="Triton kernels on NVIDIA GPUs: registers and spills",
      columns=["gpu", "op", "setting", "kernel", "registers", "spill_store_bytes",
               "spill_load_bytes", "stack_frame_bytes", "error"],
      directory=out_dir, notes=notes))
  return paths
