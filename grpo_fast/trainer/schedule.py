"""The learning-rate schedule of the trainer and of SFT: linear warm-up, then constant, cosine or linear decay."""

from __future__ import annotations

import math
from collections.abc import Callable

LR_SCHEDULERS = ("constant", "cosine", "linear")


def warmup_then_decay(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """LR factor per optimizer step: linear warm-up to 1 over ``warmup`` steps, then ``kind`` (one of
    LR_SCHEDULERS) until ``total`` steps: 1, a cosine down to 0 or a line down to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # the first step already learns (HF starts at 0, wasting a rollout)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress}[kind]

    return factor


def lr_lambda(cfg) -> Callable[[int], float]:
    """The schedule of a GRPOConfig, over all its optimizer steps (max_steps * num_iterations)."""
    total = cfg.max_steps * cfg.num_iterations
    return warmup_then_decay(cfg.lr_scheduler_type, cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total), total)
