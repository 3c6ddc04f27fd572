"""The ``cache:`` section of decoding configs: which KV cache to decode through.

```yaml
cache: {type: kivi, bits: 2, group_size: 32, residual: 128}   # default: {type: full}
```
"""

from __future__ import annotations

import dataclasses

from effjax.kv_cache import KIVI, CacheType, FullKVCache
from experiments.config import ConfigError, require

CACHE_TYPES = ("full", "kivi")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  type: str = "full"
  """'full': keys/values in the model's dtype; 'kivi': KIVI (Liu et al. 2024), per-channel keys,
  per-token values, asymmetric `bits`-bit codes, `residual` recent tokens in full precision."""
  bits: int = 2
  """kivi: code width (2 or 4 in the paper; 16 disables quantization)."""
  value_bits: int | None = None
  """kivi: the values' code width if it differs from the keys' (null: `bits`)."""
  group_size: int = 32
  """kivi: tokens per key group and channels per value group (the model's head_dim must be a
  multiple)."""
  residual: int = 128
  """kivi: recent tokens kept in full precision; a multiple of group_size."""

  def __post_init__(self):
    require(self.type in CACHE_TYPES, "cache.type", self.type, f"one of {list(CACHE_TYPES)}")
    if self.type == "kivi":
      try:
        self.cache_type()
      except ValueError as error:
        raise ConfigError(f"invalid KIVI settings in 'cache': {error}") from error

  def cache_type(self) -> CacheType:
    """What :func:`effjax.models.generate` and :func:`effjax.models.init_caches` take."""
    if self.type == "full":
      return FullKVCache
    return KIVI(bits=self.bits, group_size=self.group_size, residual=self.residual,
                value_bits=self.value_bits)

  @property
  def label(self) -> str:
    """A short name for tables: 'fp', 'KIVI-2', 'KIVI-K2V4', 'KIVI-4 (G=32, R=64)' (non-default
    G/R shown)."""
    if self.type == "full":
      return "fp"
    default = CacheConfig()
    details = ("" if (self.group_size, self.residual) == (default.group_size, default.residual)
               else f" (G={self.group_size}, R={self.residual})")
    widths = (self.bits if self.value_bits in (None, self.bits)
              else f"K{self.bits}V{self.value_bits}")
    return f"KIVI-{widths}{details}"
