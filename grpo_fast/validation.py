"""Checks at the public boundary: every error a user can cause is a ValueError/TypeError that names
the argument, what was expected and what was given. Kernels are launched only after these pass."""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BACKENDS = ("auto", "triton", "torch", "reference")


def check_tensor(name: str, x, ndim: int | tuple[int, ...], dtypes=None) -> torch.Tensor:
    """x must be a tensor with one of the given ranks and (optionally) dtypes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    ranks = (ndim,) if isinstance(ndim, int) else ndim
    if x.dim() not in ranks:
        raise ValueError(f"{name} must have {' or '.join(map(str, ranks))} dims, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    return x


def check_shape(name: str, x: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(x.shape)}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def data_checks_enabled() -> bool:
    """Checks that read tensor values (a host sync on CUDA) run eagerly, not inside torch.compile,
    where they would break the graph; compiled code is validated by its eager first run or tests."""
    return not torch.compiler.is_compiling()


def check_ids(name: str, ids: torch.Tensor, vocab: int, mask: torch.Tensor | None = None) -> None:
    """ids must be integer and within [0, vocab) wherever they are used (mask != 0).

    This reads the ids on the host (a device sync on CUDA); a kernel indexed by an id outside the
    vocabulary would read out of bounds, so the check stays on by default (off under torch.compile).
    """
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32 token ids, got {ids.dtype}")
    if ids.numel() == 0 or not data_checks_enabled():
        return
    used = ids if mask is None else ids[mask != 0]  # mask None: no copy of the ids
    if used.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(used))
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{name} must be in [0, {vocab}) (the vocabulary size), got values in [{lo}, {hi}]")


def check_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Resolve ``backend``: auto = triton on CUDA (float32/bf16/fp16 inputs), torch elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        kernel_dtype = dtype != torch.float64  # the kernels take fp32/bf16/fp16; float64 goes to torch
        return "triton" if device.type == "cuda" and kernel_dtype and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported), "
                f"got tensors on {device}"
            )
    return backend


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_float(name: str, value, minimum: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)
