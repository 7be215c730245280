"""The GRPO trainer for Hugging Face causal LMs, and the machinery it owns.

    from grpo_fast.trainer import GRPOConfig, GRPOTrainer

Modules: ``grpo`` (GRPOTrainer: the step), ``config`` (GRPOConfig), ``update`` (the policy update),
``run_dir`` (output directory, checkpoints, resume), ``batch``, ``metrics``, ``schedule``, ``inputs``
(checks of what the user hands in); sampling: ``rollout``, ``decoding`` (the lean KV-cached decoder),
``engines``, ``shared_prefix``; ``rewards``, ``evaluation``, ``sft``, ``checkpoint``, ``distributed``,
``modeling``, ``tracking``, ``configio``, ``data``, ``tiny_model``.
"""

from .batch import Batch, TrainerState
from .config import GRPOConfig
from .grpo import GRPOTrainer
from .metrics import MetricsLog, format_metrics, peak_memory_mib
from .run_dir import OutputDirInUseError, StopSignal
from .schedule import lr_lambda
from .update import NonFiniteError

__all__ = [
    "Batch",
    "GRPOConfig",
    "GRPOTrainer",
    "MetricsLog",
    "NonFiniteError",
    "OutputDirInUseError",
    "StopSignal",
    "TrainerState",
    "format_metrics",
    "lr_lambda",
    "peak_memory_mib",
]
