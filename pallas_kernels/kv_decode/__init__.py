"""Decode attention over packed quantized KV caches, KIVI's (``gpu``, ``tpu``) and VidKV's
(``vidkv_gpu``, ``vidkv_tpu``), and over XQuant's quantized layer-input stream (``xquant_gpu``,
``xquant_tpu``: keys rematerialized and rotated in-kernel): Pallas kernels with Triton and Mosaic
TPU lowerings. They read uint32 codes and dequantize in registers (VMEM on TPU), split the context
flash-decoding style and return per-split outputs and log-sum-exps; ``common`` holds what they
share."""
