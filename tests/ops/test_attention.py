"""Tests of ``flash_attention``: each implementation through the shared base, argument
validation (once, before dispatch), the reference against independent computations, dispatch,
block ranges, and the O(N) memory of the ``xla`` path."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_test_base import (DEFAULT_CASES, REFERENCE, SLOW_CASES, AttentionTestBase,
                                 Case, naive_attention, numpy_mask)

from effjax import dispatch, testing
from effjax.ops.attention import flash_attention, xla
from effjax.ops.attention.api import normalize_arguments
from pallas_kernels.flash_attention import masks


class TestXla(AttentionTestBase):
  implementation = "xla"


class TestXlaSmallBlocks(AttentionTestBase):
  """``xla`` with small unequal blocks: many padded, partial and skipped blocks at small sizes."""

  def attention(self, q, k, v, **options):
    return xla.attention(q, k, v, block_sizes=(16, 24), **normalize_arguments(q, k, v, **options))


class TestValidation:
  """``flash_attention`` validates its arguments before dispatch (``api.normalize_arguments``),
  the same for every implementation: the bad-input checks run once, on the default one."""

  @pytest.mark.parametrize("change, error, words", [
      (dict(q=np.zeros((2, 8, 4))), ValueError, ["q", "rank 4", "(2, 8, 4)"]),
      (dict(k=np.zeros((2, 9, 3, 16), np.float32), v=np.zeros((2, 9, 3, 16), np.float32)),
       ValueError, ["multiple", "kv_heads", "(3)"]),
      (dict(k=np.zeros((3, 9, 2, 16), np.float32)), ValueError, ["k", "batch", "(3, 9, 2, 16)"]),
      (dict(k=np.zeros((2, 9, 2, 8), np.float32)), ValueError, ["k", "head_dim", "16"]),
      (dict(v=np.zeros((2, 7, 2, 16), np.float32)), ValueError, ["v", "(2, 7, 2, 16)"]),
      (dict(v=np.zeros((2, 9, 2, 16), np.float16)), TypeError, ["v", "float16", "float32"]),
      (dict(q=np.zeros((2, 8, 4, 16), np.int32)), TypeError, ["q", "int32"]),
      (dict(q=np.zeros((2, 0, 4, 16), np.float32)), ValueError, ["q", ">= 1"]),
      (dict(q=[[1.0]]), TypeError, ["q", "array", "list"]),
      (dict(window=(3,)), ValueError, ["window", "(3,)"]),
      (dict(window=(-1, 2)), ValueError, ["window", "-1", "non-negative"]),
      (dict(window=(1.5, None)), ValueError, ["window", "1.5"]),
      (dict(q_segment_ids=np.zeros((2, 8), np.int32)), ValueError, ["kv_segment_ids", "together"]),
      (dict(q_segment_ids=np.zeros((2, 9), np.int32), kv_segment_ids=np.zeros((2, 9), np.int32)),
       ValueError, ["q_segment_ids", "(2, 8)", "(2, 9)"]),
      (dict(q_segment_ids=np.zeros((2, 8)), kv_segment_ids=np.zeros((2, 9))),
       TypeError, ["q_segment_ids", "integer", "float64"]),
      (dict(softcap=0.0), ValueError, ["softcap", "positive", "0.0"]),
      (dict(softcap="1"), TypeError, ["softcap", "'1'"]),
      (dict(scale=float("inf")), ValueError, ["scale", "finite", "inf"]),
      (dict(scale=jnp.float32(1.0)), TypeError, ["scale", "static"]),
      (dict(causal=1), TypeError, ["causal", "bool", "1"]),
      (dict(return_lse=None), TypeError, ["return_lse", "bool"]),
  ])
  def test_bad_input_raises(self, change, error, words):
    arguments = dict(q=np.zeros((2, 8, 4, 16), np.float32), k=np.zeros((2, 9, 2, 16), np.float32),
                     v=np.zeros((2, 9, 2, 16), np.float32))
    arguments.update(change)
    with pytest.raises(error) as raised:
      flash_attention(**arguments)
    for word in words:
      assert word in str(raised.value), f"{word!r} not in {raised.value}"


_NAIVE_CASES = DEFAULT_CASES[::2] + [
    pytest.param(case, marks=pytest.mark.slow) for case in DEFAULT_CASES[1::2] + SLOW_CASES]


class TestReference:
  """The oracle itself, against computations that share none of its code."""

  @pytest.mark.parametrize("case", _NAIVE_CASES, ids=str)
  def test_matches_naive_attention(self, case):
    q, k, v, options = case.inputs()
    testing.check_against_reference(
        functools.partial(REFERENCE, return_lse=True, **options),
        functools.partial(naive_attention, return_lse=True, **options), q, k, v,
        argnums=(0, 1, 2))

  @pytest.mark.parametrize("case", [
      Case(128, 257, window=(7, 3), group=2, head_dim=64),
      Case(100, 300, causal=True, segments=2, group=8, kv_heads=1)], ids=str)
  def test_matches_jax_nn(self, case):
    """jax.nn takes the mask explicitly; its LSE is a residual, compared without gradients."""
    q, k, v, options = case.inputs()
    mask = jnp.asarray(numpy_mask(case.q_len, case.kv_len, options))[:, None]
    assert mask.any(-1).all(), "jax.nn is not defined on fully masked rows"
    jax_nn = jax.jit(functools.partial(jax.nn.dot_product_attention, mask=mask),
                     static_argnames="return_residual")
    testing.check_against_reference(functools.partial(REFERENCE, **options), jax_nn, q, k, v,
                                    argnums=(0, 1, 2))
    _, lse = jax_nn(q, k, v, return_residual=True)
    testing.assert_close(REFERENCE(q, k, v, return_lse=True, **options)[1], lse.transpose(0, 2, 1))


def test_default_order_serves_the_call_on_cpu():
  assert dispatch.default_order("flash_attention", "cpu") == ("xla",)
  assert dispatch.default_order("flash_attention", "gpu") == ("pallas_gpu", "xla")
  assert dispatch.default_order("flash_attention", "tpu") == ("xla",)
  for platform in dispatch.PLATFORMS:
    assert dispatch.default_order("flash_attention", platform)[-1] == "xla"  # the fallback
  q, k, v, options = Case(20, 30, causal=True).inputs()
  np.testing.assert_array_equal(flash_attention(q, k, v, **options),
                                flash_attention(q, k, v, implementation="xla", **options))


def test_kernels_off_their_platform_fall_through_to_xla():
  q, k, v, options = Case(20, 30, causal=True).inputs()
  np.testing.assert_array_equal(
      flash_attention(q, k, v, implementation=("pallas_gpu", "xla"), **options),
      flash_attention(q, k, v, implementation="xla", **options))
  with pytest.raises(dispatch.NoImplementationError, match="pallas_gpu.*needs a GPU"):
    flash_attention(q, k, v, implementation="pallas_gpu", **options)


def test_unknown_implementation_raises():
  q, k, v, _ = Case(4, 4).inputs()
  with pytest.raises(ValueError, match="nope"):
    flash_attention(q, k, v, implementation="nope")


@pytest.mark.parametrize("block_sizes", [(0, 16), (16,), (16.0, 16)])
def test_bad_block_sizes_raise(block_sizes):
  q, k, v, _ = Case(4, 4).inputs()
  with pytest.raises(ValueError, match="block_sizes"):
    xla.attention(q, k, v, scale=1.0, block_sizes=block_sizes)


@pytest.mark.parametrize("q_len, kv_len", [(37, 37), (20, 53), (53, 20), (1, 9), (9, 1)])
@pytest.mark.parametrize("causal, window", [
    (False, None), (True, None), (False, (4, 2)), (True, (6, None)), (False, (None, 3)),
    (False, (0, 0)), (True, (0, 5))])
def test_block_ranges_are_exact(q_len, kv_len, causal, window):
  """The loop bounds skip exactly the blocks the band masks: no visible key is skipped, and no
  position inside a range is masked for the whole block (so the skipping saves all it can)."""
  spec = masks.MaskSpec.create(q_len, kv_len, causal=causal, window=window)
  full = numpy_mask(q_len, kv_len, dict(causal=causal, window=window))[0]
  for block in (1, 4, 7):
    for rows, transposed, ranges in ((full, False, spec.kv_range), (full.T, True, spec.q_range)):
      for start in range(0, rows.shape[0], block):
        seen = np.flatnonzero(rows[start:start + block].any(0))
        lo, hi = (int(x) for x in ranges(start, start + block))
        if seen.size:
          assert (lo, hi) == (seen[0], seen[-1] + 1) and hi - lo == seen.size, (transposed, start)
        else:
          assert hi <= lo, (transposed, start)


def _temp_bytes(implementation: str, length: int, heads: int = 1, head_dim: int = 64) -> int:
  """Temp bytes of the compiled causal forward + backward (compiled only, never run)."""
  spec = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)

  def loss(q, k, v):
    return flash_attention(q, k, v, causal=True, implementation=implementation).sum()

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_xla_memory_grows_linearly():
  """FlashAttention's claim: no [S, S] buffer in forward or backward, memory linear in S."""
  length = 4096
  quadratic = length * length * 4
  temp, temp_double = _temp_bytes("xla", length), _temp_bytes("xla", 2 * length)
  assert temp < quadratic / 4, (temp, quadratic)
  assert temp_double / temp < 2.5, (temp, temp_double)
  assert _temp_bytes("reference", length) > quadratic  # the naive oracle is quadratic


@pytest.mark.parametrize("q_len, kv_len, batch_heads", list(itertools.product(
    (1, 17, 257, 1000, 4096), (1, 513, 4096), (1, 64, 4096))))
def test_default_block_sizes(q_len, kv_len, batch_heads):
  block_q, block_kv = xla.default_block_sizes(q_len, kv_len, batch_heads)
  for length, block in ((q_len, block_q), (kv_len, block_kv)):
    blocks = -(-length // block)
    assert block == length or (block % 8 == 0 and blocks * block - length < 8 * blocks)
  assert batch_heads * block_q * block_kv <= max(1 << 22, batch_heads * 64 * 64)
