"""Prepacking: prompts and training documents packed into rows instead of padded one per row.

Prefill (serving): SmolLM2-135M-Instruct from its GGUF, cut to its first 4 blocks (every
block costs the same per token, so the packed / padded ratios carry over to the 30-block model;
the vocabulary projection runs on one token per prompt in both paths), float32, FullKVCache.
Prompts are documents of gensim's news corpus (Lee), tokenized with the SmolLM2 tokenizer and cut
to at most 512 tokens, drawn at random (seed 0) in batches of 16 / 32 / 64. ``padded``:
the prompts left-padded to the longest, one row each (``effjax.models.prefill(last_only=True)``);
``packed``: first-fit decreasing into rows as long as the longest prompt, then each prompt's K/V
gathered into its own cache row (``effjax.models.prefill_packed``). Both fill the same caches and
give the same last-token logits. Reported: tokens through the model (rows x row length), the
model FLOPs of the prefill (2 per weight per row slot in the blocks' projections and MLPs, 4 x
heads x head_dim per causal (query, key) pair within a segment, padding's own segment included
as it is computed, and the vocabulary projection of one token per prompt; counted from the
shapes, as XLA's ``cost_analysis`` counts a loop body once), compiled peak bytes (arguments +
outputs + temp, ``memory_analysis``) and the median time over interleaved repeats, as packed /
padded ratios. Goal (issue 17): >= 2x faster, peak <= padded.

Training: gensim's news + Wikipedia documents (the quickstart's text) cut into pieces of at most
seq_len + 1 tokens. ``padded``: one piece per row (``effjax.data.packing.pad``); ``packed``:
first-fit decreasing (``effjax.data.PackedRows``, what ``train_lm --data.packing=true`` trains
on). Reported: rows needed for one epoch, the fraction of row slots holding a document token, and,
at the quickstart's seq_len with its model (configs/quickstart.yaml), the median time of one loss +
gradient step on a batch of 8 rows and the predicted (loss-bearing) tokens per second.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from effjax import benchmarking
from effjax.data import (PackedRows, load_documents, load_smollm2_tokenizer, pad, split_long,
                         tokenize_each)
from effjax.models import (generation, init_caches, left_pad, load_smollm2, pack_prompts,
                           prompt_layout)
from effjax.models import packed_prefill
from experiments import run as run_config
from experiments.train_lm import build_model, make_loss, packed_loss_weights

LAYERS = 4
MAX_PROMPT = 512
BATCHES = (16, 32, 64)
TRAIN_SEQ_LENS = (128, 512, 2048)
BATCH = 8


def _prefill_flops(model, params, segment_ids: np.ndarray, prompts: int) -> float:
  """Model FLOPs of a prefill of rows with these (contiguous) ``segment_ids`` (module doc)."""
  config = model.config
  block_weights = sum(leaf.size for name, layer in params["params"].items()
                      if name.startswith("layer_")
                      for leaf in jax.tree.leaves(layer) if leaf.ndim >= 2)
  pairs = sum(int(c) * (int(c) + 1) // 2 for row in np.asarray(segment_ids)
              for c in np.unique(row, return_counts=True)[1])
  attention = 4 * config.num_heads * config.resolved_head_dim * pairs * config.num_layers
  head = 2 * prompts * config.d_model * config.vocab_size
  return float(2 * np.size(segment_ids) * block_weights + attention + head)


def prefill_rows(batches, max_prompt: int, layers: int, repeats: int) -> list[dict]:
  model, params, tokenizer = load_smollm2(num_layers=layers)
  documents = [doc[:max_prompt] for doc in tokenize_each(load_documents("news"), tokenizer)]
  rng = np.random.default_rng(0)
  rows = []
  for batch in batches:
    prompts = [documents[i].tolist() for i in rng.choice(len(documents), batch, replace=False)]
    tokens, start = left_pad(prompts, tokenizer.pad_id)
    plan = pack_prompts(prompts, pad_id=tokenizer.pad_id)
    caches = init_caches(model, batch, tokens.shape[1])
    lowered = {
        "padded": generation._prefill.lower(model, params, tokens, start, caches),  # noqa: SLF001
        "packed": packed_prefill._prefill_packed.lower(  # noqa: SLF001
            model, params, plan, caches, all_logits=False)}
    args = {"padded": (params, tokens, start, caches), "packed": (params, plan, caches)}
    compiled, calls, stats = {}, {}, {}
    for name, low in lowered.items():
      compiled[name] = low.compile()
      calls[name] = lambda c=compiled[name], a=args[name]: jax.block_until_ready(c(*a))
      calls[name]()  # warm-up
      stats[name] = benchmarking.memory_of(compiled[name])
    seconds = benchmarking.interleaved_medians(calls, repeats)
    segments = {"padded": prompt_layout(start, tokens.shape[1])[1], "packed": plan.segment_ids}
    lengths = np.array([len(p) for p in prompts])
    for name, memory in stats.items():
      rows.append({
          "batch": batch, "prefill": name, "prompt_tokens": int(lengths.sum()),
          "longest": int(lengths.max()), "rows": segments[name].shape[0],
          "model_tokens": int(np.size(segments[name])),
          "flops": _prefill_flops(model, params, segments[name], batch),
          "peak_bytes": memory.peak_bytes, "temp_bytes": memory.temp_bytes,
          "time_ms": seconds[name] * 1e3})
    padded, packed = rows[-2], rows[-1]
    for row in (padded, packed):
      row.update(flops_vs_padded=row["flops"] / padded["flops"],
                 peak_vs_padded=row["peak_bytes"] / padded["peak_bytes"],
                 speedup=padded["time_ms"] / row["time_ms"])
  return rows


def training_rows(seq_lens, batch: int, repeats: int) -> list[dict]:
  tokenizer = load_smollm2_tokenizer()
  documents = tokenize_each(load_documents("all"), tokenizer)
  _, quickstart = run_config.load("quickstart")
  rows = []
  for seq_len in seq_lens:
    layouts = {
        "padded": pad(split_long(documents, seq_len + 1, min_len=2), seq_len + 1,
                      pad_id=tokenizer.pad_id),
        "packed": PackedRows(documents, seq_len, pad_id=tokenizer.pad_id).packed}
    for name, layout in layouts.items():
      rows.append({"seq_len": seq_len, "rows": name, "rows_per_epoch": layout.num_rows,
                   "non_padding_fraction": layout.non_padding_fraction})
    if seq_len != quickstart.data.seq_len:
      continue
    model = build_model(quickstart.model, tokenizer.vocab_size, seq_len)
    params = model.init(jax.random.key(0), layouts["packed"].tokens[:1, :-1])
    step = jax.jit(jax.value_and_grad(make_loss(model)))
    calls, predicted = {}, {}
    for name, layout in layouts.items():
      picked = np.random.default_rng(0).choice(layout.num_rows, batch, replace=False)
      segments = layout.segment_ids[picked]
      weights = packed_loss_weights(segments)
      predicted[name] = int((weights > 0).sum())
      data = {"tokens": layout.tokens[picked], "segment_ids": segments, "weights": weights}
      calls[name] = lambda d=data: jax.block_until_ready(step(params, d))
      calls[name]()  # compile + warm-up
    seconds = benchmarking.interleaved_medians(calls, repeats)
    for row in rows[-2:]:
      name = row["rows"]
      row.update(batch=batch, step_ms=seconds[name] * 1e3, predicted_tokens=predicted[name],
                 tokens_per_s=predicted[name] / seconds[name])
    base = rows[-2]["tokens_per_s"]
    for row in rows[-2:]:
      row["tokens_per_s_vs_padded"] = row["tokens_per_s"] / base
  return rows


def run(quick: bool, out_dir: pathlib.Path) -> list[pathlib.Path]:
  prefill = prefill_rows((4, 8) if quick else BATCHES, 64 if quick else MAX_PROMPT,
                         1 if quick else LAYERS, 1 if quick else 5)
  training = training_rows((128,) if quick else TRAIN_SEQ_LENS, BATCH, 1 if quick else 7)
  ratio = lambda v: f"{v:.2f}x"
  notes = __doc__.split("\n\n")
  paths = list(benchmarking.write_results(
      "prepacking_prefill", prefill, directory=out_dir,
      title=f"Packed vs padded prefill, SmolLM2-135M (first {1 if quick else LAYERS} blocks)",
      notes=notes[1], group_by=["batch"],
      columns=["batch", "prefill", "prompt_tokens", "longest", "rows", "model_tokens",
               "flops", "flops_vs_padded", "peak_bytes", "peak_vs_padded", "time_ms",
               "speedup"],
      formatters={"flops": lambda v: f"{v:.3g}", "flops_vs_padded": ratio,
                  "peak_bytes": benchmarking.format_bytes, "peak_vs_padded": ratio,
                  "temp_bytes": benchmarking.format_bytes, "time_ms": lambda v: f"{v:.0f}",
                  "speedup": ratio}))
  paths += benchmarking.write_results(
      "prepacking_training", training, directory=out_dir,
      title="Packed vs padded training rows (gensim news + Wikipedia, SmolLM2 tokenizer)",
      notes=notes[2],
      columns=["seq_len", "rows", "rows_per_epoch", "non_padding_fraction", "batch", "step_ms",
               "predicted_tokens", "tokens_per_s", "tokens_per_s_vs_padded"],
      formatters={"non_padding_fraction": lambda v: f"{v:.3f}",
                  "step_ms": lambda v: f"{v:.1f}", "tokens_per_s": lambda v: f"{v:.0f}",
                  "tokens_per_s_vs_padded": ratio})
  series = {}
  for row in prefill:
    xs, ys = series.setdefault(row["prefill"], ([], []))
    xs.append(row["batch"])
    ys.append(row["time_ms"])
  paths.append(benchmarking.plot_lines(
      out_dir / "prepacking_prefill.png", series,
      title="SmolLM2 prefill of news prompts: padded vs packed", xlabel="prompts per batch",
      ylabel="median ms"))
  return paths
