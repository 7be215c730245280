"""GRPOConfig: the trainer's hyper-parameters (TRL's names), checked when given."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import LossConfig
from . import configio, tracking
from .distributed import PARALLELISM
from .rewards import ON_ERROR
from .schedule import LR_SCHEDULERS

SCALE_REWARDS = ("group", "batch", "none")


VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


ON_NONFINITE = ("raise", "skip_step")


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO training hyper-parameters (TRL ``GRPOConfig`` names). Load with ``GRPOConfig.from_yaml``."""

    # run
    output_dir: str = _f("runs/grpo", "directory for metrics.jsonl, checkpoints and plots")
    overwrite_output_dir: bool = _f(
        False, "a fresh run may replace the checkpoints of another run in output_dir (they are deleted)"
    )
    seed: int = _f(42, "seed of every random draw (model init is the caller's)")
    max_steps: int = _f(500, "number of generation batches (each = num_iterations optimizer steps)")
    logging_steps: int = _f(1, "log metrics every this many steps")
    save_steps: int = _f(0, "save a checkpoint every this many steps; 0 = only at the end")
    eval_steps: int = _f(0, "greedy evaluation on eval_dataset every this many steps; 0 = only at the end")
    report_to: tuple[str, ...] = _f(
        ("none",), "experiment trackers: tensorboard, wandb, trackio, mlflow (a list), all (the installed ones), none"
    )
    run_name: str | None = _f(None, "the tracked run's name; None = output_dir's last component")
    logging_dir: str | None = _f(None, "tracker files (TensorBoard events, wandb/, mlflow.db); None = output_dir/runs")
    log_completions_steps: int = _f(
        0, "log a table of the step's completions and rewards to the trackers every this many steps; 0 = never"
    )
    # optimisation
    learning_rate: float = _f(1e-6, "AdamW peak learning rate. DeepSeekMath 1e-6, DeepSeek-R1 3e-6")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.99, "AdamW beta2 (0.99 as DeepSeek-R1 / TRL GRPO examples)")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping by global norm; 0 = off")
    lr_scheduler_type: str = _f("constant", f"one of {LR_SCHEDULERS}, after the warm-up")
    warmup_ratio: float = _f(0.0, "linear warm-up as a fraction of all optimizer steps (warmup_steps wins if > 0)")
    warmup_steps: int = _f(0, "linear warm-up optimizer steps")
    per_device_train_batch_size: int = _f(8, "completions per micro-batch and process (TRL meaning)")
    gradient_accumulation_steps: int = _f(
        1,
        "micro-batches per optimizer step; one generation batch = "
        "per_device_train_batch_size * gradient_accumulation_steps completions per process",
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    bf16: bool | None = _f(None, "bf16 autocast; None = on when a CUDA device supports it. CUDA only")
    share_prompt_prefix: bool = _f(
        True,
        "run each prompt once per group in the update's forward passes, not once per completion "
        "(grpo_fast.trainer.shared_prefix; Llama-family models, one process)",
    )
    # generation
    num_generations: int = _f(8, "G, completions per prompt. DeepSeekMath 64, DeepSeek-R1 16, TRL 8")
    max_prompt_length: int | None = _f(512, "prompts keep their last this many tokens; None = no limit")
    max_completion_length: int = _f(256, "length budget of a completion in tokens")
    temperature: float = _f(1.0, "sampling temperature; the loss uses log-probs of the same tempered softmax")
    top_p: float = _f(1.0, "nucleus sampling mass")
    top_k: int = _f(0, "top-k sampling; 0 = off")
    decode_graphs: str = _f(
        "auto", "rollout steps as one fixed-shape step: on (CUDA graph; CPU: compiled), off (eager), auto (on on CUDA)"
    )
    # GRPO objective
    beta: float = _f(0.0, "KL coefficient (k3 estimator, in the loss). DeepSeekMath 0.04, R1 0.001, DAPO 0")
    epsilon: float = _f(0.2, "lower clip range of the ratio. PPO/DeepSeekMath 0.2")
    epsilon_high: float | None = _f(None, "upper clip range; None = epsilon. DAPO clip-higher 0.28")
    delta: float | None = _f(None, "two-sided clip: cap on the unclipped ratio (INTELLECT-2), > 1 + epsilon_high")
    loss_type: str = _f(
        "dapo", "aggregation: grpo | bnpo | dr_grpo | dapo | luspo | cispo | sapo | vespo (TRL default dapo)"
    )
    importance_sampling_level: str = _f("token", "token (GRPO) or sequence (GSPO, arXiv 2507.18071)")
    num_iterations: int = _f(1, "mu, optimizer passes over each generation batch. DeepSeekMath 1")
    scale_rewards: str = _f("group", "group (divide by group std), batch, or none (Dr. GRPO, arXiv 2503.20783)")
    mask_truncated_completions: bool = _f(False, "drop completions without EOS from the loss (DAPO overlong filter)")
    reward_weights: tuple[float, ...] | None = _f(None, "one weight per reward function; None = all 1")
    reward_timeout: float | None = _f(None, "seconds a reward function call may take (then an error); None = none")
    on_reward_error: str = _f("raise", "reward function raised/hung/returned NaN: raise (stop) or skip (log it)")
    on_nonfinite: str = _f(
        "raise", f"NaN/inf loss or gradient norm: the update is not applied; {ON_NONFINITE}: stop, or drop the update"
    )
    sync_ref_model: bool = _f(False, "mix the policy into the reference model (TR-DPO, arXiv 2404.09656)")
    ref_model_sync_steps: int = _f(512, "optimizer steps between reference syncs. R1 replaces it every 400")
    ref_model_mixup_alpha: float = _f(0.6, "ref <- alpha * policy + (1 - alpha) * ref at a sync. TR-DPO 0.6")
    dynamic_sampling: bool = _f(False, "DAPO: drop groups whose rewards are all equal and sample more prompts")
    max_dynamic_sampling_tries: int = _f(3, "generation rounds per step before training on what was kept")
    eval_max_new_tokens: int | None = _f(None, "length budget of evaluation; None = max_completion_length")
    # TRL 1.16's loss options (TRL's names and defaults; fields of grpo_fast.LossConfig unless noted)
    use_bias_correction_kl: bool = _f(False, "multiply the KL term by the importance ratio (DeepSeek-V3.2)")
    sapo_temperature_pos: float = _f(1.0, "sapo: gate temperature for tokens with A > 0")
    sapo_temperature_neg: float = _f(1.05, "sapo: gate temperature for tokens with A <= 0")
    vespo_k_pos: float = _f(2.0, "vespo: power k of the gamma weight for A >= 0")
    vespo_lambda_pos: float = _f(3.0, "vespo: decay lambda of the gamma weight for A >= 0")
    vespo_k_neg: float = _f(3.0, "vespo: power k of the gamma weight for A < 0")
    vespo_lambda_neg: float = _f(2.0, "vespo: decay lambda of the gamma weight for A < 0")
    entropy_coef: float = _f(0.0, "entropy bonus: loss -= entropy_coef * mean entropy / GA; logs entropy_coef")
    top_entropy_quantile: float = _f(
        1.0,
        "train only on the tokens whose entropy is in this top share of each update pass (arXiv 2506.01939); "
        "1 = all; the entropy bonus then averages over them too",
    )
    off_policy_mask_threshold: float | None = _f(
        None,
        "drop sequences with A < 0 whose mean KL(sampler || policy) exceeds this (DeepSeek-V3.2); None = off; "
        "logs off_policy_mask/kept_fraction",
    )
    cast_lm_head_to_fp32: bool = _f(False, "compute the LM head (the loss's GEMMs) in float32 under bf16 autocast")
    # several processes (torchrun; grpo_fast.trainer.distributed)
    parallelism: str = _f("ddp", "with WORLD_SIZE > 1 (torchrun): ddp, or fsdp2 (parameters sharded)")
    # rollout engine (grpo_fast.trainer.engines); TRL names
    use_vllm: bool = _f(False, "sample with a colocated vLLM engine (the vllm extra; CUDA only)")
    vllm_gpu_memory_utilization: float = _f(0.3, "share of the GPU memory the colocated vLLM engine may take")
    vllm_max_model_length: int | None = _f(None, "vLLM context length; None = vLLM's default for the model")
    vllm_importance_sampling_correction: bool = _f(
        True, "correct the sampler/policy mismatch with the rollout IS ratio (when the engine returns log-probs)"
    )
    vllm_importance_sampling_mode: str = _f("sequence_mask", f"one of {VLLM_IS_MODES} (TRL default sequence_mask)")
    vllm_importance_sampling_clip_max: float | None = _f(
        3.0, "C_max: *_truncate clamps the ratio to it, *_mask zeroes ratios above it; None = no upper bound"
    )
    vllm_importance_sampling_clip_min: float | None = _f(
        None, "C_min: *_truncate clamps the ratio to it, *_mask zeroes ratios below it; None = no lower bound"
    )
    vllm_importance_sampling_cap: float | None = _f(None, "deprecated TRL name of vllm_importance_sampling_clip_max")

    def __post_init__(self):
        object.__setattr__(self, "report_to", tracking.check_report_to(self.report_to))  # a name -> (name,)
        configio.check_field_types(self)  # types, and no NaN/inf in any float field
        for name in ("output_dir", "logging_dir"):  # ~ and $VAR, as a shell would
            if getattr(self, name):
                object.__setattr__(self, name, configio.expand_path(getattr(self, name), name))
        for name in (
            "max_steps",
            "logging_steps",
            "max_completion_length",
            "num_iterations",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "ref_model_sync_steps",
            "max_dynamic_sampling_tries",
        ):
            _check(getattr(self, name) >= 1, name, "an int >= 1", getattr(self, name))
        for name in ("save_steps", "eval_steps", "warmup_steps", "top_k", "log_completions_steps"):
            _check(getattr(self, name) >= 0, name, "an int >= 0", getattr(self, name))
        for name in ("max_prompt_length", "eval_max_new_tokens", "vllm_max_model_length"):
            _check(getattr(self, name) is None or getattr(self, name) >= 1, name, "None or an int >= 1",
                   getattr(self, name))  # fmt: skip
        _check(self.num_generations >= 2, "num_generations",
               "an int >= 2 (advantages compare the G completions of a prompt: with 1 every advantage is 0)",
               self.num_generations)  # fmt: skip
        _check(bool(self.output_dir), "output_dir", "a directory path", self.output_dir)
        _check(self.learning_rate > 0, "learning_rate", "> 0", self.learning_rate)
        for name in ("weight_decay", "adam_epsilon"):
            _check(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, name, "in [0, 1)", getattr(self, name))
        _check(self.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 = no clipping)", self.max_grad_norm)
        _check(self.on_nonfinite in ON_NONFINITE, "on_nonfinite", f"one of {ON_NONFINITE}", self.on_nonfinite)
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", "in [0, 1)", self.warmup_ratio)
        _check(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(self.decode_graphs in ("auto", "on", "off"), "decode_graphs", "one of auto, on, off", self.decode_graphs)
        _check(self.temperature > 0, "temperature", "> 0 (the loss divides by it)", self.temperature)
        _check(0 < self.top_entropy_quantile <= 1, "top_entropy_quantile", "in (0, 1]", self.top_entropy_quantile)
        _check(0 <= self.ref_model_mixup_alpha <= 1, "ref_model_mixup_alpha", "in [0, 1]", self.ref_model_mixup_alpha)
        _check(
            self.lr_scheduler_type in LR_SCHEDULERS,
            "lr_scheduler_type",
            f"one of {LR_SCHEDULERS}",
            self.lr_scheduler_type,
        )
        _check(self.scale_rewards in SCALE_REWARDS, "scale_rewards", f"one of {SCALE_REWARDS}", self.scale_rewards)
        _check(self.reward_timeout is None or 0 < self.reward_timeout < math.inf, "reward_timeout", "None or > 0",
               self.reward_timeout)  # fmt: skip
        _check(self.on_reward_error in ON_ERROR, "on_reward_error", f"one of {ON_ERROR}", self.on_reward_error)
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        _check(
            batch % self.num_generations == 0,
            "per_device_train_batch_size * gradient_accumulation_steps",
            f"a multiple of num_generations={self.num_generations}",
            batch,
        )
        self.loss_config()  # validates the objective's fields (loss_type, epsilon, delta, beta, ...)
        _check(self.parallelism in PARALLELISM, "parallelism", f"one of {PARALLELISM}", self.parallelism)
        _check(0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization", "in (0, 1]",
               self.vllm_gpu_memory_utilization)  # fmt: skip
        if self.vllm_importance_sampling_cap is not None:  # TRL: the deprecated name overrides clip_max
            object.__setattr__(self, "vllm_importance_sampling_clip_max", self.vllm_importance_sampling_cap)
        mode, lo, hi = (self.vllm_importance_sampling_mode, self.vllm_importance_sampling_clip_min,
                        self.vllm_importance_sampling_clip_max)  # fmt: skip
        _check(mode in VLLM_IS_MODES, "vllm_importance_sampling_mode", f"one of {VLLM_IS_MODES}", mode)
        _check(lo is None or lo >= 0, "vllm_importance_sampling_clip_min", "None or >= 0", lo)
        _check(hi is None or hi > 0, "vllm_importance_sampling_clip_max", "None or > 0", hi)
        _check(lo is None or hi is None or lo < hi, "vllm_importance_sampling_clip_min",
               f"< vllm_importance_sampling_clip_max = {hi}", lo)  # fmt: skip
        _check(not mode.endswith("truncate") or lo is not None or hi is not None,
               "vllm_importance_sampling_clip_min or _clip_max", f"set for mode {mode!r}", None)  # fmt: skip

    @property
    def generation_batch_size(self) -> int:
        """Completions per step: per_device_train_batch_size * gradient_accumulation_steps."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def prompts_per_step(self) -> int:
        return self.generation_batch_size // self.num_generations

    def loss_config(self) -> LossConfig:
        return LossConfig(
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
            delta=self.delta,
            beta=self.beta,
            temperature=self.temperature,
            max_completion_length=self.max_completion_length,
            use_bias_correction_kl=self.use_bias_correction_kl,
            sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg,
            vespo_k_pos=self.vespo_k_pos,
            vespo_lambda_pos=self.vespo_lambda_pos,
            vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg,
            entropy_coef=self.entropy_coef,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            steps_per_generation=self.gradient_accumulation_steps,  # one generation batch per optimizer step
        )

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> GRPOConfig:
        """From a mapping; unknown keys raise ValueError with the closest field name."""
        return configio.from_dict(cls, data, source)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> GRPOConfig:
        """From a YAML file (yaml.safe_load), with ``overrides`` applied on top."""
        return cls.from_dict({**configio.read_yaml(path), **overrides}, source=str(path))

    def to_dict(self) -> dict:
        return configio.to_dict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def replace(self, **changes) -> GRPOConfig:
        return dataclasses.replace(self, **changes)


def _check(ok: bool, name: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {got!r}")
