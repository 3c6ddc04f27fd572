"""Long-convolution layers (Flax Linen), after "Simple Hardware-Efficient Long Convolutions for
Sequence Modeling" (Fu, Epstein et al. 2023).

The paper learns the convolution kernel directly (one weight per lag, as long as the sequence)
and finds two simple regularizers enough to match state-space models on LRA: **squash** (soft
threshold ``sign(k) max(|k| - lambda, 0)``, sparsifying the kernel) and **smooth** (average pooling
along the lags), plus kernel dropout; the kernel gets its own learning rate and no weight decay.

* :class:`LongConvKernel`: raw weights ``[channels, kernel_len]`` -> smooth -> squash -> dropout.
  Random init (``randn * 0.002``, as safari) or geometric decay (``init="geometric"``).
* :class:`LongConv`: the paper's layer: ``num_kernels`` kernels per feature, conv + D skip ->
  GELU -> dropout -> Linear(num_kernels * d -> 2 d) -> GLU.
* :class:`H3LongConv`: an H3-style gated block, ``out(q * (conv(shift(k) * v) + D shift(k) v))``
  with the long convolution's gates fused (``pre_gate``, ``post_gate``).
* :class:`LongConvLM`: a pre-norm decoder LM whose mixers are causal long convolutions (no
  attention, no positions), interchangeable with :class:`effjax.nn.DecoderLM`.
* :func:`label_params` / :func:`long_conv_optimizer`: labels for ``optax.multi_transform`` so the
  kernels (and learned butterfly blocks) get their own optimizer without weight decay.

Memory: parameters ``num_kernels * d * kernel_len`` per layer for the kernel (the rest is linear
layers); activations O(batch * seq * num_kernels * d) per layer plus the convolution's spectra
(``conv_fn``, default :func:`effjax.long_conv`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from effjax.nn.remat import LONG_CONV_ACTIVATIONS, parse_remat, tag
from effjax.nn.transformer import SwiGLU
from effjax.ops.long_conv import butterfly, long_conv

ConvFn = Callable[..., jax.Array]
KERNEL_PARAM = "raw_kernel"
BUTTERFLY_PARAM = "butterfly_blocks"
KERNEL_LR_RATIO = 0.1
"""Kernel learning rate / global learning rate in safari's long-conv LRA configs (kernel 1e-3
against a global 1e-2; ListOps 5e-4, a ratio of 0.05): the default where none is given."""


def geometric_decay_init(key: jax.Array, shape: tuple[int, int], dtype: Any = jnp.float32
                         ) -> jax.Array:
  """``randn * exp(-t / tau_c) / sqrt(tau_c)`` with time scales ``tau_c`` spaced geometrically
  from 1 to ``kernel_len`` across channels: short and long memories from the start."""
  channels, kernel_len = shape
  tau = np.geomspace(1.0, max(kernel_len, 1), channels)[:, None]
  envelope = np.exp(-np.arange(kernel_len)[None, :] / tau) / np.sqrt(tau)
  return (jax.random.normal(key, shape, jnp.float32) * envelope.astype(np.float32)).astype(dtype)


class LongConvKernel(nn.Module):
  """A learned long kernel ``[channels, kernel_len]`` in float32, regularized as in the paper.

  Attributes:
    channels: number of kernels.
    kernel_len: lags per kernel.
    squash: soft-threshold ``lambda`` (paper's LRA configs: 1e-3 to 3e-3; 0 disables).
    smooth_window: odd average-pooling window along the lags (1 disables; zero padded).
    dropout: kernel dropout rate (paper: 0.2 to 0.3 on LRA); active when not ``deterministic``.
    initializer: ``"random"`` (``randn * 0.002``) or ``"geometric"``
      (:func:`geometric_decay_init`).
  """
  channels: int
  kernel_len: int
  squash: float = 3e-3
  smooth_window: int = 1
  dropout: float = 0.0
  initializer: str = "random"

  @nn.compact
  def __call__(self, deterministic: bool = True) -> Float[Array, "channels kernel_len"]:
    if self.smooth_window < 1 or self.smooth_window % 2 == 0:
      raise ValueError(f"smooth_window must be an odd positive int, got {self.smooth_window}")
    if self.initializer not in ("random", "geometric"):
      raise ValueError(f"initializer must be 'random' or 'geometric', got {self.initializer!r}")
    init = (geometric_decay_init if self.initializer == "geometric"
            else nn.initializers.normal(stddev=0.002))
    kernel = self.param(KERNEL_PARAM, init, (self.channels, self.kernel_len), jnp.float32)
    if self.smooth_window > 1:
      half = self.smooth_window // 2
      kernel = nn.avg_pool(kernel.T[None], (self.smooth_window,), strides=(1,),
                           padding=((half, half),))[0].T
    if self.squash > 0:
      kernel = jnp.sign(kernel) * jnp.maximum(jnp.abs(kernel) - self.squash, 0.0)
    return nn.Dropout(self.dropout, deterministic=deterministic)(kernel)


class LongConv(nn.Module):
  """The paper's long-convolution layer: ``x [batch, seq, d] -> [batch, seq, d]``.

  ``num_kernels`` kernels per feature convolve the input (plus the D skip), then GELU, dropout,
  ``Linear(num_kernels * d -> 2 d)`` and GLU. ``kernel_len`` defaults to the sequence length
  (``2 seq - 1`` two-sided lags for ``mode="bidirectional"``); a longer kernel is cut to what
  the sequence can use, so one model serves several lengths.

  Attributes:
    kernel_len: lags per kernel (None: from the input's length at initialization).
    mode: the convolution mode (see :func:`effjax.long_conv`).
    num_kernels: kernels per feature (safari's ``channels``, default 2).
    dropout: dropout after GELU.
    kernel: :class:`LongConvKernel` settings (``squash``, ``smooth_window``, ``dropout``,
      ``initializer``) as a dict.
    learned_butterfly: learn the forward DFT blocks of the Monarch transform (paper Sec. 5;
      initialized to the DFT); uses :func:`effjax.ops.long_conv.butterfly.long_conv`.
    conv_fn: the convolution op, with :func:`effjax.long_conv`'s signature.
  """
  kernel_len: int | None = None
  mode: str = "causal"
  num_kernels: int = 2
  dropout: float = 0.0
  kernel: dict[str, Any] = dataclasses.field(default_factory=dict)
  learned_butterfly: bool = False
  conv_fn: ConvFn = long_conv
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "batch seq d"], deterministic: bool = True
               ) -> Float[Array, "batch seq d"]:
    seq, features = x.shape[1:]
    channels = self.num_kernels * features
    full_len = 2 * seq - 1 if self.mode == "bidirectional" else seq
    kernel = LongConvKernel(channels, self.kernel_len or full_len, **self.kernel,
                            name="kernel")(deterministic)
    if self.mode == "bidirectional":
      excess = max(0, (kernel.shape[1] - full_len) // 2)
      kernel = kernel[:, excess:kernel.shape[1] - excess]
    else:
      kernel = kernel[:, :seq]
    skip = self.param("skip", nn.initializers.normal(1.0), (channels,), jnp.float32)
    u = tag(jnp.tile(x.astype(self.dtype), (1, 1, self.num_kernels)), "mixer_input")
    if self.learned_butterfly:
      _, transform = butterfly.plan_and_transform(self.mode, seq, kernel.shape[1])
      blocks = self.param(BUTTERFLY_PARAM, lambda _: tuple(
          jnp.asarray(b) for b in butterfly.dft_blocks(transform.factors)))
      y = butterfly.long_conv(u, kernel, mode=self.mode, skip=skip, blocks=blocks)
    else:
      y = self.conv_fn(u, kernel, mode=self.mode, skip=skip)
    y = tag(y, "long_conv_output")
    y = nn.Dropout(self.dropout, deterministic=deterministic)(nn.gelu(y))
    y = nn.Dense(2 * features, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(y)
    return nn.glu(y, axis=-1)


class H3LongConv(nn.Module):
  """H3-style gated long convolution: ``x [batch, seq, d] -> [batch, seq, d]``.

  ``q, k, v = Linear(x)``; ``k`` passes a short causal convolution (H3's shift SSM,
  ``shift_len`` lags); then ``out(q * (conv(k * v) + D * k * v))`` with the gates fused into
  ``conv_fn`` (``pre_gate=k``, ``post_gate=q``). Causal by construction.
  """
  kernel_len: int | None = None
  shift_len: int = 4
  kernel: dict[str, Any] = dataclasses.field(default_factory=dict)
  conv_fn: ConvFn = long_conv
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Float[Array, "batch seq d"], deterministic: bool = True
               ) -> Float[Array, "batch seq d"]:
    seq, features = x.shape[1:]
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    q, k, v = jnp.split(tag(dense(3 * features, "qkv")(x), "mixer_input"), 3, axis=-1)
    shift = self.param("shift_kernel", nn.initializers.normal(0.5), (features, self.shift_len),
                       jnp.float32)
    k = self.conv_fn(k, shift[:, :seq].astype(k.dtype), mode="causal")
    kernel = LongConvKernel(features, self.kernel_len or seq, **self.kernel,
                            name="kernel")(deterministic)[:, :seq]
    skip = self.param("skip", nn.initializers.normal(1.0), (features,), jnp.float32)
    y = self.conv_fn(v, kernel, mode="causal", skip=skip, pre_gate=k, post_gate=q)
    return dense(features, "out")(tag(y, "long_conv_output"))


@dataclasses.dataclass(frozen=True)
class LongConvLMConfig:
  """Shape of a long-convolution LM. Each kernel has ``kernel_len`` lags; inputs may be longer
  (older lags weigh zero) or shorter (the kernel is cut)."""
  vocab_size: int
  d_model: int
  num_layers: int
  d_ff: int
  kernel_len: int
  mixer: str = "long_conv"  # or "h3"
  num_kernels: int = 2
  squash: float = 3e-3
  smooth_window: int = 1
  kernel_dropout: float = 0.0
  kernel_initializer: str = "geometric"  # "random" (randn * 0.002) is mostly squashed to 0
  dropout: float = 0.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "d_ff", "kernel_len", "num_kernels"):
      if getattr(self, name) <= 0:
        raise ValueError(f"LongConvLMConfig.{name} must be > 0, got {getattr(self, name)}")
    if self.mixer not in ("long_conv", "h3"):
      raise ValueError(f"LongConvLMConfig.mixer must be 'long_conv' or 'h3', got {self.mixer!r}")


class LongConvLM(nn.Module):
  """Token ids ``[batch, seq]`` -> float32 logits ``[batch, seq, vocab]``.

  Pre-norm blocks ``x + Mixer(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``, the mixer a causal
  :class:`LongConv` or :class:`H3LongConv`; no positional encoding (the kernels are positional).
  ``remat`` checkpoints every block with a policy of :mod:`effjax.nn.remat` (not ``tokenwise``,
  which needs attention blocks; names from :data:`~effjax.nn.remat.LONG_CONV_ACTIVATIONS`).
  """
  config: LongConvLMConfig
  conv_fn: ConvFn = long_conv
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"

  @nn.nowrap
  def block(self, x: Float[Array, "batch seq d"], layer: int, deterministic: bool
            ) -> Float[Array, "batch seq d"]:
    """Block ``layer`` (submodules ``layer_{layer}_mixer``, ``_mixer_norm``, ``_mlp``,
    ``_mlp_norm``); called inside ``__call__``, under ``nn.remat`` when ``remat`` checkpoints."""
    config = self.config
    norm = lambda name: nn.RMSNorm(epsilon=config.norm_eps, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=f"layer_{layer}_{name}")
    kernel = dict(squash=config.squash, smooth_window=config.smooth_window,
                  dropout=config.kernel_dropout, initializer=config.kernel_initializer)
    name = f"layer_{layer}_mixer"
    if config.mixer == "h3":
      mixer = H3LongConv(config.kernel_len, kernel=kernel, conv_fn=self.conv_fn,
                         dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    else:
      mixer = LongConv(config.kernel_len, num_kernels=config.num_kernels,
                       dropout=config.dropout, kernel=kernel, conv_fn=self.conv_fn,
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    x = x + mixer(tag(norm("mixer_norm")(x), "mixer_norm"), deterministic)
    mlp = SwiGLU(config.d_ff, dtype=self.dtype, param_dtype=self.param_dtype,
                 name=f"layer_{layer}_mlp")
    return x + mlp(tag(norm("mlp_norm")(x), "mlp_norm"))

  @nn.compact
  def __call__(self, tokens: Int[Array, "batch seq"], deterministic: bool = True
               ) -> Float[Array, "batch seq vocab"]:
    config = self.config
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integer [batch, seq], got {tokens.dtype}{list(tokens.shape)}")
    embed = nn.Embed(config.vocab_size, config.d_model, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="embed",
                     embedding_init=nn.initializers.normal(stddev=config.d_model**-0.5))
    remat = parse_remat(self.remat, f"{type(self).__name__}.remat")
    remat.check_emitted(LONG_CONV_ACTIVATIONS, type(self).__name__)
    if remat.tokenwise is not None:
      raise ValueError(f"LongConvLM.remat is {self.remat!r}; tokenwise(alpha) splits the "
                       "token-local work around attention, which long-convolution blocks lack; "
                       "use none, full, dots, save_names(...) or offload_names(...)")
    policy = remat.policy()
    block = type(self).block if policy is None else nn.remat(
        type(self).block, policy=policy, static_argnums=(2, 3))
    x = embed(tokens)
    for layer in range(config.num_layers):
      x = block(self, x, layer, deterministic)
    x = nn.RMSNorm(epsilon=config.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="final_norm")(x)
    if config.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(config.vocab_size, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="lm_head")(x)
    return logits.astype(jnp.float32)


def label_params(params: Any) -> Any:
  """``"long_conv_kernel"`` for raw kernels, ``"butterfly"`` for learned DFT blocks,
  ``"default"`` elsewhere: labels for ``optax.multi_transform``."""
  def label(path, _):
    names = {getattr(key, "key", None) for key in path}
    if KERNEL_PARAM in names:
      return "long_conv_kernel"
    return "butterfly" if BUTTERFLY_PARAM in names else "default"
  return jax.tree_util.tree_map_with_path(label, params)


def long_conv_optimizer(default: optax.GradientTransformation, *,
                        kernel_learning_rate: optax.ScalarOrSchedule,
                        butterfly_learning_rate: optax.ScalarOrSchedule = 1e-3
                        ) -> optax.GradientTransformation:
  """``default`` for most parameters; Adam without weight decay at ``kernel_learning_rate`` for
  the long kernels and at ``butterfly_learning_rate`` for learned butterfly blocks (the paper's
  recipe: kernel lr 5e-4 to 1e-3, weight decay 0; see :data:`KERNEL_LR_RATIO`). Either rate may be
  a schedule (safari scales every parameter group by the same warm-up/decay)."""
  return optax.multi_transform(
      {"default": default, "long_conv_kernel": optax.adam(kernel_learning_rate),
       "butterfly": optax.adam(butterfly_learning_rate)}, label_params)
