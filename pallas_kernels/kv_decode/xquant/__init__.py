"""XQuant decode kernels (keys rematerialized in-kernel): ``pallas_gpu`` (Triton) and
``pallas_tpu`` (Mosaic TPU)."""
