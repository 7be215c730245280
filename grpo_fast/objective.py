"""The GRPO objective on (B, T) per-token quantities: every backend's loss ends here.

From the per-token log-probs of the current policy (and its entropies), the sampling policy's and the
reference model's, and the advantages: importance weights, the clipped (or cispo / sapo / vespo) surrogate, the
KL penalty, the loss-type normaliser (one table, ``aggregation_weights``) and TRL's metrics. No
vocabulary-sized work: how the log-probs are computed from logits or hidden states is the business of
``reference`` (plain PyTorch, the float64 spec), ``loss`` and ``linear`` (the fused paths).

Formulas: DeepSeekMath (arXiv 2402.03300, eq. 3-4) and TRL's ``GRPOTrainer._compute_loss`` for the
loss-type normalisations, so that for the same inputs the loss is TRL's to rounding.
"""

from __future__ import annotations

import math

import torch

from .config import PPO_CLIP_LOSS_TYPES, LossConfig


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman's estimators).

    k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) - (ref - logp) - 1 (DeepSeekMath eq. 4,
    unbiased and >= 0); low_var_kl = k3 with ref - logp clamped to [-20, 20] and the result to [-10, 10]
    (verl's ``low_var_kl``).
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if estimator == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1
    if estimator == "low_var_kl":
        d = torch.clamp(ref_logp - logp, -20.0, 20.0)
        return torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0)
    raise ValueError(f"kl_estimator must be one of k1, k2, k3, low_var_kl, got {estimator!r}")


def log_importance_weights(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str, clamp: float
) -> torch.Tensor:
    """log(pi_theta / pi_old): per token (B, T), or per sequence (B, 1) as the masked mean (GSPO).

    Clamped to [-clamp, clamp] before it is exponentiated (verl clamps at 20) so a stale ratio
    never overflows.
    """
    log_ratio = logp - old_logp
    if level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return torch.clamp(log_ratio, -clamp, clamp)


def policy_loss(coef_1: torch.Tensor, advantages: torch.Tensor, logp: torch.Tensor, config: LossConfig):
    """Per-token policy loss before masking, and coef_1 as TRL uses it for the clip metrics.

    PPO-clip family: l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), with r first capped at delta
    when delta is set (INTELLECT-2). CISPO: l = -sg(min(r, eps_high)) A logp. SAPO:
    l = -(4 / tau) sigmoid(tau (r - 1)) A with tau = tau_pos if A > 0 else tau_neg.
    """
    if config.loss_type == "cispo":
        return -torch.clamp(coef_1, max=config.eps_high).detach() * advantages * logp, coef_1
    if config.loss_type == "sapo":
        pos, neg = (advantages.new_tensor(x) for x in (config.sapo_temperature_pos, config.sapo_temperature_neg))
        tau = torch.where(advantages > 0, pos, neg)  # in the advantages' dtype (float64 stays exact)
        return -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * advantages, coef_1
    coef_2 = torch.clamp(coef_1, 1 - config.epsilon, 1 + config.eps_high)
    if config.delta is not None:
        coef_1 = torch.clamp(coef_1, max=config.delta)
    return -torch.min(coef_1 * advantages, coef_2 * advantages), coef_1


VESPO_LOG_W_MIN = math.log(1e-8)  # VESPO's floor on the sequence weight w (TRL: log(1e-8) ~ -18.42)


def vespo_weights(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
    importance_ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """VESPO's detached gamma weight phi of each sequence (arXiv 2602.10693; TRL's ``get_gamma_weights``).

    log w = clamp(sum_t m_t clamp(logp_t - old_t, -20, 20) + log rho, log 1e-8, 20), where the rollout
    correction rho (``importance_ratio``) enters as sum_t m_t clamp(log rho_t, log 1e-8, 20) for a (B, T)
    ratio, or clamp(log rho, log 1e-8, 20) for a (B, 1) one: VESPO folds it into w instead of multiplying
    the loss by it. phi = exp(lambda + k log w - lambda w), so phi(1) = 1, with (k, lambda) = (k_pos,
    lambda_pos) where A >= 0, else (k_neg, lambda_neg); NaN / inf -> 0. Shape of A broadcast over (B, 1).
    """
    with torch.no_grad():
        log_w = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)  # (B, 1)
        if importance_ratio is not None:
            log_rho = torch.clamp(torch.log(importance_ratio), VESPO_LOG_W_MIN, 20.0)
            log_w = log_w + (log_rho if log_rho.shape[-1] == 1 else (log_rho * mask).sum(-1, keepdim=True))
        log_w = torch.clamp(log_w, VESPO_LOG_W_MIN, 20.0)
        positive = advantages >= 0
        k_pos, k_neg, lam_pos, lam_neg = (
            log_w.new_tensor(x)  # in log_w's dtype: float64 stays exact
            for x in (config.vespo_k_pos, config.vespo_k_neg, config.vespo_lambda_pos, config.vespo_lambda_neg)
        )
        k = torch.where(positive, k_pos, k_neg)
        lam = torch.where(positive, lam_pos, lam_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """(B, T) 0/1 mask of the tokens whose entropy is in the top ``top_quantile`` share of the masked tokens
    (Wang et al., arXiv 2506.01939; TRL's ``get_high_entropy_mask`` on one process): H >= the (1 - q)-quantile
    of {H_t : m_t = 1} (linear interpolation, torch.quantile), within the mask; all 0 when no token counts."""
    active = mask > 0
    values = entropy[active].float()
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1.0 - top_quantile).to(entropy.dtype)
    return ((entropy * mask >= threshold) & active).to(mask.dtype)


def off_policy_mask(
    advantages: torch.Tensor, logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor, threshold: float
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL's ``get_off_policy_mask``), (B, 1) or A's (B, T) shape:
    keep a sequence if A >= 0 or its mean KL estimate sum_t m (sampling - logp) / max(sum_t m, 1) <= threshold;
    tokens the sampler did not score (NaN) count 0."""
    kl = torch.nan_to_num(sampling_logp - logp.detach(), nan=0.0)
    mean_kl = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    return ((advantages >= 0) | (mean_kl <= threshold)).to(mask.dtype)


def aggregate(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce (B, T) per-token losses to the scalar loss exactly as TRL does for each loss_type:
    ``sum(aggregation_weights(mask) * per_token_loss)``."""
    return (aggregation_weights(mask, config, num_items_in_batch) * per_token_loss).sum()


def aggregation_weights(
    mask: torch.Tensor, config: LossConfig, num_items_in_batch: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token weights w of the loss ``(w * l).sum()``: the one table of TRL's normalisers.

    grpo, sapo: mean_i [sum_t l m / max(sum_t m, 1)] / GA;  bnpo: sum l m / max(sum m, 1) / GA;
    dr_grpo: sum l m / (B * max_completion_length) / GA;  luspo: mean_i [sum_t l m] / GA;
    dapo, cispo, vespo: sum l m / (max(num_items_in_batch, 1) / world_size * GA / steps_per_generation),
    where num_items_in_batch (default: this batch's mask sum) counts the whole generation batch.
    The weights depend on the mask only, so a fused kernel can apply them token by token.
    """
    ga = config.gradient_accumulation_steps
    b = mask.size(0)
    if config.loss_type in ("grpo", "sapo"):
        return mask / mask.sum(-1, keepdim=True).clamp(min=1.0) / (b * ga)
    if config.loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0) / ga
    if config.loss_type == "dr_grpo":
        return mask / (b * config.max_completion_length * ga)
    if config.loss_type == "luspo":
        return mask / (b * ga)
    return mask / dapo_normalizer(mask, config, num_items_in_batch)


def dapo_normalizer(mask: torch.Tensor, config: LossConfig, num_items_in_batch=None) -> torch.Tensor:
    """TRL's dapo/cispo/vespo divisor: num_items_in_batch / world_size * GA / steps_per_generation."""
    n = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype)
    steps = config.steps_per_generation or config.gradient_accumulation_steps
    return n.clamp(min=1.0) / config.world_size * config.gradient_accumulation_steps / steps


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the tokens that count; a (B, 1) x (sequence level) is one value per sequence."""
    if x.shape[-1] == 1 and mask.shape[-1] != 1:
        return x.sum() / max(x.shape[0], 1)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_objective(
    logp: torch.Tensor,
    entropy: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    config: LossConfig | None = None,
    importance_ratio: torch.Tensor | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    policy_mask: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss from per-token log-probs (the (B, T) part; no vocabulary-sized work).

    l_t = s_t * rho_t * policy_loss_t + beta * KL_t (KL_t *= r_t with bias correction), aggregated per
    ``config.loss_type``, minus ``entropy_coef`` times the mean entropy over mask * e / GA, with
    s = ``policy_mask`` and e = ``entropy_mask`` (1 when None). For vespo rho is not a factor of the loss:
    it is folded into the sequence weight w (``vespo_weights``), as TRL does.

    Args:
        logp: (B, T) log-probs of the current policy (differentiable).
        entropy: (B, T) per-token entropies (differentiable) or None (then no entropy metric/bonus).
        advantages: (B,) or (B, T).
        mask: (B, T) completion mask in logp's dtype.
        old_logp: (B, T) log-probs of the sampling policy; None = on-policy (old = logp.detach()).
        ref_logp: (B, T) reference-model log-probs; needed when beta > 0.
        importance_ratio: (B, T) or (B, 1) rollout correction rho (see ``rollout_importance_ratio``).
        num_items_in_batch: dapo/cispo/vespo normaliser (tokens in the generation batch).
        policy_mask: (B, T) or (B, 1) detached factor of the per-token policy loss (not of the KL term, not
            of the normaliser): TRL's off-policy sequence mask times its high-entropy token mask.
        entropy_mask: (B, T) the tokens the entropy bonus averages over, within ``mask`` (TRL's high-entropy
            mask when top_entropy_quantile < 1); the ``entropy`` metric stays the mean over ``mask``.
    Returns:
        (loss, metrics): scalar loss in logp's dtype; metrics under TRL's names, detached.
    """
    config = config or LossConfig()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1)
    old_logp = logp.detach() if old_logp is None else old_logp
    log_w = log_importance_weights(logp, old_logp, mask, config.importance_sampling_level, config.log_ratio_clamp)
    coef_1 = torch.exp(log_w)  # (B, T) or (B, 1)
    metrics: dict[str, torch.Tensor] = {}
    if config.loss_type == "vespo":  # l = -sg(phi) A logp, rho inside phi
        phi = vespo_weights(logp - old_logp, advantages, mask, config, importance_ratio)
        per_token_loss, clip_coef = -phi * advantages * logp, coef_1
        metrics["vespo/phi_seq_mean"] = masked_mean(phi, mask)
    else:
        per_token_loss, clip_coef = policy_loss(coef_1, advantages, logp, config)
        if importance_ratio is not None:
            per_token_loss = per_token_loss * importance_ratio
    if policy_mask is not None:
        per_token_loss = per_token_loss * policy_mask
    if config.beta != 0.0:
        kl = kl_penalty(logp, ref_logp, config.kl_estimator)
        if config.use_bias_correction_kl:
            kl = kl * coef_1
        per_token_loss = per_token_loss + config.beta * kl
        metrics["kl"] = masked_mean(kl, mask)
    loss = aggregate(per_token_loss, mask, config, num_items_in_batch)
    if entropy is not None:
        mean_entropy = masked_mean(entropy, mask)
        if config.entropy_coef != 0.0:
            bonus = mean_entropy if entropy_mask is None else masked_mean(entropy, mask * entropy_mask)
            loss = loss - config.entropy_coef * bonus / config.gradient_accumulation_steps
        metrics["entropy"] = mean_entropy
    if config.loss_type in PPO_CLIP_LOSS_TYPES:
        metrics.update(clip_metrics(clip_coef, advantages, mask, config))
    elif config.loss_type == "cispo":  # TRL's name: share of A > 0 tokens whose ratio hit the cap
        metrics["cispo_clip_ratio"] = masked_mean(((coef_1 > config.eps_high) & (advantages > 0)).to(mask.dtype), mask)
    return loss, {k: v.detach().float() for k, v in metrics.items()}


def clip_metrics(coef_1: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, config: LossConfig):
    """TRL's clip fractions: low = r < 1 - eps_low with A < 0; high = r > 1 + eps_high with A > 0."""
    low = ((coef_1 < 1 - config.epsilon) & (advantages < 0)).to(mask.dtype)
    high = ((coef_1 > 1 + config.eps_high) & (advantages > 0)).to(mask.dtype)
    region = torch.maximum(low, high)
    return {
        "clip_ratio/low_mean": masked_mean(low, mask),
        "clip_ratio/high_mean": masked_mean(high, mask),
        "clip_ratio/region_mean": masked_mean(region, mask),
    }
