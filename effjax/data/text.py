"""Real English text for training and evaluation, read from the installed ``gensim`` wheel.

gensim ships two small English corpora in ``gensim/test/test_data/``:

* ``"news"``: the Lee corpus, 343 distinct Australian news articles (``lee_background.cor`` +
  ``lee.cor``, one article per line; ``lee_background.cor`` repeats 7 of its lines verbatim);
* ``"wiki"``: the first articles of an English Wikipedia dump
  (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``), converted here from
  wiki markup to plain text.

Nothing is copied into the repository or cached on disk: the files are read from the installed
package on every call. The pipeline is documents -> :func:`split_documents` (train / held out, by
document) -> :func:`tokenize_documents` (one flat token stream) -> :class:`TokenWindows` (fixed
length training windows in a resumable, deterministic order).
"""

from __future__ import annotations

import bz2
import importlib.util
import pathlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import numpy as np

from effjax.data.tokenizer import Tokenizer

SOURCES = ("news", "wiki", "all")
NEWS_FILES = ("lee_background.cor", "lee.cor")
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# The Lee files are ISO-8859-1 (lee.cor has a pound sign as byte 0xA3), not UTF-8.
NEWS_ENCODING = "latin-1"
# Wikipedia pages with fewer words than this after markup removal are dropped.
MIN_WIKI_WORDS = 100
# MediaWiki namespace of encyclopedia articles (others: talk pages, templates, portals, ...).
ARTICLE_NAMESPACE = "0"

# Markup that gensim's filter_wiki leaves in place, removed line by line after it.
_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)[ \t]*(.*?)[ \t]*\1$", re.MULTILINE)
_LIST_MARKER = re.compile(r"^[*#:;]+[ \t]*", re.MULTILINE)
_GALLERY_FILE = re.compile(r"^(?:File|Image):[^|\n]*\|", re.MULTILINE)
_SPACES_AROUND_NEWLINE = re.compile(r"[ \t]*\n[ \t]*")
_BLANK_LINES = re.compile(r"\n{3,}")


def gensim_test_data_dir() -> pathlib.Path:
  """Returns ``gensim/test/test_data`` of the installed gensim, located without importing it."""
  spec = importlib.util.find_spec("gensim")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        "effjax.data reads English text from the 'gensim' package's test data; install it with "
        "`pip install 'effjax[eval]'`")
  return pathlib.Path(spec.submodule_search_locations[0]) / "test" / "test_data"


def _news_documents(data_dir: pathlib.Path) -> list[str]:
  docs = []
  for name in NEWS_FILES:
    text = (data_dir / name).read_text(encoding=NEWS_ENCODING)
    docs.extend(line.strip() for line in text.splitlines() if line.strip())
  return docs


def _wiki_plain_text(markup: str) -> str:
  """Converts one article's wiki markup to plain text, one paragraph per blank-line block."""
  from gensim.corpora.wikicorpus import filter_wiki

  text = filter_wiki(markup).replace("\xa0", " ").strip()
  text = _SPACES_AROUND_NEWLINE.sub("\n", text)
  text = _BOLD_ITALIC.sub("", text)
  text = _HEADING.sub(r"\2", text)
  text = _LIST_MARKER.sub("", text)
  text = _GALLERY_FILE.sub("", text)
  return _BLANK_LINES.sub("\n\n", text).strip()


def _wiki_documents(data_dir: pathlib.Path) -> list[str]:
  """Plain text of the dump's articles: no redirects, other namespaces or very short pages."""
  docs = []
  with bz2.open(data_dir / WIKI_FILE) as f:
    for _, element in ET.iterparse(f):
      if not element.tag.endswith("}page"):
        continue
      is_article = element.findtext("{*}ns") == ARTICLE_NAMESPACE
      if is_article and element.find("{*}redirect") is None:
        text = _wiki_plain_text(element.findtext("{*}revision/{*}text") or "")
        if len(text.split()) >= MIN_WIKI_WORDS:
          docs.append(text)
      element.clear()
  return docs


def load_documents(source: str) -> list[str]:
  """Loads English documents from gensim's test data.

  Args:
    source: ``"news"`` (Lee corpus articles), ``"wiki"`` (Wikipedia articles as plain text, with
      paragraphs separated by blank lines) or ``"all"`` (news then wiki).

  Returns:
    The documents, in file order, each a non-empty string. Verbatim repeats are dropped (the first
    is kept), so that no document can land on both sides of :func:`split_documents`.
  """
  if source not in SOURCES:
    raise ValueError(f"source is {source!r}; expected one of {list(SOURCES)}")
  data_dir = gensim_test_data_dir()
  docs = []
  if source in ("news", "all"):
    docs.extend(_news_documents(data_dir))
  if source in ("wiki", "all"):
    docs.extend(_wiki_documents(data_dir))
  return list(dict.fromkeys(docs))


def _check_seed(seed: int) -> None:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed is {seed!r}; expected a non-negative int")


def split_documents(docs: Sequence[str], heldout_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
  """Splits documents into disjoint train and held-out sets, deterministically in ``seed``.

  Args:
    docs: the N documents.
    heldout_fraction: share of documents held out, in (0, 1); ``round(N * heldout_fraction)``
      documents are.
    seed: non-negative int choosing which documents are held out.

  Returns:
    ``(train_docs, heldout_docs)``, each in the original order of ``docs``.
  """
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(f"heldout_fraction is {heldout_fraction!r}; expected a float in (0, 1)")
  _check_seed(seed)
  docs = list(docs)
  num_heldout = round(len(docs) * heldout_fraction)
  if not 0 < num_heldout < len(docs):
    raise ValueError(
        f"heldout_fraction {heldout_fraction} of {len(docs)} documents holds out {num_heldout}; "
        "expected both the train and the held-out set to be non-empty")
  heldout = np.zeros(len(docs), dtype=bool)
  heldout[np.random.default_rng(seed).permutation(len(docs))[:num_heldout]] = True
  train_docs = [doc for doc, out in zip(docs, heldout) if not out]
  heldout_docs = [doc for doc, out in zip(docs, heldout) if out]
  return train_docs, heldout_docs


def tokenize_each(docs: Sequence[str], tokenizer: Tokenizer) -> list[np.ndarray]:
  """Tokenizes each document on its own, ``tokenizer.eos_id`` appended (the model learns where a
  document ends): D int32 arrays, for packing (:mod:`effjax.data.packing`)."""
  if not docs:
    raise ValueError("docs is empty; expected at least one document")
  return [np.asarray([*ids, tokenizer.eos_id], dtype=np.int32)
          for ids in tokenizer.encode_batch(docs)]


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
  """Tokenizes documents into one flat stream, with ``tokenizer.eos_id`` between documents.

  Args:
    docs: D non-empty documents.
    tokenizer: the tokenizer.

  Returns:
    int32 array of shape ``[sum of document lengths + D - 1]``.
  """
  return np.concatenate(tokenize_each(docs, tokenizer))[:-1]


def epoch_order_indices(step: int, batch_size: int, num_items: int, seed: int,
                        items_name: str = "num_items") -> np.ndarray:
  """Indices of the items in training batch ``step``: a pure function of ``(seed, step)``.

  The items are walked epoch by epoch, epoch ``e`` in the random order seeded by ``(seed, e)``;
  step ``s`` takes positions ``s * batch_size ... (s + 1) * batch_size - 1`` of that endless
  sequence (a batch may span two epochs), so a run resumed at step s reads exactly the batches an
  uninterrupted run would have.
  """
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step is {step!r}; expected a non-negative int")
  if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
      or not 1 <= batch_size <= num_items):
    raise ValueError(f"batch_size is {batch_size!r}; expected an int in [1, {items_name} = "
                     f"{num_items}]")
  _check_seed(seed)
  positions = step * batch_size + np.arange(batch_size)
  epochs, offsets = np.divmod(positions, num_items)
  indices = np.empty(batch_size, dtype=np.int64)
  for epoch in np.unique(epochs):
    in_epoch = epochs == epoch
    order = np.random.default_rng([seed, int(epoch)]).permutation(num_items)
    indices[in_epoch] = order[offsets[in_epoch]]
  return indices


class TokenWindows:
  """Non-overlapping windows of ``seq_len + 1`` tokens cut from a flat token stream.

  Window ``i`` is ``tokens[i * (seq_len + 1) : (i + 1) * (seq_len + 1)]``; a model reads
  ``window[:-1]`` and predicts ``window[1:]``. Trailing tokens that do not fill a window are unused.

  Training batches walk the windows epoch by epoch, each epoch in its own random order seeded by
  ``(seed, epoch)`` (:func:`epoch_order_indices`), so batch ``step`` is a pure function of
  ``(seed, step)``: a run resumed at step s reads exactly the batches an uninterrupted run would
  have.

  Attributes:
    tokens: the int32 stream, shape ``[num_tokens]``.
    seq_len: the model's input length.
  """

  def __init__(self, tokens: np.ndarray | Sequence[int], seq_len: int):
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(
          f"tokens has shape {tokens.shape} and dtype {tokens.dtype}; expected a 1-D integer array")
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
      raise ValueError(f"seq_len is {seq_len!r}; expected a positive int")
    if len(tokens) < seq_len + 1:
      raise ValueError(
          f"tokens has {len(tokens)} tokens; expected at least seq_len + 1 = {seq_len + 1} for one "
          "window")
    self.tokens = tokens.astype(np.int32)
    self.seq_len = int(seq_len)

  @property
  def window_len(self) -> int:
    """Tokens per window: ``seq_len + 1``."""
    return self.seq_len + 1

  @property
  def num_windows(self) -> int:
    """Number of whole windows in the stream."""
    return len(self.tokens) // self.window_len

  def all_windows(self) -> np.ndarray:
    """All windows in stream order (for evaluation): int32 ``[num_windows, seq_len + 1]``."""
    return self.tokens[:self.num_windows * self.window_len].reshape(self.num_windows,
                                                                    self.window_len)

  def batch(self, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The training batch of step ``step``, a pure function of ``(seed, step)``
    (:func:`epoch_order_indices` over the windows): int32 ``[batch_size, seq_len + 1]``."""
    return self.all_windows()[epoch_order_indices(step, batch_size, self.num_windows, seed,
                                                  "num_windows")]


def load_text_splits(source: str, tokenizer: Tokenizer, heldout_fraction: float, seed: int, *,
                     train_documents: bool = False
                     ) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
  """Loads, splits by document and tokenizes a corpus.

  Args:
    source: ``"news"``, ``"wiki"`` or ``"all"`` (see :func:`load_documents`).
    tokenizer: the tokenizer.
    heldout_fraction: share of documents held out, in (0, 1).
    seed: non-negative int choosing the held-out documents.
    train_documents: return the training documents one array each (:func:`tokenize_each`, for
      packing) instead of one stream.

  Returns:
    ``(train_tokens, heldout_tokens)``: int32 token streams (see :func:`tokenize_documents`), the
    first a list of documents with ``train_documents``.
  """
  train_docs, heldout_docs = split_documents(load_documents(source), heldout_fraction, seed)
  train = (tokenize_each if train_documents else tokenize_documents)(train_docs, tokenizer)
  return train, tokenize_documents(heldout_docs, tokenizer)


def unigram_perplexity(train_tokens: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
  """Perplexity of ``targets`` under the add-one-smoothed unigram distribution of
  ``train_tokens``: the floor a language model reaches by learning token frequencies and nothing
  of context, so a trained model's held-out perplexity should sit well below it.

  Args:
    train_tokens: int token stream the frequencies are counted on.
    targets: int tokens to score (any shape), e.g. held-out windows' ``[:, 1:]``.
    vocab_size: the vocabulary size (every id gets one pseudo-count).
  """
  train_tokens, targets = np.asarray(train_tokens), np.asarray(targets)
  for name, tokens in (("train_tokens", train_tokens), ("targets", targets)):
    if not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
      raise ValueError(f"{name} has dtype {tokens.dtype} and {tokens.size} elements; expected a "
                       "non-empty integer array")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
      raise ValueError(f"{name} holds ids in [{tokens.min()}, {tokens.max()}]; expected ids in "
                       f"[0, vocab_size={vocab_size})")
  counts = np.bincount(train_tokens.ravel(), minlength=vocab_size).astype(np.float64) + 1.0
  log_p = np.log(counts[targets.ravel()]) - np.log(counts.sum())
  return float(np.exp(-log_p.mean()))
