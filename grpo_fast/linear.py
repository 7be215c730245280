"""Public GRPO loss API from hidden states: ``linear_grpo_loss``, ``linear_token_logprobs``,
``LinearGRPOLoss``. The (N x V) logits are never materialised whole."""

from __future__ import annotations

import torch
from torch import nn

from .config import LossConfig
from .loss import LossOutput, TokenLogprobs, grpo_loss, token_logprobs


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> TokenLogprobs:
    """Forward-only per-token log-probs of ``hidden @ weight.T + bias`` (for old/ref log-probs)."""
    with torch.no_grad():
        logits = _logits(hidden, weight, bias)
        return token_logprobs(logits, _ids3(ids, hidden), temperature, return_entropy, backend)


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    config: LossConfig | None = None,
    importance_ratio: torch.Tensor | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    backend: str = "auto",
) -> LossOutput:
    """GRPO loss of the LM head ``hidden @ weight.T + bias``; same arguments as ``grpo_loss``."""
    logits = _logits(hidden, weight, bias)
    return grpo_loss(
        logits, completion_ids, advantages, completion_mask, old_logprobs, ref_logprobs,
        config=config, importance_ratio=importance_ratio, num_items_in_batch=num_items_in_batch, backend=backend,
    )  # fmt: skip


class LinearGRPOLoss(nn.Module):
    """``linear_grpo_loss`` as a module."""

    def __init__(self, config: LossConfig | None = None, backend: str = "auto"):
        super().__init__()
        self.config = config or LossConfig()
        self.backend = backend

    def forward(self, hidden, weight, completion_ids, advantages, completion_mask=None, old_logprobs=None,
                ref_logprobs=None, **kwargs) -> LossOutput:  # fmt: skip
        return linear_grpo_loss(
            hidden, weight, completion_ids, advantages, completion_mask, old_logprobs, ref_logprobs,
            config=self.config, backend=kwargs.pop("backend", self.backend), **kwargs,
        )  # fmt: skip


def _logits(hidden, weight, bias):
    logits = hidden @ weight.T.to(hidden.dtype)
    return logits if bias is None else logits + bias


def _ids3(ids, hidden):
    return ids
