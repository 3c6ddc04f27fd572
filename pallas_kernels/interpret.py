"""One switch that makes every Pallas kernel run on CPU, for tests.

Inside ``with interpret_mode():``

* GPU (Triton-lowered) kernels run with ``pallas_call(..., interpret=True)``: wrappers ask
  :func:`gpu_interpret` for their ``interpret`` argument;
* TPU (Mosaic) kernels run in the TPU interpret mode, which simulates VMEM, DMAs and semaphores
  on the host and can detect races: wrappers pass ``require_tpu_or_interpret(interpret)`` (a
  ``pltpu.InterpretParams``) to their ``pallas_call``;
* Mosaic GPU (Hopper) kernels run in the Mosaic GPU interpreter, which simulates warpgroups, TMA
  copies, barriers and ``wgmma``: wrappers pass ``interpret=mosaic_gpu_interpret(interpret)``.

The switch is per kernel family, never jax's global ``force_tpu_interpret_mode``: that would also
send GPU (Triton) kernels to the TPU interpreter, which rejects them.

Inside ``with compile_target("tpu"):`` (or ``"gpu"``) the kernels for that platform are built for
the real hardware although the host is a CPU: the wrappers get ``interpret=False``, so a
function can be lowered and compiled ahead of time for a device it does not run on
(:mod:`pallas_kernels.aot`).

Outside both, a kernel whose platform is not the current backend raises ``NotImplementedError`` so
that dispatch falls through to the next implementation.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import warnings
from collections.abc import Iterator
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class _Interpret:
  detect_races: bool


_INTERPRET: contextvars.ContextVar[_Interpret | None] = contextvars.ContextVar(
    "pallas_kernels_interpret", default=None)


@contextlib.contextmanager
def interpret_mode(*, detect_races: bool = False) -> Iterator[None]:
  """Runs GPU kernels with ``interpret=True`` and TPU kernels in TPU interpret mode.

  Args:
    detect_races: ask the TPU interpreter to detect races between DMAs and kernel reads/writes.
  """
  token = _INTERPRET.set(_Interpret(detect_races=detect_races))
  try:
    yield
  finally:
    _INTERPRET.reset(token)


# (platform, device or None) of the active compile_target.
_COMPILE_TARGET: contextvars.ContextVar[tuple[str, Any] | None] = contextvars.ContextVar(
    "pallas_kernels_compile_target", default=None)


@contextlib.contextmanager
def compile_target(platform: str, device: Any = None) -> Iterator[None]:
  """Builds the compiled (not interpreted) kernels of ``platform`` whatever the backend is.

  For ahead-of-time lowering and compilation on a host without that accelerator
  (:func:`pallas_kernels.aot.compile_for`): the kernels' wrappers resolve ``interpret`` to False
  instead of raising ``NotImplementedError``. Nothing inside may run the kernels.

  Args:
    platform: ``"tpu"`` (Mosaic TPU kernels) or ``"gpu"`` (Triton and Mosaic GPU kernels).
    device: the (compile-only) device compiled for, if known: wrappers whose defaults depend on
      the chip read it (:func:`gpu_compute_capability`).

  Raises:
    ValueError: another platform.
  """
  if platform not in ("tpu", "gpu"):
    raise ValueError(f"platform must be 'tpu' or 'gpu', got {platform!r}")
  token = _COMPILE_TARGET.set((platform, device))
  try:
    yield
  finally:
    _COMPILE_TARGET.reset(token)


def _compiling_for(platform: str) -> bool:
  """Whether :func:`compile_target` targets ``platform``."""
  target = _COMPILE_TARGET.get()
  return target is not None and target[0] == platform


def gpu_compute_capability() -> tuple[int, int] | None:
  """``(major, minor)`` of the NVIDIA GPU the kernels are built for: the device of
  :func:`compile_target`, else the first local GPU; None when neither is known (interpreting on
  a CPU, or a GPU without a compute capability, e.g. ROCm)."""
  target = _COMPILE_TARGET.get()
  if target is not None:
    device = target[1]
  else:
    try:
      device = jax.devices("gpu")[0]
    except RuntimeError:  # no GPU backend
      return None
  capability = getattr(device, "compute_capability", None)
  if not capability:
    return None
  major, minor = str(capability).split(".")
  return int(major), int(minor)


def interpreting() -> bool:
  """Whether :func:`interpret_mode` is active."""
  return _INTERPRET.get() is not None


def gpu_interpret(interpret: bool | None) -> bool:
  """Resolves a GPU kernel wrapper's ``interpret`` argument.

  Returns True when asked explicitly or inside :func:`interpret_mode`; returns False on a GPU
  or inside ``compile_target("gpu")``;
  raises NotImplementedError anywhere else, so dispatch moves on to the next implementation.
  """
  interpret = interpreting() if interpret is None else interpret
  if not interpret and jax.default_backend() not in ("cuda", "rocm", "gpu") and not (
      _compiling_for("gpu")):
    raise NotImplementedError(
        f"Pallas GPU kernel needs a GPU (backend is {jax.default_backend()!r}); "
        "use interpret=True or pallas_kernels.interpret.interpret_mode() to run it on CPU")
  return interpret


def require_tpu_or_interpret(interpret: bool | None = None) -> Any:
  """Resolves a TPU kernel wrapper's ``interpret`` argument into its ``pallas_call``'s.

  Returns ``pltpu.InterpretParams`` when ``interpret`` is True, or is None inside
  :func:`interpret_mode` (whose ``detect_races`` it takes); otherwise False on a TPU or inside
  ``compile_target("tpu")``; raises NotImplementedError anywhere else, so dispatch moves on to
  the next implementation.
  """
  settings = _INTERPRET.get()
  if interpret or (interpret is None and settings is not None):
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.InterpretParams(detect_races=bool(settings and settings.detect_races))
  if jax.default_backend() != "tpu" and not _compiling_for("tpu"):
    raise NotImplementedError(
        f"Pallas TPU kernel needs a TPU (backend is {jax.default_backend()!r}); "
        "use interpret=True or pallas_kernels.interpret.interpret_mode() to run it in the TPU "
        "interpreter on CPU")
  return False


# XLA CPU runtime threads the Mosaic GPU interpreter needs (see :func:`mosaic_gpu_interpret`).
MOSAIC_GPU_INTERPRETER_THREADS = 16


def mosaic_gpu_interpret(interpret: bool | None) -> Any:
  """The ``interpret`` argument of a Mosaic GPU (Hopper) kernel.

  Returns the Mosaic GPU interpreter's parameters when asked explicitly or inside
  :func:`interpret_mode`, False on a GPU of compute capability 9.x or inside
  ``compile_target("gpu")``; raises NotImplementedError
  anywhere else (another GPU generation, no GPU), so dispatch moves on.

  Threads: jax 0.10's interpreter runs each warpgroup of a CTA as its own XLA CPU computation,
  blocked in host callbacks at barriers, plus the computation that waits for them; XLA's CPU
  runtime runs them on a thread pool sized to the machine's cores. With 2 cores the pool can be
  full of blocked computations while the warpgroup they wait for cannot start: a hang that
  depends on timing. Set the environment variable ``NPROC`` (read by XLA when it creates the CPU
  client, so before jax first runs anything) to at least :data:`MOSAIC_GPU_INTERPRETER_THREADS`,
  as ``tests/conftest.py`` does.
  """
  interpret = interpreting() if interpret is None else interpret
  if interpret:
    threads = os.environ.get("NPROC") or os.cpu_count() or 1
    if int(threads) < MOSAIC_GPU_INTERPRETER_THREADS:
      warnings.warn(f"the Mosaic GPU interpreter may hang with {threads} XLA CPU threads; set "
                    f"NPROC={MOSAIC_GPU_INTERPRETER_THREADS} before jax starts (see "
                    "pallas_kernels.interpret.mosaic_gpu_interpret)", RuntimeWarning, stacklevel=2)
    # Not exported publicly by jax 0.10; the interpreter simulates warpgroups, TMA and barriers.
    from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top
    settings = _INTERPRET.get()
    return params.InterpretGPUParams(detect_races=bool(settings and settings.detect_races))
  if _compiling_for("gpu"):
    return False
  device = jax.devices()[0]
  capability = str(getattr(device, "compute_capability", ""))
  if device.platform != "gpu" or not capability.startswith("9."):
    raise NotImplementedError(
        f"the Hopper (Mosaic GPU) kernel needs an sm_90 GPU (device: {device.device_kind!r}, "
        f"compute capability {capability or 'none'}); use interpret_mode() to run it on CPU")
  return False
