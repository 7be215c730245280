"""grpo_fast: the fastest, most exact GRPO core. The API: README.md; the details: docs/."""

from .advantages import group_advantages
from .config import LossConfig
from .linear import LinearGRPOLoss, linear_grpo_loss, linear_token_logprobs
from .loss import GRPOLoss, LossOutput, TokenLogprobs, grpo_loss, token_logprobs
from .reference import rollout_importance_ratio

__all__ = [
    "GRPOLoss",
    "LinearGRPOLoss",
    "linear_grpo_loss",
    "linear_token_logprobs",
    "LossConfig",
    "LossOutput",
    "TokenLogprobs",
    "group_advantages",
    "grpo_loss",
    "rollout_importance_ratio",
    "token_logprobs",
]
__version__ = "0.1.0"

_TRAINER_NAMES = ("GRPOConfig", "GRPOTrainer")
__all__ += list(_TRAINER_NAMES)


def __getattr__(name: str):
    """The trainer is imported on first use, so ``import grpo_fast`` does not load transformers/datasets."""
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'grpo_fast' has no attribute {name!r}")
