"""Public attention op: argument validation, then dispatch to an implementation.

Implementations (see ``effjax.dispatch.DEFAULT_ORDER`` for the order tried per platform):

* ``"reference"``: float32, materializes ``[q_len, kv_len]``; the test oracle, never a default.
* ``"xla"``: FlashAttention-2-style blockwise online softmax in pure JAX with a recomputing
  ``custom_vjp``; O(N) memory in forward and backward. The default on CPU, the fallback elsewhere.
* ``"pallas_gpu"``: Pallas kernels with Triton lowering
  (``pallas_kernels.flash_attention.pallas_gpu``): forward, dq and dk/dv kernels, GQA by index
  mapping, causal/window/segment block skipping.
* ``"pallas_tpu"``: Pallas kernels with Mosaic TPU lowering
  (``pallas_kernels.flash_attention.pallas_tpu``): the same three kernels and features; skipped
  blocks start no compute and no DMA.
* ``"mosaic_gpu"``: warp-specialized Pallas Mosaic GPU kernels for Hopper
  (``pallas_kernels.flash_attention.mosaic_gpu``), FlashAttention-3 style; 16-bit inputs only.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from effjax.dispatch import Implementation, dispatch, register

__all__ = ["flash_attention", "normalize_arguments"]

OP = "flash_attention"
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

register(OP, "reference", "effjax.ops.attention.reference:attention")
register(OP, "xla", "effjax.ops.attention.xla:attention")
register(OP, "pallas_gpu", "pallas_kernels.flash_attention.pallas_gpu:attention")
register(OP, "pallas_tpu", "pallas_kernels.flash_attention.pallas_tpu:attention")
# Hopper (sm_90) kernels; opt-in until measured on a GPU (not in DEFAULT_ORDER).
register(OP, "mosaic_gpu", "pallas_kernels.flash_attention.mosaic_gpu:attention")

Window = tuple[int | None, int | None]


def flash_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads v_head_dim"],
    *,
    causal: bool = False,
    q_segment_ids: Int[Array, "batch q_len"] | None = None,
    kv_segment_ids: Int[Array, "batch kv_len"] | None = None,
    window: Window | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    implementation: Implementation = None,
) -> (Float[Array, "batch q_len heads v_head_dim"]
      | tuple[Float[Array, "batch q_len heads v_head_dim"], Float[Array, "batch heads q_len"]]):
  """Exact softmax attention ``softmax(scale * q k^T + mask) v`` without an O(N^2) buffer.

  FlashAttention (Dao et al. 2022) and FlashAttention-2 (Dao 2023) compute exact attention block
  by block with an online softmax, keeping memory linear in sequence length instead of quadratic,
  and recompute the probabilities in the backward pass from the saved log-sum-exp. Memory of the
  default ``"xla"`` implementation, forward and backward: O(batch * heads * (q_len + kv_len) *
  head_dim) plus a few float32 ``[batch, heads, block_q, block_kv]`` blocks; the naive
  computation needs O(batch * heads * q_len * kv_len).

  Masking (all combinable):

  * ``causal``: aligned bottom-right when ``q_len != kv_len`` (FlashAttention >= 2.1): query ``i``
    sees keys ``j <= i + kv_len - q_len``. Queries with ``i < q_len - kv_len`` see nothing.
  * ``window=(left, right)``: query ``i`` sees keys ``i + kv_len - q_len - left <= j <=
    i + kv_len - q_len + right``, around the same bottom-right-aligned diagonal; either side may
    be None (unbounded). With ``causal``, ``right`` is 0.
  * ``q_segment_ids`` / ``kv_segment_ids``: several sequences packed in one row; query ``i`` sees
    key ``j`` only when their ids are equal. Give both or neither. Not differentiable.

  A query that sees no key outputs 0 and has LSE -inf (never NaN); values at masked positions
  (a key no query sees, a query that sees no key) never reach the output or the gradients.

  GQA/MQA: ``heads`` must be a multiple of ``kv_heads``; query head ``h`` uses kv head
  ``h // (heads // kv_heads)``. K/V are never repeated in memory.

  Args:
    q: queries ``[batch, q_len, heads, head_dim]``, float32, bfloat16 or float16.
    k: keys ``[batch, kv_len, kv_heads, head_dim]``, same dtype as q.
    v: values ``[batch, kv_len, kv_heads, v_head_dim]``, same dtype as q.
    causal: causal masking (bottom-right aligned).
    q_segment_ids: integer ``[batch, q_len]``.
    kv_segment_ids: integer ``[batch, kv_len]``.
    window: ``(left, right)`` sliding window, each a non-negative int or None.
    softcap: if given (> 0), logits become ``softcap * tanh(logits / softcap)`` (Gemma 2).
    scale: logits scale, default ``1 / sqrt(head_dim)``.
    return_lse: also return the natural-log log-sum-exp of each query's logits (differentiable).
    implementation: None (platform default order), a registered name, or a sequence of names.

  Returns:
    The output ``[batch, q_len, heads, v_head_dim]`` in q's dtype (float32 accumulation), and
    with ``return_lse`` the LSE ``[batch, heads, q_len]`` in float32.

  Raises:
    ValueError / TypeError: an argument has a wrong shape, dtype, type or value; the message
      names the argument, the value given and what is expected.
    effjax.dispatch.NoImplementationError: no requested implementation serves the call.
  """
  options = normalize_arguments(
      q, k, v, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      window=window, softcap=softcap, scale=scale, return_lse=return_lse)
  return dispatch(OP, implementation, q, k, v, **options)


def normalize_arguments(q: Any, k: Any, v: Any, *, causal: Any = False,
                        q_segment_ids: Any = None, kv_segment_ids: Any = None,
                        window: Any = None, softcap: Any = None, scale: Any = None,
                        return_lse: Any = False) -> dict[str, Any]:
  """Validates ``flash_attention``'s arguments; returns its keyword options in canonical form.

  Canonical form, as every implementation receives it: ``causal`` and ``return_lse`` are bools,
  ``window`` is None or a ``(left, right)`` tuple of int/None, ``softcap`` is None or a float,
  and ``scale`` is a float (the ``1 / sqrt(head_dim)`` default filled in).
  """
  _check_qkv(q, k, v)
  _check_segment_ids(q, k, q_segment_ids, kv_segment_ids)
  return dict(
      causal=_bool("causal", causal),
      q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids,
      window=_window(window),
      softcap=None if softcap is None else _finite_float("softcap", softcap, positive=True),
      scale=q.shape[-1] ** -0.5 if scale is None else _finite_float("scale", scale),
      return_lse=_bool("return_lse", return_lse),
  )


def _check_qkv(q: Any, k: Any, v: Any) -> None:
  for name, x in (("q", q), ("k", k), ("v", v)):
    _check_array(name, x, rank=4, layout="[batch, seq, heads, head_dim]")
    if any(size < 1 for size in x.shape):
      raise ValueError(f"{name} must have every dimension >= 1, got shape {x.shape}")
  if q.dtype not in SUPPORTED_DTYPES:
    raise TypeError(f"q must have dtype float32, bfloat16 or float16, got {q.dtype}")
  for name, x in (("k", k), ("v", v)):
    if x.dtype != q.dtype:
      raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
  if k.shape[0] != q.shape[0]:
    raise ValueError(f"k must have q's batch size {q.shape[0]}, got shape {k.shape}")
  if k.shape[3] != q.shape[3]:
    raise ValueError(f"k must have q's head_dim {q.shape[3]}, got shape {k.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must match k's [batch, kv_len, kv_heads] {k.shape[:3]}, got shape "
                     f"{v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"q's heads ({q.shape[2]}) must be a multiple of k's kv_heads "
                     f"({k.shape[2]}) for GQA/MQA, got q shape {q.shape} and k shape {k.shape}")


def _check_segment_ids(q: Any, k: Any, q_segment_ids: Any, kv_segment_ids: Any) -> None:
  if (q_segment_ids is None) != (kv_segment_ids is None):
    given = "q_segment_ids" if kv_segment_ids is None else "kv_segment_ids"
    raise ValueError(f"q_segment_ids and kv_segment_ids must be given together, got only {given}")
  if q_segment_ids is None:
    return
  for name, ids, like in (("q_segment_ids", q_segment_ids, q),
                          ("kv_segment_ids", kv_segment_ids, k)):
    _check_array(name, ids, rank=2, layout="[batch, seq]")
    if ids.shape != like.shape[:2]:
      raise ValueError(f"{name} must have shape {like.shape[:2]}, got {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"{name} must have an integer dtype, got {ids.dtype}")


def _check_array(name: str, x: Any, *, rank: int, layout: str) -> None:
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if len(x.shape) != rank:
    raise ValueError(f"{name} must have rank {rank} {layout}, got shape {x.shape}")


def _bool(name: str, value: Any) -> bool:
  if not isinstance(value, (bool, jnp.bool_)):
    raise TypeError(f"{name} must be a bool, got {value!r}")
  return bool(value)


def _window(window: Any) -> Window | None:
  if window is None:
    return None
  if not isinstance(window, (tuple, list)) or len(window) != 2:
    raise ValueError(f"window must be None or a (left, right) pair, got {window!r}")
  for side in window:
    if side is not None and (isinstance(side, (bool, jnp.bool_))
                             or not isinstance(side, numbers.Integral) or side < 0):
      raise ValueError(f"window must hold non-negative ints or None, got {window!r}")
  return tuple(None if side is None else int(side) for side in window)


def _finite_float(name: str, value: Any, *, positive: bool = False) -> float:
  if isinstance(value, (bool, jnp.bool_)) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a Python or NumPy real number (it is static), got {value!r}")
  if not math.isfinite(value) or (positive and value <= 0):
    raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got "
                     f"{value!r}")
  return float(value)
