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

Determinism: every random draw of step s comes from generators seeded with (seed, s) and the data
order is a fixed function of (seed, epoch), so a run resumed from a checkpoint reproduces the
uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from . import configio, evaluation
from .advantages import group_advantages
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import LossConfig
from .evaluation import completion_id_lists, decode_completions, prompt_text
from .linear import linear_grpo_loss, linear_token_logprobs
from .modeling import backbone_and_head, completion_hidden
from .rewards import RewardFunction, get_reward_function, reward_name, score_completions
from .rollout import Rollout, encode_prompts, generate

LR_SCHEDULERS = ("constant", "cosine", "linear")
SCALE_REWARDS = ("group", "batch", "none")


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO training hyper-parameters (TRL ``GRPOConfig`` names). Load with ``GRPOConfig.from_yaml``."""

    # run
    output_dir: str = _f("runs/grpo", "directory for metrics.jsonl, checkpoints and plots")
    seed: int = _f(42, "seed of every random draw (model init is the caller's)")
    max_steps: int = _f(500, "number of generation batches (each = num_iterations optimizer steps)")
    logging_steps: int = _f(1, "log metrics every this many steps")
    save_steps: int = _f(0, "save a checkpoint every this many steps; 0 = only at the end")
    eval_steps: int = _f(0, "greedy evaluation on eval_dataset every this many steps; 0 = only at the end")
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
    per_device_train_batch_size: int = _f(8, "completions per micro-batch (TRL meaning)")
    gradient_accumulation_steps: int = _f(
        1,
        "micro-batches per optimizer step; one generation batch = "
        "per_device_train_batch_size * gradient_accumulation_steps completions",
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    bf16: bool | None = _f(None, "bf16 autocast; None = on when a CUDA device supports it. CUDA only")
    # generation
    num_generations: int = _f(8, "G, completions per prompt. DeepSeekMath 64, DeepSeek-R1 16, TRL 8")
    max_prompt_length: int | None = _f(512, "prompts keep their last this many tokens; None = no limit")
    max_completion_length: int = _f(256, "length budget of a completion in tokens")
    temperature: float = _f(1.0, "sampling temperature; the loss uses log-probs of the same tempered softmax")
    top_p: float = _f(1.0, "nucleus sampling mass")
    top_k: int = _f(0, "top-k sampling; 0 = off")
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
    sync_ref_model: bool = _f(False, "mix the policy into the reference model (TR-DPO, arXiv 2404.09656)")
    ref_model_sync_steps: int = _f(512, "optimizer steps between reference syncs. R1 replaces it every 400")
    ref_model_mixup_alpha: float = _f(0.6, "ref <- alpha * policy + (1 - alpha) * ref at a sync. TR-DPO 0.6")
    dynamic_sampling: bool = _f(False, "DAPO: drop groups whose rewards are all equal and sample more prompts")
    max_dynamic_sampling_tries: int = _f(3, "generation rounds per step before training on what was kept")
    eval_max_new_tokens: int | None = _f(None, "length budget of evaluation; None = max_completion_length")

    def __post_init__(self):
        for name in (
            "max_steps",
            "logging_steps",
            "num_generations",
            "max_completion_length",
            "num_iterations",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "ref_model_sync_steps",
            "max_dynamic_sampling_tries",
        ):
            _check(getattr(self, name) >= 1, name, "an int >= 1", getattr(self, name))
        for name in ("save_steps", "eval_steps", "warmup_steps", "top_k"):
            _check(getattr(self, name) >= 0, name, "an int >= 0", getattr(self, name))
        _check(self.learning_rate > 0, "learning_rate", "> 0", self.learning_rate)
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", "in [0, 1)", self.warmup_ratio)
        _check(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(self.temperature > 0, "temperature", "> 0 (the loss divides by it)", self.temperature)
        _check(0 <= self.ref_model_mixup_alpha <= 1, "ref_model_mixup_alpha", "in [0, 1]", self.ref_model_mixup_alpha)
        _check(
            self.lr_scheduler_type in LR_SCHEDULERS,
            "lr_scheduler_type",
            f"one of {LR_SCHEDULERS}",
            self.lr_scheduler_type,
        )
        _check(self.scale_rewards in SCALE_REWARDS, "scale_rewards", f"one of {SCALE_REWARDS}", self.scale_rewards)
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        _check(
            batch % self.num_generations == 0,
            "per_device_train_batch_size * gradient_accumulation_steps",
            f"a multiple of num_generations={self.num_generations}",
            batch,
        )
        self.loss_config()  # validates the objective's fields (loss_type, epsilon, delta, beta, ...)

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
    """

    rollout: Rollout
    rewards: torch.Tensor
    rewards_per_func: torch.Tensor
    advantages: torch.Tensor | None = None

    def group_std(self, group_size: int) -> torch.Tensor:
        """(groups,) Bessel-corrected reward std of each group."""
        return self.rewards.view(-1, group_size).std(1) if group_size > 1 else torch.zeros(len(self.rewards))

    def select_groups(self, groups: torch.Tensor, group_size: int) -> Batch:
        rows = (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)  # (K * G,)
        return Batch(
            self.rollout.select(rows.to(self.rollout.prompt_ids.device)),
            self.rewards[rows],
            self.rewards_per_func[rows],
        )

    @staticmethod
    def cat(batches: list[Batch], pad_token_id: int) -> Batch:
        return Batch(
            Rollout.cat([b.rollout for b in batches], pad_token_id),
            torch.cat([b.rewards for b in batches]),
            torch.cat([b.rewards_per_func for b in batches]),
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
    """

    def __init__(self, model, reward_funcs, config: GRPOConfig, train_dataset, eval_dataset=None, tokenizer=None):
        self.config = config
        self.model = model
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(model)
        self.reward_funcs = _reward_functions(reward_funcs)
        self.reward_weights = _reward_weights(config.reward_weights, len(self.reward_funcs))
        self.train_dataset = _as_dataset(train_dataset, "train_dataset")
        self.eval_dataset = None if eval_dataset is None else _as_dataset(eval_dataset, "eval_dataset")
        self.backbone, self.head = backbone_and_head(model)
        self.use_bf16 = _use_bf16(config.bf16, self.device)
        self.loss_config = config.loss_config()
        self.ref_model = _frozen_copy(model) if config.beta > 0 else None
        if config.gradient_checkpointing:
            _enable_checkpointing(model)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config))
        self.state = TrainerState(seed=config.seed)
        self.generator = torch.Generator(self.device)
        self.run_dir = Path(config.output_dir)
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation of the train rows)

    # ----------------------------------------------------------------- the GRPO step
    def step(self) -> dict[str, float]:
        """One GRPO iteration: sample G completions per prompt, reward, advantages, update the policy."""
        cfg, start = self.config, time.perf_counter()
        self._seed_step()
        batch, sampled = self._sample_batch()  # G completions per prompt with their rewards
        batch.advantages = group_advantages(batch.rewards, cfg.num_generations, cfg.scale_rewards).to(self.device)
        rollout_done = time.perf_counter()
        # Old-policy log-probs only matter when the batch is reused (mu > 1); with mu = 1 they equal the
        # current log-probs, which the loss detaches itself. Reference log-probs only when beta > 0.
        old_logprobs = self._logprobs(self.model, batch) if cfg.num_iterations > 1 else None
        ref_logprobs = self._logprobs(self.ref_model, batch) if self.ref_model is not None else None
        updates = [self._optimizer_step(batch, old_logprobs, ref_logprobs) for _ in range(cfg.num_iterations)]
        self.state.step += 1
        self._sync_ref_model()
        times = {"rollout": rollout_done - start, "update": time.perf_counter() - rollout_done}
        return self._step_metrics(sampled, batch, updates, times)

    def _sample_batch(self) -> tuple[Batch, Batch]:
        """(the batch to train on, everything sampled this step — for the logs).

        Without dynamic sampling both are one generation batch. With it (DAPO), groups whose rewards
        are all equal (zero advantage: no learning signal) are dropped and fresh prompts sampled, for at
        most ``max_dynamic_sampling_tries`` rounds; then the step trains on the groups kept (or, if none
        has any spread, on the last round as it is).
        """
        cfg, g = self.config, self.config.num_generations
        kept, sampled = [], []
        while len(sampled) < cfg.max_dynamic_sampling_tries:
            missing = cfg.prompts_per_step - sum(len(b.rewards) // g for b in kept)
            sampled.append(self._rollout_and_score(self._next_prompts(missing)))
            if not cfg.dynamic_sampling:
                return sampled[0], sampled[0]
            spread = (sampled[-1].group_std(g) > 0).nonzero().squeeze(1)
            kept.append(sampled[-1].select_groups(spread, g))
            if missing == len(spread):
                break
        everything = Batch.cat(sampled, self.tokenizer.pad_token_id)
        kept = [b for b in kept if len(b.rewards)]
        return (Batch.cat(kept, self.tokenizer.pad_token_id) if kept else sampled[-1]), everything

    def _rollout_and_score(self, rows: list[int]) -> Batch:
        """Sample G completions for each of the dataset rows ``rows`` and score them."""
        cfg, g, tok = self.config, self.config.num_generations, self.tokenizer
        examples = self.train_dataset[rows]  # {column: [value per prompt]}
        prompts = [p for p in examples["prompt"] for _ in range(g)]  # (B,) = prompts x G, grouped
        ids, mask = encode_prompts(tok, [prompt_text(tok, p) for p in prompts], cfg.max_prompt_length, self.device)
        with self._autocast():
            rollout = generate(
                self.model,
                ids,
                mask,
                cfg.max_completion_length,
                tok.eos_token_id,
                tok.pad_token_id,
                cfg.temperature,
                cfg.top_p,
                cfg.top_k,
                self.generator,
            )
        columns = {k: [v for v in values for _ in range(g)] for k, values in examples.items() if k != "prompt"}
        columns["completion_ids"] = completion_id_lists(rollout)
        completions = decode_completions(tok, columns["completion_ids"], prompts)
        per_func, rewards = score_completions(self.reward_funcs, self.reward_weights, prompts, completions, columns)
        return Batch(rollout, rewards, per_func)

    def _optimizer_step(self, batch: Batch, old_logprobs, ref_logprobs) -> dict[str, float]:
        """Gradient accumulation over micro-batches, clipping, one AdamW step and one scheduler step."""
        cfg = self.config
        mask = self._loss_mask(batch.rollout)  # (B, T)
        num_items = mask.sum().clamp(min=1)  # tokens in the whole generation batch (dapo/cispo normaliser)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = defaultdict(float)
        micro_batches = self._micro_batches(batch)
        for rows in micro_batches:
            r = batch.rollout.select(rows).trim()
            t = r.completion_ids.shape[1]
            with self._autocast():
                hidden = completion_hidden(self.backbone, r.prompt_ids, r.prompt_mask, r.completion_ids)  # (b, t, H)
            out = linear_grpo_loss(
                hidden,
                self.head.weight,
                r.completion_ids,
                batch.advantages[rows],
                mask[rows, :t],
                _rows(old_logprobs, rows, t),
                _rows(ref_logprobs, rows, t),
                bias=self.head.bias,
                config=self.loss_config,
                num_items_in_batch=num_items,
            )
            out.loss.backward()
            sums["loss"] += out.loss.item()
            for name, value in out.metrics.items():
                sums[name] += float(value) / len(micro_batches)
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        sums["learning_rate"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        return sums

    @torch.no_grad()
    def _logprobs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(B, T) per-token log-probs of the completions under ``model`` (forward only, chunked head)."""
        backbone, head = backbone_and_head(model)
        logprobs = torch.zeros(batch.rollout.completion_ids.shape, device=self.device)  # (B, T)
        for rows in self._micro_batches(batch):
            r = batch.rollout.select(rows).trim()
            with self._autocast():
                hidden = completion_hidden(backbone, r.prompt_ids, r.prompt_mask, r.completion_ids)  # (b, t, H)
            stats = linear_token_logprobs(hidden, head.weight, r.completion_ids, head.bias, self.config.temperature,
                                          mask=r.completion_mask)  # fmt: skip
            logprobs[rows, : r.completion_ids.shape[1]] = stats.logprobs
        return logprobs

    def _micro_batches(self, batch: Batch) -> list[torch.Tensor]:
        """Row indices of each micro-batch, rows sorted by completion length so that each micro-batch,
        cut to its own longest completion, carries little padding. The loss is unchanged: its normalisers
        are per sequence or over the whole generation batch (except bnpo's per-micro-batch token mean)."""
        order = batch.rollout.lengths.argsort(stable=True)
        return list(order.split(self.config.per_device_train_batch_size))

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
        """Seed the sampler and torch's global RNG from (seed, step): resumes need no RNG replay."""
        step_seed = _mix(self.config.seed, self.state.step, 0)
        self.generator.manual_seed(step_seed)
        torch.manual_seed(step_seed)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    # ----------------------------------------------------------------- metrics, training loop, checkpoints
    def _step_metrics(self, sampled: Batch, batch: Batch, updates: list[dict], times: dict) -> dict[str, float]:
        """Per-step metrics under TRL's names (rewards over everything sampled, loss terms averaged)."""
        g = self.config.num_generations
        lengths = sampled.rollout.lengths.float()
        truncated = sampled.rollout.truncated
        step_time = times["rollout"] + times["update"]
        metrics = {
            "step": self.state.step,
            "reward": float(sampled.rewards.mean()),
            "reward_std": float(sampled.group_std(g).mean()),
            "frac_reward_zero_std": float((sampled.group_std(g) == 0).float().mean()),
        }
        for i, fn in enumerate(self.reward_funcs):
            metrics[f"rewards/{reward_name(fn)}/mean"] = float(sampled.rewards_per_func[:, i].nanmean())
            metrics[f"rewards/{reward_name(fn)}/std"] = float(_nanstd(sampled.rewards_per_func[:, i]))
        for name in updates[0]:
            metrics[name] = sum(u[name] for u in updates) / len(updates)
        metrics.update(
            {
                "completions/mean_length": float(lengths.mean()),
                "completions/min_length": float(lengths.min()),
                "completions/max_length": float(lengths.max()),
                "completions/clipped_ratio": float(truncated.float().mean()),
                "num_groups_trained": len(batch.rewards) // g,
                "tokens_per_second": float(lengths.sum()) / step_time,
                "step_time": step_time,
                "time/rollout": times["rollout"],
                "time/update": times["update"],
                "peak_memory_mib": peak_memory_mib(self.device),
            }
        )
        return metrics

    def evaluate(self, dataset=None) -> dict[str, float]:
        """Greedy mean reward of each reward function on ``dataset`` (default eval_dataset), as eval/..."""
        dataset = self.eval_dataset if dataset is None else _as_dataset(dataset, "dataset")
        cfg = self.config
        with self._autocast():
            out = evaluation.evaluate(
                self.model,
                self.tokenizer,
                dataset,
                self.reward_funcs,
                max_new_tokens=cfg.eval_max_new_tokens or cfg.max_completion_length,
                max_prompt_length=cfg.max_prompt_length,
            )
        return {f"eval/{k}": v for k, v in out.items()}

    def train(self, resume_from_checkpoint: bool | str | None = None) -> dict[str, float]:
        """Run until ``max_steps``; returns the last step's metrics (plus the final evaluation).

        Args:
            resume_from_checkpoint: a checkpoint directory, or True for the latest one in output_dir
                (starting fresh when there is none).
        """
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._resume(resume_from_checkpoint)
        log = MetricsLog(self.run_dir / "metrics.jsonl", keep_up_to_step=self.state.step)
        metrics: dict[str, float] = {}
        bar = tqdm(total=cfg.max_steps, initial=self.state.step, desc="GRPO", unit="step", dynamic_ncols=True)
        with bar:
            while self.state.step < cfg.max_steps:
                metrics = self.step()
                step, last = self.state.step, self.state.step == cfg.max_steps
                evaluating = self.eval_dataset is not None and ((cfg.eval_steps and step % cfg.eval_steps == 0) or last)
                if evaluating:
                    metrics.update(self.evaluate())
                if step % cfg.logging_steps == 0 or evaluating or last:
                    log.write(metrics)
                    bar.write(format_metrics(metrics, cfg.max_steps))
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", refresh=False)
                bar.update(1)
                if (cfg.save_steps and step % cfg.save_steps == 0) or last:
                    self.save_checkpoint()
        return metrics

    def save_checkpoint(self) -> Path:
        """Atomically write output_dir/checkpoint-<step> (model, tokenizer, optimizer, scheduler, RNG, state)."""
        return save_checkpoint(
            self.run_dir,
            self.state.step,
            self.model,
            self.optimizer,
            self.scheduler,
            dataclasses.asdict(self.state),
            self.tokenizer,
            {"grpo_config.yaml": self.config.to_yaml()},
            self.ref_model,
        )

    def _resume(self, resume_from_checkpoint) -> None:
        if not resume_from_checkpoint:
            return
        path = latest_checkpoint(self.run_dir) if resume_from_checkpoint is True else Path(resume_from_checkpoint)
        if path is None:
            print(f"no checkpoint in {self.run_dir}; starting from step 0", file=sys.stderr)
            return
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.ref_model)
        self.state = TrainerState(**state)
        print(f"resumed from {path} at step {self.state.step}", file=sys.stderr)


class MetricsLog:
    """Appends one JSON object per logged step to ``path``; on resume, drops lines past the checkpoint."""

    def __init__(self, path: Path, keep_up_to_step: int = 0):
        self.path = path
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= keep_up_to_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")


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
    dataset = Dataset.from_list(list(data)) if isinstance(data, (list, tuple)) else data
    if "prompt" not in dataset.column_names:
        raise ValueError(f"{name} needs a 'prompt' column, got columns {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    return dataset


def _load_tokenizer(model):
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", "")
    if not path:
        raise ValueError("tokenizer=None needs a model loaded from a directory (model.name_or_path is empty)")
    return AutoTokenizer.from_pretrained(path)
