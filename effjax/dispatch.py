"""Implementation dispatch: one registry per op, one table of default orders per platform.

Every op in ``effjax.ops`` is served by several implementations (a float32 reference, a
memory-efficient XLA version, Pallas kernels for GPU and TPU). Callers pick one with a single knob,
``implementation=``:

* ``None``: try the platform's default order from :data:`DEFAULT_ORDER` (the ONE table);
* ``"name"``: exactly that implementation;
* ``("a", "b", ...)``: try each in turn.

An implementation that cannot serve the given arguments (wrong platform, unsupported shape or
option) raises :class:`NotImplementedError` and the next one is tried. When none serves,
:class:`NoImplementationError` lists every implementation tried and its reason.

Implementations register lazily as ``"module:attribute"`` strings, so importing effjax never imports
a Pallas backend. A backend whose import fails is logged (warning) when first needed and its import
error is reported as that implementation's reason; it is never silently dropped.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

logger = logging.getLogger(__name__)

PLATFORMS = ("cpu", "gpu", "tpu")

# The ONE table: op name -> platform -> implementation names in the order they are tried.
# Reference implementations are oracles for tests and never appear here. A Pallas kernel enters a
# platform's order only after it ran correctly on that hardware, and :data:`KERNEL_EVIDENCE`
# cites the measurement; until then it is opt-in by name (implementation="pallas_tpu", ...).
DEFAULT_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "flash_attention": {"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("xla",)},
    # tpu: butterfly for the TPU's matmul units and FFT precision (an XLA path that ran correctly
    # on an H200, benchmarks/gpu/long_conv.md; not timed on a TPU).
    "long_conv": {"cpu": ("xla_fft",), "gpu": ("xla_fft",), "tpu": ("butterfly", "xla_fft")},
    "kivi_decode": {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)},
    "xquant_decode": {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)},
    "vidkv_decode": {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)},
}

# (op, platform, kernel) -> the committed benchmark file showing that kernel ran correctly on that
# platform's hardware; every Pallas kernel in DEFAULT_ORDER needs an entry (tests/test_dispatch.py).
KERNEL_EVIDENCE: dict[tuple[str, str, str], str] = {
    # NVIDIA H200, 2026-11-28: outputs within 0.0078 of cuDNN's in bf16 at S 2k-16k, D 64/128;
    # 3 of the 50 GPU tests of that run failed unidentified (benchmarks/gpu/gpu_check.md).
    ("flash_attention", "gpu", "pallas_gpu"): "benchmarks/gpu/attention_gpu.md",
}

# Implementations that are Pallas kernels (the rest are XLA compositions and references).
KERNEL_NAMES = ("pallas_gpu", "pallas_tpu", "mosaic_gpu")

Implementation = str | Sequence[str] | None


class NoImplementationError(NotImplementedError):
  """No implementation of an op could serve a call; the message lists each one's reason."""

  def __init__(self, op: str, reasons: Mapping[str, str]):
    self.op = op
    self.reasons = dict(reasons)
    lines = "\n".join(f"  - {name}: {reason}" for name, reason in self.reasons.items())
    super().__init__(f"no implementation of {op!r} could serve this call:\n{lines}")


@dataclasses.dataclass
class _Entry:
  target: Callable[..., Any] | str
  resolved: Callable[..., Any] | None = None
  import_error: str | None = None

  def load(self, op: str, name: str) -> Callable[..., Any]:
    """Returns the callable, importing it on first use; raises NotImplementedError if it cannot."""
    if self.resolved is not None:
      return self.resolved
    if self.import_error is not None:
      raise NotImplementedError(self.import_error)
    if callable(self.target):
      self.resolved = self.target
      return self.resolved
    module_name, _, attribute = self.target.partition(":")
    try:
      self.resolved = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
      self.import_error = f"backend {self.target!r} failed to import: {type(error).__name__}: {error}"
      logger.warning("effjax: implementation %r of op %r is unavailable: %s", name, op,
                     self.import_error)
      raise NotImplementedError(self.import_error) from error
    return self.resolved


_REGISTRY: dict[str, dict[str, _Entry]] = {}


def register(op: str, name: str, target: Callable[..., Any] | str) -> None:
  """Registers implementation ``name`` of ``op``.

  Args:
    op: the op's name, e.g. ``"flash_attention"``.
    name: the implementation's name, e.g. ``"xla"`` or ``"pallas_gpu"``.
    target: the callable, or ``"package.module:attribute"`` imported on first use.
  """
  implementations = _REGISTRY.setdefault(op, {})
  if name in implementations and implementations[name].target != target:
    raise ValueError(f"implementation {name!r} of op {op!r} is already registered "
                     f"as {implementations[name].target!r}")
  implementations[name] = _Entry(target)


def implementations(op: str) -> tuple[str, ...]:
  """Names of every registered implementation of ``op``."""
  return tuple(_registry_of(op))


def current_platform() -> str:
  """'cpu', 'gpu' or 'tpu' for the default JAX backend (CUDA and ROCm both count as 'gpu')."""
  platform = jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def default_order(op: str, platform: str | None = None) -> tuple[str, ...]:
  """The implementations tried for ``implementation=None`` on ``platform`` (default: current)."""
  platform = current_platform() if platform is None else platform
  if platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
  _registry_of(op)
  order = DEFAULT_ORDER.get(op, {}).get(platform)
  if not order:
    raise NoImplementationError(op, {"<default order>": f"no default order for platform {platform!r}"
                                     " in effjax.dispatch.DEFAULT_ORDER"})
  return order


def resolve(op: str, implementation: Implementation) -> tuple[str, ...]:
  """Canonicalizes ``implementation`` to the tuple of names to try, validating each name."""
  if implementation is None:
    names = default_order(op)
  elif isinstance(implementation, str):
    names = (implementation,)
  elif isinstance(implementation, Sequence) and implementation and all(
      isinstance(name, str) for name in implementation):
    names = tuple(implementation)
  else:
    raise TypeError(f"implementation must be None, a name or a non-empty sequence of names, "
                    f"got {implementation!r}")
  known = _registry_of(op)
  unknown = [name for name in names if name not in known]
  if unknown:
    raise ValueError(f"unknown implementation(s) {unknown} for op {op!r}; "
                     f"registered: {sorted(known)}")
  return names


def dispatch(op: str, implementation: Implementation, *args: Any, **kwargs: Any) -> Any:
  """Calls the first implementation of ``op`` that serves ``(*args, **kwargs)``.

  Raises:
    NoImplementationError: every implementation raised NotImplementedError (or failed to import).
    ValueError / TypeError: ``implementation`` names nothing registered or has the wrong type.
  """
  reasons: dict[str, str] = {}
  for name in resolve(op, implementation):
    entry = _REGISTRY[op][name]
    try:
      return entry.load(op, name)(*args, **kwargs)
    except NotImplementedError as error:
      reasons[name] = str(error) or type(error).__name__
  raise NoImplementationError(op, reasons)


def _registry_of(op: str) -> dict[str, _Entry]:
  if op not in _REGISTRY:
    raise ValueError(f"unknown op {op!r}; registered ops: {sorted(_REGISTRY)}")
  return _REGISTRY[op]
