"""Triton kernels of grpo_fast (installed as ``grpo_fast.kernels``): one op per file, kernel(s) then launcher."""
