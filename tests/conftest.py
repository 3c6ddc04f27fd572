"""pytest setup: 8 simulated CPU devices, device markers, a strict-dtype-promotion fixture.

XLA_FLAGS must be set before jax is imported, so this module does it first; likewise
``JAX_SKIP_CUDA_CONSTRAINTS_CHECK`` and ``ALLOW_MULTIPLE_LIBTPU_LOAD`` (:mod:`pallas_kernels.aot`) and
``NPROC``
(:data:`pallas_kernels.interpret.MOSAIC_GPU_INTERPRETER_THREADS`: the Mosaic GPU interpreter needs
more XLA CPU runtime threads than a 2-core machine gets by default, see
:func:`pallas_kernels.interpret.mosaic_gpu_interpret`). Tests marked ``gpu``
or ``tpu`` are skipped unless that accelerator is the default backend; ``slow`` tests are
deselected by the default ``-m 'not slow'`` in pyproject.toml (run them with ``pytest -m slow``).
"""

import os

SIMULATED_DEVICES = 8
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""),
     f"--xla_force_host_platform_device_count={SIMULATED_DEVICES}"]).strip()
os.environ.setdefault("NPROC", "16")  # = pallas_kernels.interpret.MOSAIC_GPU_INTERPRETER_THREADS
# Without a GPU, jax's CUDA plugin registers (for compile-only GPU devices, pallas_kernels.aot)
# only when its check of CUDA's runtime libraries is skipped.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
# pytest-xdist workers each load libtpu (compile-only TPU devices); by default the second
# process to load it fails on libtpu's lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

from effjax.dispatch import current_platform  # noqa: E402



@pytest.fixture
def strict_promotion():
  """Strict dtype promotion for op tests (an implicit f32 upcast of bf16 inputs is an error).

  Not global: optax and flax internals rely on standard promotion.
  """
  with jax.numpy_dtype_promotion("strict"):
    yield


def pytest_collection_modifyitems(config, items):
  platform = current_platform()
  for item in items:
    for marker in ("gpu", "tpu"):
      if marker in item.keywords and platform != marker:
        item.add_marker(pytest.mark.skip(reason=f"needs a {marker.upper()} (backend is {platform})"))
