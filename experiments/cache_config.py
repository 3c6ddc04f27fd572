"""The ``cache:`` section of decoding configs: which KV cache to decode through.

```yaml
cache: {type: kivi, bits: 2, group_size: 32, residual: 128}   # default: {type: full}
cache: {type: vidkv, key_bits: 1.5, group_size: 32, residual: 128}
cache: {type: xquant, bits: 4, group_size: 64, residual: 128} # or xquant_cl (+ first_bits, ...)
```
"""

from __future__ import annotations

import dataclasses

from effjax.kv_cache import KIVI, CacheType, FullKVCache, VidKV, XQuant, XQuantCL
from experiments.config import ConfigError, require

CACHE_TYPES = ("full", "kivi", "vidkv", "xquant", "xquant_cl")
DEFAULT_RESIDUAL = 128  # kivi, vidkv


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  type: str = "full"
  """'full': keys/values in the model's dtype; 'kivi': KIVI (Liu et al. 2024), per-channel keys,
  per-token values, asymmetric `bits`-bit codes, `residual` recent tokens in full precision;
  'vidkv': VidKV (Tao et al. 2025), 2-bit/1-bit+FFT mixed keys, ternary per-channel values."""
  bits: int = 2
  """kivi: code width (2 or 4 in the paper; 16 disables quantization)."""
  value_bits: int | None = None
  """kivi: the values' code width if it differs from the keys' (null: `bits`)."""
  group_size: int = 32
  """kivi: tokens per key group and channels per value group (the model's head_dim must be a
  multiple)."""
  residual: int | None = None
  """Recent tokens kept in full precision (null: the type's default). kivi/vidkv: a multiple of
  group_size, default 128; xquant/xquant_cl: any int >= 0, default 0 (no window)."""
  key_bits: float = 1.5
  """vidkv: average key width in [1, 2] (that fraction minus 1 of the channels at 2 bits, the rest
  1-bit after an FFT); values are ternary. vidkv also uses group_size (tokens per group of every
  key and value channel) and residual."""
  first_bits: int = 4
  """xquant_cl: code width of the first `first_layers` layers ('xquant'/'xquant_cl' (Tomar et al.
  2025): the layer input X, its SVD latents (GQA) or cross-layer deltas of the residual stream,
  quantized per token in `bits`-bit groups of `group_size` channels; K/V rematerialized)."""
  first_layers: int = 3
  """xquant_cl: layers using `first_bits`."""

  def __post_init__(self):
    require(self.type in CACHE_TYPES, "cache.type", self.type, f"one of {list(CACHE_TYPES)}")
    if self.type != "full":
      try:
        self.cache_type()
      except ValueError as error:
        name = {"kivi": "KIVI", "vidkv": "VidKV", "xquant": "XQuant",
                "xquant_cl": "XQuant-CL"}[self.type]
        raise ConfigError(f"invalid {name} settings in 'cache': {error}") from error

  def cache_type(self) -> CacheType:
    """What :func:`effjax.models.generate` and :func:`effjax.models.init_caches` take."""
    if self.type == "full":
      return FullKVCache
    if self.type == "xquant":
      return XQuant(bits=self.bits, group_size=self.group_size, residual=self.window)
    if self.type == "xquant_cl":
      return XQuantCL(bits=self.bits, first_bits=self.first_bits, first_layers=self.first_layers,
                      group_size=self.group_size, residual=self.window)
    if self.type == "vidkv":
      return VidKV(key_bits=self.key_bits, group_size=self.group_size, residual=self.window)
    return KIVI(bits=self.bits, group_size=self.group_size, residual=self.window,
                value_bits=self.value_bits)

  @property
  def window(self) -> int:
    """``residual`` with the type's default filled in."""
    if self.residual is not None:
      return self.residual
    return 0 if self.type in ("xquant", "xquant_cl") else DEFAULT_RESIDUAL

  @property
  def label(self) -> str:
    """A short name for tables: 'fp', 'KIVI-2', 'KIVI-K2V4', 'KIVI-4 (G=32, R=64)' (non-default
    G/R shown)."""
    if self.type == "full":
      return "fp"
    default = CacheConfig()
    details = ("" if (self.group_size, self.window) == (default.group_size, DEFAULT_RESIDUAL)
               else f" (G={self.group_size}, R={self.window})")
    window = f", R={self.window}" if self.window else ""
    if self.type == "xquant":
      return f"XQuant-{self.bits} (G={self.group_size}{window})"
    if self.type == "xquant_cl":
      return (f"XQuant-CL-{self.bits} (first {self.first_layers} @{self.first_bits}, "
              f"G={self.group_size}{window})")
    if self.type == "vidkv":
      return f"VidKV K{self.key_bits:g}V1.58{details}"
    widths = (self.bits if self.value_bits in (None, self.bits)
              else f"K{self.bits}V{self.value_bits}")
    return f"KIVI-{widths}{details}"
