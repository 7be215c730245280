"""A minimal GRPO trainer for Hugging Face causal LMs (DeepSeekMath, arXiv 2402.03300, Algorithm 1).

    trainer = GRPOTrainer(model, [accuracy_reward], GRPOConfig(...), train_dataset, tokenizer=tokenizer)
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

One ``step()`` is one generation batch: sample G completions per prompt, score them, turn the rewards
into group-relative advantages, then ``num_iterations`` optimizer steps on that batch with the clipped
surrogate loss. The loss is ``grpo_fast.linear_grpo_loss`` on the backbone's hidden states and the
LM-head weight, so the (B, T, V) logits are never materialised for the loss; old-policy and reference
log-probs are forward-only (``linear_token_logprobs``) and computed only when they can differ from the
current policy (num_iterations > 1) or are used (beta > 0).

Field names follow TRL's GRPOConfig. A "step" here is one generation batch (``num_iterations``
optimizer steps); with the default num_iterations = 1 that is TRL's global step.

Determinism: the G completions of a prompt are drawn from a generator seeded with (seed, step, the
prompt's position in the training stream), the other random draws of step s from (seed, s), and the data
order is a fixed function of (seed, epoch). So a run resumed from a checkpoint reproduces the
uninterrupted run bit for bit on CPU, and N processes sample exactly what one process samples.

Beyond one process and full fine-tuning:
- torchrun (``grpo_fast.distributed``): prompts sharded across ranks (groups never split), DDP or FSDP2,
  global normalisers, so N processes make the 1-process update (up to fp32 reduction order);
- ``peft_config`` (LoRA): only the adapters train; the KL reference is the same model with its adapters
  disabled; checkpoints hold the adapters;
- ``engine`` / ``use_vllm`` (``grpo_fast.engines``): another sampler; when it returns sampling
  log-probs, the loss gets TRL's rollout importance correction (``vllm_importance_sampling_*``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import shutil
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from filelock import FileLock, Timeout
from torch import nn
from tqdm.auto import tqdm

from . import configio, evaluation, tracking
from .advantages import group_advantages
from .checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import LossConfig
from .decoding import unsupported_reason
from .distributed import PARALLELISM, Dist, gathered, init_from_env, is_fsdp, no_sync, wrap_policy
from .engines import SamplingSettings, build_engine
from .evaluation import completion_id_lists, decode_completions, prompt_text
from .linear import linear_grpo_loss, linear_token_logprobs
from .modeling import backbone_and_head, completion_hidden
from .reference import rollout_importance_ratio
from .rewards import ON_ERROR, RewardFunction, get_reward_function, reward_name, score_completions
from .rollout import Rollout, encode_prompts
from .shared_prefix import SharedPrefixForward, SharedPrompts, groups_share_prompts

LR_SCHEDULERS = ("constant", "cosine", "linear")
SCALE_REWARDS = ("group", "batch", "none")
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
ON_NONFINITE = ("raise", "skip_step")
LOCK_FILE = ".lock"  # in output_dir while a run writes there
FIXED_ON_RESUME = ("seed", "num_generations", "num_iterations")  # the rest may change on resume (and is applied)


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
        "(grpo_fast.shared_prefix; Llama-family models, one process)",
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
    loss_type: str = _f("dapo", "aggregation: grpo | bnpo | dr_grpo | dapo | luspo | cispo | sapo (TRL default dapo)")
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
    # several processes (torchrun; grpo_fast.distributed)
    parallelism: str = _f("ddp", "with WORLD_SIZE > 1 (torchrun): ddp, or fsdp2 (parameters sharded)")
    # rollout engine (grpo_fast.engines); TRL names
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
            gradient_accumulation_steps=self.gradient_accumulation_steps,
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


@dataclass
class Batch:
    """One generation batch, laid out group by group (rows g*G .. g*G+G-1 answer prompt g).

    rollout: the sampled completions (B = groups * G rows).
    rewards: (B,) weighted reward; rewards_per_func: (B, F), NaN where a function returned None.
    advantages: (B,), set once the batch is final.
    keys: (groups,) int64 position of each group's prompt in the training stream (the global order of
        the groups, the same with any number of processes); None = 0, 1, 2, ...
    sampling_logprobs: (B, T) the sampler's log-probs of the completion tokens, when the engine gives them.
    """

    rollout: Rollout
    rewards: torch.Tensor
    rewards_per_func: torch.Tensor
    advantages: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    sampling_logprobs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rewards)

    def group_keys(self, group_size: int) -> torch.Tensor:
        return self.keys if self.keys is not None else torch.arange(len(self.rewards) // group_size)

    def group_std(self, group_size: int) -> torch.Tensor:
        """(groups,) Bessel-corrected reward std of each group."""
        return self.rewards.view(-1, group_size).std(1) if group_size > 1 else torch.zeros(len(self.rewards))

    def select_groups(self, groups: torch.Tensor, group_size: int) -> Batch:
        rows = (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)  # (K * G,)
        device = self.rollout.prompt_ids.device
        return Batch(
            self.rollout.select(rows.to(device)),
            self.rewards[rows],
            self.rewards_per_func[rows],
            keys=self.group_keys(group_size)[groups],
            sampling_logprobs=None if self.sampling_logprobs is None else self.sampling_logprobs[rows.to(device)],
        )

    @staticmethod
    def cat(batches: list[Batch], pad_token_id: int, group_size: int = 1) -> Batch:
        sampling, filled = None, [b for b in batches if len(b)]
        if filled and all(b.sampling_logprobs is not None for b in filled):
            batches = filled  # (empty batches carry no sampling log-probs)
            width = max(b.rollout.completion_ids.shape[1] for b in batches)
            sampling = torch.cat(
                [nn.functional.pad(b.sampling_logprobs, (0, width - b.sampling_logprobs.shape[1])) for b in batches]
            )
        return Batch(
            Rollout.cat([b.rollout for b in batches], pad_token_id),
            torch.cat([b.rewards for b in batches]),
            torch.cat([b.rewards_per_func for b in batches]),
            keys=torch.cat([b.group_keys(group_size) for b in batches]),
            sampling_logprobs=sampling,
        )


@dataclass
class TrainerState:
    """Counters saved with every checkpoint. data_cursor = prompts consumed from the shuffled stream."""

    step: int = 0
    data_cursor: int = 0
    seed: int = 0


class GRPOTrainer:
    """GRPO on a Hugging Face causal LM.

    Args:
        model: a causal LM (``AutoModelForCausalLM``-style, LM head as ``get_output_embeddings()``).
        reward_funcs: a reward function, a built-in name (see grpo_fast.rewards.REWARD_FUNCTIONS) or a
            list of them; protocol ``fn(prompts, completions, **columns) -> list[float | None]``.
        config: GRPOConfig.
        train_dataset: ``datasets.Dataset`` (or list of dicts) with a ``prompt`` column (text, or chat
            messages) and whatever columns the reward functions read.
        eval_dataset: optional held-out prompts, evaluated greedily every ``eval_steps`` and at the end.
        tokenizer: the model's tokenizer (needs pad and eos tokens); None = loaded from model.name_or_path.
        peft_config: a ``peft`` config (e.g. ``LoraConfig``): the model is wrapped with ``get_peft_model``
            and only the adapters train; with beta > 0 the reference log-probs come from the same model
            with its adapters disabled (no second copy). The LM head cannot be a LoRA target. A model
            that already is a ``PeftModel`` is used as it is.
        engine: the sampler (see grpo_fast.engines); None = ``HFEngine`` on the policy, or a colocated
            ``VLLMEngine`` when ``config.use_vllm``.
        run_files: {file name: text} written next to grpo_config.yaml, in output_dir once the run owns it
            and in every checkpoint (the CLI's run_arguments.yaml).

    Under torchrun (WORLD_SIZE > 1) the trainer joins the process group (gloo on CPU, nccl on CUDA) and
    trains data-parallel (see grpo_fast.distributed); every rank must build the same initial model.
    """

    def __init__(
        self,
        model,
        reward_funcs,
        config: GRPOConfig,
        train_dataset,
        eval_dataset=None,
        tokenizer=None,
        peft_config=None,
        engine=None,
        run_files: dict[str, str] | None = None,
    ):
        self.config = config
        self.run_files = dict(run_files or {})
        self.device = init_from_env(next(model.parameters()).device)  # joins torchrun's process group, if any
        self.dist = Dist(self.device)
        if next(model.parameters()).device != self.device:
            model = model.to(self.device)  # torchrun on CUDA: this rank's GPU
        if peft_config is not None:
            model = _apply_peft(model, peft_config)
        self.is_peft = _is_peft_model(model)
        if self.is_peft and config.sync_ref_model:
            raise ValueError("sync_ref_model needs a reference model of its own; with peft the reference is the "
                             "base model (adapters disabled), which does not move")  # fmt: skip
        self.model = model
        self.base_model = model.get_base_model() if self.is_peft else model  # transformers model (+ LoRA layers)
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(self.base_model)
        self.reward_funcs = _reward_functions(reward_funcs)
        self.reward_weights = _reward_weights(config.reward_weights, len(self.reward_funcs))
        self.train_dataset = _as_dataset(train_dataset, "train_dataset")
        self.eval_dataset = None if eval_dataset is None else _as_dataset(eval_dataset, "eval_dataset")
        self.backbone, self.head = backbone_and_head(self.base_model)
        _check_tokenizer(self.tokenizer, self.base_model)
        self.use_bf16 = _use_bf16(config.bf16, self.device)
        # dapo/cispo divide by num_items_in_batch / world_size: see _optimizer_step for the other types
        self.loss_config = config.loss_config().replace(world_size=self.dist.world_size)
        self.ref_model = _frozen_copy(model) if config.beta > 0 and not self.is_peft else None
        if config.gradient_checkpointing:
            _enable_checkpointing(self.base_model)
        # what the update's forward passes go through: DDP / FSDP2 with several processes
        self._policy = wrap_policy(model, self.backbone, self.dist, config.parallelism)
        self._prefix = self._shared_prefix_forward(self.base_model)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            fused=_fused_adamw(model),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config))
        self.state = TrainerState(seed=config.seed)
        self.engine = engine if engine is not None else build_engine(config, model)
        self._correction_stats = None  # this step's rollout-correction statistics (for the metrics)
        self.sampled: Batch | None = None  # what the last step sampled (completions_table)
        self.run_dir = Path(config.output_dir)
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation of the train rows)
        # what a Ctrl-C may save: the state at the start of an unfinished step, whether its update was applied
        self._step_start: TrainerState | None = None
        self._weights_changed = False
        self._saved_step: int | None = None

    # ----------------------------------------------------------------- the GRPO step
    def step(self) -> dict[str, float]:
        """One GRPO iteration: sample G completions per prompt, reward, advantages, update the policy."""
        cfg, start = self.config, time.perf_counter()
        self._step_start, self._weights_changed = dataclasses.replace(self.state), False  # for a Ctrl-C
        self._seed_step()
        with gathered(self._policy):  # FSDP2: parameters stay gathered for sampling and forward-only passes
            self.engine.sync_weights(self.model)
            batch, sampled = self._sample_batch()  # G completions per prompt with their rewards
            batch.advantages = self._advantages(batch)
            rollout_done = time.perf_counter()
            # Old-policy log-probs only matter when the batch is reused (mu > 1) or for the rollout
            # correction; with mu = 1 they equal the current log-probs, which the loss detaches itself.
            # Reference log-probs only when beta > 0.
            correct = cfg.vllm_importance_sampling_correction and batch.sampling_logprobs is not None
            old_logprobs = self._logprobs(self.base_model, batch) if cfg.num_iterations > 1 or correct else None
            ratio, self._correction_stats = self._rollout_correction(batch, old_logprobs) if correct else (None, None)
            ref_logprobs = self._ref_logprobs(batch) if cfg.beta > 0 else None
        if cfg.num_iterations == 1:
            old_logprobs = None  # on-policy: ratio exactly 1
        updates = [self._optimizer_step(batch, old_logprobs, ref_logprobs, ratio) for _ in range(cfg.num_iterations)]
        self.sampled = sampled  # for the trackers' completions table
        self.state.step += 1
        self._sync_ref_model()
        self._step_start = None  # the step is finished
        times = {"rollout": rollout_done - start, "update": time.perf_counter() - rollout_done}
        return self._step_metrics(sampled, batch, updates, times)

    def _sample_batch(self) -> tuple[Batch, Batch]:
        """(this rank's batch to train on, everything this rank sampled this step — for the logs).

        Every rank draws the global list of prompts (the list one process would draw) and samples its
        contiguous share (``Dist.shard_bounds``); the G completions of a prompt stay on one rank.
        Without dynamic sampling both are one generation batch. With it (DAPO), groups whose rewards
        are all equal (zero advantage: no learning signal) are dropped and fresh prompts sampled, for at
        most ``max_dynamic_sampling_tries`` rounds; then the step trains on the groups kept (or, if none
        has any spread, on the last round as it is). The counts behind these decisions are global.
        """
        cfg, g, d, pad = self.config, self.config.num_generations, self.dist, self.tokenizer.pad_token_id
        kept, sampled, kept_groups = [], [], 0
        while len(sampled) < cfg.max_dynamic_sampling_tries:
            missing = cfg.prompts_per_step * d.world_size - kept_groups  # global count
            first = self.state.data_cursor
            rows = self._next_prompts(missing)
            lo, hi = d.shard_bounds(missing)
            keys = list(range(first + lo, first + hi))  # positions of this rank's prompts in the stream
            sampled.append(self._rollout_and_score(rows[lo:hi], keys) if keys else self._empty_batch())
            if not cfg.dynamic_sampling:
                return sampled[0], sampled[0]
            spread = (sampled[-1].group_std(g) > 0).nonzero().squeeze(1)
            kept.append(sampled[-1].select_groups(spread, g))
            found = d.sum_int(len(spread))
            kept_groups += found
            if found == missing:
                break
        everything = Batch.cat(sampled, pad, g)
        return (Batch.cat(kept, pad, g) if kept_groups else sampled[-1]), everything

    def _empty_batch(self) -> Batch:
        """A batch of no rows (a rank whose share of a dynamic-sampling round is empty)."""
        none = torch.zeros((0, 1), dtype=torch.long, device=self.device)
        rollout = Rollout(none, none, none, none, torch.zeros(0, dtype=torch.bool, device=self.device))
        return Batch(rollout, torch.zeros(0), torch.zeros((0, len(self.reward_funcs))),
                     keys=torch.zeros(0, dtype=torch.long))  # fmt: skip

    def _advantages(self, batch: Batch) -> torch.Tensor:
        """(B,) group advantages; with scale_rewards="batch" and several processes, the batch std is that of
        every rank's rewards (gathered in stream order, so the result equals the 1-process one bit for bit)."""
        cfg, g = self.config, self.config.num_generations
        if not self.dist.enabled or cfg.scale_rewards != "batch":
            return group_advantages(batch.rewards, g, cfg.scale_rewards).to(self.device)
        parts = self.dist.gather_objects((batch.keys.cpu(), batch.rewards.cpu().view(-1, g)))
        keys, rewards = torch.cat([k for k, _ in parts]), torch.cat([r for _, r in parts])
        order = keys.argsort()
        everyone = group_advantages(rewards[order].reshape(-1), g, "batch").view(-1, g)  # (all groups, G)
        where = {k: i for i, k in enumerate(keys[order].tolist())}
        return everyone[[where[k] for k in batch.keys.tolist()]].reshape(-1).to(self.device)

    def _rollout_correction(self, batch: Batch, old_logprobs: torch.Tensor):
        """(importance ratio for the loss, its statistics): TRL's vllm_importance_sampling_* correction,
        rho = pi_old / pi_sampler per token (token_*) or per sequence (sequence_*), truncated or masked."""
        cfg = self.config
        level, mode = cfg.vllm_importance_sampling_mode.split("_")
        mask = batch.rollout.completion_mask.float()
        sampling = batch.sampling_logprobs.to(old_logprobs)
        sampling = torch.where(sampling.isnan(), old_logprobs, sampling)  # tokens the engine did not score: rho 1
        lo = cfg.vllm_importance_sampling_clip_min
        hi = cfg.vllm_importance_sampling_clip_max
        ratio = rollout_importance_ratio(old_logprobs, sampling, mask, level, mode, 0.0 if lo is None else lo,
                                         math.inf if hi is None else hi)  # fmt: skip
        on = mask.bool()
        values = ratio.reshape(-1) if level == "sequence" else ratio[on]
        delta = (old_logprobs - sampling).abs()[on]
        stats = (values.numel(), float(values.sum()), float(values.min()) if values.numel() else math.inf,
                 float(values.max()) if values.numel() else -math.inf, delta.numel(), float(delta.sum()),
                 float(delta.max()) if delta.numel() else 0.0)  # fmt: skip
        return ratio, stats

    def _rollout_and_score(self, rows: list[int], keys: list[int] | None = None) -> Batch:
        """Sample G completions for each of the dataset rows ``rows`` and score them.

        keys: the rows' positions in the training stream (they seed each group's sampler); None = the
        positions just consumed (the last len(rows) ones).
        """
        cfg, g, tok = self.config, self.config.num_generations, self.tokenizer
        examples = self.train_dataset[rows]  # {column: [value per prompt]}
        prompts = [p for p in examples["prompt"] for _ in range(g)]  # (B,) = prompts x G, grouped
        texts = [prompt_text(tok, p) for p in examples["prompt"]]
        ids, mask = encode_prompts(tok, texts, cfg.max_prompt_length, self.device)  # each prompt once
        ids, mask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)  # (B, P): G rows per prompt
        if keys is None:
            keys = list(range(self.state.data_cursor - len(rows), self.state.data_cursor))
        settings = SamplingSettings(cfg.max_completion_length, tok.eos_token_id, tok.pad_token_id, cfg.temperature,
                                    cfg.top_p, cfg.top_k, cfg.decode_graphs)  # fmt: skip
        with self._autocast():
            generation = self.engine.generate(ids, mask, self._group_seeds(keys), g, settings)
        rollout = generation.rollout
        columns = {k: [v for v in values for _ in range(g)] for k, values in examples.items() if k != "prompt"}
        columns["completion_ids"] = completion_id_lists(rollout)
        completions = decode_completions(tok, columns["completion_ids"], prompts)
        per_func, rewards = score_completions(self.reward_funcs, self.reward_weights, prompts, completions, columns,
                                              cfg.reward_timeout, cfg.on_reward_error)  # fmt: skip
        return Batch(rollout, rewards, per_func, keys=torch.tensor(keys, dtype=torch.long),
                     sampling_logprobs=generation.sampling_logprobs)  # fmt: skip

    def _optimizer_step(self, batch: Batch, old_logprobs, ref_logprobs, importance_ratio=None) -> dict[str, float]:
        """Gradient accumulation over micro-batches, clipping, one AdamW step and one scheduler step.

        Normalisers are those of the whole generation batch, over every rank: dapo/cispo divide by its
        number of loss tokens (num_items_in_batch); grpo, sapo, luspo and dr_grpo by its number of
        sequences (the loss function divides a micro-batch by its own rows * GA, so the loss is rescaled
        by world_size * rows * GA / all rows: exactly 1 for equal, full micro-batches); bnpo keeps TRL's
        per-micro-batch token mean. DDP/FSDP average gradients over the ranks, hence the factor
        world_size (for dapo/cispo via LossConfig.world_size): the averaged gradient is the gradient of the
        1-process loss. Every rank runs as many forward/backward passes as the rank with the most
        micro-batches (zero-loss passes where it has none left), so the gradient all-reduces pair up.
        """
        cfg, d = self.config, self.dist
        mask = self._loss_mask(batch.rollout)  # (B, T)
        counts = d.all_reduce(torch.tensor([float(mask.sum()), float(mask.shape[0])], dtype=torch.float64))
        num_items = max(float(counts[0]), 1.0)  # loss tokens in the global generation batch (dapo/cispo)
        all_rows = float(counts[1])
        self.optimizer.zero_grad(set_to_none=True)
        shared = self._shared_prompts(batch)
        micro_batches = self._update_passes(batch, shared is not None)
        passes = d.max_int(len(micro_batches)) if d.enabled else len(micro_batches)
        loss_sum, weighted, weights = 0.0, defaultdict(float), defaultdict(float)
        for i in range(passes):
            with no_sync(self._policy, skip=i < passes - 1):  # gradients are reduced in the last pass only
                if i >= len(micro_batches):
                    self._idle_backward()
                    continue
                rows = micro_batches[i]
                r = batch.rollout.select(rows).trim()
                t = r.completion_ids.shape[1]
                with self._autocast():
                    if shared is not None:
                        hidden = shared.hidden(rows, r.completion_ids, r.lengths)  # (b, t, H)
                    else:
                        hidden = self._policy(r.prompt_ids, r.prompt_mask, r.completion_ids)
                hidden, weight, bias = self._head_operands(hidden, self.head)
                out = linear_grpo_loss(
                    hidden,
                    weight,
                    r.completion_ids,
                    batch.advantages[rows],
                    mask[rows, :t],
                    _rows(old_logprobs, rows, t),
                    _rows(ref_logprobs, rows, t),
                    bias=bias,
                    config=self.loss_config,
                    importance_ratio=_ratio_rows(importance_ratio, rows, t),
                    num_items_in_batch=num_items,
                )
                scale = self._loss_scale(len(rows), all_rows)
                loss = out.loss if scale == 1.0 else out.loss * scale
                loss.backward()
            loss_sum += loss.item()
            tokens, sequences = float(mask[rows, :t].sum()), float(len(rows))
            for name, value in out.metrics.items():
                w = sequences if self._per_sequence_metric(name) else tokens
                weighted[name] += float(value) * w
                weights[name] += w
        if shared is not None:
            shared.backward()  # the prompts' share of the gradient, summed over the micro-batches
        sums = self._reduce_update_metrics(loss_sum, weighted, weights)
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        sums["grad_norm"] = _clip_gradients(params, max_norm)
        sums["learning_rate"] = self.scheduler.get_last_lr()[0]
        sums["updates_skipped"] = 0.0
        if math.isfinite(sums["loss"]) and math.isfinite(sums["grad_norm"]):
            self._weights_changed = True  # (a Ctrl-C from here on cannot save this step's start)
            self.optimizer.step()
        else:
            sums["updates_skipped"] = self._nonfinite_update(sums["loss"], sums["grad_norm"])
        self.scheduler.step()  # the LR schedule follows the step count, applied or not
        return sums

    def _nonfinite_update(self, loss: float, grad_norm: float) -> float:
        """A NaN/inf loss or gradient norm: the update is not applied. on_nonfinite="raise": NonFiniteError
        naming the step and the first non-finite tensor; "skip_step": a warning, and 1.0 (one update skipped)."""
        where = _first_nonfinite(self.model) or "none in the parameters or gradients (their norm overflowed)"
        self.optimizer.zero_grad(set_to_none=True)
        message = (f"step {self.state.step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); the update "
                   f"was not applied; first non-finite tensor: {where}")  # fmt: skip
        if self.config.on_nonfinite == "raise":
            raise NonFiniteError(
                f"{message}; lower learning_rate, check the data and reward scale, or set on_nonfinite: skip_step "
                "to drop such updates"
            )
        warnings.warn(f"{message} (on_nonfinite: skip_step)", RuntimeWarning, stacklevel=2)
        return 1.0

    def _shared_prefix_forward(self, model: nn.Module) -> SharedPrefixForward | None:
        """The shared-prompt forward of ``model`` when config.share_prompt_prefix allows it and it applies."""
        cfg = self.config
        if not cfg.share_prompt_prefix or cfg.num_generations < 2 or self.dist.enabled:
            return None
        longest = math.inf if cfg.max_prompt_length is None else cfg.max_prompt_length + cfg.max_completion_length
        if unsupported_reason(model, longest, training=True) is not None:  # e.g. a sliding window below it
            return None
        return SharedPrefixForward(model, longest, checkpoint=cfg.gradient_checkpointing)

    def _shared_prompts(self, batch: Batch) -> SharedPrompts | None:
        """This step's prompt pass, run once per group and shared by the update's passes, or None (then each
        pass runs [prompt; completion] whole). It applies when the batch's rows come in groups with one
        prompt each and the prompt pass, whose activations live for the whole step, has no more tokens than
        an average micro-batch has completion tokens (a pass's budget, see ``_update_passes``): it never
        adds more than one pass's activations to the peak. With G = 8 and prompts shorter than
        completions it is far below that."""
        g = self.config.num_generations
        if self._prefix is None or len(batch) == 0:
            return None
        r = batch.rollout.trim()
        if not groups_share_prompts(r.prompt_ids, r.prompt_mask, g):
            return None
        micro_batches = math.ceil(len(batch) / self.config.per_device_train_batch_size)
        if len(batch) // g * r.prompt_ids.shape[1] > float(r.lengths.sum()) / micro_batches:
            return None
        with self._autocast():
            return SharedPrompts(self._prefix, r.prompt_ids, r.prompt_mask, g)

    def _loss_scale(self, rows: int, all_rows: float) -> float:
        """Factor on a micro-batch's loss so that the rank-averaged gradient is the global one (see above)."""
        if self.config.loss_type in ("grpo", "sapo", "luspo", "dr_grpo"):
            return self.dist.world_size * rows * self.config.gradient_accumulation_steps / all_rows
        return 1.0  # dapo/cispo: LossConfig.world_size; bnpo: per-micro-batch mean (TRL)

    def _per_sequence_metric(self, name: str) -> bool:
        """Metrics that are means over sequences (sequence-level clip fractions), not over tokens."""
        return self.config.importance_sampling_level == "sequence" and "clip_ratio" in name

    def _reduce_update_metrics(self, loss_sum: float, weighted: dict, weights: dict) -> dict[str, float]:
        """Loss (summed over micro-batches, averaged over ranks as the gradient is) and the token- (or
        sequence-) weighted means of the loss metrics over the whole generation batch."""
        parts = self.dist.gather_objects((loss_sum, dict(weighted), dict(weights)))
        out = {"loss": sum(p[0] for p in parts) / self.dist.world_size}
        for name in dict.fromkeys(n for p in parts for n in p[1]):
            total = sum(p[2].get(name, 0.0) for p in parts)
            out[name] = sum(p[1].get(name, 0.0) for p in parts) / total if total > 0 else 0.0
        return out

    def _idle_backward(self) -> None:
        """A zero-loss forward/backward on a one-token row: this rank has no micro-batch left but must join
        the gradient all-reduce (dynamic sampling can leave ranks with different numbers of rows)."""
        one = torch.full((1, 1), self.tokenizer.eos_token_id, dtype=torch.long, device=self.device)
        with self._autocast():
            hidden = self._policy(one, torch.ones_like(one), one)
        zero = hidden.float().sum() * 0.0
        for p in (self.head.weight, self.head.bias):
            if p is not None and p.requires_grad:
                zero = zero + p.sum() * 0.0
        zero.backward()

    @torch.no_grad()
    def _logprobs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(B, T) per-token log-probs of the completions under ``model`` (forward only, chunked head)."""
        backbone, head = (self.backbone, self.head) if model is self.base_model else backbone_and_head(model)
        logprobs = torch.zeros(batch.rollout.completion_ids.shape, device=self.device)  # (B, T)
        g, prompts = self.config.num_generations, None
        same = model is self.base_model or self._prefix is None
        prefix = self._prefix if same else self._shared_prefix_forward(model)  # else: the reference model
        everything = batch.rollout.trim()
        if prefix is not None and groups_share_prompts(everything.prompt_ids, everything.prompt_mask, g):
            with self._autocast():  # each prompt once (forward only: keeps just its keys and values)
                prompts = prefix.prompt_pass(everything.prompt_ids[::g], everything.prompt_mask[::g])
        for rows in self._micro_batches(batch):
            r = batch.rollout.select(rows).trim()
            with self._autocast():
                if prompts is not None:
                    hidden = prefix.completion_hidden(prompts, rows // g, r.completion_ids, r.lengths)  # (b, t, H)
                else:
                    hidden = completion_hidden(backbone, r.prompt_ids, r.prompt_mask, r.completion_ids)
            hidden, weight, bias = self._head_operands(hidden, head)
            stats = linear_token_logprobs(hidden, weight, r.completion_ids, bias, self.config.temperature,
                                          mask=r.completion_mask)  # fmt: skip
            logprobs[rows, : r.completion_ids.shape[1]] = stats.logprobs
        return logprobs

    def _ref_logprobs(self, batch: Batch) -> torch.Tensor:
        """Reference log-probs: the frozen copy, or (peft) the policy with its adapters disabled."""
        if self.ref_model is not None:
            return self._logprobs(self.ref_model, batch)
        with self.model.disable_adapter():
            return self._logprobs(self.base_model, batch)

    def _micro_batches(self, batch: Batch) -> list[torch.Tensor]:
        """Row indices of each micro-batch, rows sorted by completion length so that each micro-batch,
        cut to its own longest completion, carries little padding. The loss is unchanged: its normalisers
        are per sequence or over the whole generation batch (except bnpo's per-micro-batch token mean)."""
        if len(batch) == 0:
            return []
        order = batch.rollout.lengths.argsort(stable=True)
        return list(order.split(self.config.per_device_train_batch_size))

    def _update_passes(self, batch: Batch, shared: bool) -> list[torch.Tensor]:
        """Row indices of the update's forward/backward passes: micro-batches balanced by tokens.

        Activation memory grows with a pass's tokens, and with rows sorted by length the last of the
        equal-row micro-batches holds the longest completions. Here each pass takes rows in length order
        while rows x its widest row (prompt included unless ``shared``: the prompt pass is separate) stays
        within the tokens of an average micro-batch; so no pass holds more than the equal-row micro-batch
        with the most tokens, and usually far fewer. The gradient does not depend on the split (the
        normalisers are those of the whole generation batch; grpo-like types rescale by rows in
        ``_loss_scale``), except for bnpo's per-micro-batch token mean, which keeps TRL's micro-batches.
        """
        if self.config.loss_type == "bnpo" or len(batch) == 0:
            return self._micro_batches(batch)
        order = batch.rollout.lengths.argsort(stable=True)
        prompt = 0 if shared else batch.rollout.trim().prompt_ids.shape[1]
        widths = (batch.rollout.lengths[order] + prompt).tolist()  # ascending
        budget = sum(widths) / math.ceil(len(batch) / self.config.per_device_train_batch_size)
        passes, start = [], 0
        for i, width in enumerate(widths):
            if i > start and (i - start + 1) * width > budget:
                passes.append(order[start:i])
                start = i
        return passes + [order[start:]]

    def _loss_mask(self, rollout: Rollout) -> torch.Tensor:
        """(B, T) float mask of the tokens in the loss; truncated completions are dropped when asked (DAPO)."""
        mask = rollout.completion_mask.float()
        if self.config.mask_truncated_completions:
            mask = mask * (~rollout.truncated).float()[:, None]
        return mask

    @torch.no_grad()
    def _sync_ref_model(self) -> None:
        """TR-DPO reference update every ref_model_sync_steps optimizer steps: ref <- a*policy + (1-a)*ref."""
        cfg = self.config
        if self.ref_model is None or not cfg.sync_ref_model:
            return
        optimizer_steps = self.state.step * cfg.num_iterations
        if (
            optimizer_steps // cfg.ref_model_sync_steps
            == (optimizer_steps - cfg.num_iterations) // cfg.ref_model_sync_steps
        ):
            return
        for ref, policy in zip(self.ref_model.parameters(), self.model.parameters(), strict=True):
            ref.lerp_(policy.detach(), cfg.ref_model_mixup_alpha)

    # ----------------------------------------------------------------- data order and randomness
    def _next_prompts(self, n: int) -> list[int]:
        """The next n row indices of the shuffled training stream (reshuffled each epoch)."""
        size, rows = len(self.train_dataset), []
        for _ in range(n):
            epoch, position = divmod(self.state.data_cursor, size)
            if self._order is None or self._order[0] != epoch:
                shuffle = torch.Generator().manual_seed(_mix(self.config.seed, epoch, 1))
                self._order = (epoch, torch.randperm(size, generator=shuffle))
            rows.append(int(self._order[1][position]))
            self.state.data_cursor += 1
        return rows

    def _seed_step(self) -> None:
        """Seed torch's global RNG from (seed, step): resumes need no RNG replay. (Sampling draws from one
        generator per prompt group: ``_group_seeds``.)"""
        torch.manual_seed(_mix(self.config.seed, self.state.step, 0))

    def _group_seeds(self, keys: list[int]) -> list[int]:
        """Sampler seeds of the groups whose prompts sit at stream positions ``keys``: a function of (seed,
        step, position) only, so what a group samples depends neither on the other prompts in its batch
        nor on the number of processes."""
        step_seed = _mix(self.config.seed, self.state.step, 2)
        return [_mix(step_seed, key, 0) for key in keys]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def _head_operands(self, hidden: torch.Tensor, head: nn.Linear) -> tuple:
        """(hidden, weight, bias) of the LM-head loss, in bf16 when autocast is on, as an autocast linear
        layer would run: the backbone's final norm keeps fp32 under autocast, which would send the fused
        kernels to their fp32 variants (no tensor cores). Gradients still accumulate in fp32 (.grad)."""
        operands = (hidden, head.weight, head.bias)
        if not self.use_bf16:
            return operands
        return tuple(None if x is None else x.to(torch.bfloat16) for x in operands)

    # ----------------------------------------------------------------- metrics, training loop, checkpoints
    def _gather_sampled(self, sampled: Batch):
        """(rewards, rewards_per_func, lengths, truncated) of what every rank sampled, in stream order."""
        g = self.config.num_generations
        fields = (sampled.rewards.cpu(), sampled.rewards_per_func.cpu(), sampled.rollout.lengths.cpu(),
                  sampled.rollout.truncated.cpu())  # fmt: skip
        if not self.dist.enabled:
            return fields
        parts = self.dist.gather_objects((sampled.group_keys(g).cpu(), *fields))
        order = torch.cat([p[0] for p in parts]).argsort()
        rows = (order[:, None] * g + torch.arange(g)).reshape(-1)
        return tuple(torch.cat([p[i] for p in parts])[rows] for i in range(1, 5))

    def _step_metrics(self, sampled: Batch, batch: Batch, updates: list[dict], times: dict) -> dict[str, float]:
        """Per-step metrics under TRL's names (rewards over everything sampled by every rank, loss terms
        averaged over the generation batch)."""
        g = self.config.num_generations
        rewards, per_func, lengths, truncated = self._gather_sampled(sampled)
        lengths = lengths.float()
        group_std = rewards.view(-1, g).std(1) if g > 1 else torch.zeros(len(rewards))
        step_time = times["rollout"] + times["update"]
        metrics = {
            "step": self.state.step,
            "reward": float(rewards.mean()),
            "reward_std": float(group_std.mean()),
            "frac_reward_zero_std": float((group_std == 0).float().mean()),
        }
        for i, fn in enumerate(self.reward_funcs):
            metrics[f"rewards/{reward_name(fn)}/mean"] = float(per_func[:, i].nanmean())
            metrics[f"rewards/{reward_name(fn)}/std"] = float(_nanstd(per_func[:, i]))
        for name in updates[0]:
            metrics[name] = sum(u[name] for u in updates) / len(updates)
        metrics.update(
            {
                "completions/mean_length": float(lengths.mean()),
                "completions/min_length": float(lengths.min()),
                "completions/max_length": float(lengths.max()),
                "completions/clipped_ratio": float(truncated.float().mean()),
                "num_groups_trained": self.dist.sum_int(len(batch.rewards) // g),
                "tokens_per_second": float(lengths.sum()) / step_time,
                "step_time": step_time,
                "time/rollout": times["rollout"],
                "time/update": times["update"],
                "peak_memory_mib": peak_memory_mib(self.device),
            }
        )
        if self._correction_stats is not None:
            metrics.update(self._correction_metrics(self._correction_stats))
        return metrics

    def _correction_metrics(self, stats) -> dict[str, float]:
        """TRL's sampling/* metrics of the rollout importance correction, over every rank."""
        parts = self.dist.gather_objects(stats)
        n, total, delta_n, delta_total = (sum(p[i] for p in parts) for i in (0, 1, 4, 5))
        return {
            "sampling/sampling_logp_difference/mean": delta_total / delta_n if delta_n else 0.0,
            "sampling/sampling_logp_difference/max": max(p[6] for p in parts),
            "sampling/importance_sampling_ratio/min": min(p[2] for p in parts) if n else 0.0,
            "sampling/importance_sampling_ratio/mean": total / n if n else 0.0,
            "sampling/importance_sampling_ratio/max": max(p[3] for p in parts) if n else 0.0,
        }

    def evaluate(self, dataset=None) -> dict[str, float]:
        """Greedy mean reward of each reward function on ``dataset`` (default eval_dataset), as eval/..."""
        dataset = self.eval_dataset if dataset is None else _as_dataset(dataset, "dataset")
        cfg = self.config
        with self._autocast(), gathered(self._policy):
            out = evaluation.evaluate(
                self.base_model,
                self.tokenizer,
                dataset,
                self.reward_funcs,
                max_new_tokens=cfg.eval_max_new_tokens or cfg.max_completion_length,
                max_prompt_length=cfg.max_prompt_length,
                reward_timeout=cfg.reward_timeout,
                on_reward_error=cfg.on_reward_error,
            )
        return {f"eval/{k}": v for k, v in out.items()}

    def train(self, resume_from_checkpoint: bool | str | None = None) -> dict[str, float]:
        """Run until ``max_steps``; returns the last step's metrics (plus the final evaluation).

        With several processes only rank 0 evaluates (every rank with FSDP2, whose forward passes are
        collective), writes metrics.jsonl and checkpoints and shows the progress bar.

        Args:
            resume_from_checkpoint: a checkpoint directory, or True for the latest one in output_dir
                (starting fresh when there is none).

        The run holds output_dir's lock file (``.lock``) until it returns: a second run into the same
        directory is refused while this one writes there. A fresh run (no resume) into a directory that
        holds another run's checkpoints is refused unless ``overwrite_output_dir`` (which deletes them).
        Ctrl-C (one process) saves a checkpoint of the last finished step, then re-raises KeyboardInterrupt.
        """
        with self._own_output_dir(bool(resume_from_checkpoint)):
            try:
                metrics = self._train(resume_from_checkpoint)
                self.dist.barrier()  # every rank returns once rank 0 has written the last metrics (after the save)
                return metrics
            except KeyboardInterrupt:
                self._save_on_interrupt()
                raise

    def _train(self, resume_from_checkpoint) -> dict[str, float]:
        cfg, main = self.config, self.dist.is_main
        self._resume(resume_from_checkpoint)
        if main:  # only now: the config validated, the dir is ours
            for name, text in {**self.run_files, "grpo_config.yaml": self.config.to_yaml()}.items():
                (self.run_dir / name).write_text(text)
        log = MetricsLog(self.run_dir / "metrics.jsonl", keep_up_to_step=self.state.step) if main else None
        metrics: dict[str, float] = {}
        bar = tqdm(total=cfg.max_steps, initial=self.state.step, desc="GRPO", unit="step", dynamic_ncols=True,
                   disable=not main)  # fmt: skip
        tracker = self.start_tracking() if main else tracking.Trackers([])  # rank 0 only; finished on exit
        with bar, tracker:
            while self.state.step < cfg.max_steps:
                metrics = self.step()
                step, last = self.state.step, self.state.step == cfg.max_steps
                if (cfg.save_steps and step % cfg.save_steps == 0) or last:
                    self.save_checkpoint()  # before evaluating: a failing evaluation loses no training
                evaluating = self.eval_dataset is not None and ((cfg.eval_steps and step % cfg.eval_steps == 0) or last)
                if evaluating and (main or is_fsdp(self._policy)):
                    metrics.update(self.evaluate())
                if log is not None and (step % cfg.logging_steps == 0 or evaluating or last):
                    log.write(metrics)
                    bar.write(format_metrics(metrics, cfg.max_steps))
                    tracker.log_metrics(metrics, step)
                if tracker and cfg.log_completions_steps and step % cfg.log_completions_steps == 0:
                    tracker.log_completions(self.completions_table(), step)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", refresh=False)
                bar.update(1)
        return metrics

    def start_tracking(self) -> tracking.Trackers:
        """The runs of ``config.report_to`` (continuing the tracked run when resumed at step > 0)."""
        cfg = self.config
        run = tracking.RunInfo(cfg.run_name or self.run_dir.resolve().name, cfg.logging_dir or self.run_dir / "runs",
                               cfg.to_dict(), resume_step=self.state.step)  # fmt: skip
        return tracking.start_tracking(cfg.report_to, run)

    def completions_table(self) -> list[dict]:
        """The last step's completions on this rank: prompt, completion, reward and each function's reward."""
        r, batch = self.sampled.rollout, self.sampled
        prompts = self.tokenizer.batch_decode([ids[m] for ids, m in zip(r.prompt_ids, r.prompt_mask.bool())],
                                              skip_special_tokens=True)  # fmt: skip
        completions = self.tokenizer.batch_decode(completion_id_lists(r), skip_special_tokens=True)
        names = [reward_name(fn) for fn in self.reward_funcs]
        rows = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            per_func = {n: float(batch.rewards_per_func[i, j]) for j, n in enumerate(names)}
            rows.append({"step": self.state.step, "prompt": prompt, "completion": completion,
                         "reward": float(batch.rewards[i]), **per_func})  # fmt: skip
        return rows

    def save_checkpoint(self) -> Path:
        """Atomically write output_dir/checkpoint-<step> (model, tokenizer, optimizer, scheduler, RNG, state).

        With peft the model part is the adapters (adapter_model.safetensors + adapter_config.json, loadable
        with ``PeftModel.from_pretrained`` on the base model). Rank 0 writes; every rank waits for it.
        """
        bad = _first_nonfinite(self.model)
        if self.dist.sum_int(int(bad is not None)):  # never a checkpoint with NaN/inf weights
            raise NonFiniteError(
                f"refusing to save checkpoint-{self.state.step}: {bad or 'a parameter on another rank'} holds NaN/inf; "
                f"the checkpoints already in {self.run_dir} are untouched"
            )
        model, optimizer = self.model, self.optimizer
        if is_fsdp(self._policy):  # gather full (unsharded) state dicts: collective, on every rank
            model, optimizer = _fsdp_full_state(self.model, self.optimizer)
        path = self.run_dir / f"checkpoint-{self.state.step}"
        if self.dist.is_main:
            path = save_checkpoint(
                self.run_dir,
                self.state.step,
                model,
                optimizer,
                self.scheduler,
                dataclasses.asdict(self.state),
                self.tokenizer,
                {**self.run_files, "grpo_config.yaml": self.config.to_yaml()},
                self.ref_model,
            )
        self.dist.barrier()
        self._saved_step = self.state.step
        return path

    @contextlib.contextmanager
    def _own_output_dir(self, resuming: bool):
        """Hold output_dir's lock file for the run (rank 0); a fresh run there must not mix with another run's
        checkpoints: refused, or (overwrite_output_dir) those are deleted first."""
        if not self.dist.is_main:
            yield
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.run_dir / LOCK_FILE, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise OutputDirInUseError(
                f"output_dir {self.run_dir} is in use by another run (it holds {self.run_dir / LOCK_FILE}); wait for "
                "that run to end or choose another output_dir"
            ) from None
        try:
            if not resuming and self.state.step == 0:  # (a trainer that already trained continues its own run)
                self._claim_output_dir()
            yield
        finally:
            lock.release()

    def _claim_output_dir(self) -> None:
        old = checkpoint_dirs(self.run_dir)
        if old and not self.config.overwrite_output_dir:
            raise ValueError(
                f"output_dir {self.run_dir} holds another run's checkpoints ({', '.join(p.name for p in old)}); "
                "resume it (--resume, or train(resume_from_checkpoint=True)), set overwrite_output_dir: true to "
                "delete them and start over, or choose another output_dir"
            )
        for path in old:
            shutil.rmtree(path)
        if old:
            print(f"overwrite_output_dir: deleted {len(old)} checkpoint(s) of an earlier run in {self.run_dir}",
                  file=sys.stderr)  # fmt: skip

    def _save_on_interrupt(self) -> None:
        """After Ctrl-C: save the last finished step (unless saved already); one process only (with several,
        a save is collective and the ranks may be anywhere)."""
        if self.dist.enabled or not self.dist.is_main:
            return
        if self._step_start is not None:  # interrupted mid-step
            if self._weights_changed:
                last = "none" if self._saved_step is None else f"checkpoint-{self._saved_step}"
                print(f"interrupted during the update of step {self._step_start.step + 1}: the weights are between "
                      f"two steps, so no checkpoint was saved (the last one: {last})", file=sys.stderr)  # fmt: skip
                return
            self.state, self._step_start = self._step_start, None  # (sampling had moved the data cursor)
        if self.state.step > 0 and self.state.step != self._saved_step:
            path = self.save_checkpoint()
            print(f"interrupted: saved {path} (step {self.state.step}); continue with --resume", file=sys.stderr)

    def _resume(self, resume_from_checkpoint) -> None:
        if not resume_from_checkpoint:
            return
        path = latest_checkpoint(self.run_dir) if resume_from_checkpoint is True else Path(resume_from_checkpoint)
        if path is None:
            if self.dist.is_main:
                print(f"no checkpoint in {self.run_dir}; starting from step 0", file=sys.stderr)
            return
        state = _read_trainer_state(path)  # checked before anything is loaded
        if state.step > self.config.max_steps:
            raise ValueError(f"cannot resume {path}: it is at step {state.step}, past max_steps = "
                             f"{self.config.max_steps}; set max_steps >= {state.step}")  # fmt: skip
        changed = self._compare_saved_config(path)
        if is_fsdp(self._policy):
            _fsdp_load(path, self.model, self.optimizer, self.scheduler, self.ref_model)
        else:
            load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.ref_model)
        self._apply_optimizer_settings()
        self.state, self._saved_step = state, state.step
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.state.step}", file=sys.stderr)
            if changed:
                print(f"settings changed since {path.name}, applied: {changed}", file=sys.stderr)

    def _compare_saved_config(self, path: Path) -> str:
        """The settings that differ from the checkpoint's grpo_config.yaml, as "name old -> new, ...".

        Raises:
            ValueError naming the settings fixed for a whole run (``FIXED_ON_RESUME``) that differ.
        """
        file = path / "grpo_config.yaml"
        if not file.is_file():
            return ""  # saved without a config (save_checkpoint called directly): nothing to compare
        saved, now = configio.read_yaml(file), self.config.to_dict()
        diff = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k] and k != "output_dir"}
        fixed = [f"{k} ({a!r} -> {b!r})" for k, (a, b) in diff.items() if k in FIXED_ON_RESUME]
        if fixed:
            raise ValueError(
                f"cannot resume {path} with a different {', '.join(fixed)}: fixed for the whole run; keep the "
                "checkpoint's value, or start a new run in another output_dir"
            )
        return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())

    def _apply_optimizer_settings(self) -> None:
        """The config's AdamW settings and LR schedule (a checkpoint restores the saved ones), at the restored
        optimizer step: a resume with a new learning_rate or max_steps uses them."""
        cfg = self.config
        for group in self.optimizer.param_groups:
            group.update(initial_lr=cfg.learning_rate, weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon,
                         betas=(cfg.adam_beta1, cfg.adam_beta2))  # fmt: skip
        # LambdaLR(last_epoch=n - 1) takes one step to n: the restored optimizer step, with the new schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(cfg), last_epoch=self.scheduler.last_epoch - 1
        )


class MetricsLog:
    """Appends one JSON object per logged step to ``path``; on resume, drops lines past the checkpoint."""

    def __init__(self, path: Path, keep_up_to_step: int = 0):
        self.path = path
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            records = [_json_line(ln, path, i + 1, last=i == len(lines) - 1) for i, ln in enumerate(lines)]
            kept = [ln for ln, r in zip(lines, records) if r is not None and r.get("step", 0) <= keep_up_to_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")


def _json_line(line: str, path: Path, number: int, last: bool) -> dict | None:
    """One metrics.jsonl line; a torn last line (a run killed mid-write) is None, with a message."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        if last:
            print(f"{path}: dropped its torn last line {number} (a run stopped mid-write): {line[:80]!r}",
                  file=sys.stderr)  # fmt: skip
            return None
        raise ValueError(f"{path}, line {number}: not a JSON object ({error}); fix or delete that line") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}, line {number}: not a JSON object: {line[:80]!r}; fix or delete that line")
    return record


def _read_trainer_state(path: Path) -> TrainerState:
    """The checkpoint's trainer_state.json as a TrainerState; ValueError naming the file if it is not one."""
    from .checkpoint import STATE_FILE

    file = Path(path) / STATE_FILE
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} is missing: {path} is not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: not readable JSON ({error})") from error
    names = [f.name for f in dataclasses.fields(TrainerState)]
    if not isinstance(data, dict) or sorted(data) != sorted(names):
        raise ValueError(f"{file}: expected an object with the keys {names}, got {data!r:.200}")
    bad = {k: v for k, v in data.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
    if bad:
        raise ValueError(f"{file}: {', '.join(bad)} must be ints >= 0, got {bad}")
    return TrainerState(**data)


def format_metrics(metrics: dict, max_steps: int) -> str:
    """One console line: the metrics a reader watches first."""
    keys = [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "kl",
        "entropy",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "grad_norm",
        "learning_rate",
        "step_time",
    ]
    keys += [k for k in metrics if k.startswith("eval/rewards/") and k.endswith("/mean")]
    parts = [f"{k} {metrics[k]:.3g}" for k in keys if k in metrics]
    return f"step {metrics['step']}/{max_steps} | " + " | ".join(parts)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: max_memory_allocated on CUDA, the process' RSS high-water mark elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource  # POSIX only
    except ImportError:
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _lr_lambda(cfg: GRPOConfig):
    """LR factor per optimizer step: linear warm-up to 1, then constant, cosine or linear decay to 0."""
    total = cfg.max_steps * cfg.num_iterations
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)
    kind = cfg.lr_scheduler_type

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # the first step already learns (HF starts at 0, wasting a rollout)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress}[kind]

    return factor


def _mix(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for (seed, step, stream): distinct, well-spread inputs for torch generators."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) % 2**64
    x ^= x >> 31
    return (x * 0xD6E8FEB86659FD93 % 2**64) >> 1


def _rows(x: torch.Tensor | None, rows: torch.Tensor, width: int) -> torch.Tensor | None:
    return None if x is None else x[rows, :width]


def _ratio_rows(ratio: torch.Tensor | None, rows: torch.Tensor, width: int) -> torch.Tensor | None:
    """The micro-batch's rows of a (B, T) token-level or (B, 1) sequence-level importance ratio."""
    if ratio is None:
        return None
    return ratio[rows] if ratio.shape[1] == 1 else ratio[rows, :width]


def _is_peft_model(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("peft_config", "get_base_model", "disable_adapter"))


def _apply_peft(model: nn.Module, peft_config) -> nn.Module:
    """``get_peft_model(model, peft_config)``, refusing adapters on the LM head (the fused loss reads the
    head's weight directly, so an adapter there would be silently ignored by the loss)."""
    try:
        from peft import get_peft_model
        from peft.tuners.tuners_utils import check_target_module_exists
    except ImportError as error:
        raise ImportError("peft_config needs the peft package: pip install 'grpo-fast[peft]'") from error
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head and n), "lm_head")
    targeted = getattr(peft_config, "target_modules", None) is not None and check_target_module_exists(
        peft_config, name
    )
    saved = any(name == m or name.endswith("." + m) for m in getattr(peft_config, "modules_to_save", None) or ())
    if targeted or saved:
        raise ValueError(
            f"peft_config adapts the LM head {name!r} (target_modules / modules_to_save): LoRA on the LM head is "
            "not supported (the fused loss uses lm_head.weight directly); leave it out of target_modules"
        )
    return get_peft_model(model, peft_config)


def _fsdp_full_state(model: nn.Module, optimizer: torch.optim.Optimizer):
    """(model, optimizer) stand-ins whose save_pretrained / state_dict give the full, unsharded state of an
    FSDP2-sharded model (gathered here, on every rank, to CPU)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)

    class FullModel:
        def save_pretrained(self, path):
            model.save_pretrained(path, state_dict=model_state)

    class FullOptimizer:
        def state_dict(self):
            return optimizer_state

    return FullModel(), FullOptimizer()


def _fsdp_load(path: Path, model, optimizer, scheduler, ref_model) -> dict:
    """load_checkpoint for an FSDP2-sharded model: every rank reads the full state and keeps its shards."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from .checkpoint import STATE_FILE, check_files, set_rng_state

    adapters = hasattr(model, "peft_config") and (path / "adapter_model.safetensors").exists()
    weights = "adapter_model.safetensors" if adapters else "model.safetensors"
    reference = ["ref_model.safetensors"] if ref_model is not None else []
    check_files(path, [weights, "optimizer.pt", "scheduler.pt", "rng.pt", STATE_FILE, *reference])
    options = StateDictOptions(full_state_dict=True, strict=False)
    if adapters:
        # the file's names lack the adapter name that the model's parameter names carry
        saved = load_file(str(path / "adapter_model.safetensors"))
        adapter = f".{model.active_adapter}"
        names = {k.replace(adapter, ""): k for k in get_model_state_dict(model) if "lora_" in k}
        if set(saved) != set(names):
            raise ValueError(f"{path}: adapters do not match the model ({sorted(set(saved) ^ set(names))})")
        set_model_state_dict(model, {names[k]: v for k, v in saved.items()}, options=options)
    else:
        set_model_state_dict(model, load_file(str(path / "model.safetensors")), options=options)
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if ref_model is not None:
        from safetensors.torch import load_model

        load_model(ref_model, str(path / "ref_model.safetensors"), device=str(next(ref_model.parameters()).device))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / STATE_FILE).read_text())


class OutputDirInUseError(RuntimeError):
    """output_dir's lock is held by another run."""


class NonFiniteError(FloatingPointError):
    """A training step produced a NaN/inf loss or gradient norm, or weights that are not finite."""


def _clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients to ``max_norm`` (global L2 norm) and return their norm before clipping; NaN, with
    the gradients left as they were (to find the first non-finite one), when that norm is not finite."""
    try:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=True)
    except RuntimeError:  # error_if_nonfinite: raised before any gradient is scaled
        return math.nan
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor


def _first_nonfinite(model: nn.Module) -> str | None:
    """The first parameter holding NaN/inf, else the first such gradient, by name; None if there is none."""
    named = list(model.named_parameters())
    for name, p in named:
        if not _finite(p):
            return f"parameter {name} (the weights themselves)"
    for name, p in named:
        if p.grad is not None and not _finite(p.grad):
            return f"the gradient of {name}"
    return None


def _finite(x: torch.Tensor) -> bool:
    x = x.to_local() if hasattr(x, "to_local") else x  # FSDP2: this rank's shard
    return bool(torch.isfinite(x.detach()).all())


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    x = x[~x.isnan()]
    return x.std() if x.numel() > 1 else torch.tensor(0.0)


def _enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of every decoder layer (transformers >= 5.23 renamed the method)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _fused_adamw(model: nn.Module) -> bool:
    """AdamW's fused kernel (one op per step instead of a dozen per parameter; transformers' Trainer
    defaults to it, optim="adamw_torch_fused") where it applies: trainable floating-point parameters on CPU
    or CUDA, none of them an FSDP2 DTensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() and type(p.data) is torch.Tensor for p in params
    )


def _frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def _use_bf16(bf16: bool | None, device: torch.device) -> bool:
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if bf16 and not cuda_bf16:
        raise ValueError(f"bf16=True needs a CUDA device with bfloat16 support; the model is on {device}")
    return cuda_bf16 if bf16 is None else bf16


def _reward_functions(reward_funcs) -> list[RewardFunction]:
    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    out = [get_reward_function(f) if isinstance(f, str) else f for f in funcs]
    for f in out:
        if not callable(f):
            raise TypeError(f"reward functions must be callables or built-in names, got {type(f).__name__}")
    if not out:
        raise ValueError("reward_funcs must name at least one reward function")
    return out


def _reward_weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"reward_weights has {len(weights)} entries but there are {n} reward functions")
    return [float(w) for w in weights]


def _as_dataset(data, name: str) -> Dataset:
    if isinstance(data, (list, tuple)):  # checked before Arrow refuses mixed types in its own words
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise TypeError(f"{name} row {i} must be a dict of columns, got {type(row).__name__}")
            if "prompt" in row:
                _check_prompt(row["prompt"], f"{name} row {i}")
    dataset = Dataset.from_list(list(data)) if isinstance(data, (list, tuple)) else data
    if "prompt" not in dataset.column_names:
        raise ValueError(f"{name} needs a 'prompt' column, got columns {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    for i, prompt in enumerate(dataset["prompt"]):
        _check_prompt(prompt, f"{name} row {i}")
    return dataset


def _check_prompt(prompt, where: str) -> None:
    """A prompt is a non-blank string or a non-empty list of chat messages (dicts with a "content")."""
    expected = "a non-empty string or a non-empty list of chat messages ({'role': ..., 'content': ...})"
    if not isinstance(prompt, (str, list, tuple)):
        raise TypeError(f"{where}: the prompt must be {expected}, got {type(prompt).__name__} {prompt!r:.100}")
    chat = not isinstance(prompt, str) and all(isinstance(m, dict) and "content" in m for m in prompt)
    if not (prompt.strip() if isinstance(prompt, str) else prompt and chat):
        raise ValueError(f"{where}: the prompt must be {expected}, got {prompt!r:.100}")


def _check_tokenizer(tokenizer, model: nn.Module) -> None:
    """The tokenizer has an EOS token, a pad token (else EOS, as TRL), and no more tokens than the model's
    embedding and LM-head rows (a token id past them would index out of range)."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("the tokenizer has no eos_token, so a completion could never end; set tokenizer.eos_token "
                         "(e.g. the model's end-of-turn token)")  # fmt: skip
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        warnings.warn(f"the tokenizer has no pad token: padding with its EOS token {tokenizer.eos_token!r} (as TRL "
                      "does)", UserWarning, stacklevel=3)  # fmt: skip
    rows = {"input embedding": model.get_input_embeddings().weight.shape[0],
            "LM head": model.get_output_embeddings().weight.shape[0]}  # fmt: skip
    for what, n in rows.items():
        if len(tokenizer) > n:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's {what} has {n} rows; use the model's "
                "own tokenizer, or model.resize_token_embeddings(len(tokenizer)) before training"
            )


def _load_tokenizer(model):
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", "")
    if not path:
        raise ValueError("tokenizer=None needs a model loaded from a directory (model.name_or_path is empty)")
    return AutoTokenizer.from_pretrained(path)
