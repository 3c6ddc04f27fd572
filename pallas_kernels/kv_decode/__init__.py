"""Decode attention over KIVI's packed quantized KV cache: ``gpu`` (Pallas, Triton lowering) and
``tpu`` (Pallas, Mosaic TPU). Both read uint32 codes and dequantize in registers (VMEM on TPU),
split the context flash-decoding style and return per-split outputs and log-sum-exps."""
