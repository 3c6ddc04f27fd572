"""The Mosaic GPU attention kernels' static description: tile constants, :class:`BlockSizes`
(tiles and schedule, validated) and :class:`Call` (everything static about one call)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from pallas_kernels.flash_attention import masks

ROWS = 64  # rows of one consumer warpgroup's tiles (wgmma's M)
CONSUMERS = 2
TILE = ROWS * CONSUMERS  # rows per CTA: queries (forward, dq) or keys (dk/dv)
LOG2E = math.log2(math.e)
_BLOCKS = (64, 128)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and schedule of the Mosaic GPU kernels (each block 64 or 128).

  Attributes:
    block_kv: keys per forward step.
    block_kv_dq: keys per step of the dq kernel.
    block_q_dkv: queries per step of the dk/dv kernel.
    stages: ring slots (>= 2): how many steps the producer may load ahead.
    ping_pong: forward only, FlashAttention-3's schedule: the two consumers rendezvous twice per
      step, offset by one, so one's softmax runs while the other's GEMMs hold the tensor cores.
      Off by default.
    overlap: forward only, FlashAttention-3's intra-warpgroup pipelining: a consumer issues
      block ``j``'s ``Q K^T`` and block ``j - 1``'s ``P V`` together and runs the softmax of the
      former under the latter. Excludes ``ping_pong``. Any ``stages``: a consumer holds
      ``K_j`` and ``V_{j-1}`` (different slots), and ``K_j``'s slot is refilled once
      ``K_{j-2}`` is released, early in step ``j - 2``. Off by default.
  """
  block_kv: int = 128
  block_kv_dq: int = 64
  block_q_dkv: int = 64
  stages: int = 2
  ping_pong: bool = False
  overlap: bool = False

  def __post_init__(self):
    for name in ("block_kv", "block_kv_dq", "block_q_dkv"):
      value = getattr(self, name)
      if value not in _BLOCKS or isinstance(value, bool):
        raise ValueError(f"BlockSizes.{name} must be one of {_BLOCKS}, got {value!r}")
    if not isinstance(self.stages, int) or isinstance(self.stages, bool) or self.stages < 2:
      raise ValueError(f"BlockSizes.stages must be an int >= 2, got {self.stages!r}")
    for name in ("ping_pong", "overlap"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"BlockSizes.{name} must be a bool, got {getattr(self, name)!r}")
    if self.ping_pong and self.overlap:
      raise ValueError("BlockSizes.ping_pong and BlockSizes.overlap are exclusive (the "
                       "ping-pong rendezvous are placed for the plain schedule), got both True")


def default_block_sizes(head_dim: int) -> BlockSizes:
  """The block-size heuristic: 128-key forward blocks up to head_dim 128, 64 above (shared
  memory, registers); 64-row backward blocks, 2 stages, the plain schedule."""
  return BlockSizes(block_kv=128 if head_dim <= 128 else 64)


@dataclasses.dataclass(frozen=True)
class Call:
  """Everything static about one call (hashable: a ``jit`` static argument)."""
  mask: masks.MaskSpec
  scale: float
  softcap: float | None
  group: int  # query heads per kv head
  segments: bool
  blocks: BlockSizes
  interpret: Any  # False, or the interpreter's parameters
