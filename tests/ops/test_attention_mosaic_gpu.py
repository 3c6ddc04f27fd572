"""The Mosaic GPU (Hopper, warp-specialized) forward, dq and dk/dv kernels.

On CPU the kernel runs in Pallas' Mosaic GPU interpreter, which simulates the three warpgroups,
TMA copies and barriers (and fails on a barrier phase nobody waits for), with 64-key blocks so
the K/V ring is refilled; it is also lowered to Mosaic GPU for CUDA. On an sm_90 GPU
(``-m gpu``) the compiled kernel runs the same cases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aot_compile import compile_for_gpu, gpu_kernel_calls
from attention_test_base import AttentionTestBase, Case

from effjax.ops.attention import flash_attention
from effjax.ops.attention.api import normalize_arguments
from pallas_kernels.flash_attention import masks, mosaic_gpu
from pallas_kernels.interpret import interpret_mode

SMALL = mosaic_gpu.BlockSizes(block_kv=64)

# What the kernel supports: 16-bit inputs, causal/window bands, segment ids, softcap, GQA, any
# lengths, head dims <= 256.
CASES = [
    pytest.param(Case(128, 128, head_dim=64, kv_heads=1, batch=1, dtype="bfloat16"),
                 marks=pytest.mark.slow),
    Case(100, 200, head_dim=64, group=2, kv_heads=1, batch=1, causal=True, dtype="bfloat16"),
    Case(200, 70, head_dim=80, kv_heads=1, batch=1, causal=True, dtype="float16"),  # rows see none
    Case(65, 129, head_dim=64, v_head_dim=128, kv_heads=1, batch=1, dtype="bfloat16"),
    pytest.param(Case(320, 320, head_dim=64, kv_heads=1, batch=1, window=(140, 5),
                      softcap=20.0, dtype="bfloat16"), marks=pytest.mark.slow),
    # Packed rows: 3 segments over 2 query tiles, so tiles skip key blocks of other segments.
    Case(130, 200, head_dim=64, kv_heads=1, batch=1, segments=3, dtype="bfloat16"),
    pytest.param(Case(257, 300, head_dim=64, group=2, kv_heads=1, batch=1, segments=4,
                      causal=True, dtype="bfloat16"), marks=pytest.mark.slow),
]


class _Interpreted(AttentionTestBase):
  """The shared checks (forward, LSE, gradients, bf16 error rule) on the interpreted kernel."""

  def attention(self, q, k, v, **options):
    return mosaic_gpu.attention(q, k, v, block_sizes=SMALL, interpret=True,
                                **normalize_arguments(q, k, v, **options))


class _Compiled(AttentionTestBase):
  implementation = "mosaic_gpu"


# Not subclasses of the shared base: its grids include float32, windows, segments and softcap.
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_in_the_interpreter(case):
  _Interpreted().check(case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_on_gpu(case):
  _Compiled().check(case)


@pytest.mark.gpu
def test_bitwise_deterministic_on_gpu():
  q, k, v, options = Case(1000, 1100, head_dim=128, group=4, causal=True,
                          dtype="bfloat16").inputs()
  run = lambda: jax.vjp(lambda *x: flash_attention(*x, implementation="mosaic_gpu", **options),
                        q, k, v)
  (out_1, vjp_1), (out_2, vjp_2) = run(), run()
  np.testing.assert_array_equal(out_1, out_2)
  for grad_1, grad_2 in zip(vjp_1(out_1), vjp_2(out_1)):
    np.testing.assert_array_equal(grad_1, grad_2)


def test_window_and_softcap_forward_in_the_interpreter():
  """Key blocks skipped left (tile 2) and right (tile 0) of the band, a whole block without mask
  in the middle (tile 2, first consumer), an all-padding consumer (tile 2, second)."""
  q, k, v, options = Case(320, 320, head_dim=64, kv_heads=1, batch=1, window=(140, 5),
                          softcap=20.0, dtype="bfloat16").inputs()
  out, lse = _Interpreted().attention(q, k, v, return_lse=True, **options)
  want, want_lse = flash_attention(*(x.astype(jnp.float32) for x in (q, k, v)), return_lse=True,
                                   implementation="reference", **options)
  np.testing.assert_allclose(out.astype(np.float32), want, atol=2e-2)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_len, kv_len, options", [
    (40, 57, dict(window=(3, 0), causal=True)),  # keys left of every window
    pytest.param(70, 20, dict(causal=True), marks=pytest.mark.slow),  # 50 queries see no key
    # Trailing padding segments: keys 45.. of an id no query has, queries 30.. of an id no key has.
    (40, 57, dict(causal=False, q_segment_ids=np.array([[0] * 30 + [2] * 10], np.int32),
                  kv_segment_ids=np.array([[0] * 45 + [1] * 12], np.int32))),
], ids=["window", "causal", "segments"])
def test_garbage_no_query_or_key_sees_does_not_leak(q_len, kv_len, options):
  """NaN planted in keys/values no query sees and in queries/cotangents that see no key: the
  outputs and gradients equal those with zeros planted, and are finite."""
  q, k, v, _ = Case(q_len, kv_len, head_dim=64, kv_heads=1, batch=1, dtype="bfloat16").inputs()
  allowed = masks.MaskSpec.create(q_len, kv_len, causal=options["causal"],
                                  window=options.get("window")).allowed(
                                      np.arange(q_len), np.arange(kv_len))
  if "q_segment_ids" in options:
    allowed &= options["q_segment_ids"][0, :, None] == options["kv_segment_ids"][0, None, :]
  unseen_keys = jnp.asarray(~allowed.any(0))[None, :, None, None]
  unseen_queries = jnp.asarray(~allowed.any(1))[None, :, None, None]
  assert unseen_keys.any() or unseen_queries.any()
  cotangent = jax.random.normal(jax.random.key(1), q.shape, q.dtype)

  def run(fill):
    planted = (jnp.where(unseen_queries, fill, q), jnp.where(unseen_keys, fill, k),
               jnp.where(unseen_keys, fill, v))
    out, vjp = jax.vjp(lambda *x: _Interpreted().attention(*x, **options), *planted)
    return out, *vjp(jnp.where(unseen_queries, fill, cotangent))

  with_nan, with_zero = run(jnp.nan), run(0.0)
  for got, want in zip(with_nan, with_zero):
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(np.asarray(got, np.float32)).all()


@pytest.mark.parametrize("schedule, q_len, kv_len, options", [
    (dict(ping_pong=True), 256, 200, dict(group=2, causal=True)),
    (dict(ping_pong=True), 100, 300, dict(group=2, causal=True)),
    # Tile 0 streams no block, tile 1 one (the prologue and epilogue only).
    (dict(overlap=True), 256, 64, dict(causal=True)),
    (dict(overlap=True, stages=3), 100, 300, dict(group=2, causal=True)),  # 5 steps, GQA
    # Blocks skipped on both sides of the band, a whole block first (tile 0, second consumer).
    pytest.param(dict(overlap=True), 320, 320, dict(window=(140, 5), softcap=20.0),
                 marks=pytest.mark.slow),
    pytest.param(dict(overlap=True), 257, 300, dict(group=2, segments=4, causal=True),
                 marks=pytest.mark.slow),
], ids=lambda x: "-".join(map(str, x.items())) if isinstance(x, dict) else str(x))
def test_ping_pong_and_overlap_schedules_in_the_interpreter(schedule, q_len, kv_len, options):
  """The opt-in schedules' extra rendezvous and reordered ring accesses pair up (the
  interpreter fails on a barrier phase that is not observed, and would hang on one that never
  completes); the same output and LSE as the plain schedule, bitwise."""
  q, k, v, options = Case(q_len, kv_len, head_dim=64, kv_heads=1, batch=1, dtype="bfloat16",
                          **options).inputs()
  run = lambda **schedule: mosaic_gpu.attention(
      q, k, v, block_sizes=mosaic_gpu.BlockSizes(block_kv=64, **schedule), interpret=True,
      **normalize_arguments(q, k, v, return_lse=True, **options))
  plain = {"stages": schedule["stages"]} if "stages" in schedule else {}
  for got, want in zip(run(**schedule), run(**plain)):
    np.testing.assert_array_equal(got, want)


def test_dispatch_reaches_the_kernel_in_interpret_mode():
  q, k, v, options = Case(64, 64, head_dim=64, kv_heads=1, batch=1, causal=True,
                          dtype="bfloat16").inputs()
  with interpret_mode():
    got = flash_attention(q, k, v, implementation="mosaic_gpu", **options)
  want = flash_attention(q, k, v, implementation="xla", **options)
  np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2)


@pytest.mark.parametrize("change, words", [
    (dict(dtype="float32"), ["float32"]),
    (dict(head_dim=320), ["256", "320"]),
], ids=["float32", "head_dim"])
def test_unsupported_calls_fall_through(change, words):
  """NotImplementedError names the feature; dispatch then runs the next implementation."""
  dtype = change.pop("dtype", "bfloat16")
  q, k, v, options = Case(40, 40, kv_heads=1, batch=1, dtype=dtype, **change).inputs()
  with interpret_mode():
    with pytest.raises(NotImplementedError) as raised:
      flash_attention(q, k, v, implementation="mosaic_gpu", **options)
    for word in words:
      assert word in str(raised.value)
    got = flash_attention(q, k, v, implementation=("mosaic_gpu", "xla"), **options)
  np.testing.assert_array_equal(got, flash_attention(q, k, v, implementation="xla", **options))


def test_off_hopper_it_falls_through():
  q, k, v, options = Case(16, 16, head_dim=64, kv_heads=1, batch=1, dtype="bfloat16").inputs()
  with pytest.raises(NotImplementedError, match="sm_90"):
    mosaic_gpu.attention(q, k, v, scale=0.125)


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("options, head_dim, v_head_dim, q_len, kv_len", [
    (dict(), 64, 64, 256, 256), (dict(causal=True), 128, 128, 200, 300),
    pytest.param(dict(causal=True), 256, 256, 128, 128, marks=_SLOW),
    pytest.param(dict(), 64, 128, 128, 192, marks=_SLOW),
    pytest.param(dict(window=(100, 20), softcap=30.0), 128, 128, 300, 500, marks=_SLOW),
    pytest.param(dict(causal=True, block_sizes=mosaic_gpu.BlockSizes(ping_pong=True)), 128, 128,
                 256, 512, marks=_SLOW),
    pytest.param(dict(causal=True, softcap=30.0, block_sizes=mosaic_gpu.BlockSizes(overlap=True)),
                 128, 128, 256, 512, marks=_SLOW),
    (dict(window=(100, 20), segments=True,
          block_sizes=mosaic_gpu.BlockSizes(block_kv=64, stages=3, overlap=True)),
     128, 128, 200, 300),
    pytest.param(dict(causal=True, segments=True), 128, 128, 300, 300, marks=_SLOW),
    (dict(segments=True), 256, 256, 128, 200)])  # the Triton backward with segment ids
def test_compiles_for_h100(options, head_dim, v_head_dim, q_len, kv_len):
  """The three kernels compile for an H100 on this CPU-only machine (Mosaic GPU and ptxas through
  jax's CUDA plugin, :mod:`pallas_kernels.aot`: warpgroups, TMA, wgmma, register layouts, the
  shared-memory budget), with the compiled code path: register and transposed wgmma operands,
  which the interpreter does not take."""
  q = jax.ShapeDtypeStruct((2, q_len, 4, head_dim), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, kv_len, 2, head_dim), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((2, kv_len, 2, v_head_dim), jnp.bfloat16)
  options = dict(options)
  ids = ((jax.ShapeDtypeStruct((2, q_len), jnp.int32), jax.ShapeDtypeStruct((2, kv_len), jnp.int32))
         if options.pop("segments", False) else (None, None))

  def forward_backward(q, k, v, q_ids, kv_ids):
    out, vjp = jax.vjp(lambda q, k, v: mosaic_gpu.attention(
        q, k, v, scale=0.1, q_segment_ids=q_ids, kv_segment_ids=kv_ids, **options), q, k, v)
    return out, vjp(out)

  compiled = compile_for_gpu("h100", forward_backward, q, k, v, *ids)
  mosaic_backward = max(head_dim, v_head_dim) <= 128  # else the Triton backward
  assert gpu_kernel_calls(compiled, "mosaic_gpu") == (3 if mosaic_backward else 1)
  assert gpu_kernel_calls(compiled, "triton") == (0 if mosaic_backward else 2)
