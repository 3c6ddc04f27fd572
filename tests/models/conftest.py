"""Fixtures: SmolLM2-135M read from the installed GGUF once per session, whole and truncated."""

import dataclasses

import pytest


@pytest.fixture(scope="session")
def smollm2_reader():
  gguf = pytest.importorskip("gguf")
  pytest.importorskip("tokenizers")
  from effjax.data import SmolLM2NotInstalledError, smollm2_gguf_path
  try:
    path = smollm2_gguf_path()
  except SmolLM2NotInstalledError as error:
    pytest.skip(str(error))
  return gguf.GGUFReader(path)


@pytest.fixture(scope="session")
def smollm2(smollm2_reader):
  """``(model, params, tokenizer)`` of the whole model (30 layers)."""
  from effjax.data import Tokenizer
  from effjax.models import config_from_gguf, params_from_gguf
  from effjax.nn import DecoderLM
  config = config_from_gguf(smollm2_reader)
  return (DecoderLM(config), params_from_gguf(smollm2_reader, config),
          Tokenizer.from_gguf(smollm2_reader))


@pytest.fixture(scope="session")
def smollm2_2layers(smollm2):
  """The first two blocks of SmolLM2 (same embeddings and final norm): fast, real weights."""
  model, params, tokenizer = smollm2
  config = dataclasses.replace(model.config, num_layers=2)
  kept = {key: value for key, value in params["params"].items()
          if not key.startswith("layer_") or int(key.split("_")[1]) < 2}
  return model.clone(config=config), {"params": kept}, tokenizer
