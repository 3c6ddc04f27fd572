"""What the fused kernels share about their optional inputs: the pre-gate, the post-gate and the
skip term, as static flags (a kernel built without one never loads it)."""

from __future__ import annotations

import dataclasses
from typing import Any

NAMES = ("pre_gate", "post_gate", "skip")


@dataclasses.dataclass(frozen=True)
class Options:
  """Which of :data:`NAMES` a kernel loads."""
  pre_gate: bool
  post_gate: bool
  skip: bool

  @staticmethod
  def check(x: Any, n: int, pre_gate: Any, post_gate: Any, skip: Any) -> dict[str, bool]:
    """The flags of the options given with ``x [batch, seq, channels]`` for a transform of size
    ``n``, as keyword arguments; raises ValueError on a wrong shape."""
    if x.shape[1] > n:
      raise ValueError(f"x must have seq <= n = {n} rows, got shape {x.shape}")
    for name, gate in (("pre_gate", pre_gate), ("post_gate", post_gate)):
      if gate is not None and gate.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {x.shape}, got {gate.shape}")
    if skip is not None and skip.shape != x.shape[-1:]:
      raise ValueError(f"skip must have shape {x.shape[-1:]}, got {skip.shape}")
    return dict(pre_gate=pre_gate is not None, post_gate=post_gate is not None,
                skip=skip is not None)

  def names(self) -> tuple[str, ...]:
    """The names of the options loaded, in operand order."""
    return tuple(name for name in NAMES if getattr(self, name))
