"""Loss configuration: one frozen dataclass, field names as in TRL's ``GRPOConfig``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
PPO_CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# loss types whose normaliser divides by the number of sequences B (reference.aggregation_weights)
PER_SEQUENCE_NORMALISED = ("grpo", "sapo", "dr_grpo", "luspo")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class LossConfig:
    """Every knob of the GRPO objective. Defaults are TRL 1.16's ``GRPOConfig``: loss_type "dapo", beta 0.0,
    epsilon 0.2, epsilon_high None (= epsilon). DeepSeekMath's GRPO (arXiv 2402.03300) is
    ``LossConfig(loss_type="grpo", beta=0.04)``, the defaults until 0.1.0 (see CHANGELOG.md).

    Attributes:
        loss_type: aggregation / policy-loss family, one of ``LOSS_TYPES`` (TRL ``loss_type``).
            "grpo" = mean over sequences of the per-sequence token mean (DeepSeekMath eq. 3);
            "dapo" = token mean over the generation batch (DAPO, arXiv 2503.14476);
            "dr_grpo" = sum / (B * max_completion_length) (Dr. GRPO, arXiv 2503.20783);
            "bnpo" = token mean over the micro-batch; "luspo" = mean of per-sequence sums;
            "cispo" = MiniMax-M1's clipped-IS REINFORCE; "sapo" = soft-gated ratio;
            "vespo" = REINFORCE weighted by a gamma function of the sequence-level ratio (VESPO,
            arXiv 2602.10693), normalised like "dapo".
        importance_sampling_level: "token" (PPO/GRPO) or "sequence" (GSPO, arXiv 2507.18071).
        epsilon: lower clip range, ratio >= 1 - epsilon. DeepSeekMath: 0.2.
        epsilon_high: upper clip range, ratio <= 1 + epsilon_high; None = epsilon. DAPO: 0.28.
            For "cispo" it is the cap on the ratio itself (MiniMax-M1 recommends ~5.0).
        delta: optional upper bound on the unclipped ratio (INTELLECT-2 two-sided clip), > 1 + epsilon_high.
        beta: weight of the KL penalty to the reference policy; 0 (TRL) needs no reference log-probs.
            DeepSeekMath 0.04, DeepSeek-R1 0.001.
        kl_estimator: "k3" (DeepSeekMath, unbiased, >= 0), "k1", "k2" or "low_var_kl" (verl's clamped k3).
        temperature: sampling temperature; log-probs are taken of softmax(logits / temperature).
        max_completion_length: the constant normaliser of "dr_grpo" (required for it).
        use_bias_correction_kl: multiply the KL term by the importance ratio (DeepSeek-V3.2).
        sapo_temperature_pos / sapo_temperature_neg: SAPO gate temperatures for A > 0 / A <= 0.
        vespo_k_pos / vespo_lambda_pos: VESPO's gamma weight phi(w) = exp(lambda + k log w - lambda w)
            for sequences with A >= 0 (k >= 0: power, lambda > 0: decay); TRL's defaults 2.0 / 3.0.
        vespo_k_neg / vespo_lambda_neg: the same for A < 0; TRL's defaults 3.0 / 2.0.
        entropy_coef: entropy bonus, loss -= entropy_coef * (masked mean entropy) / GA.
        gradient_accumulation_steps: TRL's GA divisor of every loss type.
        steps_per_generation: TRL's ``steps_per_generation`` (None = gradient_accumulation_steps); only
            the dapo/cispo/vespo normaliser uses it.
        world_size: number of processes sharing ``num_items_in_batch`` (dapo/cispo/vespo normaliser).
        log_ratio_clamp: |logp - old| is clamped to this before exp() so a stale ratio can never
            overflow to inf/NaN (verl clamps at 20). 20 nats is far beyond any clip range, so results
            equal TRL's wherever TRL's are finite.
    """

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    temperature: float = 1.0
    max_completion_length: int | None = None
    use_bias_correction_kl: bool = False
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    entropy_coef: float = 0.0
    gradient_accumulation_steps: int = 1
    steps_per_generation: int | None = None
    world_size: int = 1
    log_ratio_clamp: float = 20.0

    def __post_init__(self) -> None:
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_number("epsilon", self.epsilon, minimum=0.0)
        _check_number("beta", self.beta, minimum=0.0)
        _check_number("temperature", self.temperature, minimum=0.0, strict=True)
        _check_number("sapo_temperature_pos", self.sapo_temperature_pos, minimum=0.0, strict=True)
        _check_number("sapo_temperature_neg", self.sapo_temperature_neg, minimum=0.0, strict=True)
        for side in ("pos", "neg"):
            _check_number(f"vespo_k_{side}", getattr(self, f"vespo_k_{side}"), minimum=0.0)
            _check_number(f"vespo_lambda_{side}", getattr(self, f"vespo_lambda_{side}"), minimum=0.0, strict=True)
        _check_number("entropy_coef", self.entropy_coef)
        _check_number("log_ratio_clamp", self.log_ratio_clamp, minimum=0.0, strict=True)
        if self.epsilon_high is not None:
            _check_number("epsilon_high", self.epsilon_high, minimum=0.0)
        if self.delta is not None:
            _check_number("delta", self.delta)
            if self.delta <= 1.0 + self.eps_high:
                raise ValueError(f"delta must be > 1 + epsilon_high = {1.0 + self.eps_high}, got {self.delta}")
        for name in ("gradient_accumulation_steps", "world_size"):
            _check_int(name, getattr(self, name))
        if self.steps_per_generation is not None:
            _check_int("steps_per_generation", self.steps_per_generation)
        if self.max_completion_length is not None:
            _check_int("max_completion_length", self.max_completion_length)
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (its constant normaliser), got None")

    @property
    def eps_high(self) -> float:
        """The upper clip range actually used: epsilon_high, or epsilon when it is None."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def replace(self, **changes) -> LossConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_number(name: str, value, minimum: float | None = None, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be {relation} {minimum}, got {value}")


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
