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

from . import debug, reference
from .config import LossConfig
from .ops.token_stats import token_stats
from .validation import (
    FLOAT_DTYPES,
    check_backend,
    check_float,
    check_ids,
    check_same_device,
    check_shape,
    check_tensor,
    data_checks_enabled,
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
    active = active_mask(mask, ids.shape, "mask", ids.device)
    check_same_device(logits=logits, ids=ids, mask=mask)
    check_ids("ids", ids, logits.shape[-1], mask)
    backend = check_backend(backend, logits.device, logits.dtype)
    ids = usable_ids(ids, active, mask)
    debug.check_inputs(active, ids, logits=logits)
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
        config: LossConfig (default: DeepSeekMath GRPO).
        importance_ratio: (B, T) or (B, 1) rollout correction rho, e.g. ``rollout_importance_ratio``.
        num_items_in_batch: dapo/cispo normaliser, tokens in the whole generation batch.
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
    active = active_mask(completion_mask, (b, t), "completion_mask", completion_ids.device)
    check_same_device(
        logits=logits,
        completion_ids=completion_ids,
        advantages=advantages,
        completion_mask=completion_mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        importance_ratio=importance_ratio,
    )
    check_ids("completion_ids", completion_ids, logits.shape[-1], completion_mask)
    check_config_inputs(config, ref_logprobs, num_items_in_batch)
    backend = check_backend(backend, logits.device, logits.dtype)
    ids = usable_ids(completion_ids, active, completion_mask)
    debug.check_inputs(active, ids, logits=logits, advantages=advantages, old_logprobs=old_logprobs,
                       ref_logprobs=ref_logprobs, importance_ratio=importance_ratio)  # fmt: skip
    if backend == "reference":
        mask = active.to(_float_for(logits))
        loss, metrics, logp = reference.grpo_loss(
            logits, ids, advantages, mask, old_logprobs, ref_logprobs, config, importance_ratio, num_items_in_batch
        )
        return LossOutput(_finish(loss, logits), metrics, logp.float())
    logp, entropy = _stats(logits, ids, active, config.temperature, True, backend, inplace_backward)
    mask = active.float()
    loss, metrics = reference.grpo_objective(
        logp,
        entropy,
        advantages.float(),
        mask,
        _maybe_float(old_logprobs),
        _maybe_float(ref_logprobs),
        config,
        _maybe_float(importance_ratio),
        num_items_in_batch,
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


def _maybe_float(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.float()


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


def check_config_inputs(config: LossConfig, ref_logprobs, num_items_in_batch) -> None:
    if config.beta != 0.0 and ref_logprobs is None:
        raise ValueError(f"config.beta = {config.beta} > 0 needs ref_logprobs (B, T), got None")
    if num_items_in_batch is not None and data_checks_enabled():
        n = float(num_items_in_batch)
        if not n >= 0:
            raise ValueError(f"num_items_in_batch must be >= 0, got {n}")
