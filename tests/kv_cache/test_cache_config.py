"""The `cache:` config section: selection of the cache type, and clear errors naming the key."""

import pathlib

import pytest

from effjax.kv_cache import KIVI, FullKVCache
from experiments import run
from experiments.cache_config import CacheConfig, FullCacheConfig, KIVIConfig
from experiments.config import ConfigError


def test_default_is_the_full_cache_and_kivi_is_selectable():
  assert FullCacheConfig().cache_type() is FullKVCache
  assert FullCacheConfig().type == "full" and KIVIConfig().type == "kivi"
  assert KIVIConfig(bits=4, residual=64).cache_type() == KIVI(4, 32, 64)
  assert KIVIConfig(bits=4).label == "KIVI-4"
  assert KIVIConfig(bits=2, residual=64).label == "KIVI-2 (G=32, R=64)"
  assert KIVIConfig(bits=2, value_bits=4).label == "KIVI-K2V4"
  assert KIVIConfig(bits=2, value_bits=4).cache_type() == KIVI(2, value_bits=4)
  assert sorted(CacheConfig.get_known_choices()) == ["full", "kivi", "vidkv", "xquant",
                                                      "xquant_cl"]


def test_generate_config_reads_the_cache_section(tmp_path):
  path = tmp_path / "generate.yaml"
  path.write_text("experiment: generate\ncache: {type: kivi, bits: 4}\n")
  _, config = run.load(str(path), ["--cache.residual=64"])
  assert config.cache.cache_type() == KIVI(bits=4, group_size=32, residual=64)


@pytest.mark.parametrize("text, overrides, match", [
    ("experiment: generate\ncache: {type: paged}\n", [],
     r"invalid value for 'cache.type': got 'paged'"),
    ("experiment: generate\ncache: {type: kivi, residual: 100}\n", [],
     r"residual is 100; expected a multiple of group_size=32"),
    ("experiment: generate\n", ["--cache.type=kivi", "--cache.bits=5"],
     r"bits is 5; expected one of"),
    ("experiment: generate\ncache: {type: kivi, bitz: 2}\n", [],
     r"unknown config key 'cache.bitz'"),
    ("experiment: eval_kvcache\ncaches: [{type: kivi}]\n", [],
     r"invalid value for 'caches'.*first entry is \{type: full\}"),
    # A key of another cache type is an error, not ignored.
    ("experiment: generate\ncache: {type: vidkv, bits: 4}\n", [],
     r"unknown config key 'cache.bits' .*type: vidkv.*key_bits"),
    ("experiment: generate\ncache: {type: full, residual: 64}\n", [],
     r"unknown config key 'cache.residual'"),
    ("experiment: generate\ncache: {type: xquant, first_bits: 4}\n", [],
     r"unknown config key 'cache.first_bits'"),
    ("experiment: generate\n", ["--cache.type=vidkv", "--cache.value_bits=4"],
     r"unknown config key 'cache.value_bits'"),
    ("experiment: generate\ncache: {type: kivi}\n", ["--cache.key_bits=1.5"],
     r"unknown config key 'cache.key_bits'"),
    ("experiment: eval_kvcache\ncaches: [{type: full}, {type: xquant, key_bits: 1.5}]\n", [],
     r"unknown config key 'caches\[1\].key_bits'"),
    ("experiment: eval_kvcache\ncaches: [{type: full}, {type: zip}]\n", [],
     r"invalid value for 'caches\[1\].type': got 'zip'"),
    ("experiment: generate\n", ["--cache={type: vidkv, bits: 3}"],
     r"unknown config key 'cache.bits'"),
    ("experiment: eval_kvcache\n", ["--caches=[{type: full}, {type: kivi, key_bits: 1}]"],
     r"unknown config key 'caches\[1\].key_bits'"),
])
def test_bad_cache_config_is_a_clear_error(tmp_path, text, overrides, match):
  path = tmp_path / "config.yaml"
  path.write_text(text)
  with pytest.raises(ConfigError, match=match):
    run.load(str(path), overrides)


def test_help_documents_every_cache_types_fields(capsys):
  configs = pathlib.Path(__file__).parents[2] / "configs"
  assert run.main([str(configs / "smollm2_generate.yaml"), "--help"]) == 0
  text = capsys.readouterr().out
  for key in ("cache.type", "cache.bits", "cache.value_bits", "cache.key_bits",
              "cache.first_layers", "cache.residual"):
    assert f"--{key}" in text, key
