"""The ``optim:`` section of training configs: schedule, clipping, and which optimizer.

```yaml
optim: {name: adamw, learning_rate: 3.0e-3}                       # the default
optim: {name: frugal, frugal: {rho: 0.25, update_gap: 200}}       # effjax.optim.frugal
optim: {name: galore, frugal: {rho: 0.25}}                        # FRUGAL without the residual
optim: {name: spiel, spiel: {density: 0.01}}                      # effjax.optim.sparse_finetune
optim: {name: snell, snell: {rank: 8, sparsity: 0.9}}             # effjax.optim.snell
```

Every optimizer runs after global-norm clipping on a linear warm-up + cosine decay schedule and is
an optax GradientTransformation whose state ``effjax.optim.zero_trainer`` shards under ZeRO 1-3.
A section for an optimizer that ``name`` does not choose is an error, not silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from effjax import optim
from effjax.nn.long_conv import KERNEL_LR_RATIO, long_conv_optimizer
from experiments.config import require

NAMES = ("adamw", "frugal", "galore", "spiel", "snell")
EMBEDDING = "params/embed/embedding"


@dataclasses.dataclass(frozen=True)
class FrugalConfig:
  """FRUGAL / GaLore settings (:func:`effjax.optim.frugal`)."""
  rho: float = 0.25
  """Share of each attention/MLP matrix's smaller side kept as the Adam subspace, in (0, 1]."""
  update_gap: int = 200
  """Steps between subspace refreshes (moments reset then)."""
  projection: str = "svd"
  """'svd' (GaLore-like, from the gradient), 'random' (semi-orthogonal) or 'blocks' (BAdam-like
  whole tensors)."""
  state_free: str = "sign"
  """frugal only: the residual's update, 'sign' (signSGD) or 'sgd'."""
  inactive_lr_scale: float = 1.0
  """frugal only: scale of the residual's update (the paper: 1.0 pre-training, 0.1
  fine-tuning)."""
  project_embedding: bool = False
  """Project the (tied) token embedding too, as the FRUGAL code's proj_embeds: in small models it
  holds most of Adam's state."""

  def __post_init__(self):
    require(0 < self.rho <= 1, "optim.frugal.rho", self.rho, "in (0, 1]")
    require(self.update_gap >= 1, "optim.frugal.update_gap", self.update_gap, ">= 1")
    require(self.projection in ("svd", "random", "blocks"), "optim.frugal.projection",
            self.projection, "'svd', 'random' or 'blocks'")
    require(self.state_free in ("sign", "sgd"), "optim.frugal.state_free", self.state_free,
            "'sign' or 'sgd' (name: galore has no residual update)")
    require(self.inactive_lr_scale >= 0, "optim.frugal.inactive_lr_scale",
            self.inactive_lr_scale, ">= 0")


@dataclasses.dataclass(frozen=True)
class SpielConfig:
  """SpIEL sparse fine-tuning settings (:func:`effjax.optim.sparse_finetune`)."""
  density: float = 0.01
  """Share of each attention/MLP matrix's entries that may differ from the starting weights."""
  reselection_steps: int = 100
  """Steps between prune-and-regrow rounds."""
  reselection_rate: float = 0.2
  """Share of the entries replaced at a round, decaying linearly to 0 over training."""
  regrow: str = "sm3"
  """Regrowth score: 'sm3' (SM3 row/column statistics, SpIEL-MA) or 'gradient' (accumulated
  gradient magnitude, SpIEL-AG)."""
  accumulation_steps: int = 5
  """Steps of gradient statistics before a round."""
  train_others: bool = False
  """Also train the embedding and norms with AdamW (their full Adam state); False: frozen."""

  def __post_init__(self):
    require(0 < self.density <= 1, "optim.spiel.density", self.density, "in (0, 1]")
    require(self.reselection_steps >= 1, "optim.spiel.reselection_steps",
            self.reselection_steps, ">= 1")
    require(0 <= self.reselection_rate <= 1, "optim.spiel.reselection_rate",
            self.reselection_rate, "in [0, 1]")
    require(self.regrow in ("sm3", "gradient"), "optim.spiel.regrow", self.regrow,
            "'sm3' or 'gradient'")
    require(self.accumulation_steps >= 1, "optim.spiel.accumulation_steps",
            self.accumulation_steps, ">= 1")


@dataclasses.dataclass(frozen=True)
class SnellConfig:
  """SNELL settings (:func:`effjax.optim.snell`)."""
  rank: int = 8
  """Rank of each matrix's factors A [m, rank], B [rank, n] (even for the piecewise kernel)."""
  sparsity: float = 0.9
  """Share of each merged delta zeroed by the competition (the largest |delta| survive)."""
  kernel: str = "piecewise_linear"
  """'piecewise_linear' (SNELL's) or 'linear' (LoRA's A @ B)."""
  kernel_scale: float = 0.1
  """The kernel's coefficient."""
  train_others: bool = False
  """Also train the embedding and norms with AdamW (their full Adam state); False: frozen."""

  def __post_init__(self):
    require(self.rank >= 1, "optim.snell.rank", self.rank, ">= 1")
    require(0 <= self.sparsity < 1, "optim.snell.sparsity", self.sparsity, "in [0, 1)")
    require(self.kernel in ("piecewise_linear", "linear"), "optim.snell.kernel", self.kernel,
            "'piecewise_linear' or 'linear'")
    require(self.kernel_scale > 0, "optim.snell.kernel_scale", self.kernel_scale, "> 0")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  name: str = "adamw"
  """'adamw'; 'frugal' (Adam on a rank-rho subspace of each attention/MLP matrix, signSGD on
  the rest; settings in `frugal`); 'galore' (the same without the residual update); 'spiel'
  (sparse fine-tuning of a moving set of entries; `spiel`); 'snell' (a sparsified kernelized
  low-rank delta; `snell`)."""
  learning_rate: float = 3e-3
  """Peak learning rate (after warm-up)."""
  warmup_steps: int = 25
  """Linear warm-up from 0."""
  final_lr_fraction: float = 0.1
  """Cosine decay ends at this fraction of the peak."""
  weight_decay: float = 0.1
  """Decoupled weight decay, applied to matrices only (not norms)."""
  b1: float = 0.9
  """Adam beta1."""
  b2: float = 0.95
  """Adam beta2."""
  grad_clip: float = 1.0
  """Global-norm gradient clipping threshold."""
  kernel_learning_rate: float | None = None
  """Peak learning rate of the long-convolution kernels (model.mixer long_conv / h3): Adam with
  no weight decay on the same warm-up and decay, as the paper. None: learning_rate times
  effjax.nn.long_conv.KERNEL_LR_RATIO (0.1, safari's LRA configs)."""
  frugal: FrugalConfig | None = None
  """Settings of name: frugal or galore (None: the defaults)."""
  spiel: SpielConfig | None = None
  """Settings of name: spiel (None: the defaults)."""
  snell: SnellConfig | None = None
  """Settings of name: snell (None: the defaults)."""

  def __post_init__(self):
    require(self.name in NAMES, "optim.name", self.name, f"one of {list(NAMES)}")
    require(self.learning_rate > 0, "optim.learning_rate", self.learning_rate, "> 0")
    require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
    require(0 <= self.final_lr_fraction <= 1, "optim.final_lr_fraction", self.final_lr_fraction,
            "in [0, 1]")
    require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
    require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1/b2", (self.b1, self.b2), "in [0, 1)")
    require(self.grad_clip > 0, "optim.grad_clip", self.grad_clip, "> 0")
    require(self.kernel_learning_rate is None or self.kernel_learning_rate > 0,
            "optim.kernel_learning_rate", self.kernel_learning_rate, "None or > 0")
    for section, names in (("frugal", ("frugal", "galore")), ("spiel", ("spiel",)),
                           ("snell", ("snell",))):
      require(getattr(self, section) is None or self.name in names, f"optim.{section}",
              getattr(self, section),
              f"unset with optim.name={self.name!r} (it configures {'/'.join(names)})")
    if self.name == "galore" and self.frugal is not None:
      for key in ("state_free", "inactive_lr_scale"):
        require(getattr(self.frugal, key) == getattr(FrugalConfig(), key), f"optim.frugal.{key}",
                getattr(self.frugal, key), "unset with optim.name='galore' (no residual update)")


def kernel_learning_rate(config: OptimConfig) -> float:
  """Peak learning rate of long-convolution kernels: ``kernel_learning_rate``, else the paper's
  ratio to ``learning_rate``."""
  if config.kernel_learning_rate is None:
    return config.learning_rate * KERNEL_LR_RATIO
  return config.kernel_learning_rate


def matrices_decayed(params: Any) -> Any:
  """The weight-decay mask: matrices (ndim >= 2) only, not norms."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(config: OptimConfig, total_steps: int, mixer: str = "attention"
                    ) -> optax.GradientTransformation:
  """Clipping, then the chosen optimizer on a warm-up + cosine schedule, weight decay on matrices
  only; for a long-convolution ``mixer`` the kernels instead get :func:`long_conv_optimizer`'s
  Adam, peaking at :func:`kernel_learning_rate` on the same schedule shape, without weight
  decay."""
  schedule = lambda peak: optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=config.warmup_steps,
      decay_steps=max(total_steps, config.warmup_steps + 1),
      end_value=peak * config.final_lr_fraction)
  optimizer = _named_optimizer(config, schedule(config.learning_rate), total_steps)
  if mixer != "attention":
    if config.name != "adamw":
      raise ValueError(f"optim.name={config.name!r} selects attention/MLP matrices of a "
                       f"DecoderLM; model.mixer={mixer!r} takes optim.name='adamw'")
    optimizer = long_conv_optimizer(optimizer,
                                    kernel_learning_rate=schedule(kernel_learning_rate(config)))
  return optax.chain(optax.clip_by_global_norm(config.grad_clip), optimizer)


def _named_optimizer(config: OptimConfig, learning_rate: optax.Schedule, total_steps: int
                     ) -> optax.GradientTransformation:
  adam = optax.scale_by_adam(b1=config.b1, b2=config.b2)
  if config.name == "adamw":
    return optax.adamw(learning_rate, b1=config.b1, b2=config.b2,
                       weight_decay=config.weight_decay, mask=matrices_decayed)
  if config.name in ("spiel", "snell"):
    return _sparse_optimizer(config, learning_rate, total_steps, adam)
  settings = config.frugal or FrugalConfig()
  common = dict(update_gap=settings.update_gap, projection=settings.projection, state_full=adam,
                weight_decay=config.weight_decay, weight_decay_mask=matrices_decayed,
                matrix_fn=_matrix_fn(settings.project_embedding), seed=0)
  if config.name == "galore":
    return optim.galore(learning_rate, rho=settings.rho, **common)
  return optim.frugal(learning_rate, rho=settings.rho, state_free=settings.state_free,
                      inactive_lr_scale=settings.inactive_lr_scale, **common)


def _sparse_optimizer(config: OptimConfig, learning_rate: optax.Schedule, total_steps: int,
                      adam: optax.GradientTransformation) -> optax.GradientTransformation:
  """SpIEL or SNELL on the attention/MLP matrices; the other leaves frozen, or AdamW."""
  settings = getattr(config, config.name) or {"spiel": SpielConfig, "snell": SnellConfig}[
      config.name]()
  others = (optax.chain(adam, optax.add_decayed_weights(config.weight_decay, matrices_decayed),
                        optax.scale_by_learning_rate(learning_rate))
            if settings.train_others else None)
  common = dict(b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, others=others)
  if config.name == "spiel":
    return optim.sparse_finetune(
        learning_rate, total_steps=total_steps, density=settings.density,
        reselection_steps=settings.reselection_steps, reselection_rate=settings.reselection_rate,
        regrow=settings.regrow, accumulation_steps=settings.accumulation_steps, **common)
  return optim.snell(learning_rate, rank=settings.rank, sparsity=settings.sparsity,
                     kernel=settings.kernel, kernel_scale=settings.kernel_scale, **common)


def _matrix_fn(project_embedding: bool) -> Callable[[Any], dict[str, int]] | None:
  """FRUGAL's projectable leaves: the DecoderLM's attention/MLP kernels, plus the embedding."""
  if not project_embedding:
    return None
  return lambda params: {**optim.decoder_lm_matrices(params), EMBEDDING: 1}
