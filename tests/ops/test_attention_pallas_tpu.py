"""The Pallas TPU (Mosaic) FlashAttention kernels through the shared test base.

On CPU the kernels run in the TPU interpreter (``interpret_mode()``), which simulates VMEM, SMEM
and the DMAs of the pipeline, at about 20 ms per grid step, so what runs where is:

* default run: :class:`TestPallasTpu` with 24 x 32 blocks (padded, partial, full and skipped
  blocks all occur) on :data:`TPU_CASES`, four small cases that cover GQA 2 and 8, causal with
  q_len != kv_len, window, segments, softcap, bfloat16, head dim 80 (padded to 128), length 1 and
  fully masked rows; the base's NaN-leak, recompilation and bad-input tests; the block schedule
  against brute force; DMA and compute counts of skipped blocks in the interpreter; and the
  Mosaic lowering of all three kernels for TPU (``jax.export``).
* ``-m slow``: with small blocks, the base's default cases up to length 257, the short lengths
  of its grid, fully masked rows, float16, vmap and bitwise determinism; and
  :class:`TestPallasTpuDefaultBlocks`, the whole base (its full grid included) with the default
  block sizes.
* ``-m tpu`` (on a TPU): :class:`TestPallasTpuCompiled`, the whole base on the compiled kernels.
"""

from __future__ import annotations

import collections
import functools
import itertools
import sys

import attention_test_base
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_test_base import (DEFAULT_BF16_CASES, DEFAULT_CASES, SLOW_BF16_CASES, SLOW_CASES,
                                 AttentionTestBase, Case, numpy_mask, packed_segment_ids)
from jax._src import source_info_util  # the TPU interpreter's internals: one test counts
from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # its DMAs and loads
from aot_compile import ALL_GENERATIONS, compile_for_tpu, kernel_calls

from effjax import dispatch
from effjax.ops.attention import flash_attention
from effjax.ops.attention.api import normalize_arguments
from pallas_kernels.flash_attention import pallas_tpu
from pallas_kernels.interpret import compile_target, interpret_mode

SMALL_BLOCKS = pallas_tpu.BlockSizes(24, 32)
TPU_CASES = [
    Case(1, 70, causal=True, window=(30, None), group=8, kv_heads=1, batch=1),
    Case(57, 40, causal=True, group=2, kv_heads=1, batch=1, head_dim=80),
    Case(45, 30, window=(7, 3), segments=2, softcap=3.0, group=2, kv_heads=1, head_dim=16),
    Case(20, 30, window=(3, None), group=2, kv_heads=1, batch=1, dtype="bfloat16"),
]
_SMALL = [case for case in DEFAULT_CASES + DEFAULT_BF16_CASES
          if max(case.q_len, case.kv_len) <= 257]
_slow = pytest.mark.slow
_INTERPRETER_SOURCES = "pallas/mosaic/interpret"  # where the TPU interpreter's code lives


def _slow_copy(test):
  """The base's ``test`` (its parametrization included), marked slow in the subclass only."""
  @functools.wraps(test)
  def copy(self, *args, **kwargs):
    return test(self, *args, **kwargs)
  return _slow(copy)


class _KernelCompileCounter(
    attention_test_base._CompileCounter):  # pylint: disable=protected-access
  """Counts compilations, except those started inside the TPU interpreter's host callbacks."""

  def emit(self, record) -> None:
    frame = sys._getframe()  # pylint: disable=protected-access
    while frame is not None:
      if _INTERPRETER_SOURCES in frame.f_code.co_filename:
        return
      frame = frame.f_back
    super().emit(record)


class TestPallasTpu(AttentionTestBase):
  """The kernels in the TPU interpreter with small blocks (see the module docstring)."""

  block_sizes: pallas_tpu.BlockSizes | None = SMALL_BLOCKS

  def attention(self, q, k, v, **options):
    with interpret_mode():
      return pallas_tpu.attention(q, k, v, block_sizes=self.block_sizes,
                                  **normalize_arguments(q, k, v, **options))

  @pytest.mark.parametrize("case", TPU_CASES + [pytest.param(case, marks=_slow) for case in _SMALL],
                           ids=str)
  def test_matches_reference(self, case):
    self.check(case)

  @_slow
  @pytest.mark.parametrize("case", [case for case in SLOW_CASES + SLOW_BF16_CASES
                                    if max(case.q_len, case.kv_len) <= 128], ids=str)
  def test_matches_reference_grid(self, case):
    """Small blocks on the grid's short lengths; the whole grid runs in the default-block class."""
    self.check(case)

  def test_no_recompilation_on_second_call(self, monkeypatch):
    """The base's test, not counting what jax compiles inside the TPU interpreter's host
    callbacks: eager scalar bookkeeping (``device_id * cores``, ``tuple(grid_index)``) whose
    executables sit in jax's LRU caches, which the previous tests may have evicted. A
    recompilation of the kernels is compiled from the caller's stack and still counts."""
    monkeypatch.setattr(attention_test_base, "_CompileCounter", _KernelCompileCounter)
    super().test_no_recompilation_on_second_call()

  # Slow here, unchanged otherwise. Fully masked rows also occur in the default cases (queries
  # before the band in TPU_CASES[1] and [2]), whose output and LSE must match 0 and -inf exactly.
  test_fully_masked_rows = _slow_copy(AttentionTestBase.test_fully_masked_rows)
  test_float16 = _slow_copy(AttentionTestBase.test_float16)
  test_jit_and_vmap = _slow_copy(AttentionTestBase.test_jit_and_vmap)
  test_bitwise_deterministic = _slow_copy(AttentionTestBase.test_bitwise_deterministic)


@_slow
class TestPallasTpuDefaultBlocks(TestPallasTpu):
  """The whole base with :func:`pallas_tpu.default_block_sizes` (one block per length up to
  512)."""

  block_sizes = None

  @pytest.mark.parametrize("case", DEFAULT_CASES + DEFAULT_BF16_CASES, ids=str)
  def test_matches_reference(self, case):
    self.check(case)

  @pytest.mark.parametrize("case", SLOW_CASES + SLOW_BF16_CASES, ids=str)
  def test_matches_reference_grid(self, case):
    self.check(case)


@pytest.mark.tpu
class TestPallasTpuCompiled(AttentionTestBase):
  """The compiled kernels with default blocks (TPU only)."""
  implementation = "pallas_tpu"


def test_dispatch():
  """Default order on TPU; the kernel serves ``implementation="pallas_tpu"`` in interpret mode
  and falls through to xla off a TPU outside it."""
  assert dispatch.default_order("flash_attention", "tpu") == ("xla",)
  q, k, v, options = Case(20, 30, causal=True, batch=1).inputs()
  with interpret_mode():
    got = flash_attention(q, k, v, implementation="pallas_tpu", **options)
  np.testing.assert_allclose(got, flash_attention(q, k, v, implementation="reference", **options),
                             rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(
      flash_attention(q, k, v, implementation=("pallas_tpu", "xla"), **options),
      flash_attention(q, k, v, implementation="xla", **options))
  with pytest.raises(dispatch.NoImplementationError, match="pallas_tpu.*needs a TPU"):
    flash_attention(q, k, v, implementation="pallas_tpu", **options)


def test_block_sizes_must_suit_mosaic_on_a_tpu():
  """Off the interpreter, blocks must be multiples of 128 unless they cover the whole length."""
  q, k, v, _ = Case(300, 300).inputs()
  with compile_target("tpu"), pytest.raises(ValueError, match="block_kv must be a multiple of 128"):
    pallas_tpu.attention(q, k, v, scale=1.0, block_sizes=pallas_tpu.BlockSizes(128, 96))


@pytest.mark.parametrize("length", [1, 7, 8, 100, 512, 513, 1000, 4097, 32768])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_default_block_sizes(length, head_dim):
  """Mosaic-legal blocks (128-multiples, or one block of the 8-padded length) within the target,
  padding each length by less than 128 positions per block."""
  blocks = pallas_tpu.default_block_sizes(length, length, head_dim)
  block_q = blocks.block_q
  assert block_q == blocks.block_kv
  target = 512 if head_dim <= 128 else 256
  blocks = -(-length // block_q)
  if blocks == 1:
    assert block_q == -(-length // 8) * 8
  else:
    assert block_q % 128 == 0 and block_q <= target
    assert blocks * block_q - length < 128 * blocks


def _brute_force_blocks(mask, config, *, queries_major):
  """``{(b, major, minor): (any pair allowed, every pair allowed and none is padding)}``."""
  batch = mask.shape[0]
  padded = np.zeros((batch, config.q_pad, config.kv_pad), bool)
  padded[:, :mask.shape[1], :mask.shape[2]] = mask
  result = {}
  for b, i, j in itertools.product(range(batch), range(config.q_blocks), range(config.kv_blocks)):
    block = padded[b, i * config.block_q:(i + 1) * config.block_q,
                   j * config.block_kv:(j + 1) * config.block_kv]
    result[(b, i, j) if queries_major else (b, j, i)] = (block.any(), block.all())
  return result


@pytest.mark.parametrize("q_len, kv_len, options, sorted_ids", [
    (64, 64, dict(causal=True), True),
    (50, 93, dict(window=(10, 5)), True),
    (93, 50, dict(causal=True, window=(20, None)), True),
    (70, 70, dict(causal=True, segments=3), True),
    (70, 88, dict(segments=4), False),  # rows shifted: the last ids wrap around (unsorted)
    (88, 70, dict(window=(None, 9), segments=2), False),
])
@pytest.mark.parametrize("queries_major", [True, False], ids=["q_major", "kv_major"])
def test_block_schedule_matches_brute_force(q_len, kv_len, options, sorted_ids, queries_major):
  """Every block pair with an allowed (query, key) is computed; with the band and sorted ids
  exactly those; a pair run without its mask really allows every pair."""
  options = dict(options)
  batch = 3
  segments = options.pop("segments", 0)
  ids = {}
  if segments:
    ids = dict(q_segment_ids=packed_segment_ids(batch, q_len, segments),
               kv_segment_ids=packed_segment_ids(batch, kv_len, segments))
    if sorted_ids:
      ids = {name: jnp.sort(x, axis=1) for name, x in ids.items()}
  config = pallas_tpu._Config(  # pylint: disable=protected-access
      mask=pallas_tpu.masks.MaskSpec.create(q_len, kv_len, causal=options.get("causal", False),
                                            window=options.get("window")),
      scale=1.0, softcap=None, block_q=16, block_kv=24, group=1, segments=bool(segments),
      interpret=False)
  schedule = pallas_tpu._Schedule.create(  # pylint: disable=protected-access
      config, ids.get("q_segment_ids"), ids.get("kv_segment_ids"), queries_major=queries_major)
  tables = [np.asarray(x) for x in schedule.tables]
  expected = _brute_force_blocks(np.broadcast_to(numpy_mask(q_len, kv_len, {**options, **ids}),
                                                 (batch, q_len, kv_len)),
                                 config, queries_major=queries_major)
  skipped = 0
  for (b, major, minor), (any_allowed, all_allowed) in expected.items():
    visible, full = (bool(x) for x in pallas_tpu._block_kind(  # pylint: disable=protected-access
        config, tables, b, major, minor, queries_major=queries_major))
    assert visible or not any_allowed, (b, major, minor)
    assert not (visible and full) or all_allowed, (b, major, minor)
    if sorted_ids:
      assert visible == any_allowed, (b, major, minor)
      assert (visible and full) == all_allowed, (b, major, minor)
    skipped += not visible
  assert skipped > 0


def test_skipped_blocks_start_no_dma_and_no_compute(monkeypatch):
  """Counts, in the TPU interpreter, the K/V block fetches and the compute steps of a causal
  forward pass: compute runs on exactly the blocks that hold an allowed pair, and K/V are
  fetched once per visible block (a skipped step names a block that is already resident).

  The counts come from the interpreter's DMA and load callbacks (jax internals: if they move,
  this test fails rather than passes vacuously)."""
  fetches, reads = collections.Counter(), collections.Counter()
  original = interpret_pallas_call.get

  def counting_get(*args, input_name=None, source_info=None, **kwargs):
    if input_name is not None:  # a pipeline DMA of an input block
      fetches[input_name] += 1
    elif source_info is not None:  # a load inside the kernel body
      reads[source_info_util.summarize(source_info)] += 1
    return original(*args, input_name=input_name, source_info=source_info, **kwargs)

  monkeypatch.setattr(interpret_pallas_call, "get", counting_get)
  q_len = kv_len = 64
  block = 16
  q, k, v, options = Case(q_len, kv_len, causal=True, batch=1, kv_heads=1).inputs()
  with interpret_mode():
    jax.block_until_ready(pallas_tpu.attention(q, k, v,
                                               block_sizes=pallas_tpu.BlockSizes(block, block),
                                               **normalize_arguments(q, k, v, **options)))
  mask = numpy_mask(q_len, kv_len, options)[0]
  blocks = q_len // block
  visible = [[j for j in range(blocks) if mask[i * block:(i + 1) * block,
                                               j * block:(j + 1) * block].any()]
             for i in range(blocks)]
  sequence = [j for row in visible for j in row]  # the ideal fetch order: visible blocks only
  ideal_fetches = 1 + sum(a != b for a, b in zip(sequence, sequence[1:]))
  assert ideal_fetches < blocks * blocks
  # Kernel inputs after the six scalar-prefetch tables: q (refs[6]), k (refs[7]), v (refs[8]).
  assert fetches["refs[7]"] == fetches["refs[8]"] == ideal_fetches, fetches
  step_reads = {count for where, count in reads.items() if "_forward_kernel.<locals>.step" in where}
  assert step_reads == {len(sequence)}, reads
  # The counts the benchmark reports (experiments/bench_attention_tpu.py) agree.
  counts = pallas_tpu.schedule_counts(q_len, kv_len, causal=True,
                                      block_sizes=pallas_tpu.BlockSizes(block, block))
  assert (counts["forward_computed"], counts["forward_fetched"]) == (len(sequence), ideal_fetches)


@pytest.mark.parametrize("q_len, kv_len, head_dim, dtype, options", [
    (1000, 1000, 128, jnp.bfloat16, dict(causal=True)),
    (257, 1000, 80, jnp.float32, dict(window=(100, 20), softcap=20.0, segments=True)),
    (17, 4096, 256, jnp.float16, dict(causal=True, segments=True)),
], ids=["causal_bf16", "window_segments_softcap_f32", "d256_f16"])
@ALL_GENERATIONS
def test_compiles_for_tpu(generation, q_len, kv_len, head_dim, dtype, options):
  """Forward and backward compile for a TPU with the default blocks: Mosaic's own compiler
  (libtpu, no TPU needed) checks the block shapes against the (8, 128) tiling, every op of the
  kernel bodies and index maps, the vector layouts and dtypes of that generation (float16 loads
  are rejected: the wrapper computes float16 as float32) and the VMEM the blocks take."""
  options = dict(options)
  batch, heads, kv_heads = 2, 4, 2
  q = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), dtype)
  k = jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), dtype)
  ids = {}
  if options.pop("segments", False):
    ids = dict(q_segment_ids=jax.ShapeDtypeStruct((batch, q_len), jnp.int32),
               kv_segment_ids=jax.ShapeDtypeStruct((batch, kv_len), jnp.int32))

  def loss(q, k, v, **segment_ids):
    out, lse = pallas_tpu.attention(q, k, v, **normalize_arguments(q, k, v, return_lse=True,
                                                                   **options, **segment_ids))
    return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

  compiled = compile_for_tpu(generation, jax.grad(loss, argnums=(0, 1, 2)), q, k, k, **ids)
  assert kernel_calls(compiled) == 3  # forward, dq, dk/dv


def test_statistics_take_little_hbm_on_tpu():
  """Forward+backward compiled for TPU v5e (bfloat16, S = 16k, d = 128, causal): the LSE and D
  rows take 32 bytes per query and head (``[b, h, 8, q]``), so the temporary HBM is at most two
  heads-major copies (2 x q's bytes; XLA keeps the rest on chip). Lane-broadcast statistics
  (``[b, h, q, 128]``, 512 bytes) took 160 MiB here, 5 x q's bytes."""
  seq = 16384
  q = jax.ShapeDtypeStruct((1, seq, 8, 128), jnp.bfloat16)

  def loss(q, k, v):
    out = pallas_tpu.attention(q, k, v, **normalize_arguments(q, k, v, causal=True))
    return jnp.sum(out.astype(jnp.float32) ** 2)

  compiled = compile_for_tpu("v5e", jax.grad(loss, argnums=(0, 1, 2)), q, q, q)
  temp, q_bytes = compiled.memory_analysis().temp_size_in_bytes, seq * 8 * 128 * 2
  assert temp <= 2 * q_bytes + 2**20, temp / q_bytes
