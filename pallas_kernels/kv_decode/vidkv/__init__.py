"""VidKV decode kernels: ``pallas_gpu`` (Triton) and ``pallas_tpu`` (Mosaic TPU)."""
