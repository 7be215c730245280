"""Checks at the public boundary: every error a user can cause is a ValueError/TypeError that names
the argument, what was expected and what was given. Kernels are launched only after these pass."""

from __future__ import annotations

import os

import torch

from . import debug
from .config import LossConfig
from .debug import data_checks_enabled

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


def active_mask(mask, shape, name: str, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    check_tensor(name, mask, 2)
    check_shape(name, mask, shape, "(B, T) like the ids")
    if mask.dtype != torch.bool and data_checks_enabled() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1, got other values")
    return mask != 0


def usable_ids(ids: torch.Tensor, active: torch.Tensor, mask) -> torch.Tensor:
    """int64 ids with 0 at masked positions, where callers may leave padding such as -100; with no
    ``mask`` every position is used and int64 ids are returned as they are (no copy)."""
    return ids.long() if mask is None else ids.long().masked_fill(~active, 0)


def check_config(config) -> LossConfig:
    if config is None:
        return LossConfig()
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a grpo_fast.LossConfig, got {type(config).__name__}")
    return config


def check_loss_inputs(b, t, completion_ids, advantages, old_logprobs, ref_logprobs, importance_ratio, source):
    """Shapes and dtypes of the (B, T)-sized arguments; ``source`` names the tensor that fixed B and T."""
    check_tensor("completion_ids", completion_ids, 2)
    check_shape("completion_ids", completion_ids, (b, t), f"{source}.shape[:2]")
    check_tensor("advantages", advantages, (1, 2), FLOAT_DTYPES)
    if advantages.shape not in ((b,), (b, t)):
        raise ValueError(f"advantages must have shape ({b},) or ({b}, {t}), got {tuple(advantages.shape)}")
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if x is not None:
            check_tensor(name, x, 2, FLOAT_DTYPES)
            check_shape(name, x, (b, t), "(B, T) like completion_ids")
    if importance_ratio is not None:
        check_tensor("importance_ratio", importance_ratio, 2, FLOAT_DTYPES)
        if importance_ratio.shape not in ((b, t), (b, 1)):
            raise ValueError(
                f"importance_ratio must have shape ({b}, {t}) or ({b}, 1), got {tuple(importance_ratio.shape)}"
            )
    return b, t


def check_token_masks(b, t, policy_mask, entropy_mask) -> None:
    """policy_mask (B, T) or (B, 1), entropy_mask (B, T): float or bool tensors (``grpo_objective``)."""
    for name, x, shapes in (("policy_mask", policy_mask, ((b, t), (b, 1))), ("entropy_mask", entropy_mask, ((b, t),))):
        if x is None:
            continue
        check_tensor(name, x, 2, FLOAT_DTYPES + (torch.bool,))
        if tuple(x.shape) not in shapes:
            raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(x.shape)}")


def check_config_inputs(config: LossConfig, ref_logprobs, num_items_in_batch) -> None:
    if config.beta != 0.0 and ref_logprobs is None:
        raise ValueError(f"config.beta = {config.beta} > 0 needs ref_logprobs (B, T), got None")
    if num_items_in_batch is not None and data_checks_enabled():
        n = float(num_items_in_batch)
        if not n >= 0:
            raise ValueError(f"num_items_in_batch must be >= 0, got {n}")


def checked_ids(scores: dict, vocab: int, ids_name: str, ids, mask_name: str, mask, **tensors):
    """The token checks of every public op, in one order: (active (B, T) bool, int64 ids usable everywhere).

    scores: the tensors the log-probs come from, by argument name (``logits``, or ``hidden``, ``weight``,
    ``bias``); tensors: the op's other inputs (advantages, log-probs, ratios), for the device check and
    the debug mode's NaN/inf check.
    """
    active = active_mask(mask, tuple(ids.shape), mask_name, ids.device)
    check_same_device(**scores, **{ids_name: ids, mask_name: mask}, **tensors)
    check_ids(ids_name, ids, vocab, mask)
    ids = usable_ids(ids, active, mask)
    debug.check_inputs(active, ids, **scores, **tensors)
    return active, ids


def as_float(x: torch.Tensor | None) -> torch.Tensor | None:
    """float32 copy of an optional tensor input (None stays None)."""
    return None if x is None else x.float()
