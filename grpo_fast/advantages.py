"""Group-relative advantages (DeepSeekMath outcome supervision) with input checks."""

from __future__ import annotations

import torch

from . import reference
from .validation import FLOAT_DTYPES, check_tensor

SCALES = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", estimator: str = "grpo", eps: float = 1e-4
) -> torch.Tensor:
    """Advantages of rewards laid out group by group (rewards[g*G:(g+1)*G] answer one prompt).

    Args:
        rewards: (B,) float, B a multiple of group_size. NaN rewards are not allowed.
        group_size: G >= 1. A group of one gets advantage 0.
        scale: "group" (divide by the group std + eps; DeepSeekMath, TRL default), "batch" (by the
            batch std), "none" (Dr. GRPO: no division).
        estimator: "grpo" (r - group mean) or "rloo" (r - mean of the other G - 1 rewards).
        eps: added to the std (TRL 1e-4, verl 1e-6).
    Returns:
        (B,) float32 advantages (float64 for float64 rewards).
    """
    check_tensor("rewards", rewards, 1, FLOAT_DTYPES)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite; drop or replace NaN/inf rewards before computing advantages")
    if rewards.numel() == 0:
        return rewards.float()
    return reference.group_advantages(rewards, group_size, scale, estimator, eps)
