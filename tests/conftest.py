"""Test-session setup. With no CUDA device the Triton kernels run under the interpreter, which must be
switched on before triton is first imported (torch does not import triton eagerly)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
