"""The ``cache:`` section of decoding configs: which KV cache to decode through.

One frozen dataclass per cache type, chosen by the ``type`` key (a draccus choice type, as
levanter's optimizer configs); each takes only its own fields, so a field of another type is an
unknown config key, not silently ignored:

```yaml
cache: {type: full}                                           # the default
cache: {type: kivi, bits: 2, group_size: 32, residual: 128}   # + value_bits
cache: {type: vidkv, key_bits: 1.5, group_size: 32, residual: 128}
cache: {type: xquant, bits: 4, group_size: 64, residual: 0}
cache: {type: xquant_cl, bits: 2, first_bits: 4, first_layers: 3, group_size: 64, residual: 0}
```

Each type's defaults are those of its settings class in :mod:`effjax.kv_cache`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import draccus

from effjax.kv_cache import KIVI, CacheType, FullKVCache, VidKV, XQuant, XQuantCL
from experiments.config import ConfigError

# Group size and residual of KIVI and VidKV that labels leave out (the papers' settings).
PAPER_GROUP_SIZE = 32
PAPER_RESIDUAL = 128


@dataclasses.dataclass(frozen=True)
class CacheConfig(draccus.ChoiceRegistry):
  """A KV cache: ``{type: full}``, ``{type: kivi, ...}``, ``{type: vidkv, ...}``,
  ``{type: xquant, ...}`` or ``{type: xquant_cl, ...}``; see each type's fields."""

  NAME: ClassVar[str] = ""  # the method's name in messages

  @classmethod
  def default_choice_name(cls) -> str:
    return "full"

  @property
  def type(self) -> str:
    """The ``type`` key that selects this class ('full', 'kivi', ...)."""
    return CacheConfig.get_choice_name(type(self))

  def __post_init__(self):
    try:
      self.cache_type()
    except ValueError as error:
      raise ConfigError(f"invalid {self.NAME} settings in cache config {self.yaml()}: "
                        f"{error}") from error

  def yaml(self) -> str:
    """This config as the YAML flow mapping that selects it: ``{type: kivi, bits: 2, ...}``."""
    fields = [f"{field.name}: {_yaml_scalar(getattr(self, field.name))}"
              for field in dataclasses.fields(self)]
    return "{" + ", ".join([f"type: {self.type}", *fields]) + "}"

  def cache_type(self) -> CacheType:
    """What :func:`effjax.models.generate` and :func:`effjax.models.init_caches` take."""
    raise NotImplementedError(f"{type(self).__name__} does not define cache_type")

  @property
  def label(self) -> str:
    """A short name for tables: 'fp', 'KIVI-2', 'KIVI-K2V4', 'KIVI-4 (G=32, R=64)', ..."""
    raise NotImplementedError(f"{type(self).__name__} does not define label")


def _yaml_scalar(value) -> str:
  return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _details(group_size: int, residual: int) -> str:
  """' (G=.., R=..)' unless the papers' group size and residual."""
  if (group_size, residual) == (PAPER_GROUP_SIZE, PAPER_RESIDUAL):
    return ""
  return f" (G={group_size}, R={residual})"


@CacheConfig.register_subclass("full")
@dataclasses.dataclass(frozen=True)
class FullCacheConfig(CacheConfig):
  """'full': keys and values in the model's dtype (the reference of the quantized caches)."""

  NAME: ClassVar[str] = "full"

  def cache_type(self) -> CacheType:
    return FullKVCache

  @property
  def label(self) -> str:
    return "fp"


@CacheConfig.register_subclass("kivi")
@dataclasses.dataclass(frozen=True)
class KIVIConfig(CacheConfig):
  """'kivi': KIVI (Liu et al. 2024): per-channel keys, per-token values, asymmetric `bits`-bit
  codes, `residual` recent tokens in full precision."""

  NAME: ClassVar[str] = "KIVI"
  bits: int = 2
  """Code width (2 or 4 in the paper; 16 disables quantization)."""
  value_bits: int | None = None
  """The values' code width if it differs from the keys' (null: `bits`)."""
  group_size: int = 32
  """Tokens per key group and channels per value group (the model's head_dim must be a
  multiple)."""
  residual: int = 128
  """Recent tokens kept in full precision; a multiple of group_size."""

  def cache_type(self) -> CacheType:
    return KIVI(bits=self.bits, group_size=self.group_size, residual=self.residual,
                value_bits=self.value_bits)

  @property
  def label(self) -> str:
    widths = (self.bits if self.value_bits in (None, self.bits)
              else f"K{self.bits}V{self.value_bits}")
    return f"KIVI-{widths}{_details(self.group_size, self.residual)}"


@CacheConfig.register_subclass("vidkv")
@dataclasses.dataclass(frozen=True)
class VidKVConfig(CacheConfig):
  """'vidkv': VidKV (Tao et al. 2025): 2-bit/1-bit+FFT mixed keys, ternary per-channel values,
  `residual` recent tokens in full precision."""

  NAME: ClassVar[str] = "VidKV"
  key_bits: float = 1.5
  """Average key width in [1, 2] (that fraction minus 1 of the channels at 2 bits, the rest 1-bit
  after an FFT); values are ternary."""
  group_size: int = 32
  """Tokens per group of every key and value channel."""
  residual: int = 128
  """Recent tokens kept in full precision; a multiple of group_size."""

  def cache_type(self) -> CacheType:
    return VidKV(key_bits=self.key_bits, group_size=self.group_size, residual=self.residual)

  @property
  def label(self) -> str:
    return f"VidKV K{self.key_bits:g}V1.58{_details(self.group_size, self.residual)}"


@CacheConfig.register_subclass("xquant")
@dataclasses.dataclass(frozen=True)
class XQuantConfig(CacheConfig):
  """'xquant': XQuant (Tomar et al. 2025): the layer input X (or its SVD latents, GQA) quantized
  per token in `bits`-bit groups of `group_size` channels; K/V rematerialized."""

  NAME: ClassVar[str] = "XQuant"
  bits: int = 4
  """Code width of the cached stream (paper: 2-4; 16 disables quantization)."""
  group_size: int = 64
  """Consecutive channels of one token sharing a scale and zero point."""
  residual: int = 0
  """Recent tokens kept in full precision (0: none)."""

  def cache_type(self) -> CacheType:
    return XQuant(bits=self.bits, group_size=self.group_size, residual=self.residual)

  @property
  def label(self) -> str:
    window = f", R={self.residual}" if self.residual else ""
    return f"XQuant-{self.bits} (G={self.group_size}{window})"


@CacheConfig.register_subclass("xquant_cl")
@dataclasses.dataclass(frozen=True)
class XQuantCLConfig(CacheConfig):
  """'xquant_cl': XQuant-CL (Tomar et al. 2025): quantized cross-layer deltas of the residual
  stream; K/V rematerialized."""

  NAME: ClassVar[str] = "XQuant-CL"
  bits: int = 2
  """Code width of the deltas of layers >= first_layers."""
  first_bits: int = 4
  """Code width of the first `first_layers` layers."""
  first_layers: int = 3
  """Layers using `first_bits`."""
  group_size: int = 64
  """Consecutive channels of one token sharing a scale and zero point."""
  residual: int = 0
  """Recent tokens kept in full precision (0: none)."""

  def cache_type(self) -> CacheType:
    return XQuantCL(bits=self.bits, first_bits=self.first_bits, first_layers=self.first_layers,
                    group_size=self.group_size, residual=self.residual)

  @property
  def label(self) -> str:
    window = f", R={self.residual}" if self.residual else ""
    return (f"XQuant-CL-{self.bits} (first {self.first_layers} @{self.first_bits}, "
            f"G={self.group_size}{window})")
