"""Tests for effjax.data: the SmolLM2 tokenizer rebuilt from GGUF metadata, and the English text
pipeline (documents -> split -> token stream -> resumable training windows)."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
pytest.importorskip("gensim")

from effjax import data  # noqa: E402  (after the eval-extra skips on purpose)


@pytest.fixture(scope="module")
def reader():
  try:
    path = data.smollm2_gguf_path()
  except data.SmolLM2NotInstalledError as e:
    pytest.skip(str(e))
  return gguf.GGUFReader(path)


@pytest.fixture(scope="module")
def tokenizer(reader):
  return data.Tokenizer.from_gguf(reader)


@pytest.fixture(scope="module")
def news():
  return data.load_documents("news")


@pytest.fixture(scope="module")
def wiki():
  return data.load_documents("wiki")


def _metadata(reader, key):
  return reader.get_field(key).contents()


def _tokens_of(tokenizer, text):
  return [tokenizer.id_to_token(i) for i in tokenizer.encode(text)]


# --- tokenizer: the real SmolLM2 GGUF ---------------------------------------------------------


def test_vocab_size_and_special_ids_come_from_metadata(tokenizer, reader):
  tokens = _metadata(reader, "tokenizer.ggml.tokens")
  assert tokenizer.vocab_size == len(tokens) == 49152
  assert tokenizer.bos_id == _metadata(reader, "tokenizer.ggml.bos_token_id") == 1
  assert tokenizer.eos_id == _metadata(reader, "tokenizer.ggml.eos_token_id") == 2
  assert tokenizer.pad_id == _metadata(reader, "tokenizer.ggml.padding_token_id") == 2
  assert tokens[1] == tokenizer.id_to_token(1) == "<|im_start|>"
  assert tokens[2] == tokenizer.id_to_token(2) == "<|im_end|>"


def test_control_tokens_encode_and_decode_as_single_ids(tokenizer):
  text = "<|im_start|>user\nWhat is 2+2?<|im_end|>"
  ids = tokenizer.encode(text)
  assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
  assert tokenizer.bos_id not in ids[1:-1] and tokenizer.eos_id not in ids[1:-1]
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nWhat is 2+2?"


def test_bos_is_added_only_on_request(tokenizer):
  ids = tokenizer.encode("Hello world")
  assert ids == _ids(tokenizer, ["Hello", "Ġworld"])
  assert tokenizer.encode("Hello world", add_bos=True) == [tokenizer.bos_id, *ids]
  assert tokenizer.encode_batch(["Hello world"], add_bos=True) == [[tokenizer.bos_id, *ids]]


def _ids(tokenizer, token_strings):
  vocab = tokenizer.backend.get_vocab()
  return [vocab[t] for t in token_strings]


@pytest.mark.parametrize("text, expected", [
    (" hello", ["Ġhello"]),
    ("2024", ["2", "0", "2", "4"]),
    ("in 3.14%", ["in", "Ġ", "3", ".", "1", "4", "%"]),
    # GPT-2 contractions are case-sensitive ("'M" is not one), unlike llama3 / qwen2.
    ("don't", ["don", "'t"]),
    ("I'M", ["I", "'", "M"]),
    # The digit split comes BEFORE the GPT-2 regex: the spaces before a number stay one run.
    # (GPT-2's regex alone gives ["total", ":", "Ġ", "Ġ", "4", "2"] and ["x", "Ċ", "Ċ", "1"].)
    ("total:  42", ["total", ":", "ĠĠ", "4", "2"]),
    ("x\n\n1", ["x", "ĊĊ", "1"]),
])
def test_smollm_pre_tokenizer_known_encodings(tokenizer, text, expected):
  assert _tokens_of(tokenizer, text) == expected
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_on_real_english(tokenizer, news, wiki):
  docs = news[:100] + wiki[:10]
  for doc, ids in zip(docs, tokenizer.encode_batch(docs)):
    assert tokenizer.decode(ids) == doc
  assert tokenizer.encode_batch(docs[:5]) == [tokenizer.encode(d) for d in docs[:5]]
  # BPE compresses English: about 4 characters per token.
  assert 3.0 < sum(map(len, docs)) / sum(map(len, tokenizer.encode_batch(docs))) < 6.0


def test_bad_arguments_raise_clear_errors(tokenizer):
  with pytest.raises(ValueError, match=r"ids contain \[49152\]"):
    tokenizer.decode([5, 49152])
  with pytest.raises(TypeError, match="text is a bytes; expected str"):
    tokenizer.encode(b"hello")
  with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
    tokenizer.encode_batch(["a", 1])
  with pytest.raises(TypeError, match="source is a int"):
    data.Tokenizer.from_gguf(3)


# --- tokenizer: small GGUF files written here ---------------------------------------------------


def _write_gguf(path, *, model="gpt2", pre="smollm", with_merges=True):
  writer = gguf.GGUFWriter(str(path), arch="llama")
  writer.add_tokenizer_model(model)
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(["<|endoftext|>", "<tool>", "a", "b", "1", "Ġ", "ab", "Ġab"])
  if with_merges:
    writer.add_token_merges(["a b", "Ġ ab"])
  writer.add_token_types([3, 4, 1, 1, 1, 1, 1, 1])
  writer.add_bos_token_id(0)
  writer.add_eos_token_id(0)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_from_gguf_path_builds_bpe_with_added_tokens(tmp_path):
  tokenizer = data.Tokenizer.from_gguf(str(_write_gguf(tmp_path / "tiny.gguf")))
  assert tokenizer.vocab_size == 8 and tokenizer.pad_id is None
  assert tokenizer.encode("ab ab1") == [6, 7, 4]
  assert tokenizer.encode("<|endoftext|>ab<tool>") == [0, 6, 1]
  # CONTROL tokens are special (skippable); USER_DEFINED ones are ordinary text.
  assert tokenizer.decode([0, 6, 1], skip_special_tokens=True) == "ab<tool>"


@pytest.mark.parametrize("model, pre, message", [
    ("llama", "smollm", r"'tokenizer\.ggml\.model' is 'llama'; supported: \['gpt2'\]"),
    ("gpt2", "llama-bpe", r"'tokenizer\.ggml\.pre' is 'llama-bpe'; supported: \['smollm'\]"),
])
def test_unsupported_tokenizer_raises(tmp_path, model, pre, message):
  path = _write_gguf(tmp_path / "bad.gguf", model=model, pre=pre)
  with pytest.raises(ValueError, match=message):
    data.Tokenizer.from_gguf(path)


def test_missing_metadata_field_raises(tmp_path):
  path = _write_gguf(tmp_path / "no_merges.gguf", with_merges=False)
  with pytest.raises(ValueError, match="no field 'tokenizer.ggml.merges'"):
    data.Tokenizer.from_gguf(gguf.GGUFReader(path))


# --- documents ----------------------------------------------------------------------------------


def _is_english(doc):
  words = doc.lower().split()
  return sum(w in ("the", "of", "and", "to", "in", "a", "is") for w in words) > 0.05 * len(words)


def test_news_documents_are_english_articles(news):
  assert len(news) == len(set(news)) == 343  # 350 lines, 7 verbatim repeats dropped
  assert all(doc and doc == doc.strip() and "\n" not in doc for doc in news)
  assert sum(map(_is_english, news)) > 0.95 * len(news)
  assert any("£" in doc for doc in news)  # lee.cor is latin-1, decoded as such


def test_wiki_documents_are_plain_english_text(wiki):
  assert len(wiki) > 50
  assert sum(map(_is_english, wiki)) > 0.95 * len(wiki)
  assert wiki[0].startswith("Anarchism is a political philosophy")
  assert sum("\n\n" in doc for doc in wiki) > 0.9 * len(wiki)  # paragraphs kept
  for doc in wiki:
    assert len(doc.split()) >= data.text.MIN_WIKI_WORDS
    for markup in ("[[", "]]", "{{", "}}", "''", "<ref", "&nbsp;", "\n=="):
      assert markup not in doc, (markup, doc[:80])


def test_all_is_news_then_wiki(news, wiki):
  assert data.load_documents("all") == news + wiki


def test_unknown_source_raises():
  with pytest.raises(ValueError,
                     match=r"source is 'books'; expected one of \['news', 'wiki', 'all'\]"):
    data.load_documents("books")


def test_split_is_disjoint_deterministic_and_complete(news):
  train, heldout = data.split_documents(news, heldout_fraction=0.1, seed=3)
  assert len(heldout) == 34 and len(train) == 309
  assert sorted(train + heldout) == sorted(news)
  assert not set(train) & set(heldout)
  assert [d for d in news if d in set(heldout)] == heldout  # original order kept
  assert data.split_documents(news, 0.1, seed=3) == (train, heldout)
  assert data.split_documents(news, 0.1, seed=4)[1] != heldout


@pytest.mark.parametrize("fraction, seed, message", [
    (0.0, 0, "heldout_fraction is 0.0"),
    (1.0, 0, "heldout_fraction is 1.0"),
    (0.1, 0, "holds out 0; expected both"),
    (0.5, -1, "seed is -1"),
])
def test_split_rejects_bad_arguments(fraction, seed, message):
  with pytest.raises(ValueError, match=message):
    data.split_documents(["a", "b", "c"], fraction, seed)


def test_tokenize_documents_puts_eos_between_documents(tokenizer):
  docs = ["The cat sat.", "A dog ran home.", "Birds fly."]
  stream = data.tokenize_documents(docs, tokenizer)
  expected = [*tokenizer.encode(docs[0]), 2, *tokenizer.encode(docs[1]), 2,
              *tokenizer.encode(docs[2])]
  assert stream.dtype == np.int32 and stream.tolist() == expected
  with pytest.raises(ValueError, match="docs is empty"):
    data.tokenize_documents([], tokenizer)


def test_load_text_splits_tokenizes_each_side(tokenizer, news):
  train, heldout = data.load_text_splits("news", tokenizer, heldout_fraction=0.2, seed=0)
  train_docs, heldout_docs = data.split_documents(news, 0.2, seed=0)
  assert np.array_equal(heldout, data.tokenize_documents(heldout_docs, tokenizer))
  # Two streams drop exactly one separator compared with the whole corpus in one stream.
  assert len(train) + len(heldout) == len(data.tokenize_documents(news, tokenizer)) - 1
  assert len(train) > 3 * len(heldout) > 0 and train.dtype == np.int32


# --- training windows ---------------------------------------------------------------------------


def test_windows_cut_the_stream_without_overlap():
  windows = data.TokenWindows(np.arange(23), seq_len=4)
  assert windows.num_windows == 4  # 23 // 5; the last 3 tokens are unused
  all_windows = windows.all_windows()
  assert all_windows.shape == (4, 5) and all_windows.dtype == np.int32
  assert all_windows.tolist() == np.arange(20).reshape(4, 5).tolist()
  inputs, targets = all_windows[:, :-1], all_windows[:, 1:]
  assert np.array_equal(targets, inputs + 1)


def test_batches_are_a_function_of_seed_and_step():
  windows = data.TokenWindows(np.arange(10 * 9), seq_len=8)
  batch = windows.batch(step=7, batch_size=4, seed=1)
  assert batch.shape == (4, 9) and batch.dtype == np.int32
  assert np.array_equal(batch, data.TokenWindows(np.arange(90), 8).batch(7, 4, seed=1))
  assert not np.array_equal(batch, windows.batch(7, 4, seed=2))
  assert not np.array_equal(batch, windows.batch(8, 4, seed=1))


def test_each_epoch_visits_every_window_once_in_a_new_order():
  windows = data.TokenWindows(np.arange(10 * 9), seq_len=8)
  # batch_size 4 does not divide 10 windows, so steps 2 and 4 span two epochs.
  starts = np.concatenate([windows.batch(s, 4, seed=0)[:, 0] for s in range(5)]) // 9
  epoch0, epoch1 = starts[:10], starts[10:]
  assert sorted(epoch0) == sorted(epoch1) == list(range(10))
  assert epoch0.tolist() != epoch1.tolist()


def test_resuming_yields_the_uninterrupted_batches(tokenizer, news):
  stream = data.tokenize_documents(news[:40], tokenizer)
  uninterrupted = data.TokenWindows(stream, seq_len=64)
  run = [uninterrupted.batch(s, 8, seed=5) for s in range(30)]
  resumed = data.TokenWindows(stream.copy(), seq_len=64)  # e.g. after a restart
  for step in range(17, 30):
    assert np.array_equal(resumed.batch(step, 8, seed=5), run[step])
  known_windows = {tuple(w) for w in uninterrupted.all_windows().tolist()}
  assert all(tuple(row) in known_windows for batch in run for row in batch.tolist())


@pytest.mark.parametrize("tokens, seq_len, message", [
    (np.arange(8), 8, "tokens has 8 tokens; expected at least seq_len \\+ 1 = 9"),
    (np.arange(8).reshape(2, 4), 2, "expected a 1-D integer array"),
    (np.linspace(0, 1, 9), 2, "expected a 1-D integer array"),
    (np.arange(8), 0, "seq_len is 0"),
])
def test_windows_reject_bad_streams(tokens, seq_len, message):
  with pytest.raises(ValueError, match=message):
    data.TokenWindows(tokens, seq_len)


@pytest.mark.parametrize("step, batch_size, seed, message", [
    (0, 4, 0, r"batch_size is 4; expected an int in \[1, num_windows = 3\]"),
    (0, 0, 0, "batch_size is 0"),
    (-1, 2, 0, "step is -1"),
    (0, 2, -3, "seed is -3"),
])
def test_batch_rejects_bad_arguments(step, batch_size, seed, message):
  windows = data.TokenWindows(np.arange(15), seq_len=4)
  with pytest.raises(ValueError, match=message):
    windows.batch(step, batch_size, seed)


def test_unigram_perplexity_is_the_smoothed_frequency_floor():
  # Counts [1, 0, 0, 0] + 1 each = [2, 1, 1, 1] of 5: every target has p = 1/5.
  assert data.unigram_perplexity(np.array([0]), np.array([[1, 2, 3]]), 4) == pytest.approx(5.0)
  # Counts [3, 1, 0] + 1 each = [4, 2, 1] of 7; targets 0, 1.
  expected = np.exp(-(np.log(4 / 7) + np.log(2 / 7)) / 2)
  assert data.unigram_perplexity(np.array([0, 0, 0, 1]), np.array([0, 1]), 3) == pytest.approx(
      expected)


@pytest.mark.parametrize("train, targets, vocab, message", [
    (np.array([0.5]), np.array([0]), 4, "train_tokens has dtype float64"),
    (np.array([0]), np.array([], np.int32), 4, "targets has dtype int32 and 0 elements"),
    (np.array([0, 4]), np.array([0]), 4, r"train_tokens holds ids in \[0, 4\]"),
    (np.array([0]), np.array([-1]), 4, r"targets holds ids in \[-1, -1\]"),
])
def test_unigram_perplexity_rejects_bad_arguments(train, targets, vocab, message):
  with pytest.raises(ValueError, match=message):
    data.unigram_perplexity(train, targets, vocab)
