"""The language model: loading, residual capture, generation, the lean decode loop and CPU kernels."""
