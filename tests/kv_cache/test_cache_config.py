"""The `cache:` config section: selection of the cache type, and clear errors naming the key."""

import pytest

from effjax.kv_cache import KIVI, FullKVCache
from experiments import run
from experiments.cache_config import CacheConfig
from experiments.config import ConfigError


def test_default_is_the_full_cache_and_kivi_is_selectable():
  assert CacheConfig().cache_type() is FullKVCache
  assert CacheConfig("kivi", bits=4, residual=64).cache_type() == KIVI(4, 32, 64)
  assert CacheConfig("kivi", bits=4).label == "KIVI-4"
  assert CacheConfig("kivi", bits=2, residual=64).label == "KIVI-2 (G=32, R=64)"
  assert CacheConfig("kivi", bits=2, value_bits=4).label == "KIVI-K2V4"
  assert CacheConfig("kivi", bits=2, value_bits=4).cache_type() == KIVI(2, value_bits=4)


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
])
def test_bad_cache_config_is_a_clear_error(tmp_path, text, overrides, match):
  path = tmp_path / "config.yaml"
  path.write_text(text)
  with pytest.raises(ConfigError, match=match):
    run.load(str(path), overrides)
