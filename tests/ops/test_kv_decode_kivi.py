"""``kivi_decode_attention`` over KIVI's packed cache through the shared decode test base: the
kernels of ``pallas_kernels.kv_decode.kivi`` against the XLA path and the float32 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from cache_test_utils import cache_queries, filled_cache
from kv_decode_test_base import KVDecodeTestBase, Problem, case

from effjax.kv_cache import KIVI
from effjax.ops.kv_decode import kivi_decode_attention
from pallas_kernels.kv_decode.kivi import pallas_gpu, pallas_tpu

KV_HEADS, GROUP_SIZE, RESIDUAL = 2, 16, 32


class TestKIVI(KVDecodeTestBase):
  op = staticmethod(kivi_decode_attention)
  op_name = kernel_name = "kivi_decode"
  # Quantized prefixes (length - R - 1): 120 (3 splits), 0 (residual only: every split sees
  # nothing), 160 with a key flush inside the append (5 splits), 369 (the default splits).
  gpu_cases = [
      case(200, 150, 3, group=3, num_splits=3, bits=2, value_bits=2),
      case(200, 20, 2, num_splits=2, block_slots=GROUP_SIZE, dtype="bfloat16", bits=4,
           value_bits=4),
      case(200, 187, 6, seq=2, num_splits=5, dtype="float16", bits=4, value_bits=2),
      case(500, 400, 2, group=3, bits=2, value_bits=4),
  ]
  # 4 blocks of 128 slots over 3 splits (steps past a split's share); residual only.
  tpu_cases = [
      case(512, 420, 3, group=3, num_splits=3, block_slots=128, bits=2, value_bits=2),
      case(512, 30, 1, seq=2, block_slots=128, dtype="bfloat16", bits=4, value_bits=2),
  ]
  splits_case = gpu_cases[0]
  gpu_lowerings = tpu_lowerings = [(2, 64), (4, 128)]  # (bits, head_dim)
  compiled_cases = [case(4096, 3000, 5, group=3, head_dim=64, group_size=32, bits=bits,
                         value_bits=bits) for bits in (2, 4)]

  def problem(self, case):
    cache = filled_cache(
        KIVI(bits=case.get("bits"), value_bits=case.get("value_bits"),
             group_size=case.get("group_size", GROUP_SIZE), residual=RESIDUAL),
        kv_heads=KV_HEADS, head_dim=case.head_dim, max_len=case.max_len, prompt=case.prompt,
        appended=case.appended, dtype=jnp.dtype(case.dtype))
    return Problem(cache, cache_queries(cache, case.seq, case.group))

  def unserved(self):
    full = self.problem(case(200, 60, 0, bits=16, value_bits=16))  # unquantized: XLA only
    return [(full, ("pallas_gpu", "pallas_tpu"), "quantized")]

  def wrong_layout(self):
    cache, q, _ = self.problem(case(200, 60, 0, bits=2, value_bits=2))
    return (lambda: pallas_gpu.decode_partials(
        q, cache.v_codes[..., :1], cache.k_scale, cache.k_zero, cache.v_codes, cache.v_scale,
        cache.v_zero, cache.start, jnp.int32(0), key_bits=2, value_bits=2,
        group_size=GROUP_SIZE, scale=1.0, interpret=True)), "k_codes"

  def abstract_call(self, lowering, platform):
    bits, head_dim = lowering
    batch, slots, kv_heads, sd = 2, 4096, 3, jax.ShapeDtypeStruct
    words, groups = head_dim // (32 // bits), head_dim // 32
    kernel = {"gpu": pallas_gpu, "tpu": pallas_tpu}[platform]
    return (lambda *a: kernel.decode_partials(*a, key_bits=bits, value_bits=bits, group_size=32,
                                              scale=0.125),
            (sd((batch, 1, 9, head_dim), jnp.bfloat16),
             sd((batch, slots, kv_heads, words), jnp.uint32),
             sd((batch, slots // 32, kv_heads, head_dim), jnp.float16),
             sd((batch, slots // 32, kv_heads, head_dim), jnp.float16),
             sd((batch, slots, kv_heads, words), jnp.uint32),
             sd((batch, slots, kv_heads, groups), jnp.float16),
             sd((batch, slots, kv_heads, groups), jnp.float16), sd((batch,), jnp.int32),
             sd((), jnp.int32)))
