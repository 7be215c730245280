"""The executable specification of GRPO: plain PyTorch, any dtype (float64 in tests).

Every fast path in grpo_fast is tested against these functions. The (B, T) part of the loss,
``grpo_objective``, lives in ``grpo_fast.objective`` and is shared with the fast paths (re-exported
here, so the spec reads in one namespace): they differ only in how the per-token log-probabilities and
entropies are computed from the vocabulary-sized logits.

Shapes: B sequences (prompts x G), T completion tokens, V vocabulary. ``logits[:, t]`` scores
``completion_ids[:, t]`` (already shifted). ``mask`` is the completion mask, 1 for tokens that count.
Formulas follow DeepSeekMath (arXiv 2402.03300, eq. 3-4) and TRL's ``GRPOTrainer._compute_loss``
for the loss-type normalisations, so that for the same inputs the loss is TRL's to rounding.
"""

from __future__ import annotations

import torch

from .config import LossConfig
from .objective import (  # the (B, T) part of the spec, shared with the fast paths
    aggregate,
    aggregation_weights,
    clip_metrics,
    dapo_normalizer,
    grpo_objective,
    kl_penalty,
    log_importance_weights,
    masked_mean,
    policy_loss,
)

__all__ = [  # the spec in one namespace: the objective's functions and those from logits below
    "aggregate",
    "aggregation_weights",
    "clip_metrics",
    "dapo_normalizer",
    "grpo_objective",
    "kl_penalty",
    "log_importance_weights",
    "masked_mean",
    "policy_loss",
    "group_advantages",
    "grpo_loss",
    "rollout_importance_ratio",
    "token_entropy",
    "token_logprobs",
]


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (for the spec in tests); every other dtype is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[ids] per token.

    Args:
        logits: (..., V) scores; ``logits[..., t, :]`` scores ``ids[..., t]``.
        ids: (...) int64 token ids in [0, V).
        temperature: > 0; the log-probs of the *sampling* distribution (TRL #4159).
    Returns:
        (...) log-probabilities in float32 (float64 for float64 logits).
    """
    z = logits.to(_work_dtype(logits)) / temperature  # (..., V)
    return torch.log_softmax(z, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Shannon entropy H = -sum_v p_v log p_v of softmax(logits / temperature), per row, in nats."""
    z = logits.to(_work_dtype(logits)) / temperature  # (..., V)
    logp = torch.log_softmax(z, dim=-1)
    # p * logp is 0 * -inf = NaN where a logit is -inf; such entries contribute 0 to the entropy. The
    # where() goes on the factor, not the product, so the gradient is not 0 * inf = NaN there either.
    finite_logp = torch.where(logp.isneginf(), torch.zeros_like(logp), logp)
    return -(logp.exp() * finite_logp).sum(-1)


def grpo_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    config: LossConfig | None = None,
    importance_ratio: torch.Tensor | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    policy_mask: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
):
    """GRPO loss from logits by plain autograd: log_softmax -> gather -> ``grpo_objective``.

    Args:
        logits: (B, T, V). completion_ids: (B, T). advantages: (B,) or (B, T).
        completion_mask: (B, T), None = all ones. Others as in ``grpo_objective``.
    Returns:
        (loss, metrics, logprobs): logprobs (B, T), zero where the mask is 0.
    """
    config = config or LossConfig()
    logp = token_logprobs(logits, completion_ids, config.temperature)
    entropy = token_entropy(logits, config.temperature)
    mask = torch.ones_like(logp) if completion_mask is None else completion_mask.to(logp.dtype)
    logp = torch.where(mask > 0, logp, 0.0)  # masked tokens have no log-prob: 0 (not -inf * 0 = NaN)
    cast = {"dtype": logp.dtype}
    loss, metrics = grpo_objective(
        logp,
        entropy,
        advantages.to(**cast),
        mask,
        None if old_logprobs is None else old_logprobs.to(**cast),
        None if ref_logprobs is None else ref_logprobs.to(**cast),
        config,
        None if importance_ratio is None else importance_ratio.to(**cast),
        num_items_in_batch,
        None if policy_mask is None else policy_mask.to(**cast),
        None if entropy_mask is None else entropy_mask.to(**cast),
    )
    return loss, metrics, logp


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", estimator: str = "grpo", eps: float = 1e-4
) -> torch.Tensor:
    """Advantages from rewards laid out group by group: rewards[g * G : (g + 1) * G] share a prompt.

    grpo: A_i = r_i - mean(group); rloo: A_i = r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean).
    scale "group": divide by the group's Bessel std + eps (DeepSeekMath; TRL eps 1e-4); "batch": by the
    batch std + eps; "none": no division (Dr. GRPO). A group of one gets A = 0.
    """
    g = group_size
    r = rewards.to(_work_dtype(rewards)).view(-1, g)  # (num_groups, G)
    centered = r - r.mean(dim=1, keepdim=True)
    if g == 1:
        return torch.zeros_like(r).view(-1)
    if estimator == "rloo":
        centered = centered * (g / (g - 1))
    if scale == "group":
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype)
        centered = centered / (std + eps)
    return centered.reshape(-1)


def rollout_importance_ratio(
    old_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    level: str = "token",
    mode: str = "truncate",
    min_ratio: float = 0.0,
    max_ratio: float = 3.0,
) -> torch.Tensor:
    """Correction rho = pi_old / pi_sampler for rollouts from an inference engine (vLLM, TIS).

    token: rho_t = exp(old_t - sampling_t), (B, T); sequence: exp(sum_t m (old - sampling)), (B, 1).
    mode "truncate" clamps rho to [min_ratio, max_ratio]; "mask" sets rho to 0 outside that range.
    The per-token loss is multiplied by rho (before beta * KL is added), detached.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    if mode not in ("truncate", "mask"):
        raise ValueError(f"mode must be 'truncate' or 'mask', got {mode!r}")
    log_rho = (old_logprobs - sampling_logprobs) * mask
    if level == "sequence":
        log_rho = log_rho.sum(-1, keepdim=True)
    rho = torch.exp(torch.clamp(log_rho, max=20.0)).detach()
    if mode == "truncate":
        return rho.clamp(min_ratio, max_ratio)
    inside = (rho >= min_ratio) & (rho <= max_ratio)
    return torch.where(inside, rho, torch.zeros_like(rho))
