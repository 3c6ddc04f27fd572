"""Decode attention over quantized KV caches as Pallas kernels, one module per (cache format,
dispatch key): ``kivi`` (KIVI's packed 2/4-bit cache), ``vidkv`` (VidKV's 1.x-bit keys and ternary
values) and ``xquant`` (XQuant's quantized layer-input stream, keys rematerialized and rotated
in-kernel), each with ``pallas_gpu`` (Triton) and ``pallas_tpu`` (Mosaic TPU). They read uint32
codes in place and dequantize in registers (VMEM on TPU), split the context flash-decoding style
and return per-split outputs and log-sum-exps. Shared: ``common`` (settings, tiling
:class:`~pallas_kernels.kv_decode.common.DecodeBlockSizes`, query grouping, combination, lane
arithmetic), ``common_gpu`` (the Triton grid and loop), ``common_tpu`` (the Mosaic grid, step and
one-hot dequantization helpers). effjax registers them as implementations of its ops
``"kivi_decode"``, ``"vidkv_decode"`` and ``"xquant_decode"`` (``effjax.ops.kv_decode``)."""
