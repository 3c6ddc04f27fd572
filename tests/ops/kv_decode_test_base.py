"""Shared test base of the quantized-cache decode ops (``effjax.ops.kv_decode``): every cache
format runs these tests.

Subclass :class:`KVDecodeTestBase` per format, name it ``Test...``, set ``op`` and the case lists
and implement :meth:`~KVDecodeTestBase.problem`, :meth:`~KVDecodeTestBase.unserved`,
:meth:`~KVDecodeTestBase.wrong_layout` and :meth:`~KVDecodeTestBase.abstract_call`.

On CPU the GPU (Triton) kernels run in Pallas' interpreter and the TPU (Mosaic) kernels in the TPU
interpreter, on small caches after a left-padded prefill and an append (the filled prefix not a
multiple of the key group, the block or the split count, residual windows partly filled, empty,
or flushed inside the append), GQA groups 1 and 3, one or several queries, float32, bfloat16 and
float16 caches and queries. Each kernel is checked against the ``"xla"`` path (the tolerance of
the cache's dtype, ``effjax.testing``) and both against the float32 ``"reference"``; the kernels
are also compiled for their hardware on this CPU (``aot_compile``: Triton and ptxas for an H100,
Mosaic for a TPU v5e; other chips with ``-m slow``). ``-m gpu`` runs the compiled Triton kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aot_compile import (
    ALL_GENERATIONS,
    EVERY_TRITON_GPU,
    compile_for_gpu,
    compile_for_tpu,
    kernel_calls,
)

from effjax import dispatch, testing
from effjax.ops.kv_decode import DecodeBlockSizes
from pallas_kernels.interpret import interpret_mode

KERNELS = ("pallas_gpu", "pallas_tpu")


@dataclasses.dataclass(frozen=True)
class Case:
  """One decode problem: a cache of ``max_len`` slots after a left-padded prefill of ``prompt``
  tokens and an append of ``appended`` more, ``seq`` queries per row, ``group`` query heads per kv
  head, the kernels' tiling, the dtype of the cache's full-precision part and of the queries, and
  the format's own settings (``settings``, read with :meth:`get`)."""
  max_len: int
  prompt: int
  appended: int
  seq: int = 1
  group: int = 1
  num_splits: int | None = None
  block_slots: int | None = None
  head_dim: int = 32
  dtype: str = "float32"
  settings: tuple[tuple[str, Any], ...] = ()

  def __str__(self) -> str:
    fields = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
              if f.name != "settings" and (getattr(self, f.name) != f.default
                                           or f.name in ("max_len", "prompt", "appended"))]
    return ",".join(fields + [f"{name}={value}" for name, value in self.settings])

  def get(self, name: str, default: Any = None) -> Any:
    return dict(self.settings).get(name, default)

  @property
  def block_sizes(self) -> DecodeBlockSizes:
    return DecodeBlockSizes(block_slots=self.block_slots, num_splits=self.num_splits)


def case(max_len: int, prompt: int, appended: int, **fields: Any) -> Case:
  """A :class:`Case`; keywords that are not its fields become the format's ``settings``."""
  names = {f.name for f in dataclasses.fields(Case)}
  own = {name: value for name, value in fields.items() if name in names}
  settings = tuple((name, value) for name, value in fields.items() if name not in names)
  return Case(max_len, prompt, appended, settings=settings, **own)


def _id(value: Any) -> str:
  return "-".join(map(str, value)) if isinstance(value, tuple) else str(value)


class Problem(NamedTuple):
  """A filled cache, queries for it, and the op's other positional arguments."""
  cache: Any
  q: jax.Array
  extra: tuple[Any, ...] = ()


class KVDecodeTestBase:
  """Tests every decode op shares; see the module docstring.

  Attributes:
    op: the public op (a staticmethod), ``op(cache, q, *extra, scale=, implementation=,
      block_sizes=)``.
    op_name: its dispatch name.
    kernel_name: the ``pallas_call`` name of its kernels.
    gpu_cases, tpu_cases: :class:`Case` lists run by the interpreted GPU and TPU kernels.
    splits_case: a case whose GPU kernel runs with 1 and 7 splits.
    gpu_lowerings, tpu_lowerings: what :meth:`abstract_call` compiles for H100 and TPU v5e.
    compiled_cases: cases run by the compiled GPU kernel (``-m gpu``).
  """
  op: Callable[..., jax.Array]
  op_name: str
  kernel_name: str
  gpu_cases: list[Case] = []
  tpu_cases: list[Case] = []
  splits_case: Case
  gpu_lowerings: list[Any] = []
  tpu_lowerings: list[Any] = []
  compiled_cases: list[Case] = []

  def pytest_generate_tests(self, metafunc):
    """Parametrizes ``gpu_case``, ``tpu_case``, ``gpu_lowering``, ``tpu_lowering`` and
    ``compiled_case`` with the subclass's lists."""
    for name in ("gpu_case", "tpu_case", "gpu_lowering", "tpu_lowering", "compiled_case"):
      if name in metafunc.fixturenames:
        metafunc.parametrize(name, getattr(self, name + "s"), ids=_id)

  # What each format provides.

  def problem(self, case: Case) -> Problem:
    """The filled cache and queries of ``case``."""
    raise NotImplementedError

  def unserved(self) -> list[tuple[Problem, tuple[str, ...], str]]:
    """Calls the kernels do not serve: ``(problem, implementations, reason matched)``."""
    raise NotImplementedError

  def wrong_layout(self) -> tuple[Callable[[], Any], str]:
    """A GPU kernel wrapper call (interpreted) on arrays of a wrong shape, and the name the
    ValueError must mention."""
    raise NotImplementedError

  def abstract_call(self, lowering: Any, platform: str) -> tuple[Callable[..., Any], tuple]:
    """``(fn, abstract arguments)``: the ``platform`` kernel wrapper at a real model's shapes."""
    raise NotImplementedError

  # Helpers.

  def attend(self, problem: Problem, implementation: Any,
             block_sizes: DecodeBlockSizes | None = None) -> jax.Array:
    """The op under ``jit`` (the interpreters trace once); the extra arguments are closed over
    (RoPE's theta is static)."""
    return jax.jit(lambda cache, q: self.op(
        cache, q, *problem.extra, implementation=implementation, block_sizes=block_sizes))(
            problem.cache, problem.q)

  def check_kernel(self, case: Case, implementation: str) -> None:
    """The interpreted kernel against the XLA path and both against the float32 reference."""
    problem = self.problem(case)
    expected = self.attend(problem, "xla")
    reference = self.attend(problem, "reference")
    with interpret_mode():
      out = self.attend(problem, implementation, case.block_sizes)
    assert out.dtype == problem.q.dtype == jnp.dtype(case.dtype)
    testing.assert_close(out, expected, dtype=case.dtype)
    testing.assert_close(expected, reference, dtype=case.dtype)
    testing.assert_close(out, reference, dtype=case.dtype)
    assert np.abs(np.asarray(reference, np.float32)).max() > 0.1  # not a trivial attention

  # The shared tests.

  def test_gpu_kernel_matches_xla_and_reference(self, gpu_case):
    self.check_kernel(gpu_case, "pallas_gpu")

  def test_tpu_kernel_matches_xla_and_reference(self, tpu_case):
    self.check_kernel(tpu_case, "pallas_tpu")

  def test_splits_do_not_change_the_result(self):
    """The log-sum-exp combination is exact: 1 split and 7 splits (some empty) agree."""
    problem = self.problem(self.splits_case)
    with interpret_mode():
      one, many = (self.attend(problem, "pallas_gpu", DecodeBlockSizes(num_splits=n))
                   for n in (1, 7))
    np.testing.assert_allclose(one, many, atol=1e-6, rtol=1e-6)

  def test_fallbacks(self):
    """Every platform's default is XLA (the kernels are opt-in until run on their hardware); off
    its hardware a kernel defers to the next implementation; calls the kernels do not serve name
    their reason."""
    for platform in ("cpu", "gpu", "tpu"):
      assert dispatch.default_order(self.op_name, platform) == ("xla",)
    problem = self.problem(self.gpu_cases[0])
    for implementation, device in zip(KERNELS, ("GPU", "TPU"), strict=True):
      with pytest.raises(dispatch.NoImplementationError, match=f"needs a {device}"):
        self.attend(problem, implementation)
    np.testing.assert_array_equal(self.attend(problem, (*KERNELS, "xla")),
                                  self.attend(problem, "xla"))
    for other, implementations, match in self.unserved():
      with interpret_mode(), pytest.raises(dispatch.NoImplementationError, match=match):
        self.attend(other, implementations)

  def test_bad_arguments_raise(self):
    problem = self.problem(self.gpu_cases[0])
    op = self.op
    with pytest.raises(TypeError, match="cache"):
      op(object(), problem.q, *problem.extra)
    with pytest.raises(ValueError, match="q has shape"):
      op(problem.cache, problem.q[..., :-1], *problem.extra)
    with pytest.raises(TypeError, match="scale"):
      op(problem.cache, problem.q, *problem.extra, scale="0.1")
    with pytest.raises(TypeError, match="block_sizes"):
      op(problem.cache, problem.q, *problem.extra, block_sizes=(32, 2))
    with pytest.raises(ValueError, match="num_splits"):
      DecodeBlockSizes(num_splits=0)
    for implementation in KERNELS:  # a block the kernel cannot take: named before it runs
      with interpret_mode(), pytest.raises(ValueError, match="block_slots is 24"):
        op(problem.cache, problem.q, *problem.extra, implementation=implementation,
           block_sizes=DecodeBlockSizes(block_slots=24))

  def test_kernel_rejects_a_wrong_layout(self):
    call, name = self.wrong_layout()
    with pytest.raises(ValueError, match=name):
      call()

  @EVERY_TRITON_GPU
  def test_gpu_kernel_compiles(self, gpu_name, gpu_lowering):
    """The kernel compiles for an H100 (and an A100 and an L4, slow) on this CPU machine (Triton
    and ptxas, :mod:`pallas_kernels.aot`): every primitive it uses has a Triton lowering and its
    tiles fit the card's shared memory."""
    fn, args = self.abstract_call(gpu_lowering, "gpu")
    compiled = compile_for_gpu(gpu_name, fn, *args)
    assert f'name = "{self.kernel_name}' in compiled.as_text()

  @ALL_GENERATIONS
  def test_tpu_kernel_compiles(self, generation, tpu_lowering):
    """The kernel compiles for a TPU (Mosaic's own compiler from libtpu, no TPU needed): block
    shapes fit the (8, 128) tiling, every op of the body and index maps, its vector layouts and
    dtypes on that generation, and the VMEM it takes."""
    fn, args = self.abstract_call(tpu_lowering, "tpu")
    compiled = compile_for_tpu(generation, fn, *args)
    assert kernel_calls(compiled) == 1

  @pytest.mark.gpu
  def test_gpu_kernel_compiled(self, compiled_case):
    """The compiled Triton kernel (default tiling) against XLA at a real model's geometry."""
    problem = self.problem(compiled_case)
    testing.assert_close(self.attend(problem, "pallas_gpu"), self.attend(problem, "xla"),
                         atol=1e-4, rtol=1e-4)
