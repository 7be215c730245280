"""The one place a Triton kernel is launched: on the GPU that holds the tensors, on its current stream.

A launch goes to ``torch.cuda.current_device()`` and that device's current stream, whatever device the
arguments are on. With the tensors on another GPU (a model on ``cuda:1``; ``device_map="auto"`` putting
the LM head on the last GPU) that is an illegal-address fault, or with peer access a silent cross-GPU
read with no ordering against the tensors' stream. Entering ``torch.cuda.device(device)`` makes that
device current for the launch, so Triton picks it and its current stream. CPU tensors (the
``TRITON_INTERPRET=1`` interpreter) need no guard.
"""

from __future__ import annotations

import contextlib

import torch


def launch(kernel, grid: tuple, device: torch.device, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` with ``device`` (the tensors' device) current during the launch."""
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[grid](*args, **meta)
