"""Drop-ins for other training libraries. Nothing is imported here: each integration imports its library
(an optional dependency) only when it is used, e.g. ``from grpo_fast.integrations.trl import FusedGRPOTrainer``.
"""

__all__ = ["FusedGRPOTrainer"]


def __getattr__(name: str):
    """``grpo_fast.integrations.FusedGRPOTrainer`` imports TRL on first use, not when this package is imported."""
    if name == "FusedGRPOTrainer":
        from .trl import FusedGRPOTrainer

        return FusedGRPOTrainer
    raise AttributeError(f"module 'grpo_fast.integrations' has no attribute {name!r}")
