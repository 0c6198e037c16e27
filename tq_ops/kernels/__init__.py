"""Triton kernels and their launchers, one kernel family per module; CUDA tensors only."""
