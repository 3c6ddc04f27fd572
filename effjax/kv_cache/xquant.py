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
  ``K = rope((X U_k)(S_k B_k^T))``. The factors are computed once per model, when the caches are
  created (:func:`effjax.models.init_caches` with ``params``; :func:`layer_factors` memoizes them
  per weight array, so generate/eval loops reuse them), and shared by every cache of that layer.
  They are weights, not per-context memory: :meth:`XQuantCache.nbytes` excludes them and
  :meth:`XQuantCache.factor_nbytes` gives their exact one-time bytes,
  ``(d_model * 2r + 2 * r * r) * 4`` per layer (float32). They could replace ``W_k``/``W_v``
  (``x W_k = (x U_k)(S_k B_k^T)``): ``U_k`` is as large as ``W_k`` (``[d_model, r]``), so the
  replacement costs only the ``r * r`` of ``S_k B_k^T`` per projection; here they are kept next
  to the weights (the model still projects K/V of the current tokens with ``W_k``/``W_v``).
  The paper's gain here is quantizability (the latents' singular-value ordering), not size.
* **XQuant-CL** (:class:`XQuantCL`): the residual stream ``h_i`` before layer ``i``'s attention
  norm changes little between layers, so layer 0 stores ``h_0`` and layer ``i > 0`` stores
  ``delta_i = h_i - acc_{i-1}`` with the closed-loop accumulator
  ``acc_i = acc_{i-1} + dequant(quant(delta_i))`` (``acc_0 = dequant(quant(h_0))``). The error of
  ``acc_i`` is that of one quantization of ``delta_i``: it does not accumulate over layers (an
  open loop, ``delta_i = h_i - h_{i-1}``, sums every layer's error). K/V are rematerialized from
  ``X_i = rmsnorm(acc_i) * scale_i``; the first ``first_layers`` layers use ``first_bits``.
  Layer ``i``'s attention rebuilds ``acc_i`` block by block from the codes of layers ``0..i``
  (:class:`CrossLayerCarry` hands each layer the caches before it): ``i + 1`` block dequantizations
  per block instead of a float32 ``acc`` of every slot carried across layers (O(layers^2) cheap
  dequantizations per step, next to O(layers) projections ``d_model x r`` that dominate).

Full-precision window (``residual = R``, default 0): the R most recent tokens' stream stays
unquantized (in ``dtype``), as KIVI's values: after every append, slots ``< max(0, length - R)``
are quantized and the others are in the window (a ring buffer, slot ``j`` at row ``j % R``); a
token leaves the window one at a time, quantized exactly once from its full-precision value
(per-token groups, so nothing else changes). Prefill quantizes all but the last R prompt tokens.
For XQuant-CL the window holds ``h_i`` itself (exact ``acc_i``), and a token leaving it stores
``delta_i = h_i - acc_{i-1}`` against the already quantized ``acc_{i-1}`` (closed loop kept).

Attention (:meth:`XQuantCache.attend_inputs`) runs block by block
(:func:`effjax.ops.kv_decode.blockwise_decode_attention`, ``block_size`` slots at a time):
each block of the stream is dequantized, its keys rebuilt (projection, then RoPE at the slots'
positions) and folded into an online softmax; the window is the tail. V is never rebuilt. With
``Z`` the value stream (X, or ``X U_v``) and ``C_v`` its projection (``W_v``, or ``S_v B_v^T``),
per query head ``h`` of kv head ``k``:
``out_h = sum_t p_ht V_t^(k) = sum_t p_ht (Z_t C_v^(k)) = (sum_t p_ht Z_t) C_v^(k)``: attention
weights are applied to the stream and the value projection once per head, ``heads * seq * width
* head_dim`` multiply-adds instead of ``max_len * width * kv_heads * head_dim``. K cannot absorb
``W_k`` this way because RoPE depends on the position (why MLA decouples RoPE).

Implementations (:func:`effjax.ops.kv_decode.xquant_decode_attention`, op ``"xquant_decode"``,
which :meth:`XQuantCache.attend_inputs` and so the model's decode step go through; the order tried
per platform is ``effjax.dispatch.DEFAULT_ORDER``): the block-wise XLA path above (XQuant-CL's and
16 bits' only one), and fused Pallas flash-decoding kernels
(``pallas_kernels.kv_decode.xquant``: Triton and Mosaic TPU) that read the packed codes in place,
dequantize in registers/VMEM, rebuild and rotate the keys in-kernel and return per-split partials
of the weighted value stream, combined with the window (SmolLM2 latents, G = 64: 216 / 120 bytes
read per slot at 4 / 2 bits, vs 768 for float16 K/V).

Claims (paper): X is half of K+V for MHA (2x for free); XQuant ~7.7x smaller than the fp16 KV
cache at < 0.1 perplexity loss; XQuant-CL 10x at 0.01 and 12.5x at 0.1 (MHA models; for a GQA
model X is wider than K+V, so XQuant-CL starts 1.5x behind on SmolLM2).

Memory, per layer, with ``S`` slots (``max_len`` rounded up to a multiple of the decode block),
stream width ``w`` (X: ``d_model``; latents: ``2 * kv_heads * head_dim``) and
``W = ceil(w / (32 // bits))`` words: codes ``batch * S * W * 4`` bytes, scales and zero points
``2 * batch * S * (w / G) * 2`` bytes, window ``batch * R * w * itemsize``, plus ``start`` and
``length``; 16 bits (no quantization, a test mode): codes ``batch * S * w * itemsize``. Attention
scratch: one block's dequantized stream and keys (``batch * block * (w + kv_heads * head_dim)``
float32, times the layers summed for XQuant-CL), its logits and the window's; never O(max_len) in
float32.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, NamedTuple, Self

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from effjax.dispatch import Implementation
from effjax.kv_cache import quant
from effjax.kv_cache.base import (
    LayerInputCache,
    LayerInputs,
    check_floating_array,
    check_floating_dtype,
    check_positive_int,
    check_room,
    check_start,
)
from effjax.nn.rope import apply_rope
from effjax.ops import kv_decode

SUPPORTED_BITS = (2, 3, 4, 8, 16)  # 16: quantization disabled (a test mode)
SCALE_DTYPE = jnp.float16
DECODE_BLOCK_TOKENS = 256  # slots dequantized (and keys rematerialized) at a time by attend


def _check_bits(name: str, value: Any) -> None:
  if isinstance(value, bool) or value not in SUPPORTED_BITS:
    raise ValueError(f"{name} is {value!r}; expected one of {SUPPORTED_BITS} (16: no quantization)")


def _check_residual(value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"residual is {value!r}; expected an int >= 0 (full-precision recent tokens)")


@dataclasses.dataclass(frozen=True)
class XQuant:
  """XQuant settings; a cache type for :func:`effjax.models.init_caches` / ``generate``.

  Attributes:
    bits: code width of the stream (paper: 2-4; 16 disables quantization).
    group_size: G, consecutive channels of one token sharing a scale and zero point.
    latent: cache the SVD latents of X (GQA) instead of X; None: when ``d_model`` exceeds the
      K+V width. Latent caches need ``init_caches(..., params=params)`` (the factors).
    residual: R, most recent tokens kept in full precision (0: none).
    block_size: slots per block of the decode attention.
  """
  bits: int = 4
  group_size: int = 64
  latent: bool | None = None
  residual: int = 0
  block_size: int = DECODE_BLOCK_TOKENS

  def __post_init__(self):
    _check_bits("bits", self.bits)
    check_positive_int("group_size", self.group_size)
    _check_residual(self.residual)
    check_positive_int("block_size", self.block_size)

  def for_layer(self, layer: int, config: Any) -> XQuantLayer:
    """Settings of layer ``layer`` of a model of ``config`` (a TransformerConfig)."""
    del layer
    kv_width = config.num_kv_heads * config.resolved_head_dim
    latent = config.d_model > 2 * kv_width if self.latent is None else self.latent
    return XQuantLayer(self.bits, self.group_size, config.d_model, latent, cross_layer=False,
                       residual=self.residual, block_size=self.block_size)


@dataclasses.dataclass(frozen=True)
class XQuantCL:
  """XQuant-CL settings: quantized deltas of the residual stream across layers (module doc).

  Attributes:
    bits: code width of the deltas of layers ``>= first_layers``.
    first_bits: code width of the first ``first_layers`` layers (layer 0 stores the stream itself).
    first_layers: how many layers use ``first_bits``.
    group_size: G, consecutive channels of one token sharing a scale and zero point.
    residual: R, most recent tokens kept in full precision (0: none).
    block_size: slots per block of the decode attention.
  """
  bits: int = 2
  first_bits: int = 4
  first_layers: int = 3
  group_size: int = 64
  residual: int = 0
  block_size: int = DECODE_BLOCK_TOKENS

  def __post_init__(self):
    _check_bits("bits", self.bits)
    _check_bits("first_bits", self.first_bits)
    check_positive_int("group_size", self.group_size)
    if isinstance(self.first_layers, bool) or not isinstance(self.first_layers, int) or (
        self.first_layers < 0):
      raise ValueError(f"first_layers is {self.first_layers!r}; expected an int >= 0")
    _check_residual(self.residual)
    check_positive_int("block_size", self.block_size)

  def for_layer(self, layer: int, config: Any) -> XQuantLayer:
    """Settings of layer ``layer`` of a model of ``config`` (a TransformerConfig)."""
    bits = self.first_bits if layer < self.first_layers else self.bits
    return XQuantLayer(bits, self.group_size, config.d_model, latent=False, cross_layer=True,
                       residual=self.residual, block_size=self.block_size)


@dataclasses.dataclass(frozen=True)
class XQuantLayer:
  """One layer's settings (from :meth:`XQuant.for_layer` / :meth:`XQuantCL.for_layer`)."""
  bits: int
  group_size: int
  d_model: int
  latent: bool
  cross_layer: bool
  residual: int = 0
  block_size: int = DECODE_BLOCK_TOKENS

  def init(self, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int,
           dtype: Any = jnp.float32) -> XQuantCache:
    """An empty :class:`XQuantCache` with these settings."""
    return XQuantCache.init(batch, max_len, num_kv_heads=num_kv_heads, head_dim=head_dim,
                            dtype=dtype, **dataclasses.asdict(self))


class LatentFactors(NamedTuple):
  """One layer's SVD factors (latent XQuant).

  Attributes:
    down: ``[U_k, U_v]``, float32 ``[d_model, 2r]``: the stream is ``X @ down``.
    up: ``[S_k B_k^T, S_v B_v^T]``, float32 ``[2, r, kv_heads, head_dim]``.
  """
  down: jax.Array
  up: jax.Array


class CrossLayerCarry(NamedTuple):
  """What an XQuant-CL layer hands the next one (see :class:`effjax.kv_cache.LayerInputCache`).

  Attributes:
    caches: the updated caches of layers ``0..i``: layer ``i + 1``'s attention sums their
      dequantized blocks into ``acc_{i+1}``.
    acc: float32 ``[batch, seq, width]``, ``acc_i`` at the slots that left the window in this
      write (one per written token, see :meth:`XQuantCache.append_inputs`): what layer ``i + 1``
      subtracts from its residual stream there.
  """
  caches: tuple[XQuantCache, ...]
  acc: jax.Array


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


# (id(key_kernel), id(value_kernel)) -> (weak refs to both, factors); entries leave with the arrays.
_FACTORS: dict[tuple[int, int], tuple[Any, Any, LatentFactors]] = {}


def layer_factors(key_kernel: Float[Array, "d_model kv_heads head_dim"],
                  value_kernel: Float[Array, "d_model kv_heads head_dim"]) -> LatentFactors:
  """One layer's :class:`LatentFactors`, computed once per pair of (concrete) weight arrays and
  memoized while they live; traced kernels are factorized in the trace."""
  if isinstance(key_kernel, jax.core.Tracer) or isinstance(value_kernel, jax.core.Tracer):
    return _factorize(key_kernel, value_kernel)
  key = (id(key_kernel), id(value_kernel))
  hit = _FACTORS.get(key)
  if hit is not None and hit[0]() is key_kernel and hit[1]() is value_kernel:
    return hit[2]
  factors = _factorize(key_kernel, value_kernel)
  _FACTORS[key] = (weakref.ref(key_kernel), weakref.ref(value_kernel), factors)
  for kernel in (key_kernel, value_kernel):
    weakref.finalize(kernel, _FACTORS.pop, key, None)
  return factors


def _factorize(key_kernel: jax.Array, value_kernel: jax.Array) -> LatentFactors:
  (u_k, up_k), (u_v, up_v) = latent_factors(key_kernel), latent_factors(value_kernel)
  return LatentFactors(jnp.concatenate([u_k, u_v], axis=1), jnp.stack([up_k, up_v]))


class XQuantCache(LayerInputCache):
  """A per-token quantized stream of layer inputs (see the module docstring).

  Attributes:
    codes: packed codes, uint32 ``[batch, slots, words]`` (16 bits: the stream,
      ``[batch, slots, width]`` in ``dtype``); valid below ``max(0, length - residual)``.
    scale, zero: float16 ``[batch, slots, width / G]`` (16 bits: zero-sized).
    window: the unquantized stream of slots ``[max(0, length - R), length)``, slot ``j`` at row
      ``j % R``, ``[batch, R, width]`` in ``dtype`` (XQuant-CL: the residual stream ``h``).
    factors: latent mode: the layer's :class:`LatentFactors` (set by :meth:`with_weights`;
      weights, excluded from :meth:`nbytes`, see :meth:`factor_nbytes`); otherwise None.
    start: int32 ``[batch]``, each row's first real slot.
    length: int32 scalar, filled slots.
    bits, group_size, width, d_model, residual, block_size, latent, cross_layer, capacity: static
      settings; ``capacity`` is ``max_len``, ``block_size`` the attention's (``<= max_len``).
  """
  codes: jax.Array
  scale: jax.Array
  zero: jax.Array
  window: jax.Array
  factors: LatentFactors | None
  start: jax.Array
  length: jax.Array
  bits: int = flax.struct.field(pytree_node=False)
  group_size: int = flax.struct.field(pytree_node=False)
  width: int = flax.struct.field(pytree_node=False)
  d_model: int = flax.struct.field(pytree_node=False)
  residual: int = flax.struct.field(pytree_node=False)
  block_size: int = flax.struct.field(pytree_node=False)
  latent: bool = flax.struct.field(pytree_node=False)
  cross_layer: bool = flax.struct.field(pytree_node=False)
  capacity: int = flax.struct.field(pytree_node=False)

  @classmethod
  def init(cls, batch: int, max_len: int, *, num_kv_heads: int, head_dim: int,
           dtype: Any = jnp.float32, bits: int = 4, group_size: int = 64, d_model: int = 0,
           latent: bool = False, cross_layer: bool = False, residual: int = 0,
           block_size: int = DECODE_BLOCK_TOKENS) -> Self:
    """An empty cache; raises ValueError naming any invalid argument.

    The stream width (``d_model``, or ``2 * num_kv_heads * head_dim`` when ``latent``; half of it
    per latent) must be a multiple of ``group_size``.
    """
    for name, value in (("batch", batch), ("max_len", max_len), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("d_model", d_model),
                        ("group_size", group_size), ("block_size", block_size)):
      check_positive_int(name, value)
    check_floating_dtype("dtype", dtype)
    _check_bits("bits", bits)
    _check_residual(residual)
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
    block_size = min(block_size, max_len)
    slots = -(-max_len // block_size) * block_size
    if bits == 16:
      codes = jnp.zeros((batch, slots, width), dtype)
      scales = jnp.zeros((batch, slots, 0), SCALE_DTYPE)
    else:
      codes = jnp.zeros((batch, slots, quant.packed_words(width, bits)), jnp.uint32)
      scales = jnp.zeros((batch, slots, width // group_size), SCALE_DTYPE)
    return cls(codes=codes, scale=scales, zero=scales,
               window=jnp.zeros((batch, residual, width), dtype), factors=None,
               start=jnp.zeros((batch,), jnp.int32), length=jnp.zeros((), jnp.int32), bits=bits,
               group_size=group_size, width=width, d_model=d_model, residual=residual,
               block_size=block_size, latent=latent, cross_layer=cross_layer, capacity=max_len)

  @property
  def max_len(self) -> int:
    return self.capacity

  def nbytes(self) -> int:
    """Per-context bytes: codes, scales, zero points, window, ``start`` and ``length`` (not the
    latent factors, which are per model: :meth:`factor_nbytes`)."""
    leaves = (self.codes, self.scale, self.zero, self.window, self.start, self.length)
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in leaves)

  def factor_nbytes(self) -> int:
    """One-time bytes of this layer's latent factors (float32 ``[d_model, 2r]`` and
    ``[2, r, r]``), whether or not they are attached yet; 0 unless latent."""
    r = self.width // 2
    return (self.d_model * self.width + 2 * r * r) * 4 if self.latent else 0

  def with_weights(self, key_kernel: Float[Array, "d_model kv_heads head_dim"],
                   value_kernel: Float[Array, "d_model kv_heads head_dim"]) -> Self:
    """This cache with its layer's latent factors (memoized :func:`layer_factors`) attached."""
    if not self.latent:
      return self
    return self.replace(factors=layer_factors(key_kernel, value_kernel))

  # Stream encoding and decoding.

  def _encode(self, z: Float[Array, "batch T width"]) -> dict[str, jax.Array]:
    """Stored fields (``codes``, ``scale``, ``zero``) of the stream values ``z``."""
    if self.bits == 16:
      return {"codes": z.astype(self.codes.dtype)}
    codes, scale, zero = quant.quantize_groups(z, self.bits, axis=-1, group_size=self.group_size,
                                               scale_dtype=SCALE_DTYPE)
    return {"codes": quant.pack(codes, self.bits), "scale": scale, "zero": zero}

  def _decode(self, fields: dict[str, jax.Array]) -> Float[Array, "batch T width"]:
    """float32 stream values of stored fields (the inverse of :meth:`_encode`, up to rounding)."""
    if self.bits == 16:
      return fields["codes"].astype(jnp.float32)
    return quant.dequantize_groups(quant.unpack(fields["codes"], self.bits, self.width),
                                   fields["scale"], fields["zero"], axis=-1,
                                   group_size=self.group_size)

  def decode_block(self, j0: jax.Array, size: int) -> Float[Array, "batch size width"]:
    """float32 stored stream of slots ``[j0, j0 + size)`` (meaningful below ``_quantized``)."""
    return self._decode({name: lax.dynamic_slice_in_dim(getattr(self, name), j0, size, axis=1)
                         for name in ("codes", "scale", "zero")})

  @property
  def quantized(self) -> Int[Array, ""]:
    """Slots read from the codes (the rest, up to ``length``, are in the window)."""
    return jnp.maximum(self.length - self.residual, 0)

  def window_slots(self) -> Int[Array, "R"]:
    """The slot each window row holds (slots ``>= length`` are not filled yet)."""
    return self.quantized + (jnp.arange(self.residual) - self.quantized) % self.residual

  def chain(self, previous: CrossLayerCarry | None) -> tuple[XQuantCache, ...]:
    """Caches whose decoded blocks sum to this layer's stream (XQuant-CL: layers ``0..i``)."""
    return (*previous.caches, self) if self.cross_layer and previous is not None else (self,)

  def dequantize(self, previous: CrossLayerCarry | None = None
                 ) -> Float[Array, "batch max_len width"]:
    """float32 stream of every slot as :meth:`attend_inputs` sees it (0 past ``length``);
    XQuant-CL: the accumulator, with ``previous`` the carry this layer was written with.

    For tests and inspection only: it materializes the whole stream in float32.
    """
    slots = jnp.arange(self.codes.shape[1])
    z = sum(cache.decode_block(0, slots.size) for cache in self.chain(previous))
    if self.residual:
      window = jnp.take(self.window, slots % self.residual, axis=1).astype(jnp.float32)
      z = jnp.where((slots >= self.quantized)[None, :, None], window, z)
    return jnp.where((slots < self.length)[None, :, None], z, 0.0)[:, :self.max_len]

  # The LayerInputCache interface.

  def _check_inputs(self, inputs: LayerInputs, previous: CrossLayerCarry | None) -> None:
    batch, d_model = self.codes.shape[0], inputs.key_kernel.shape[0]
    for name in ("x", "residual"):
      x = getattr(inputs, name)
      check_floating_array(f"inputs.{name}", x)
      if x.ndim != 3 or x.shape[0] != batch or x.shape[2] != d_model:
        raise ValueError(f"inputs.{name} has shape {x.shape}; expected [batch={batch}, seq, "
                         f"d_model={d_model}]")
    if d_model != self.d_model:
      raise ValueError(f"inputs.x has d_model={d_model}; expected the cache's {self.d_model}")
    if self.latent and self.factors is None:
      raise ValueError("the latent XQuant cache has no SVD factors; create the caches with "
                       "effjax.models.init_caches(..., params=params) (or call with_weights)")
    if self.cross_layer and previous is not None:
      expected = (batch, inputs.x.shape[1], self.width)
      if not isinstance(previous, CrossLayerCarry) or previous.acc.shape != expected:
        raise ValueError(f"previous is {type(previous).__name__}; expected a CrossLayerCarry "
                         f"with acc of shape {list(expected)}")

  def _source(self, inputs: LayerInputs) -> Float[Array, "batch seq width"]:
    """The new tokens' unquantized stream: X, its latents, or (XQuant-CL) the residual ``h``."""
    if self.latent:
      return inputs.x.astype(jnp.float32) @ self.factors.down
    return (inputs.residual if self.cross_layer else inputs.x).astype(jnp.float32)

  def _write(self, source: jax.Array, previous: CrossLayerCarry | None
             ) -> tuple[Self, CrossLayerCarry | None]:
    """Appends ``source [batch, seq, width]`` at slot ``length``: the slots that leave the window
    (all new slots if ``R = 0``) are quantized, the last ``min(seq, R)`` tokens enter it.

    The candidates are the ``seq`` slots ending at the new quantized count (every layer computes
    the same ones, so the XQuant-CL accumulator can be passed along); those already quantized
    (or negative) are dropped.
    """
    seq, residual = source.shape[1], self.residual
    length = self.length + seq
    slots = jnp.maximum(length - residual, 0) - seq + jnp.arange(seq)
    leaving = slots >= self.quantized
    z = jnp.take(source, slots - self.length, axis=1, mode="clip")
    if residual:
      earlier = jnp.take(self.window, slots % residual, axis=1).astype(jnp.float32)
      z = jnp.where((slots < self.length)[None, :, None], earlier, z)
    if self.cross_layer and previous is not None:
      z = z - previous.acc
    encoded = self._encode(z)
    target = jnp.where(leaving, slots, self.codes.shape[1])  # out of range: dropped
    updates = {name: getattr(self, name).at[:, target].set(value, mode="drop")
               for name, value in encoded.items()}
    if residual:
      keep = min(seq, residual)
      rows = (length - keep + jnp.arange(keep)) % residual
      updates["window"] = self.window.at[:, rows].set(
          source[:, seq - keep:].astype(self.window.dtype))
    cache = self.replace(length=length, **updates)
    if not self.cross_layer:
      return cache, None
    acc = self._decode(encoded)
    return cache, CrossLayerCarry(
        caches=(cache,) if previous is None else (*previous.caches, cache),
        acc=acc if previous is None else previous.acc + acc)

  def prefill_inputs(self, inputs: LayerInputs, start: Int[Array, "batch"],
                     previous: CrossLayerCarry | None) -> tuple[Self, CrossLayerCarry | None]:
    """Stores the prompt's stream: all but the last R tokens quantized. Replaces any content."""
    self._check_inputs(inputs, previous)
    seq = inputs.x.shape[1]
    if seq > self.max_len:
      raise ValueError(f"inputs.x has {seq} tokens; expected at most max_len={self.max_len}")
    empty = self.replace(start=check_start(start, self.codes.shape[0], seq),
                         length=jnp.zeros((), jnp.int32), window=jnp.zeros_like(self.window))
    return empty._write(empty._source(inputs), previous)

  def append_inputs(self, inputs: LayerInputs, previous: CrossLayerCarry | None
                    ) -> tuple[Self, CrossLayerCarry | None]:
    """Stores the new tokens' stream in the next slots (the window's oldest tokens, or the new
    ones when ``R = 0``, are quantized)."""
    self._check_inputs(inputs, previous)
    check_room(self.length, inputs.x.shape[1], self.max_len)
    return self._write(self._source(inputs), previous)

  def attend_inputs(self, q: Float[Array, "batch seq heads head_dim"], inputs: LayerInputs,
                    previous: CrossLayerCarry | None, *, scale: float | None = None,
                    implementation: Implementation = None,
                    block_sizes: kv_decode.DecodeBlockSizes | None = None
                    ) -> Float[Array, "batch seq heads head_dim"]:
    """Attention with ``K = rope(Z_k C_k)`` rematerialized from the stream and the value
    projection applied once per head after the weighted sum of the value stream (module
    docstring): :func:`effjax.ops.kv_decode.xquant_decode_attention` (``implementation`` None:
    the platform's default order). ``previous``: the carry this layer was written with."""
    return kv_decode.xquant_decode_attention(self, q, inputs, previous, scale=scale,
                                             implementation=implementation,
                                             block_sizes=block_sizes)

  def projections(self, inputs: LayerInputs
                  ) -> tuple[Float[Array, "key_width kv_heads head_dim"],
                             Float[Array, "value_width kv_heads head_dim"]]:
    """float32 ``(C_k, C_v)``: ``S_k B_k^T`` and ``S_v B_v^T`` (latent), else ``W_k`` and
    ``W_v``."""
    if self.latent:
      return tuple(self.factors.up)
    return tuple(w.astype(jnp.float32) for w in (inputs.key_kernel, inputs.value_kernel))

  def keys_and_values(self, z: Float[Array, "batch T width"], slots: Int[Array, "T"],
                      key_up: jax.Array, inputs: LayerInputs
                      ) -> tuple[Float[Array, "batch T kv_heads head_dim"],
                                 Float[Array, "batch T value_width"]]:
    """Keys ``rope(Z_k C_k)`` at the slots' positions and the value stream ``Z_v`` of ``z``."""
    if self.latent:
      key_in, value_in = z[..., :self.width // 2], z[..., self.width // 2:]
    elif self.cross_layer:
      key_in = value_in = _rmsnorm(z, inputs.norm_scale.astype(jnp.float32), inputs.norm_eps)
    else:
      key_in = value_in = z
    positions = jnp.maximum(slots[None, :] - self.start[:, None], 0)
    keys = apply_rope(jnp.einsum("btw,wkd->btkd", key_in, key_up), positions, inputs.rope_theta)
    return keys, value_in
