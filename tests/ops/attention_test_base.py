"""Shared test base of ``flash_attention``: every implementation runs these tests.

Subclass :class:`AttentionTestBase`, set ``implementation`` (or override :meth:`attention`), and
name the subclass ``Test...``. Argument validation happens before dispatch, the same for every
implementation, so its tests run once (``test_attention.TestValidation``). Every numerical test
compares with the float32 reference through ``effjax.testing.check_against_reference`` (output, LSE,
dq, dk, dv); bfloat16 cases also pass FlashAttention's rule: the error against the float32 reference
is at most twice the error of a naive bfloat16 computation, plus a rounding floor.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import testing
from effjax.ops.attention import flash_attention

# Options that select code rather than carry data; the oracles below are jitted on them.
STATIC_OPTIONS = ("causal", "window", "softcap", "scale", "return_lse")
REFERENCE = jax.jit(functools.partial(flash_attention, implementation="reference"),
                    static_argnames=STATIC_OPTIONS)


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention problem: shapes, dtype and options (segment ids generated from ``segments``)."""
  q_len: int
  kv_len: int
  head_dim: int = 32
  group: int = 1  # heads // kv_heads
  kv_heads: int = 2
  batch: int = 2
  causal: bool = False
  window: tuple[int | None, int | None] | None = None
  segments: int = 0  # number of packed segments per row; 0: no segment ids
  softcap: float | None = None
  scale: float | None = None
  v_head_dim: int | None = None  # None: head_dim
  dtype: str = "float32"

  def __str__(self) -> str:
    fields = (f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
              if getattr(self, f.name) != f.default or f.name in ("q_len", "kv_len"))
    return ",".join(fields)

  def inputs(self, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, Any]]:
    """``(q, k, v, options)``: standard-normal q/k/v and the keyword options of the case."""
    keys = jax.random.split(jax.random.key(seed), 3)
    heads = self.kv_heads * self.group
    kv_shape = (self.batch, self.kv_len, self.kv_heads)
    q = jax.random.normal(keys[0], (self.batch, self.q_len, heads, self.head_dim), self.dtype)
    k = jax.random.normal(keys[1], (*kv_shape, self.head_dim), self.dtype)
    v = jax.random.normal(keys[2], (*kv_shape, self.v_head_dim or self.head_dim), self.dtype)
    options = dict(causal=self.causal, window=self.window, softcap=self.softcap, scale=self.scale)
    if self.segments:
      options.update(q_segment_ids=packed_segment_ids(self.batch, self.q_len, self.segments),
                     kv_segment_ids=packed_segment_ids(self.batch, self.kv_len, self.segments))
    return q, k, v, options


def packed_segment_ids(batch: int, length: int, segments: int) -> jax.Array:
  """Contiguous segments of near-equal length; row ``r`` is shifted by ``r`` positions."""
  positions = (np.arange(length)[None, :] + np.arange(batch)[:, None]) % length
  return jnp.asarray(positions * segments // length, jnp.int32)


def _cases(lengths, options, *, head_dims, groups, dtype, seed):
  """Every (length pair, options) combination, each with a head_dim and GQA group drawn at random
  (fixed seed), so head_dim x group x options are mixed without a full product."""
  rng = np.random.default_rng(seed)
  return [Case(q_len, kv_len, head_dim=int(rng.choice(head_dims)), group=int(rng.choice(groups)),
               dtype=dtype, **option)
          for (q_len, kv_len), option in itertools.product(lengths, options)]


_OPTIONS = [
    {}, {"causal": True}, {"window": (7, 3)}, {"causal": True, "window": (20, None)},
    {"segments": 3}, {"softcap": 5.0}, {"causal": True, "segments": 2, "softcap": 3.0},
    {"window": (None, 5), "segments": 2},
]
# Default run: each length, head dim, GQA ratio and option at least once, with q_len != kv_len.
DEFAULT_CASES = [
    Case(1, 1), Case(17, 17, causal=True, group=4), Case(1, 257, causal=True, head_dim=64),
    Case(257, 1, causal=True, head_dim=80, scale=0.3),
    Case(17, 128, window=(7, 3), group=2, v_head_dim=48),
    Case(128, 17, window=(7, 3), group=8, kv_heads=1),
    Case(257, 257, causal=True, window=(20, None), head_dim=128, group=2),
    Case(128, 257, segments=3, head_dim=64, group=4),
    Case(257, 128, causal=True, segments=2, softcap=3.0, head_dim=80),
    Case(1000, 1000, causal=True, group=2),
    Case(257, 1000, softcap=5.0, window=(None, 5), segments=2, head_dim=64),
    Case(1000, 257, causal=True, kv_heads=1, group=8),
]
DEFAULT_BF16_CASES = [
    Case(17, 17, dtype="bfloat16"),
    Case(257, 257, causal=True, group=2, head_dim=64, dtype="bfloat16"),
    Case(128, 257, segments=3, softcap=5.0, window=(30, 30), v_head_dim=16, dtype="bfloat16"),
]
_LENGTHS = list(itertools.product((1, 17, 128, 257, 1000), repeat=2))
SLOW_CASES = _cases(_LENGTHS, _OPTIONS, head_dims=(32, 64, 80, 128), groups=(1, 2, 4, 8),
                    dtype="float32", seed=0)
SLOW_BF16_CASES = _cases(_LENGTHS, _OPTIONS[::2], head_dims=(32, 64, 80, 128),
                         groups=(1, 2, 4, 8), dtype="bfloat16", seed=1)


def numpy_mask(q_len: int, kv_len: int, options: dict[str, Any]) -> np.ndarray:
  """``[batch or 1, q_len, kv_len]`` mask written from the documented semantics, not masks.py.

  NumPy without segment ids; with them, whatever array type the ids are (tracers included).
  """
  diagonal = np.arange(q_len)[:, None] + (kv_len - q_len)
  key = np.arange(kv_len)[None, :]
  mask = np.ones((q_len, kv_len), bool)
  if options.get("causal"):
    mask &= key <= diagonal
  left, right = options.get("window") or (None, None)
  if left is not None:
    mask &= key >= diagonal - left
  if right is not None:
    mask &= key <= diagonal + right
  mask = mask[None]
  if options.get("q_segment_ids") is not None:
    q_ids, kv_ids = options["q_segment_ids"], options["kv_segment_ids"]
    mask = mask & (q_ids[:, :, None] == kv_ids[:, None, :])
  return mask


@functools.partial(jax.jit, static_argnames=STATIC_OPTIONS)
def naive_attention(q, k, v, *, causal=False, window=None, softcap=None, scale=None,
                    q_segment_ids=None, kv_segment_ids=None, return_lse=False):
  """Textbook attention computed in the inputs' dtype (K/V repeated for GQA).

  It is the bf16 baseline of FlashAttention's error rule, and an oracle for the reference.
  """
  mask = numpy_mask(q.shape[1], k.shape[1], dict(
      causal=causal, window=window, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids))
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(scale, q.dtype)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  logits = jnp.where(mask[:, None], logits, jnp.finfo(q.dtype).min)
  lse = jax.nn.logsumexp(logits, axis=-1)
  seen = mask.any(-1)[:, None]
  p = jnp.where(seen[..., None], jnp.exp(logits - lse[..., None]), 0)
  out = jnp.einsum("bhqk,bkhd->bqhd", p, v)
  lse = jnp.where(seen, lse.astype(jnp.float32), -jnp.inf)
  return (out, lse) if return_lse else out


def _cotangent(fn, q, k, v, options, seed: int):
  """A random standard-normal cotangent for ``fn(q, k, v, return_lse=True, **options)``."""
  return testing.random_cotangent(jax.random.key(seed), jax.eval_shape(
      lambda: fn(q, k, v, return_lse=True, **options)))


def _vjp_values(fn, q, k, v, options, cotangent):
  """``[out, lse, dq, dk, dv]`` of ``fn`` as float32 numpy arrays."""
  (out, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, return_lse=True, **options), q, k, v)
  cotangent = jax.tree.map(lambda c, x: c.astype(x.dtype), cotangent, (out, lse))
  return [np.asarray(x, np.float32) for x in (out, lse, *vjp(cotangent))]


def assert_flash_attention_error_rule(fn, q, k, v, options, *, factor: float = 2.0):
  """FlashAttention's bf16/f16 rule for output, LSE, dq, dk, dv.

  ``max|fn - ref32| <= factor * max|naive_lowp - ref32| + floor``, where ``floor`` is the
  rounding step of the dtype at the reference's magnitude (FlashAttention's ``atol``).
  """
  eps = float(jnp.finfo(q.dtype).eps)
  cotangent = _cotangent(fn, q, k, v, options, seed=1)
  upcast = [x.astype(jnp.float32) for x in (q, k, v)]
  expected = _vjp_values(REFERENCE, *upcast, options, cotangent)
  actual = _vjp_values(fn, q, k, v, options, cotangent)
  baseline = _vjp_values(naive_attention, q, k, v, options, cotangent)
  for name, got, want, naive in zip(("out", "lse", "dq", "dk", "dv"), actual, expected, baseline):
    finite = np.isfinite(want)
    error = np.abs(got[finite] - want[finite]).max(initial=0.0)
    naive_error = np.abs(naive[finite] - want[finite]).max(initial=0.0)
    floor = eps * np.abs(want[finite]).max(initial=1.0)
    assert error <= factor * naive_error + floor, (
        f"{name}: error {error:.3g} > {factor} x naive {q.dtype} error {naive_error:.3g} "
        f"+ floor {floor:.3g}")


class _CompileCounter(logging.Handler):
  """Counts jax's "Finished XLA compilation" log records."""

  def __init__(self):
    super().__init__()
    self.count = 0

  def emit(self, record: logging.LogRecord) -> None:
    self.count += "Finished XLA compilation" in record.getMessage()


@pytest.mark.usefixtures("strict_promotion")
class AttentionTestBase:
  """Tests every implementation of ``flash_attention`` must pass."""

  implementation: str = ""

  def attention(self, q, k, v, **options):
    """The implementation under test, with ``flash_attention``'s signature."""
    return flash_attention(q, k, v, implementation=self.implementation, **options)

  def check(self, case: Case) -> None:
    q, k, v, options = case.inputs()
    fn = functools.partial(self.attention, return_lse=True, **options)
    out, lse = jax.eval_shape(fn, q, k, v)
    assert (out.shape, out.dtype) == ((*q.shape[:3], v.shape[3]), q.dtype)
    assert (lse.shape, lse.dtype) == ((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)
    reference = functools.partial(REFERENCE, return_lse=True, **options)
    testing.check_against_reference(fn, reference, q, k, v, argnums=(0, 1, 2))
    if q.dtype != jnp.float32:
      assert_flash_attention_error_rule(self.attention, q, k, v, options)

  @pytest.mark.parametrize("case", DEFAULT_CASES + DEFAULT_BF16_CASES, ids=str)
  def test_matches_reference(self, case):
    self.check(case)

  @pytest.mark.slow
  @pytest.mark.parametrize("case", SLOW_CASES + SLOW_BF16_CASES, ids=str)
  def test_matches_reference_grid(self, case):
    self.check(case)

  def test_float16(self):
    self.check(Case(128, 257, causal=True, group=2, head_dim=64, dtype="float16"))

  @pytest.mark.parametrize("options", [
      dict(window=(3, 0), causal=True),  # keys left of every window
      dict(segments=True),  # a trailing padding segment no query belongs to
  ], ids=["window", "segments"])
  def test_garbage_in_masked_positions_does_not_leak(self, options):
    options = dict(options)
    q, k, v, _ = Case(40, 57, group=2).inputs()
    if options.pop("segments", False):
      options.update(q_segment_ids=jnp.zeros((2, 40), jnp.int32).at[:, 30:].set(2),
                     kv_segment_ids=jnp.zeros((2, 57), jnp.int32).at[:, 45:].set(1))
    mask = numpy_mask(40, 57, options)
    unseen_keys = jnp.asarray(~mask.any(1))[:, :, None, None]
    unseen_queries = jnp.asarray(~mask.any(2))[:, :, None, None]
    assert unseen_keys.any()
    cotangent = _cotangent(self.attention, q, k, v, options, seed=3)

    def run(fill):
      planted = (jnp.where(unseen_queries, fill, q), jnp.where(unseen_keys, fill, k),
                 jnp.where(unseen_keys, fill, v))
      return _vjp_values(self.attention, *planted, options, cotangent)

    with_nan, with_zero = run(jnp.nan), run(0.0)
    for got, want in zip(with_nan, with_zero):
      np.testing.assert_array_equal(got, want)
    assert np.isfinite(with_nan[0]).all() and all(np.isfinite(g).all() for g in with_nan[2:])

  @pytest.mark.parametrize("options", [
      dict(causal=True),  # q_len > kv_len: the first queries see nothing
      dict(q_segment_ids=np.array([[0] * 20 + [5] * 30], np.int32),
           kv_segment_ids=np.zeros((1, 20), np.int32)),  # queries 20.. have no segment in kv
  ], ids=["causal", "segments"])
  def test_fully_masked_rows(self, options):
    q, k, v, _ = Case(50, 20, batch=1, group=2).inputs()
    (out, lse), vjp = jax.vjp(
        lambda q, k, v: self.attention(q, k, v, return_lse=True, **options), q, k, v)
    dq, dk, dv = vjp((jnp.ones_like(out), jnp.ones_like(lse)))
    empty = slice(20, None) if "q_segment_ids" in options else slice(0, 30)
    np.testing.assert_array_equal(out[:, empty], 0.0)
    np.testing.assert_array_equal(lse[:, :, empty], -np.inf)
    np.testing.assert_array_equal(dq[:, empty], 0.0)
    for x in (out, dq, dk, dv):
      assert np.isfinite(x).all()
    testing.check_against_reference(
        functools.partial(self.attention, return_lse=True, **options),
        functools.partial(REFERENCE, return_lse=True, **options), q, k, v, argnums=(0, 1, 2))

  def test_jit_and_vmap(self):
    q, k, v, options = Case(40, 70, causal=True, segments=3, group=2).inputs()
    options["window"] = (25, None)
    stacked = [jnp.stack([x, x[::-1]]) for x in (q, k, v)]
    ids = {name: jnp.stack([options[name], options[name][::-1]])
           for name in ("q_segment_ids", "kv_segment_ids")}
    others = {name: value for name, value in options.items() if name not in ids}

    def loss(q, k, v, q_segment_ids, kv_segment_ids):
      out = self.attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                           **others)
      return jnp.sum(out * out)

    batched = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2))))(*stacked, **ids)
    for index in range(2):
      one = jax.value_and_grad(loss, argnums=(0, 1, 2))(
          *(x[index] for x in stacked), *(ids[name][index] for name in ids))
      testing.assert_close(jax.tree.map(lambda x: x[index], batched), one)

  def test_bitwise_deterministic(self):
    q, k, v, options = Case(257, 300, causal=True, segments=2, group=2).inputs()
    cotangent = _cotangent(self.attention, q, k, v, options, seed=2)
    first = _vjp_values(self.attention, q, k, v, options, cotangent)
    second = _vjp_values(self.attention, q, k, v, options, cotangent)
    for a, b in zip(first, second):
      np.testing.assert_array_equal(a, b)

  def test_no_recompilation_on_second_call(self):
    q, k, v, options = Case(40, 41, causal=True, group=2).inputs()
    cotangent = _cotangent(self.attention, q, k, v, options, seed=2)
    counter = _CompileCounter()
    logger = logging.getLogger("jax")
    logger.addHandler(counter)
    try:
      with jax.log_compiles(True):
        _vjp_values(self.attention, q, k, v, options, cotangent)
        first = counter.count
        _vjp_values(self.attention, q, k, v, options, cotangent)
    finally:
      logger.removeHandler(counter)
    assert first > 0
    assert counter.count == first, f"{counter.count - first} compilations on the second call"
