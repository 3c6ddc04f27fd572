"""Decode-step cost of quantized KV caches against the full-precision cache, per layer.

One decoding step of one attention layer with SmolLM2-135M's geometry (9 query heads, 3 kv heads,
head_dim 64, batch 1, float32 K/V): ``cache.append`` of one token then ``cache.attend`` of its
query, on a cache already holding ``context - 1`` tokens (filled by ``prefill``, so KIVI's codes
are real). Reported per context: the cache's exact ``nbytes()``, the compiled step's temp
(scratch) bytes from ``memory_analysis()`` (the quantized path dequantizes one block at a time, so
its scratch must not grow like a float32 copy of the cache), and the median step time as a ratio
to the full cache measured in the same run. CPU times are ratios only.

XQuant rows (latent: SmolLM2's X is 576 wide, its K+V 384): the same step through
``append_inputs`` (one token's post-norm input, its latent projection) and ``attend_inputs``
(keys rematerialized block by block, value projection once per head), with random weights
``[576, 3, 64]`` for W_k and W_v; the cache holds ``context - 1`` tokens from ``prefill_inputs``.

On a GPU, ``kvcache_decode_gpu`` also times ``attend`` alone with the fused Pallas (Triton) decode
kernels (``implementation="pallas_gpu"``: KIVI-4, KIVI-2, VidKV K1.5 V1.58, XQuant-4 and XQuant-2)
against the XLA path at contexts 4k..32k, batch 8, bfloat16 queries and residual (XQuant: its
stream and window); on other backends that part is skipped.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp

from effjax import benchmarking
from effjax.kv_cache import KIVI, FullKVCache, LayerInputs, VidKV, XQuant
from effjax.nn import TransformerConfig
from effjax.ops.kv_decode import (
    kivi_decode_attention,
    vidkv_decode_attention,
    xquant_decode_attention,
)

HEADS, KV_HEADS, HEAD_DIM, D_MODEL = 9, 3, 64, 576
CACHES = {"fp": FullKVCache, "KIVI-4": KIVI(bits=4), "KIVI-2": KIVI(bits=2),
          "XQuant-4": XQuant(bits=4), "XQuant-2": XQuant(bits=2),
          "XQuant-4 (R=128)": XQuant(bits=4, residual=128)}
BASELINE = "fp"
# Caches with fused decode kernels (GPU timing only): settings and their decode attention.
KERNEL_CACHES = {"KIVI-4": (CACHES["KIVI-4"], kivi_decode_attention),
                 "KIVI-2": (CACHES["KIVI-2"], kivi_decode_attention),
                 "VidKV K1.5 V1.58": (VidKV(), vidkv_decode_attention)}
XQUANT_KERNEL_CACHES = ("XQuant-4", "XQuant-2")  # op "xquant_decode"
SMOLLM2 = TransformerConfig(vocab_size=1, d_model=D_MODEL, num_layers=1, num_heads=HEADS,
                            num_kv_heads=KV_HEADS, d_ff=1, head_dim=HEAD_DIM)


def _step(cache, k, v, q):
  cache = cache.append(k, v)
  return cache, cache.attend(q)


def _layer_inputs(x, kernels):
  return LayerInputs(x=x, residual=x, key_kernel=kernels[0], value_kernel=kernels[1],
                     norm_scale=jnp.ones((D_MODEL,)), norm_eps=1e-5, rope_theta=1e4)


def _xquant_cache(settings, context, batch=1, dtype=jnp.float32):
  """(XQuant cache holding ``context - 1`` random tokens, the random ``[W_k, W_v]``, the last
  token's X)."""
  x = benchmarking.random_inputs([jax.ShapeDtypeStruct((batch, context, D_MODEL), dtype)])[0]
  kernels = [w * D_MODEL**-0.5 for w in benchmarking.random_inputs(
      [jax.ShapeDtypeStruct((D_MODEL, KV_HEADS, HEAD_DIM), jnp.float32)] * 2, seed=1)]
  cache = settings.for_layer(0, SMOLLM2).init(batch, context, num_kv_heads=KV_HEADS,
                                              head_dim=HEAD_DIM, dtype=dtype)
  cache, _ = jax.jit(lambda c, x: c.prefill_inputs(_layer_inputs(x, kernels),
                                                   jnp.zeros((batch,), jnp.int32), None))(
                                                       cache.with_weights(*kernels), x[:, :-1])
  return cache, kernels, x[:, -1:]


def _xquant_case(settings, context, q):
  """(jitted step, its arguments) of an XQuant cache holding ``context - 1`` random tokens."""
  cache, kernels, x = _xquant_cache(settings, context)

  def step(cache, x, q):
    inputs = _layer_inputs(x, kernels)
    cache, _ = cache.append_inputs(inputs, None)
    return cache, cache.attend_inputs(q, inputs, None)

  return step, (cache, x, q)


def measure(contexts, repeats: int) -> list[dict]:
  rows = []
  for context in contexts:
    k, v = benchmarking.random_inputs([jax.ShapeDtypeStruct((1, context, KV_HEADS, HEAD_DIM),
                                                            jnp.float32)] * 2)
    q = benchmarking.random_inputs([jax.ShapeDtypeStruct((1, 1, HEADS, HEAD_DIM), jnp.float32)])[0]
    baseline = None
    for name, cache_type in CACHES.items():
      if isinstance(cache_type, XQuant):
        step, args = _xquant_case(cache_type, context, q)
      else:
        cache = cache_type.init(1, context, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
        cache = jax.jit(lambda c, k, v: c.prefill(k, v, jnp.zeros((1,), jnp.int32)))(
            cache, k[:, :-1], v[:, :-1])
        step, args = _step, (cache, k[:, -1:], v[:, -1:], q)
      cache = args[0]
      memory = benchmarking.compiled_memory(step, *args, donate_argnums=0)  # cache in place
      timing = benchmarking.time_call(jax.jit(step), *args, repeats=repeats)
      baseline = timing.median_s if name == BASELINE else baseline
      rows.append({"cache": name, "context": context, "cache_bytes": cache.nbytes(),
                   "temp_bytes": memory.temp_bytes, "median_ms": timing.median_s * 1e3,
                   "time_vs_fp": timing.median_s / baseline})
  return rows


def measure_kernel(contexts, repeats: int, batch: int = 8) -> list[dict]:
  """Median ``attend`` time of the Pallas GPU decode kernels vs the XLA path, per cache."""
  rows = []
  for context in contexts:
    k, v = benchmarking.random_inputs([jax.ShapeDtypeStruct(
        (batch, context, KV_HEADS, HEAD_DIM), jnp.bfloat16)] * 2)
    q = benchmarking.random_inputs([jax.ShapeDtypeStruct((batch, 1, HEADS, HEAD_DIM),
                                                         jnp.bfloat16)])[0]
    for name, (settings, attention) in KERNEL_CACHES.items():
      cache = settings.init(batch, context, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                            dtype=jnp.bfloat16)
      cache = jax.jit(lambda c, k, v: c.prefill(k, v, jnp.zeros((batch,), jnp.int32)))(cache, k, v)
      rows.append(_kernel_row(name, context, attention, (cache, q), repeats))
    for name in XQUANT_KERNEL_CACHES:  # keys rematerialized in-kernel from the latent stream
      cache, kernels, x = _xquant_cache(CACHES[name], context, batch, jnp.bfloat16)
      attention = functools.partial(xquant_decode_attention, inputs=_layer_inputs(x, kernels))
      rows.append(_kernel_row(name, context, attention, (cache, q), repeats))
  return rows


def _kernel_row(name, context, attention, args, repeats: int) -> dict:
  """Median time of ``attention(*args, implementation=...)`` by XLA and by the GPU kernel."""
  times = {impl: benchmarking.time_call(jax.jit(functools.partial(
      attention, implementation=impl)), *args, repeats=repeats).median_s
           for impl in ("xla", "pallas_gpu")}
  return {"cache": name, "context": context, "xla_ms": times["xla"] * 1e3,
          "pallas_gpu_ms": times["pallas_gpu"] * 1e3, "speedup": times["xla"] / times["pallas_gpu"]}


def run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]:
  written = []
  if jax.default_backend() == "gpu":
    rows = measure_kernel((4096,) if quick else (4096, 8192, 16384, 32768),
                          repeats=3 if quick else 20)
    written += benchmarking.write_results(
        "kvcache_decode_gpu", rows,
        title="KIVI, VidKV and XQuant decode attention on GPU: Pallas kernels vs XLA",
        columns=["cache", "context", "xla_ms", "pallas_gpu_ms", "speedup"], directory=out_dir,
        notes=("attend only (one layer, SmolLM2 geometry, batch 8, bf16, G=32, R=128; VidKV "
               "key_bits 1.5; XQuant: latent stream, G=64, R=0, keys rematerialized in the "
               "kernel), median of repeats; default split heuristic."),
        formatters={"xla_ms": "{:.3f}".format, "pallas_gpu_ms": "{:.3f}".format,
                    "speedup": "{:.2f}x".format})
  contexts = (256, 512) if quick else (1024, 2048, 4096, 8192)
  rows = measure(contexts, repeats=3 if quick else 15)
  notes = ("One attention layer, SmolLM2-135M geometry (9 heads, 3 kv heads, head_dim 64), "
           "batch 1, float32 K/V (KIVI scales float16, G=32, R=128); one step = append 1 token "
           "+ attend its query over `context` slots; XQuant (G=64, latent: SVD latents of the "
           "576-wide X, random weights): append_inputs of one token's X + attend_inputs "
           "(block-wise key remat, 256 slots per block). cache_bytes = exact nbytes() (XQuant: "
           "without the one-time SVD factors); temp = "
           "scratch bytes of the compiled step (cache argument donated; the fp cache's append "
           "still gets a scratch copy of its K/V on CPU); time = median of repeats as a ratio "
           "to the fp cache in the same run (CPU: XLA path, no fused kernel).")
  json_path, md_path = benchmarking.write_results(
      "kvcache_decode", rows, title="KV cache decode step: bytes, scratch and time per layer",
      columns=["cache", "context", "cache_bytes", "temp_bytes", "median_ms", "time_vs_fp"],
      directory=out_dir, notes=notes,
      formatters={"cache_bytes": benchmarking.format_bytes,
                  "temp_bytes": benchmarking.format_bytes, "median_ms": "{:.3f}".format,
                  "time_vs_fp": "{:.2f}x".format})
  plot = benchmarking.plot_lines(
      out_dir / "kvcache_decode.png",
      {name: (contexts, [row["median_ms"] for row in rows if row["cache"] == name])
       for name in CACHES},
      title="Decode step per layer (append + attend), CPU", xlabel="context (tokens)",
      ylabel="median ms")
  return [*written, json_path, md_path, plot]
