"""Public GRPO loss API from logits: ``grpo_loss``, ``token_logprobs``, ``GRPOLoss``.

Backends: "torch" (chunked, hand-written backward; the fast path on CPU), "triton" (fused kernels;
CUDA, or CPU under TRITON_INTERPRET=1), "reference" (plain autograd through grpo_fast.reference),
"auto" (triton on CUDA, torch elsewhere). Every backend ends in the same ``grpo_objective``, so
the loss-type normalisations live in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from . import objective, reference
from .config import LossConfig
from .ops.token_stats import token_stats
from .validation import (
    FLOAT_DTYPES,
    as_float,
    check_backend,
    check_config,
    check_config_inputs,
    check_float,
    check_loss_inputs,
    check_shape,
    check_tensor,
    check_token_masks,
    checked_ids,
)


@dataclass
class LossOutput:
    """loss: scalar float32 (differentiable). metrics: TRL-named float32 scalars (detached).
    logprobs: (B, T) float32 per-token log-probs of the current policy, 0 where the mask is 0."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    logprobs: torch.Tensor | None = None


class TokenLogprobs(NamedTuple):
    """logprobs: (B, T) float32. entropy: (B, T) float32, or None when not requested."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


def token_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    mask: torch.Tensor | None = None,
) -> TokenLogprobs:
    """Per-token log softmax(logits / temperature)[ids] (and entropy), differentiable, 1 read of logits.

    Args:
        logits: (B, T, V) float32/bfloat16/float16/float64; last dim contiguous for triton.
        ids: (B, T) int64 token ids in [0, V).
        temperature: > 0, the sampling temperature.
        return_entropy: also return the per-token entropy of softmax(logits / temperature).
        backend: "auto" | "triton" | "torch" | "reference".
        mask: optional (B, T); rows where it is 0 are skipped (log-prob and entropy 0).
    Returns:
        TokenLogprobs(logprobs, entropy), float32 (B, T) each (entropy None unless requested).
    """
    temperature = check_float("temperature", temperature, minimum=0.0, strict=True)
    check_tensor("logits", logits, 3, FLOAT_DTYPES)
    check_tensor("ids", ids, 2)
    check_shape("ids", ids, logits.shape[:2], "logits.shape[:2]")
    active, ids = checked_ids({"logits": logits}, logits.shape[-1], "ids", ids, "mask", mask)
    backend = check_backend(backend, logits.device, logits.dtype)
    logp, entropy = _stats(logits, ids, active, temperature, return_entropy, backend)
    return TokenLogprobs(logp, entropy if return_entropy else None)


def grpo_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    config: LossConfig | None = None,
    importance_ratio: torch.Tensor | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    policy_mask: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> LossOutput:
    """The GRPO loss from logits (DeepSeekMath eq. 3 and every TRL variant), forward + backward at
    2 reads + 1 write of the logits on the torch and triton backends.

    Args:
        logits: (B, T, V); ``logits[:, t]`` scores ``completion_ids[:, t]``. Any float dtype.
        completion_ids: (B, T) int64 sampled tokens.
        advantages: (B,) or (B, T), e.g. from ``group_advantages``.
        completion_mask: (B, T) 1 for tokens in the loss; None = all.
        old_logprobs: (B, T) log-probs under the sampling policy; None = on-policy (ratio 1,
            gradient still flows).
        ref_logprobs: (B, T) reference-policy log-probs; required when config.beta > 0.
        config: LossConfig (default: ``LossConfig()``, TRL 1.16's defaults: dapo, beta 0).
        importance_ratio: (B, T) or (B, 1) rollout correction rho, e.g. ``rollout_importance_ratio``.
        num_items_in_batch: dapo/cispo/vespo normaliser, tokens in the whole generation batch.
        policy_mask: (B, T) or (B, 1) factor of the per-token policy loss (TRL's off-policy and
            high-entropy masks); entropy_mask: (B, T) tokens the entropy bonus averages over. See
            ``grpo_objective``.
        backend: "auto" | "triton" | "torch" | "reference".
        inplace_backward: write the logits gradient into the logits' storage (saves N x V memory;
            only when nothing else uses the logits after this loss). torch/triton backends.
    Returns:
        LossOutput(loss, metrics, logprobs).
    """
    config = check_config(config)
    check_tensor("logits", logits, 3, FLOAT_DTYPES)
    b, t = logits.shape[:2]
    check_loss_inputs(b, t, completion_ids, advantages, old_logprobs, ref_logprobs, importance_ratio, "logits")
    check_token_masks(b, t, policy_mask, entropy_mask)
    check_config_inputs(config, ref_logprobs, num_items_in_batch)
    active, ids = checked_ids({"logits": logits}, logits.shape[-1], "completion_ids", completion_ids,
                              "completion_mask", completion_mask, advantages=advantages, old_logprobs=old_logprobs,
                              ref_logprobs=ref_logprobs, importance_ratio=importance_ratio,
                              policy_mask=policy_mask, entropy_mask=entropy_mask)  # fmt: skip
    backend = check_backend(backend, logits.device, logits.dtype)
    if backend == "reference":
        mask = active.to(_float_for(logits))
        loss, metrics, logp = reference.grpo_loss(
            logits, ids, advantages, mask, old_logprobs, ref_logprobs, config, importance_ratio, num_items_in_batch,
            policy_mask, entropy_mask,
        )  # fmt: skip
        return LossOutput(_finish(loss, logits), metrics, logp.float())
    logp, entropy = _stats(logits, ids, active, config.temperature, True, backend, inplace_backward)
    mask = active.float()
    loss, metrics = objective.grpo_objective(
        logp,
        entropy,
        advantages.float(),
        mask,
        as_float(old_logprobs),
        as_float(ref_logprobs),
        config,
        as_float(importance_ratio),
        num_items_in_batch,
        as_float(policy_mask),
        as_float(entropy_mask),
    )
    return LossOutput(_finish(loss, logits), metrics, logp)


class GRPOLoss(nn.Module):
    """``grpo_loss`` as a module: ``GRPOLoss(config)(logits, completion_ids, advantages, ...)``."""

    def __init__(self, config: LossConfig | None = None, backend: str = "auto"):
        super().__init__()
        self.config = check_config(config)
        self.backend = backend

    def forward(
        self, logits, completion_ids, advantages, completion_mask=None, old_logprobs=None, ref_logprobs=None, **kwargs
    ) -> LossOutput:
        return grpo_loss(
            logits,
            completion_ids,
            advantages,
            completion_mask,
            old_logprobs,
            ref_logprobs,
            config=self.config,
            backend=kwargs.pop("backend", self.backend),
            **kwargs,
        )


def _stats(logits, ids, active, temperature, with_entropy, backend, inplace_backward=False):
    if backend == "reference":
        logp = reference.token_logprobs(logits, ids, temperature)
        entropy = reference.token_entropy(logits, temperature) if with_entropy else None
        logp = torch.where(active, logp, 0.0)  # a masked token may be scored at a -inf logit: not -inf * 0
        return logp.float(), None if entropy is None else torch.where(active, entropy, 0.0).float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # only a non-unit vocabulary stride forces a copy
    use_triton = backend == "triton"
    return token_stats(logits, ids, active, temperature, with_entropy, use_triton, inplace_backward)


def _finish(loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """float32 scalar; an empty batch gives 0 that is still connected to the logits (zero gradient)."""
    if logits.shape[0] * logits.shape[1] == 0:
        return (logits.sum() * 0).float()
    return loss.float()


def _float_for(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32
