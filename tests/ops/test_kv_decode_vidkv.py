"""``vidkv_decode_attention`` over VidKV's packed 1.x-bit cache through the shared decode test
base: the kernels of ``pallas_kernels.kv_decode.vidkv`` against the XLA path and the float32
reference, every key split (``hot`` = half, a quarter, all or none of the channels: 1-bit FFTs of
16, 24, 0 or 32 points) and the Triton kernel's 32-lane chunks (2 and 4 of them, 2-bit channels
ending inside a chunk)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from cache_test_utils import cache_queries, filled_cache
from kv_decode_test_base import KVDecodeTestBase, Problem, case

from effjax.kv_cache import VidKV
from effjax.ops.kv_decode import vidkv_decode_attention
from pallas_kernels.kv_decode.vidkv import pallas_gpu, pallas_tpu

KV_HEADS, GROUP_SIZE, RESIDUAL = 2, 16, 32


class TestVidKV(KVDecodeTestBase):
  op = staticmethod(vidkv_decode_attention)
  op_name = kernel_name = "vidkv_decode"
  # (quantized, length): (128, 153) 8 groups over 3 splits, residual 25 of 32; (64, 65) a flush
  # inside the append, queries at 62..64 (two inside the quantized range: causal in the kernel);
  # (64, 64) empty residual, both queries inside the prefix; (64, 71) all channels 1-bit;
  # (0, 22) residual only, every split sees nothing; head_dim 64 and 128 (hot 48 and 26).
  gpu_cases = [
      case(200, 150, 3, group=3, num_splits=3, key_bits=1.5),
      case(200, 62, 3, seq=3, num_splits=2, dtype="float16", key_bits=1.25),
      case(200, 64, 0, seq=2, dtype="bfloat16", key_bits=2),
      case(200, 70, 1, group=3, num_splits=2, block_slots=GROUP_SIZE, key_bits=1),
      case(200, 20, 2, seq=2, num_splits=2, key_bits=1.5),
      case(120, 90, 2, seq=2, group=3, num_splits=2, head_dim=64, key_bits=1.75),
      case(120, 90, 2, seq=2, group=3, num_splits=2, head_dim=128, dtype="bfloat16",
           key_bits=1.2),
  ]
  # The first, second and fourth of those in 2 blocks of 128 slots.
  tpu_cases = [
      case(256, 150, 3, group=3, num_splits=3, block_slots=128, key_bits=1.5),
      case(256, 62, 3, seq=3, num_splits=2, block_slots=128, dtype="float16", key_bits=1.25),
      case(256, 70, 1, group=3, num_splits=2, block_slots=128, dtype="bfloat16", key_bits=1),
  ]
  splits_case = case(200, 150, 3, seq=2, group=3, key_bits=1.5)
  gpu_lowerings = tpu_lowerings = [(1.5, 64), (1.25, 64), (1.5, 128), (1, 64), (2, 64)]
  compiled_cases = [case(4096, 3000, 5, group=3, head_dim=64, group_size=32, residual=128,
                         key_bits=key_bits) for key_bits in (1.5, 2)]

  def problem(self, case):
    cache = filled_cache(
        VidKV(key_bits=case.get("key_bits"), group_size=case.get("group_size", GROUP_SIZE),
              residual=case.get("residual", RESIDUAL)),
        kv_heads=KV_HEADS, head_dim=case.head_dim, max_len=case.max_len, prompt=case.prompt,
        appended=case.appended, dtype=jnp.dtype(case.dtype))
    return Problem(cache, cache_queries(cache, case.seq, case.group))

  def unserved(self):
    cache, _, _ = problem = self.problem(case(200, 60, 0, key_bits=1.5))
    odd = self.problem(case(200, 60, 0, head_dim=24, key_bits=1.5))  # no Triton tile
    too_many = problem._replace(q=cache_queries(cache, RESIDUAL + 2, 1))  # a prefill: XLA
    return [(too_many, ("pallas_gpu", "pallas_tpu"), "R \\+ 1"),
            (odd, "pallas_gpu", "power of two")]

  def wrong_layout(self):
    cache, q, _ = self.problem(case(200, 60, 0, key_bits=1.5))
    return (lambda: pallas_gpu.decode_partials(
        q, cache.k_codes, cache.k_scale, cache.k_zero, cache.k_codes, cache.v_codes,
        cache.v_scale, cache.key_transform(), cache.start, cache.quantized, cache.length - 1,
        hot=cache.hot_channels, group_size=GROUP_SIZE, scale=1.0, interpret=True)), "k_hot"

  def abstract_call(self, lowering, platform):
    key_bits, head_dim = lowering
    batch, slots, kv_heads, sd = 2, 4096, 3, jax.ShapeDtypeStruct
    hot = round((key_bits - 1) * head_dim)
    groups = (batch, slots // 32, kv_heads)
    kernel = {"gpu": pallas_gpu, "tpu": pallas_tpu}[platform]
    return (lambda *a: kernel.decode_partials(*a, hot=hot, group_size=32, scale=0.125),
            (sd((batch, 1, 9, head_dim), jnp.bfloat16),
             sd((batch, slots, kv_heads, -(-hot // 16) + -(-(head_dim - hot) // 32)), jnp.uint32),
             sd((*groups, head_dim), jnp.float16), sd((*groups, hot), jnp.float16),
             sd((*groups, head_dim // 32), jnp.uint32),
             sd((batch, slots, -(-kv_heads * head_dim // 20)), jnp.uint32),
             sd((*groups, head_dim), jnp.float16), sd((head_dim, head_dim), jnp.float32),
             sd((batch,), jnp.int32), sd((), jnp.int32), sd((), jnp.int32)))
