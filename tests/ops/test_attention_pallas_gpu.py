"""The Pallas GPU (Triton) FlashAttention kernels through the shared test base.

On CPU (every CI run) the kernels run in Pallas' interpreter with 16/32-row tiles, so padded,
partial and skipped blocks all occur at small sizes; on a GPU (``-m gpu``, benchmarks/gpu_check.sh)
the same base runs the compiled kernels with their default tiles. The block-skipping ranges are
checked against brute force.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aot_compile import TRITON_GPUS, compile_for_gpu, gpu_kernel_calls, gpu_kernel_resources
from attention_test_base import AttentionTestBase, Case, numpy_mask, packed_segment_ids

from effjax.ops.attention import flash_attention
from effjax.ops.attention.api import normalize_arguments
from pallas_kernels import shapes
from pallas_kernels.flash_attention import masks, pallas_gpu
from pallas_kernels.interpret import interpret_mode

SMALL_TILES = pallas_gpu.BlockSizes(block_q=32, block_kv=16, block_q_dq=16, block_kv_dq=32,
                                    block_q_dkv=16, block_kv_dkv=16)


class TestPallasGpuInterpret(AttentionTestBase):
  """Kernels in the interpreter, unequal small tiles per kernel."""

  def attention(self, q, k, v, **options):
    return pallas_gpu.attention(q, k, v, block_sizes=SMALL_TILES, interpret=True,
                                **normalize_arguments(q, k, v, **options))


@pytest.mark.gpu
class TestPallasGpu(AttentionTestBase):
  """The compiled kernels with default tiles (GPU only)."""
  implementation = "pallas_gpu"


def test_dispatch_runs_the_kernel_in_interpret_mode():
  q, k, v, options = Case(50, 70, causal=True, group=2, segments=2).inputs()
  with interpret_mode():
    got = flash_attention(q, k, v, implementation="pallas_gpu", **options)
  want = flash_attention(q, k, v, implementation="reference", **options)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("q_len, kv_len", [(37, 37), (20, 53), (53, 20), (1, 9), (64, 64)])
@pytest.mark.parametrize("causal, window", [
    (False, None), (True, None), (False, (4, 2)), (True, (6, None)), (False, (None, 3)),
    (True, (40, None))])
def test_band_block_ranges_are_exact(q_len, kv_len, causal, window):
  """The kernels' loops visit exactly the blocks of the other side that the band reaches, and
  skip the mask exactly on the blocks where the band allows every pair."""
  spec = masks.MaskSpec.create(q_len, kv_len, causal=causal, window=window)
  full = numpy_mask(q_len, kv_len, dict(causal=causal, window=window))[0]
  for block, other in ((4, 8), (8, 4), (16, 16)):
    for rows, ranges, full_ranges in ((full, spec.kv_range, spec.kv_full_range),
                                      (full.T, spec.q_range, spec.q_full_range)):
      for start in range(0, rows.shape[0], block):
        mine = rows[start:start + block]
        seen = {column // other for column in np.flatnonzero(mine.any(0))}
        first, stop = (int(x) for x in pallas_gpu._block_range(ranges, start, block, other))
        assert set(range(first, stop)) == seen
        all_allowed = {j for j in range(rows.shape[1] // other)
                       if start + block <= rows.shape[0] and mine[:, j * other:(j + 1) * other].all()}
        lo, hi = (int(x) for x in full_ranges(start, start + block))
        assert set(range(-(-lo // other), hi // other)) == all_allowed


@pytest.mark.parametrize("length, segments, block", list(itertools.product((64, 100), (1, 3, 7), (16,))))
def test_segment_block_ranges_are_exact_for_sorted_ids(length, segments, block):
  """For packed (sorted) ids, the loop range is exactly the blocks that share a segment."""
  ids = jnp.stack([packed_segment_ids(1, length, segments)[0],
                   jnp.asarray(np.sort(np.random.default_rng(length).integers(0, segments, length)),
                               jnp.int32)])
  padded = shapes.pad_to_multiple(ids, 1, block, mode="edge")
  lo, hi = pallas_gpu._block_bounds(padded, block)
  for row in range(2):
    for start in range(0, length, block):
      mine = np.asarray(ids[row, start:start + block])
      first, stop = (int(x) for x in pallas_gpu._overlapping(0, 1 << 20, jnp.asarray(mine),
                                                             lo[row], hi[row]))
      sharing = {j for j in range(padded.shape[1] // block)
                 if np.isin(np.asarray(padded[row, j * block:(j + 1) * block]), mine).any()}
      assert set(range(first, stop)) == sharing


def test_segment_block_ranges_cover_unsorted_ids():
  """Unsorted ids skip less but never a block that shares an id."""
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 4, (1, 96)), jnp.int32)
  lo, hi = pallas_gpu._block_bounds(ids, 16)
  for start in range(0, 96, 16):
    mine = ids[0, start:start + 16]
    first, stop = (int(x) for x in pallas_gpu._overlapping(0, 6, mine, lo[0], hi[0]))
    sharing = {j for j in range(6) if np.isin(ids[0, j * 16:(j + 1) * 16], mine).any()}
    assert sharing <= set(range(first, stop))


@pytest.mark.parametrize("options", [
    dict(causal=True, dtype=jnp.bfloat16, head_dim=128),
    dict(dtype=jnp.bfloat16, head_dim=64),
    pytest.param(dict(window=(7, 3), softcap=5.0, segments=True, dtype=jnp.float32, head_dim=80),
                 marks=pytest.mark.slow),
    pytest.param(dict(causal=True, dtype=jnp.float32, head_dim=256), marks=pytest.mark.slow),
], ids=["causal-bf16-d128", "bf16-d64", "window-softcap-segments-f32", "causal-f32-d256"])
@TRITON_GPUS
def test_kernels_compile(gpu_name, options):
  """Forward and backward compile for an H100 (and an A100, slow) on this CPU-only machine
  (Triton and ptxas through jax's CUDA plugin, :mod:`pallas_kernels.aot`) with the default
  blocks: every primitive has a Triton lowering, and the blocks fit the card's shared memory
  (float32 at head dim 256 did not before its tiles were halved)."""
  options = dict(options)
  dtype, head_dim, segments = (options.pop("dtype"), options.pop("head_dim"),
                               options.pop("segments", False))
  spec = jax.ShapeDtypeStruct((2, 200, 4, head_dim), dtype)
  kv_spec = jax.ShapeDtypeStruct((2, 200, 2, head_dim), dtype)
  ids = jax.ShapeDtypeStruct((2, 200), jnp.int32)

  def forward_backward(q, k, v, q_ids, kv_ids):
    out, vjp = jax.vjp(lambda q, k, v: pallas_gpu.attention(
        q, k, v, scale=0.1, q_segment_ids=q_ids if segments else None,
        kv_segment_ids=kv_ids if segments else None, **options), q, k, v)
    return out, vjp(out)

  compiled = compile_for_gpu(gpu_name, forward_backward, spec, kv_spec, kv_spec, ids, ids)
  assert gpu_kernel_calls(compiled, "triton") == 3  # forward, dq, dk/dv


@pytest.mark.parametrize("head_dim", [64, 256])
def test_default_blocks_do_not_spill_on_h100(head_dim):
  """With the default blocks, the bfloat16 kernels (causal, GQA 2, S = 1024) at head dim 64 and
  256 fit the registers of an H100: ptxas spilling fails the compilation (at 256 the 4-warp tiles
  spilled KBs per thread)."""
  q = jax.ShapeDtypeStruct((1, 1024, 4, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 1024, 2, head_dim), jnp.bfloat16)

  def forward_backward(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: pallas_gpu.attention(q, k, v, scale=0.1, causal=True),
                       q, k, v)
    return out, vjp(out)

  compile_for_gpu("h100", forward_backward, q, kv, kv,
                  compiler_options={"xla_gpu_fail_ptx_compilation_on_register_spilling": True})


@pytest.mark.parametrize("head_dim", [128, 256])
def test_default_forward_does_not_spill_on_a100(head_dim):
  """Before Hopper the 16-bit forward above head dim 64 takes 64 x 64 tiles (128 x 64 spilled
  1372 bytes per thread on an A100 at 128, 600 at 256): the forward compiled for an A100, the
  compute capability read from the compile target, fails if ptxas spills."""
  blocks = lambda capability: pallas_gpu.default_block_sizes(4096, 4096, head_dim,
                                                             compute_capability=capability)
  assert blocks((8, 0)).block_q == 64 and blocks((9, 0)).block_q == 128
  q = jax.ShapeDtypeStruct((1, 1024, 4, head_dim), jnp.bfloat16)
  forward = lambda q, k, v: pallas_gpu.attention(q, k, v, scale=0.1, causal=True)
  compile_for_gpu("a100", forward, q, q, q,
                  compiler_options={"xla_gpu_fail_ptx_compilation_on_register_spilling": True})


def test_kernel_resources_report_the_spills():
  """``aot.gpu_kernel_resources`` reads ptxas' report of each Triton kernel: at head dim 256 the
  4-warp tiles (``BlockSizes()``, no longer the default there) spill KBs per thread in the
  forward (:func:`test_default_blocks_do_not_spill_on_h100`: the default blocks do not)."""
  q = jax.ShapeDtypeStruct((1, 1024, 4, 256), jnp.bfloat16)
  forward = lambda q, k, v: pallas_gpu.attention(q, k, v, scale=0.1,
                                                 block_sizes=pallas_gpu.BlockSizes())
  kernel = gpu_kernel_resources("h100", forward, q, q, q)["flash_attention_forward"]
  assert kernel.registers == 255 and kernel.spill_store_bytes > 1024
