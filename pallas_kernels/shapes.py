"""Rounding of sizes, zero padding of arrays and the ``block_sizes`` argument, shared by every
kernel wrapper.

Pure ``jax.numpy`` (no Pallas, no effjax), so effjax's XLA implementations use it too. The size
functions take Python ints or int32 arrays (block indices inside a kernel or a jitted function);
a pad to the size an axis already has returns the array itself, so aligned inputs cost no copy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax.numpy as jnp

_T = TypeVar("_T")


def cdiv(n: Any, d: Any) -> Any:
  """``ceil(n / d)`` for ``n >= 0`` and ``d > 0``: how many blocks of ``d`` cover ``n``."""
  return -(-n // d)


def round_up(n: Any, multiple: Any) -> Any:
  """The least multiple of ``multiple`` that is ``>= n``."""
  return cdiv(n, multiple) * multiple


def next_power_of_two(n: int, minimum: int = 1) -> int:
  """The least power of two ``>= max(n, minimum)`` (``minimum`` itself a power of two)."""
  return max(minimum, 1 << max(n - 1, 0).bit_length())


def balanced_block(length: int, target: int, multiple: int) -> int:
  """The block that cuts ``length`` into ``cdiv(length, target)`` near-equal blocks, rounded up
  to ``multiple``: the blocks pad ``length`` by less than ``multiple`` each."""
  return round_up(cdiv(length, cdiv(length, target)), multiple)


def pad_axes(x: Any, sizes: Mapping[int, int], *, mode: str = "constant") -> Any:
  """``x`` padded at the end of each axis ``a`` of ``sizes`` to ``sizes[a]`` (``>= x.shape[a]``),
  with zeros or :func:`jax.numpy.pad`'s ``mode``, in one pad; ``x`` itself when no axis grows."""
  widths = [(0, 0)] * x.ndim
  for axis, size in sizes.items():
    widths[axis] = (0, size - x.shape[axis])
  if all(after == 0 for _, after in widths):
    return x
  return jnp.pad(x, widths, mode=mode)


def pad_axis(x: Any, axis: int, size: int, *, mode: str = "constant") -> Any:
  """``x`` padded at the end of ``axis`` to ``size`` (:func:`pad_axes` of one axis)."""
  return pad_axes(x, {axis: size}, mode=mode)


def pad_to_multiple(x: Any, axis: int, multiple: int, *, mode: str = "constant") -> Any:
  """``x`` padded at the end of ``axis`` to the next multiple of ``multiple``."""
  return pad_axis(x, axis, round_up(x.shape[axis], multiple), mode=mode)


def resolve_block_sizes(block_sizes: Any, cls: type[_T], default: Callable[[], _T]) -> _T:
  """A kernel wrapper's ``block_sizes`` argument: ``default()`` (its heuristic) for None, else
  ``block_sizes`` itself, which must be a ``cls`` (the wrapper's block-size dataclass).

  Raises:
    TypeError: ``block_sizes`` is neither None nor a ``cls``.
  """
  if block_sizes is None:
    return default()
  if not isinstance(block_sizes, cls):
    raise TypeError(f"block_sizes must be a {cls.__module__}.{cls.__qualname__} or None, got "
                    f"{block_sizes!r}")
  return block_sizes
