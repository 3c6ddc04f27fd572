"""GGUF loader: config from metadata, tensor mapping, Q/K rows, clear errors for what it can't map.

Tiny Llama GGUF files are written here with ``gguf.GGUFWriter`` from known HF-layout weights, the
way llama.cpp's converter writes them (Q/K rows permuted to interleaved RoPE pairs).
"""

import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from effjax.models import (  # noqa: E402
    UnsupportedGGUFError,
    config_from_gguf,
    load_gguf,
    params_from_gguf,
)
from effjax.models.gguf import rope_rows_to_rotate_half  # noqa: E402
from effjax.nn import DecoderLM  # noqa: E402

VOCAB, D, LAYERS, HEADS, KV_HEADS, FF = 40, 32, 2, 4, 2, 48  # D: a whole Q8_0/Q4_0 block
HEAD_DIM = D // HEADS


class Dims(typing.NamedTuple):
  vocab: int = VOCAB
  d: int = D
  layers: int = LAYERS
  heads: int = HEADS
  kv_heads: int = KV_HEADS
  ff: int = FF

  @property
  def head_dim(self) -> int:
    return self.d // self.heads


TINY = Dims()
WIDE = Dims(d=256, ff=256, layers=1)  # rows of 256: a whole K-quant super-block


def llama_cpp_permute(w, num_heads):
  """llama.cpp's convert_hf_to_gguf Q/K permutation: HF rotate-half rows -> interleaved pairs."""
  rows, cols = w.shape
  return w.reshape(num_heads, 2, rows // num_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_weights(seed=0, untied=False, dims=TINY):
  """Random weights named as in HF Llama checkpoints' layout: [out_features, in_features]."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  d, hd = dims.d, dims.head_dim
  weights = {"token_embd.weight": normal(dims.vocab, d), "output_norm.weight": normal(d)}
  if untied:
    weights["output.weight"] = normal(dims.vocab, d)
  for i in range(dims.layers):
    weights |= {
        f"blk.{i}.attn_norm.weight": normal(d), f"blk.{i}.ffn_norm.weight": normal(d),
        f"blk.{i}.attn_q.weight": normal(dims.heads * hd, d),
        f"blk.{i}.attn_k.weight": normal(dims.kv_heads * hd, d),
        f"blk.{i}.attn_v.weight": normal(dims.kv_heads * hd, d),
        f"blk.{i}.attn_output.weight": normal(d, dims.heads * hd),
        f"blk.{i}.ffn_gate.weight": normal(dims.ff, d),
        f"blk.{i}.ffn_up.weight": normal(dims.ff, d),
        f"blk.{i}.ffn_down.weight": normal(d, dims.ff),
    }
  return weights


def write_gguf(path, weights, *, arch="llama", types=None, metadata=None, metadata_int=None,
               dims=TINY, raw=None):
  """Writes ``weights`` (HF layout) as llama.cpp would; ``types``: name -> GGML type (F32).

  ``metadata`` (strings) and ``metadata_int`` add or replace metadata fields. ``raw``: name ->
  (bytes as uint8 ``[rows, bytes per row]``, GGML type), written as they are (in place of the
  weight; Q/K rows are not permuted).
  """
  writer = gguf.GGUFWriter(str(path), arch)
  integers = {f"{arch}.block_count": dims.layers, f"{arch}.embedding_length": dims.d,
              f"{arch}.feed_forward_length": dims.ff, f"{arch}.attention.head_count": dims.heads,
              f"{arch}.attention.head_count_kv": dims.kv_heads, f"{arch}.vocab_size": dims.vocab}
  for key, value in (integers | (metadata_int or {})).items():
    writer.add_uint32(key, value)
  writer.add_rope_freq_base(5000.0)
  writer.add_layer_norm_rms_eps(1e-6)
  for key, value in (metadata or {}).items():
    writer.add_string(key, value)
  for name, w in weights.items():
    if name in (raw or {}):
      data, kind = raw[name]
      writer.add_tensor(name, data, raw_dtype=kind)
      continue
    if name.endswith("attn_q.weight"):
      w = llama_cpp_permute(w, dims.heads)
    elif name.endswith("attn_k.weight"):
      w = llama_cpp_permute(w, dims.kv_heads)
    kind = (types or {}).get(name, gguf.GGMLQuantizationType.F32)
    if kind == gguf.GGMLQuantizationType.F16:
      writer.add_tensor(name, w.astype(np.float16))
    elif kind == gguf.GGMLQuantizationType.F32:
      writer.add_tensor(name, w)
    else:
      writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return gguf.GGUFReader(str(path))


def expected_params(weights, dims=TINY):
  """The DecoderLM params the HF-layout weights stand for."""
  layer = lambda i, name: weights[f"blk.{i}.{name}.weight"]
  params = {"embed": {"embedding": weights["token_embd.weight"]},
            "final_norm": {"scale": weights["output_norm.weight"]}}
  if "output.weight" in weights:
    params["lm_head"] = {"kernel": weights["output.weight"].T}
  d, heads, kv_heads, hd = dims.d, dims.heads, dims.kv_heads, dims.head_dim
  for i in range(dims.layers):
    params[f"layer_{i}"] = {
        "attention_norm": {"scale": layer(i, "attn_norm")},
        "mlp_norm": {"scale": layer(i, "ffn_norm")},
        "attention": {
            "query": {"kernel": layer(i, "attn_q").T.reshape(d, heads, hd)},
            "key": {"kernel": layer(i, "attn_k").T.reshape(d, kv_heads, hd)},
            "value": {"kernel": layer(i, "attn_v").T.reshape(d, kv_heads, hd)},
            "out": {"kernel": layer(i, "attn_output").T.reshape(heads, hd, d)},
        },
        "mlp": {name: {"kernel": layer(i, f"ffn_{name}").T} for name in ("gate", "up", "down")},
    }
  return {"params": params}


def test_rope_rows_to_rotate_half_inverts_llama_cpp_permutation():
  w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
  np.testing.assert_array_equal(rope_rows_to_rotate_half(llama_cpp_permute(w, 2), 2), w)
  # Head 0, pair i=1: HF rows (1, 5) sit at GGUF rows (2, 3).
  np.testing.assert_array_equal(llama_cpp_permute(w, 2)[2:4], w[[1, 5]])


@pytest.mark.parametrize("untied", [False, True])
def test_tiny_file_loads_to_the_hf_weights(tmp_path, untied):
  weights = hf_weights(untied=untied)
  f16 = {name: gguf.GGMLQuantizationType.F16 for name in weights
         if "ffn" in name and "norm" not in name}
  reader = write_gguf(tmp_path / "tiny.gguf", weights, types=f16)
  config = config_from_gguf(reader)
  assert (config.vocab_size, config.d_model, config.num_layers, config.num_heads,
          config.num_kv_heads, config.d_ff, config.resolved_head_dim) == (
              VOCAB, D, LAYERS, HEADS, KV_HEADS, FF, HEAD_DIM)
  assert (config.rope_theta, config.tie_embeddings) == (5000.0, not untied)
  assert config.norm_eps == pytest.approx(1e-6)  # stored as float32
  params = params_from_gguf(reader, config)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    assert leaf.dtype == jnp.float32, path
  expected = jax.tree_util.tree_map_with_path(  # the F16 tensors were rounded on the way in
      lambda path, x: (x.astype(np.float16).astype(np.float32)
                       if "mlp'" in jax.tree_util.keystr(path) else x),
      expected_params(weights))
  jax.tree.map(np.testing.assert_array_equal, params, expected)
  logits = DecoderLM(config).apply(params, jnp.zeros((1, 3), jnp.int32))
  assert logits.shape == (1, 3, VOCAB) and logits.dtype == jnp.float32


def test_quantized_tensor_is_dequantized_by_gguf(tmp_path):
  weights = hf_weights()
  name = "blk.0.ffn_up.weight"
  reader = write_gguf(tmp_path / "q8.gguf", weights, types={name: gguf.GGMLQuantizationType.Q8_0})
  params = params_from_gguf(reader, config_from_gguf(reader))
  q8 = gguf.GGMLQuantizationType.Q8_0
  expected = gguf.quants.dequantize(gguf.quants.quantize(weights[name], q8), q8)
  np.testing.assert_array_equal(params["params"]["layer_0"]["mlp"]["up"]["kernel"], expected.T)
  assert np.abs(expected - weights[name]).max() < 0.05  # Q8_0 keeps ~2 decimal digits


@pytest.mark.parametrize("change, match", [
    (dict(arch="gpt2"), r"'general.architecture' is 'gpt2'; supported: \['llama'\]"),
    (dict(raw={"blk.1.attn_v.weight": (np.zeros((16, 40), np.uint8),
                                       gguf.GGMLQuantizationType.Q8_1)}),
     r"tensor 'blk.1.attn_v.weight' has type Q8_1, which the gguf package .* cannot dequantize; "
     r"it can: \[.*'Q4_K'.*\]"),
    (dict(metadata={"llama.rope.scaling.type": "yarn"}), r"rope.scaling.type' is 'yarn'"),
    (dict(drop="blk.1.ffn_down.weight"), r"lacks tensors for parameters .*layer_1.*mlp.*down"),
    (dict(metadata_int={"llama.attention.head_count_kv": 4}),
     r"'blk.0.attn_k.weight' has shape \[16, 32\] \(\[out, in\]\); the metadata implies "
     r"\[32, 32\]"),
    (dict(extra="blk.0.attn_q_norm.weight"), r"'blk.0.attn_q_norm.weight' has no counterpart"),
    (dict(extra="blk.0.output.weight"), r"'blk.0.output.weight' has no counterpart"),
    (dict(extra="rope_freqs.weight"), r"'rope_freqs.weight' has no counterpart"),
])
def test_unsupported_files_are_clear_errors(tmp_path, change, match):
  weights = hf_weights()
  if "drop" in change:
    del weights[change.pop("drop")]
  if "extra" in change:
    weights[change.pop("extra")] = np.ones(D, np.float32)
  with pytest.raises(UnsupportedGGUFError, match=match):
    reader = write_gguf(tmp_path / "bad.gguf", weights, **change)
    params_from_gguf(reader, config_from_gguf(reader))


def test_num_layers_out_of_range_is_a_clear_error(tmp_path):
  write_gguf(tmp_path / "tiny.gguf", hf_weights())
  with pytest.raises(ValueError, match=r"num_layers is 3; expected an int in \[1, 2\]"):
    load_gguf(tmp_path / "tiny.gguf", num_layers=3)


def _raw_blocks(rows, cols, kind, seed=0):
  """Random bytes of a ``[rows, cols]`` tensor of GGML type ``kind``: any bits are valid codes,
  and bytes below 0x3C make every float16 scale in them finite with magnitude < 1."""
  block, size = gguf.GGML_QUANT_SIZES[kind]
  return np.random.default_rng(seed).integers(0, 0x3C, (rows, cols // block * size), np.uint8)


# K-quants (llama.cpp's Q4_K_M files mix Q4_K and Q6_K), BF16 and the other types gguf
# dequantizes; gguf.quants.quantize writes only some, so the others are random valid bytes.
LOADABLE = ["BF16", "Q4_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
            "IQ4_XS", "TQ2_0", "MXFP4"]


@pytest.mark.parametrize("kind", LOADABLE)
def test_every_type_gguf_dequantizes_loads(tmp_path, kind):
  kind = gguf.GGMLQuantizationType[kind]
  weights = hf_weights(dims=WIDE)
  names = ("blk.0.ffn_up.weight", "blk.0.attn_v.weight")  # no Q/K row permutation in the way
  raw = {name: (_raw_blocks(*weights[name].shape, kind, seed), kind)
         for seed, name in enumerate(names)}
  reader = write_gguf(tmp_path / f"{kind.name}.gguf", weights, dims=WIDE, raw=raw)
  params = params_from_gguf(reader, config_from_gguf(reader))
  for name, (data, _) in raw.items():
    weights[name] = gguf.quants.dequantize(data, kind)
    assert np.isfinite(weights[name]).all() and weights[name].any()
  expected = expected_params(weights, dims=WIDE)
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_q4_k_block_decodes_to_its_codes(tmp_path):
  """A Q4_K super-block built by hand (d = 1, dmin = 0, every 6-bit scale 1, every min 0) holds
  its 4-bit codes as values: an exactness check independent of gguf's dequantizer."""
  q4_k = gguf.GGMLQuantizationType.Q4_K
  codes = np.random.default_rng(0).integers(0, 16, (WIDE.ff, WIDE.d))  # [rows, 256]
  blocks = np.zeros((WIDE.ff, 144), np.uint8)
  blocks[:, 0:2] = np.array([1.0], np.float16).view(np.uint8)  # d; dmin (bytes 2:4) stays 0
  blocks[:, 4:8] = 1  # scales of sub-blocks 0-3 (mins 0-3: bytes 8:12 stay 0)
  blocks[:, 12:16] = 1  # sub-blocks 4-7: scale in the low nibble, min in the high one
  # Each 64 values: the first 32 in the low nibbles of 32 bytes, the next 32 in the high ones.
  chunks = codes.reshape(WIDE.ff, 4, 2, 32)
  blocks[:, 16:] = (chunks[:, :, 0] | chunks[:, :, 1] << 4).reshape(WIDE.ff, 128)
  weights = hf_weights(dims=WIDE)
  reader = write_gguf(tmp_path / "q4_k.gguf", weights, dims=WIDE,
                      raw={"blk.0.ffn_up.weight": (blocks, q4_k)})
  params = params_from_gguf(reader, config_from_gguf(reader))
  np.testing.assert_array_equal(params["params"]["layer_0"]["mlp"]["up"]["kernel"],
                                codes.T.astype(np.float32))
