"""FlashAttention kernels: ``gpu`` (Pallas, Triton lowering), ``tpu`` (Pallas, Mosaic TPU), and the
attention mask (``masks``) that they and effjax's pure-JAX implementations share."""
