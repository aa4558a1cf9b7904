"""Triton kernels, one module per kernel family. Imported on first use, after TRITON_INTERPRET is set."""
