"""XQuant: cache the quantized layer input X and rematerialize K/V (Tomar et al. 2025, 2508.10395).

Not the cross-layer KV sharing method of the same name (Yang et al., arXiv 2510.11236).

What is stored, per layer and token (a "stream", quantized per token in groups of ``group_size``
consecutive channels with :func:`effjax.kv_cache.quant.quantize_groups`: asymmetric min/max
codes packed into uint32 words, float16 scales and zero points):

* **XQuant, MHA-like models** (``d_model <= 2 * kv_heads * head_dim``): X itself, the post-norm
  attention input. At attend time ``K = rope(X W_k)`` at each slot's position and ``V = X W_v``.
* **XQuant, GQA models** (``latent``; SmolLM2: X is 576 wide, K+V 384): the SVD latents of X.
  Offline, ``W_k = U_k S_k B_k^T`` (``U_k``: ``[d_model, r]``, ``r = kv_heads * head_dim``, exact
  since ``rank W_k <= r``); the stream is ``[X U_k, X U_v]`` (2r wide, as K+V) and
  ``K = rope((X U_k)(S_k B_k^T))``. The factors are computed once per prefill and kept in the
  cache (they are a reparametrization of the weights and not counted by :meth:`nbytes`).
  The paper's gain here is quantizability (the latents' singular-value ordering), not size.
* **XQuant-CL** (:class:`XQuantCL`): the residual stream ``h_i`` before layer ``i``'s attention
  norm changes little between layers, so layer 0 stores ``h_0`` and layer ``i > 0`` stores
  ``delta_i = h_i - acc_{i-1}`` with the closed-loop accumulator
  ``acc_i = acc_{i-1} + dequant(quant(delta_i))`` (``acc_0 = dequant(quant(h_0))``). The error of
  ``acc_i`` is that of one quantization of ``delta_i``: it does not accumulate over layers (an
  open loop, ``delta_i = h_i - h_{i-1}``, sums every layer's error). K/V are rematerialized from
  ``X_i = rmsnorm(acc_i) * scale_i``; the first ``first_layers`` layers use ``first_bits``.

V is never rebuilt. With ``Z`` the value stream (X, or ``X U_v``) and ``C_v`` its projection
(``W_v``, or ``S_v B_v^T``), per query head ``h`` of kv head ``k``:
``out_h = sum_t p_ht V_t^(k) = sum_t p_ht (Z_t C_v^(k)) = (sum_t p_ht Z_t) C_v^(k)``: attention
weights are applied to the stream and the value projection once per head, ``heads * seq * width
* head_dim`` multiply-adds instead of ``max_len * width * kv_heads * head_dim``. K cannot absorb
``W_k`` this way because RoPE depends on the position (why MLA decouples RoPE).

Claims (paper): X is half of K+V for MHA (2x for free); XQuant ~7.7x smaller than the fp16 KV
cache at < 0.1 perplexity loss; XQuant-CL 10x at 0.01 and 12.5x at 0.1 (MHA models).

Memory, per layer, with ``S = max_len`` slots, stream width ``w`` (X: ``d_model``; latents:
``2 * kv_heads * head_dim``) and ``W = ceil(w / (32 // bits))`` words: codes
``batch * S * W * 4`` bytes, scales and zero points ``2 * batch * S * (w / G) * 2`` bytes, plus
``start`` and ``length``; 16 bits (no quantization, a test mode): ``batch * S * w * itemsize``.
:meth:`XQuantCache.attend_inputs` rematerializes the keys of every slot in float32 and the stream
(``batch * S * w`` float32), transient like an activation: there is no block-wise path or fused
kernel yet.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Self

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from effjax.kv_cache import quant
from effjax.kv_cache.base import (
    LayerInputCache,
    LayerInputs,
    check_positive_int,
    check_query,
    check_room,
    check_start,
)
from effjax.nn.rope import apply_rope

SUPPORTED_BITS = (2, 3, 4, 8, 16)  # 16: quantization disabled (a test mode)
SCALE_DTYPE = jnp.float16


def _check_bits(name: str, value: Any) -> None:
  if isinstance(value, bool) or value not in SUPPORTED_BITS:
    raise ValueError(f"{name} is {value!r}; expected one of {SUPPORTED_BITS} (16: no quantization)")


@dataclasses.dataclass(frozen=True)
class XQuant:
  """XQuant settings; a cache type for :func:`effjax.models.init_caches` / ``generate``.

  Attributes:
    bits: code width of the stream (paper: 2-4; 16 disables quantization).
    group_size: G, consecutive channels of one token sharing a scale and zero point.
    latent: cache the SVD latents of X (GQA) instead of X; None: when ``d_model`` exceeds the
      K+V width.
  """
  bits: int = 4
  group_size: int = 64
  latent: bool | None = None

  def __post_init__(self):
    _check_bits("bits", self.bits)
    check_positive_int("group_size", self.group_size)

  def for_layer(self, layer: int, config: Any) -> XQuantLayer:
    """Settings of layer ``layer`` of a model of ``config`` (a TransformerConfig)."""
    del layer
    kv_width = config.num_kv_heads * config.resolved_head_dim
    latent = config.d_model > 2 * kv_width if self.latent is None else self.latent
    return XQuantLayer(self.bits, self.group_size, config.d_model, latent, cross_layer=False)


@dataclasses.dataclass(frozen=True)
class XQuantCL:
  """XQuant-CL settings: quantized deltas of the residual stream across layers (module doc).

  Attributes:
    bits: code width of the deltas of layers ``>= first_layers``.
    first_bits: code width of the first ``first_layers`` layers (layer 0 stores the stream itself).
    first_layers: how many layers use ``first_bits``.
    group_size: G, consecutive channels of one token sharing a scale and zero point.
  """
  bits: int = 2
  first_bits: int = 4
  first_layers: int = 3
  group_size: int = 64

  def __post_init__(self):
    _check_bits("bits", self.bits)
    _check_bits("first_bits", self.first_bits)
    check_positive_int("group_size", self.group_size)
    if isinstance(self.first_layers, bool) or not isinstance(self.first_layers, int) or (
        self.first_layers < 0):
      raise ValueError(f"first_layers is {self.first_layers!r}; expected an int >= 0")

  def for_layer(self, layer: int, config: Any) -> XQuantLayer:
    """Settings of layer ``layer`` of a model of ``config`` (a TransformerConfig)."""
    bits = self.first_bits if layer < self.first_layers else self.bits
    return XQuantLayer(bits, self.group_size, config.d_model, latent=False, cross_layer=True)


@dataclasses.dataclass(frozen=True)
class XQuantLayer:
  """One layer's settings (from :meth:`XQuant.for_layer` / :meth:`XQuantCL.for_layer`)."""
  bits: int
  group_size: int
  d_model: int
  latent: bool
  cross_layer: bool

  def init(self, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int,
           dtype: Any = jnp.float32) -> XQuantCache:
    """An empty :class:`XQuantCache` with these settings."""
    return XQuantCache.init(batch, max_len, num_kv_heads=num_kv_heads, head_dim=head_dim,
                            dtype=dtype, **dataclasses.asdict(self))


def _rmsnorm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """flax.linen.RMSNorm in float32: ``x / sqrt(mean(x^2) + eps) * scale``."""
  return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def latent_factors(kernel: Float[Array, "d_model kv_heads head_dim"]
                   ) -> tuple[Float[Array, "d_model r"], Float[Array, "r kv_heads head_dim"]]:
  """``(U, S B^T)`` of the thin SVD of ``kernel`` as a ``[d_model, r]`` matrix,
  ``r = kv_heads * head_dim <= d_model``: ``x @ kernel == (x @ U) @ (S B^T)`` exactly (up to
  float32 rounding), with the latent ``x @ U`` as wide as the keys (or values)."""
  d_model, kv_heads, head_dim = kernel.shape
  if kv_heads * head_dim > d_model:
    raise ValueError(f"kernel has shape {kernel.shape}; the latent path needs kv_heads * head_dim "
                     f"<= d_model (expected a GQA model)")
  u, s, bt = jnp.linalg.svd(kernel.reshape(d_model, -1).astype(jnp.float32), full_matrices=False)
  return u, (s[:, None] * bt).reshape(-1, kv_heads, head_dim)


class XQuantCache(LayerInputCache):
  """A per-token quantized stream of layer inputs (see the module docstring).

  Attributes:
    codes: packed codes, uint32 ``[batch, max_len, words]`` (16 bits: the stream,
      ``[batch, max_len, width]`` in ``dtype``).
    scale, zero: float16 ``[batch, max_len, width / G]`` (16 bits: zero-sized).
    factors: latent mode only: ``U = [U_k, U_v]`` float32 ``[d_model, width]`` and the up
      projections ``[2, width / 2, kv_heads, head_dim]``, set by :meth:`prefill_inputs`;
      otherwise None. Not cache memory (weights); excluded from :meth:`nbytes`.
    start: int32 ``[batch]``, each row's first real slot.
    length: int32 scalar, filled slots.
    bits, group_size, width, latent, cross_layer: static settings.
  """
  codes: jax.Array
  scale: jax.Array
  zero: jax.Array
  factors: tuple[jax.Array, jax.Array] | None
  start: jax.Array
  length: jax.Array
  bits: int = flax.struct.field(pytree_node=False)
  group_size: int = flax.struct.field(pytree_node=False)
  width: int = flax.struct.field(pytree_node=False)
  latent: bool = flax.struct.field(pytree_node=False)
  cross_layer: bool = flax.struct.field(pytree_node=False)

  @classmethod
  def init(cls, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int,
           dtype: Any = jnp.float32, bits: int = 4, group_size: int = 64, d_model: int = 0,
           latent: bool = False, cross_layer: bool = False) -> Self:
    """An empty cache; raises ValueError naming any invalid argument.

    The stream width (``d_model``, or ``2 * num_kv_heads * head_dim`` when ``latent``; half of it
    per latent) must be a multiple of ``group_size``.
    """
    for name, value in (("batch", batch), ("max_len", max_len), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("d_model", d_model),
                        ("group_size", group_size)):
      check_positive_int(name, value)
    _check_bits("bits", bits)
    if latent and cross_layer:
      raise ValueError("latent and cross_layer are both True; expected at most one (latents of "
                       "different layers live in different bases)")
    kv_width = num_kv_heads * head_dim
    if latent and kv_width > d_model:
      raise ValueError(f"latent is True with kv_heads * head_dim = {kv_width} > d_model = "
                       f"{d_model}; expected a GQA model (X is already narrower than K+V)")
    width = 2 * kv_width if latent else d_model
    if (width // 2 if latent else width) % group_size:
      raise ValueError(f"group_size is {group_size}; expected a divisor of the stream width "
                       f"{'kv_heads * head_dim = ' if latent else 'd_model = '}"
                       f"{width // 2 if latent else width}")
    if bits == 16:
      codes = jnp.zeros((batch, max_len, width), dtype)
      scales = jnp.zeros((batch, max_len, 0), SCALE_DTYPE)
    else:
      codes = jnp.zeros((batch, max_len, quant.packed_words(width, bits)), jnp.uint32)
      scales = jnp.zeros((batch, max_len, width // group_size), SCALE_DTYPE)
    factors = None if not latent else (
        jnp.zeros((d_model, width), jnp.float32),
        jnp.zeros((2, kv_width, num_kv_heads, head_dim), jnp.float32))
    return cls(codes=codes, scale=scales, zero=scales, factors=factors,
               start=jnp.zeros((batch,), jnp.int32), length=jnp.zeros((), jnp.int32), bits=bits,
               group_size=group_size, width=width, latent=latent, cross_layer=cross_layer)

  @property
  def max_len(self) -> int:
    return self.codes.shape[1]

  def nbytes(self) -> int:
    """Bytes of codes, scales, zero points, ``start`` and ``length`` (not the latent factors)."""
    leaves = (self.codes, self.scale, self.zero, self.start, self.length)
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in leaves)

  # Stream encoding.

  def _check_inputs(self, inputs: LayerInputs, previous: jax.Array | None) -> None:
    batch, d_model = self.codes.shape[0], inputs.key_kernel.shape[0]
    for name in ("x", "residual"):
      x = getattr(inputs, name)
      if x.ndim != 3 or x.shape[0] != batch or x.shape[2] != d_model:
        raise ValueError(f"inputs.{name} has shape {x.shape}; expected [batch={batch}, seq, "
                         f"d_model={d_model}]")
    if not self.latent and d_model != self.width:
      raise ValueError(f"inputs.x has d_model={d_model}; expected the cache's {self.width}")
    expected = (batch, self.max_len, self.width)
    if self.cross_layer and previous is not None and previous.shape != expected:
      raise ValueError(f"previous has shape {previous.shape}; expected {list(expected)}")

  def _to_stream(self, inputs: LayerInputs, factors, previous: jax.Array | None,
                 slot: int | jax.Array) -> jax.Array:
    """What is quantized for the tokens of ``inputs`` at slots ``[slot, slot + seq)``."""
    if self.latent:
      return inputs.x.astype(jnp.float32) @ factors[0]
    if not self.cross_layer:
      return inputs.x
    residual = inputs.residual.astype(jnp.float32)
    if previous is None:
      return residual
    return residual - lax.dynamic_slice_in_dim(previous, slot, residual.shape[1], axis=1)

  def _write(self, z: jax.Array, slot: int | jax.Array) -> dict[str, jax.Array]:
    """New ``codes``/``scale``/``zero`` with ``z [batch, seq, width]`` written at ``slot``."""
    if self.bits == 16:
      return {"codes": lax.dynamic_update_slice(self.codes, z.astype(self.codes.dtype),
                                                (0, slot, 0))}
    codes, scale, zero = quant.quantize_groups(z, self.bits, axis=-1, group_size=self.group_size,
                                               scale_dtype=SCALE_DTYPE)
    return {name: lax.dynamic_update_slice(getattr(self, name), value, (0, slot, 0))
            for name, value in (("codes", quant.pack(codes, self.bits)), ("scale", scale),
                                ("zero", zero))}

  # The LayerInputCache interface.

  def prefill_inputs(self, inputs: LayerInputs, start: Int[Array, "batch"],
                     previous: jax.Array | None) -> Self:
    """Quantizes the whole prompt's stream (computing the latent factors in latent mode)."""
    self._check_inputs(inputs, previous)
    seq = inputs.x.shape[1]
    if seq > self.max_len:
      raise ValueError(f"inputs.x has {seq} tokens; expected at most max_len={self.max_len}")
    factors = self.factors
    if self.latent:
      (u_k, up_k), (u_v, up_v) = (latent_factors(inputs.key_kernel),
                                  latent_factors(inputs.value_kernel))
      factors = (jnp.concatenate([u_k, u_v], axis=1), jnp.stack([up_k, up_v]))
    cache = self.replace(factors=factors, start=check_start(start, self.codes.shape[0]),
                         length=jnp.asarray(seq, jnp.int32))
    return cache.replace(**cache._write(cache._to_stream(inputs, factors, previous, 0), 0))

  def append_inputs(self, inputs: LayerInputs, previous: jax.Array | None) -> Self:
    """Quantizes the new tokens' stream into the next slots."""
    self._check_inputs(inputs, previous)
    seq = inputs.x.shape[1]
    check_room(self.length, seq, self.max_len)
    z = self._to_stream(inputs, self.factors, previous, self.length)
    return self.replace(length=self.length + seq, **self._write(z, self.length))

  def stream(self, previous: jax.Array | None) -> Float[Array, "batch max_len width"]:
    """float32 dequantized stream of every slot; cross-layer: the accumulator
    ``previous + dequant(delta)`` (``previous`` None: the first layer)."""
    if self.bits == 16:
      z = self.codes.astype(jnp.float32)
    else:
      z = quant.dequantize_groups(quant.unpack(self.codes, self.bits, self.width), self.scale,
                                  self.zero, axis=-1, group_size=self.group_size)
    return z + previous if self.cross_layer and previous is not None else z

  def attend_inputs(self, q: Float[Array, "batch seq heads head_dim"], inputs: LayerInputs,
                    stream: Float[Array, "batch max_len width"], *, scale: float | None = None
                    ) -> Float[Array, "batch seq heads head_dim"]:
    """Attention with ``K = rope(Z_k C_k)`` rematerialized at every slot and the value projection
    applied after the weighted sum of the value stream (module docstring)."""
    _, kv_heads, head_dim = inputs.key_kernel.shape
    check_query(q, batch=self.codes.shape[0], kv_heads=kv_heads, head_dim=head_dim)
    batch, seq, heads, _ = q.shape
    if self.latent:
      half = self.width // 2
      key_in, value_in = stream[..., :half], stream[..., half:]
      key_up, value_up = self.factors[1]
    else:
      key_in = value_in = (_rmsnorm(stream, inputs.norm_scale.astype(jnp.float32),
                                    inputs.norm_eps) if self.cross_layer else stream)
      key_up, value_up = (w.astype(jnp.float32) for w in (inputs.key_kernel, inputs.value_kernel))
    slots = jnp.arange(self.max_len)
    positions = jnp.maximum(slots[None, :] - self.start[:, None], 0)
    keys = apply_rope(jnp.einsum("btw,wkd->btkd", key_in, key_up), positions, inputs.rope_theta)
    scale = head_dim**-0.5 if scale is None else scale
    grouped = q.astype(jnp.float32).reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("bskgd,btkd->bkgst", grouped, keys) * scale
    last_visible = self.length - seq + jnp.arange(seq)
    visible = ((slots[None, None, :] >= self.start[:, None, None])
               & (slots[None, None, :] <= last_visible[None, :, None]))  # [batch, seq, max_len]
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)  # a query seeing nothing gets 0
    mixed = jnp.einsum("bkgst,btw->bskgw", weights, value_in)  # weights applied to the stream
    out = jnp.einsum("bskgw,wkd->bskgd", mixed, value_up)  # then W_v once per head
    out = jnp.where(self.length <= self.max_len, out, jnp.nan)
    return out.reshape(batch, seq, heads, head_dim).astype(q.dtype)
