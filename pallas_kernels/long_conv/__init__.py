"""Fused FFT convolution kernels (Monarch DFT as matmuls, spectrum product, inverse)."""
