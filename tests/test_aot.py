"""The compile-only devices and the compile-target switch (:mod:`pallas_kernels.aot`)."""

from __future__ import annotations

import pytest

from pallas_kernels import aot
from pallas_kernels.interpret import (compile_target, gpu_compute_capability, gpu_interpret,
                                      require_tpu_or_interpret)


def test_compile_target_builds_the_real_kernels_only_inside():
  """On a CPU host a kernel wrapper falls through (NotImplementedError) unless the target is
  its platform, where it gets ``interpret=False``."""
  with pytest.raises(NotImplementedError, match="needs a TPU"):
    require_tpu_or_interpret()
  with compile_target("tpu"):
    assert require_tpu_or_interpret() is False
    with pytest.raises(NotImplementedError, match="needs a GPU"):
      gpu_interpret(None)
  with compile_target("gpu"):
    assert gpu_interpret(None) is False


def test_gpu_compute_capability_follows_the_compile_target():
  """Wrappers whose defaults depend on the GPU read the device compiled for (none on this
  CPU host, unless a compile target names one)."""
  if not aot.cuda_plugin_available():
    pytest.skip("jax's CUDA plugin is not installed (pip install -e '.[aot]')")
  assert gpu_compute_capability() is None
  with compile_target("gpu"):
    assert gpu_compute_capability() is None
  for name, capability in (("a100", (8, 0)), ("l4", (8, 9)), ("h100", (9, 0))):
    with compile_target("gpu", aot.gpu_device(name)):
      assert gpu_compute_capability() == capability


def test_bad_targets_name_the_argument():
  with pytest.raises(ValueError, match="platform must be 'tpu' or 'gpu', got 'cuda'"):
    with compile_target("cuda"):
      pass
  with pytest.raises(ValueError, match="generation must be one of .*got 'v9'"):
    aot.tpu_device("v9")
  with pytest.raises(ValueError, match="name must be one of .*got 'b200'"):
    aot.gpu_device("b200")


def test_gpu_specs_make_target_configs():
  """Each spec's target description names its card and compute capability."""
  text = aot.GPU_SPECS["h200"].target_config()
  assert 'device_description_str: "NVIDIA H200"' in text
  assert "cuda_compute_capability { major: 9 minor: 0 }" in text
  assert "shared_memory_per_block_optin: 232448" in text
