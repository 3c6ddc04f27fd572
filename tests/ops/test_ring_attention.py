"""ring_attention == single-device reference attention, on 2, 4 and 8 simulated devices.

Every case compares output, LSE and the gradients of q, k and v (through a random cotangent on
both outputs) with the float32 reference run on the natural token order, for each layout and
strategy. Segment ids are packed in the natural order and then laid out, so documents cross
device borders.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from effjax import testing
from effjax.ops.ring_attention import (
    LAYOUTS, STRATEGIES, blocks, from_layout, positions, reference, ring_attention, to_layout)
from attention_test_base import packed_segment_ids


@dataclasses.dataclass(frozen=True)
class RingCase:
  devices: int
  per_device: int  # tokens per device
  layout: str = "zigzag"
  strategy: str = "ring"
  causal: bool = True
  kv_heads: int = 2
  group: int = 1
  head_dim: int = 16
  segments: int = 0
  window: tuple[int | None, int | None] | None = None
  softcap: float | None = None
  scale: float | None = None
  dtype: str = "float32"

  def __str__(self) -> str:
    return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                    if getattr(self, f.name) != f.default or f.name in ("devices", "per_device"))


def mesh_of(devices: int) -> Mesh:
  return Mesh(np.array(jax.devices()[:devices]), ("seq",))


def check(case: RingCase) -> None:
  seq = case.devices * case.per_device
  keys = jax.random.split(jax.random.key(0), 3)
  heads = case.kv_heads * case.group
  q = jax.random.normal(keys[0], (2, seq, heads, case.head_dim), case.dtype)
  k = jax.random.normal(keys[1], (2, seq, case.kv_heads, case.head_dim), case.dtype)
  v = jax.random.normal(keys[2], (2, seq, case.kv_heads, case.head_dim), case.dtype)
  segments = None
  if case.segments:
    segments = to_layout(packed_segment_ids(2, seq, case.segments), case.devices, case.layout)
  options = dict(causal=case.causal, window=case.window, softcap=case.softcap, scale=case.scale)
  fn = jax.jit(lambda q, k, v: ring_attention(
      q, k, v, mesh=mesh_of(case.devices), layout=case.layout, strategy=case.strategy,
      q_segment_ids=segments, kv_segment_ids=segments, return_lse=True, **options))
  oracle = functools.partial(reference.ring_attention, num_devices=case.devices,
                             layout=case.layout, q_segment_ids=segments,
                             kv_segment_ids=segments, **options)
  testing.check_against_reference(fn, oracle, q, k, v, argnums=(0, 1, 2))


DEFAULT_CASES = [
    *(RingCase(2, 8, layout, strategy, causal)
      for layout, strategy, causal in itertools.product(LAYOUTS, STRATEGIES, (True, False))),
    RingCase(4, 6, "striped", group=4, kv_heads=1),  # MQA
    RingCase(4, 34, "zigzag", group=2, segments=3),  # blocks of 17: not a multiple of 8
    RingCase(8, 4, "contiguous", "all_gather", segments=5, softcap=4.0),
    RingCase(8, 4, "zigzag", segments=5, head_dim=40, scale=0.2),
    RingCase(4, 10, "striped", "all_gather", group=2, segments=4),
    RingCase(2, 16, "zigzag", group=2, dtype="bfloat16"),
    RingCase(2, 1, "striped"),  # one token per device: the shifted step sees nothing
    # Windows: the ring stops early (contiguous 8 x 8 with left 5: 2 of 8 steps).
    RingCase(8, 8, "contiguous", window=(5, None)),
    RingCase(4, 8, "contiguous", causal=False, window=(3, 11), segments=3, group=2),
    RingCase(4, 6, "striped", "all_gather", window=(9, None)),
    RingCase(4, 6, "striped", causal=False, window=(None, 2)),
]
SLOW_CASES = [
    RingCase(devices, per_device, layout, strategy, causal, group=group, segments=segments)
    for devices, per_device, layout, strategy, causal, group, segments in itertools.product(
        (2, 4, 8), (6, 40), LAYOUTS, STRATEGIES, (True, False), (1, 3), (0, 3))
] + [
    RingCase(devices, per_device, layout, strategy, causal, window=window)
    for devices, per_device, layout, strategy, causal, window in itertools.product(
        (2, 8), (6, 40), ("contiguous", "striped"), STRATEGIES, (True, False),
        ((0, 0), (7, None), (None, 7), (50, 3), (300, None)))
]


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=str)
def test_matches_reference(case):
  check(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=str)
def test_matches_reference_grid(case):
  check(case)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_layout_round_trip_and_positions(layout, devices):
  seq = 8 * devices
  x = jnp.arange(2 * seq).reshape(2, seq)
  laid_out = to_layout(x, devices, layout)
  np.testing.assert_array_equal(from_layout(laid_out, devices, layout), x)
  np.testing.assert_array_equal(laid_out[0], positions(seq, devices, layout))
  shards = np.asarray(positions(seq, devices, layout)).reshape(devices, -1)
  assert sorted(shards.reshape(-1)) == list(range(seq))  # nothing lost or duplicated
  if layout == "striped":
    assert all((shards[d] % devices == d).all() for d in range(devices))
  if layout == "zigzag":  # chunk d and chunk 2n - 1 - d
    chunk = seq // (2 * devices)
    assert all(set(shards[d] // chunk) == {d, 2 * devices - 1 - d} for d in range(devices))


def test_ring_never_gathers_kv_and_issues_the_transfer_before_the_step():
  """The compiled fwd+bwd has collective-permutes and no all-gather; in the compiled forward loop
  body the next block's collective-permute is scheduled before the step's attention."""
  mesh = mesh_of(4)
  q = jnp.ones((1, 64, 2, 16))
  attend = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, causal=True)
  grads = jax.jit(jax.grad(lambda *args: attend(*args).sum(), argnums=(0, 1, 2)))
  hlo = grads.lower(q, q, q).compile().as_text()
  assert "collective-permute" in hlo and "all-gather" not in hlo
  forward = jax.jit(attend).lower(q, q, q).compile().as_text()
  bodies = [body for body in re.split(r"\n(?=\S)", forward)
            if "collective-permute" in body and "conditional(" in body]
  assert len(bodies) == 1, "expected one loop body with both the transfer and the step"
  assert bodies[0].index("collective-permute") < bodies[0].index("conditional(")


class TestValidation:

  def _call(self, seq=16, **kwargs):
    q = jnp.zeros((1, seq, 2, 8))
    kwargs.setdefault("mesh", mesh_of(4))
    return ring_attention(q, q, q, **kwargs)

  @pytest.mark.parametrize("kwargs, error, words", [
      (dict(seq=18), ValueError, "sequence length 18 must be divisible by 8"),
      (dict(seq=18, layout="striped"), ValueError, "divisible by 4"),
      (dict(axis="sequence"), ValueError, "axis must name an axis of the mesh"),
      (dict(layout="zig-zag"), ValueError, "layout must be one of"),
      (dict(strategy="ulysses"), ValueError, "strategy must be one of"),
      (dict(mesh="seq"), TypeError, "mesh must be a jax.sharding.Mesh"),
      (dict(window=(4, 0)), ValueError, "window needs layout 'contiguous' or 'striped'"),
      (dict(window=(-1, 0), layout="striped"), ValueError, "window must hold non-negative"),
      (dict(causal=1), TypeError, "causal must be a bool"),
  ])
  def test_bad_arguments(self, kwargs, error, words):
    with pytest.raises(error, match=words):
      self._call(**kwargs)

  def test_kv_length_must_match(self):
    q = jnp.zeros((1, 16, 2, 8))
    with pytest.raises(ValueError, match="k must have q's sequence length 16"):
      ring_attention(q, q[:, :8], q[:, :8], mesh=mesh_of(4))

  def test_segment_ids_must_come_together(self):
    ids = jnp.zeros((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="given together"):
      self._call(q_segment_ids=ids)


@pytest.mark.parametrize("layout, window, causal, steps", [
    ("contiguous", (5, None), True, 2),  # 8 tokens per device: one block back
    ("contiguous", (8, None), True, 2),
    ("contiguous", (9, None), True, 3),
    ("contiguous", (None, 3), False, 8),  # unbounded left: every block
    ("contiguous", (3, 3), False, 8),  # device 0 needs device 7's block (t = -1 -> n - 1)
    ("striped", (3, None), True, 4),  # 8 devices: the 3 previous tokens live on 3 devices
    ("striped", (20, None), True, 8),
])
def test_a_window_ends_the_ring_early(layout, window, causal, steps):
  options = blocks.StepOptions(layout, 8, causal, window, None, 1.0, None)
  assert blocks.window_steps(options, 8) == steps
