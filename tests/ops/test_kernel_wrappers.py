"""Every kernel wrapper takes the same keyword pair: ``block_sizes`` (its module's ``BlockSizes``,
None: the heuristic) and ``interpret`` (None: ``pallas_kernels.interpret.interpret_mode``).

Each wrapper is traced (``jax.eval_shape``, no kernel runs) with explicit block sizes and
``interpret=True`` outside ``interpret_mode``, and refuses block sizes of another type; every
``BlockSizes`` refuses values its kernel cannot take."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import pytest

from effjax.ops.long_conv import pallas_gpu as long_conv_gpu
from effjax.ops.long_conv import pallas_tpu as long_conv_tpu
from pallas_kernels.flash_attention import mosaic_gpu, pallas_gpu, pallas_tpu
from pallas_kernels.long_conv import pallas_gpu as fft_conv_gpu
from pallas_kernels.long_conv import pallas_tpu as fft_conv_tpu


def _attention_args(dtype):
  q = jax.ShapeDtypeStruct((1, 40, 2, 64), dtype)
  return (q, q, q), dict(scale=0.125, causal=True), (1, 40, 2, 64)


def _fft_conv_args(spectrum_shape):
  x = jax.ShapeDtypeStruct((1, 200, 3), jnp.float32)
  spectrum = jax.ShapeDtypeStruct(spectrum_shape, jnp.float32)
  return (x, spectrum, spectrum), dict(n=256), (1, 200, 3)


def _long_conv_args():
  u = jax.ShapeDtypeStruct((1, 200, 3), jnp.float32)
  return (u, jax.ShapeDtypeStruct((3, 50), jnp.float32)), dict(mode="causal"), (1, 200, 3)


# (wrapper, its block sizes, (positional args, keyword args, output shape))
WRAPPERS = {
    "flash_attention.pallas_gpu": (pallas_gpu.attention, pallas_gpu.BlockSizes(),
                                   _attention_args(jnp.float32)),
    "flash_attention.pallas_tpu": (pallas_tpu.attention, pallas_tpu.BlockSizes(16, 24),
                                   _attention_args(jnp.float32)),
    "flash_attention.mosaic_gpu": (mosaic_gpu.attention, mosaic_gpu.BlockSizes(block_kv=64),
                                   _attention_args(jnp.bfloat16)),
    "long_conv.pallas_gpu.fft_conv": (fft_conv_gpu.fft_conv, fft_conv_gpu.BlockSizes(),
                                      _fft_conv_args((16, 16, 3))),
    "long_conv.pallas_tpu.fft_conv": (fft_conv_tpu.fft_conv, fft_conv_tpu.BlockSizes(),
                                      _fft_conv_args((256, 3))),
    "effjax long_conv pallas_gpu": (long_conv_gpu.long_conv, fft_conv_gpu.BlockSizes(),
                                    _long_conv_args()),
    "effjax long_conv pallas_tpu": (long_conv_tpu.long_conv, fft_conv_tpu.BlockSizes(),
                                    _long_conv_args()),
}


@pytest.mark.parametrize("name", WRAPPERS)
def test_wrapper_takes_block_sizes_and_interpret(name):
  wrapper, block_sizes, (args, options, shape) = WRAPPERS[name]
  parameters = inspect.signature(wrapper).parameters
  for keyword in ("block_sizes", "interpret"):
    assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY
    assert parameters[keyword].default is None
  out = jax.eval_shape(functools.partial(wrapper, block_sizes=block_sizes, interpret=True,
                                         **options), *args)
  assert out.shape == shape


@pytest.mark.parametrize("name", WRAPPERS)
def test_wrapper_refuses_other_block_sizes(name):
  wrapper, _, (args, options, _) = WRAPPERS[name]
  with pytest.raises(TypeError, match="block_sizes must be a pallas_kernels"):
    jax.eval_shape(functools.partial(wrapper, block_sizes=(64, 64), interpret=True, **options),
                   *args)


BAD_BLOCK_SIZES = {
    "pallas_gpu attention": (pallas_gpu.BlockSizes, [
        (dict(block_q=24), ["block_q", "power of two", "24"]),
        (dict(block_kv_dq=8), ["block_kv_dq", "8"]),
        (dict(num_warps=0), ["num_warps", "positive"])]),
    "pallas_tpu attention": (pallas_tpu.BlockSizes, [
        (dict(block_q=0), ["block_q", "multiple of 8", "0"]),
        (dict(block_kv=16.0), ["block_kv", "16.0"]),
        (dict(block_q=12), ["block_q", "multiple of 8", "12"])]),
    "mosaic_gpu attention": (mosaic_gpu.BlockSizes, [
        (dict(block_kv=96), ["block_kv", "64", "96"]),
        (dict(block_q_dkv=256), ["block_q_dkv", "256"]),
        (dict(stages=1), ["stages", "2", "1"]),
        (dict(ping_pong=1), ["ping_pong", "bool"]),
        (dict(overlap="yes"), ["overlap", "bool", "yes"]),
        (dict(ping_pong=True, overlap=True), ["ping_pong", "overlap", "exclusive"])]),
    "pallas_gpu long_conv": (fft_conv_gpu.BlockSizes, [
        *[(dict(max_on_chip=bad), ["max_on_chip", "power of two", repr(bad)])
          for bad in (128, 300, 8192, "256")],
        (dict(max_n0=8), ["max_n0", "[16, 64]", "8"]), (dict(max_n0=48), ["max_n0", "48"])]),
    "pallas_tpu long_conv": (fft_conv_tpu.BlockSizes, [
        (dict(max_on_chip=100), ["max_on_chip", "multiple of 64", "100"]),
        (dict(max_on_chip=2**16), ["max_on_chip", "65536"]),
        (dict(max_n0=1), ["max_n0", "[2, 256]", "1"])]),
}


@pytest.mark.parametrize("cls, change, words", [
    pytest.param(cls, change, words, id=f"{name}-{','.join(change)}")
    for name, (cls, cases) in BAD_BLOCK_SIZES.items() for change, words in cases])
def test_bad_block_sizes_raise(cls, change, words):
  with pytest.raises(ValueError) as raised:
    cls(**change)
  for word in words:
    assert word in str(raised.value), f"{word!r} not in {raised.value}"
