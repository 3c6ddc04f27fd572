"""FlashAttention kernels, one module per dispatch key: ``pallas_gpu`` (Pallas, Triton lowering),
``pallas_tpu`` (Pallas, Mosaic TPU), ``mosaic_gpu`` (Pallas Mosaic GPU, Hopper), and the attention
mask (``masks``) that they and effjax's pure-JAX implementations share."""
