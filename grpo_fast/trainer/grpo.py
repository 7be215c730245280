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
- torchrun (``grpo_fast.trainer.distributed``): prompts sharded across ranks (groups never split), DDP or FSDP2,
  global normalisers, so N processes make the 1-process update (up to fp32 reduction order);
- ``peft_config`` (LoRA): only the adapters train; the KL reference is the same model with its adapters
  disabled; checkpoints hold the adapters;
- ``engine`` / ``use_vllm`` (``grpo_fast.trainer.engines``): another sampler; when it returns sampling
  log-probs, the loss gets TRL's rollout importance correction (``vllm_importance_sampling_*``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..advantages import group_advantages
from ..reference import rollout_importance_ratio
from . import evaluation, tracking
from .batch import Batch, TrainerState
from .config import GRPOConfig
from .distributed import Dist, gathered, init_from_env, is_fsdp, wrap_policy
from .engines import SamplingSettings, build_engine
from .evaluation import completion_id_lists, prompt_text, score_rollout
from .inputs import (
    apply_peft,
    as_dataset,
    check_prompt_budget,
    check_tokenizer,
    enable_checkpointing,
    frozen_copy,
    fused_adamw,
    is_peft_model,
    load_tokenizer,
    prompt_lengths,
    reward_functions,
    reward_weights,
    use_bf16,
)
from .metrics import MetricsLog, format_metrics, peak_memory_mib
from .modeling import backbone_and_head
from .rewards import reward_name
from .rollout import Rollout, encode_prompts
from .run_dir import RunDirectory, stop_signals
from .schedule import lr_lambda
from .update import PolicyUpdate
from .writes import reported


class GRPOTrainer(PolicyUpdate, RunDirectory):
    """GRPO on a Hugging Face causal LM.

    Args:
        model: a causal LM (``AutoModelForCausalLM``-style, LM head as ``get_output_embeddings()``).
        reward_funcs: a reward function, a built-in name (see grpo_fast.trainer.rewards.REWARD_FUNCTIONS) or a
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
        engine: the sampler (see grpo_fast.trainer.engines); None = ``HFEngine`` on the policy, or a colocated
            ``VLLMEngine`` when ``config.use_vllm``.
        run_files: {file name: text} written next to grpo_config.yaml, in output_dir once the run owns it
            and in every checkpoint (the CLI's run_arguments.yaml).

    Under torchrun (WORLD_SIZE > 1) the trainer joins the process group (gloo on CPU, nccl on CUDA) and
    trains data-parallel (see grpo_fast.trainer.distributed); every rank must build the same initial model.
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
            model = apply_peft(model, peft_config)
        self.is_peft = is_peft_model(model)
        if self.is_peft and config.sync_ref_model:
            raise ValueError("sync_ref_model needs a reference model of its own; with peft the reference is the "
                             "base model (adapters disabled), which does not move")  # fmt: skip
        self.model = model
        self.base_model = model.get_base_model() if self.is_peft else model  # transformers model (+ LoRA layers)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.base_model)
        self.reward_funcs = reward_functions(reward_funcs)
        self.reward_weights = reward_weights(config.reward_weights, len(self.reward_funcs))
        self.train_dataset = as_dataset(train_dataset, "train_dataset")
        self.eval_dataset = None if eval_dataset is None else as_dataset(eval_dataset, "eval_dataset")
        self.backbone, self.head = backbone_and_head(self.base_model)
        check_tokenizer(self.tokenizer, self.base_model)
        self._prompt_tokens = self._check_prompts()  # token count of each training prompt
        self._truncated_prompts = 0  # prompts of this step cut to max_prompt_length
        self.use_bf16 = use_bf16(config.bf16, self.device)
        # dapo/cispo/vespo divide by num_items_in_batch / world_size: see optimizer_step for the other types
        self.loss_config = config.loss_config().replace(world_size=self.dist.world_size)
        self.ref_model = frozen_copy(model) if config.beta > 0 and not self.is_peft else None
        if config.gradient_checkpointing:
            enable_checkpointing(self.base_model)
        # what the update's forward passes go through: DDP / FSDP2 with several processes
        self._policy = wrap_policy(model, self.backbone, self.dist, config.parallelism)
        self._prefix = self._shared_prefix_forward(self.base_model)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            fused=fused_adamw(model),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
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

    def _check_prompts(self) -> list[int]:
        """Encode every train and eval prompt once (an error names the dataset and row), warn once about
        those longer than max_prompt_length, refuse a prompt + completion past the model's positions."""
        cfg, positions = self.config, getattr(self.base_model.config, "max_position_embeddings", None)
        lengths = prompt_lengths(self.tokenizer, self.train_dataset, "train_dataset")
        check_prompt_budget("train_dataset", lengths, cfg.max_prompt_length,
                            ("max_completion_length", cfg.max_completion_length), positions)  # fmt: skip
        if self.eval_dataset is not None:
            budget = ("eval_max_new_tokens", cfg.eval_max_new_tokens) if cfg.eval_max_new_tokens else (
                "max_completion_length", cfg.max_completion_length)  # fmt: skip
            evaluated = prompt_lengths(self.tokenizer, self.eval_dataset, "eval_dataset")
            check_prompt_budget("eval_dataset", evaluated, cfg.max_prompt_length, budget, positions)
        return lengths

    # ----------------------------------------------------------------- the GRPO step
    def step(self) -> dict[str, float]:
        """One GRPO iteration: sample G completions per prompt, reward, advantages, update the policy."""
        cfg, start = self.config, time.perf_counter()
        self._step_start, self._weights_changed = dataclasses.replace(self.state), False  # for a Ctrl-C
        self._truncated_prompts = 0
        self.seed_step()
        with gathered(self._policy):  # FSDP2: parameters stay gathered for sampling and forward-only passes
            self.engine.sync_weights(self.model)
            batch, sampled = self.sample_batch()  # G completions per prompt with their rewards
            batch.advantages = self.compute_advantages(batch)
            rollout_done = time.perf_counter()
            # Old-policy log-probs only matter when the batch is reused (mu > 1) or for the rollout
            # correction; with mu = 1 they equal the current log-probs, which the loss detaches itself.
            # Reference log-probs only when beta > 0.
            correct = cfg.vllm_importance_sampling_correction and batch.sampling_logprobs is not None
            old_logprobs = self.logprobs(self.base_model, batch) if cfg.num_iterations > 1 or correct else None
            ratio, self._correction_stats = self._rollout_correction(batch, old_logprobs) if correct else (None, None)
            ref_logprobs = self.ref_logprobs(batch) if cfg.beta > 0 else None
        if cfg.num_iterations == 1:
            old_logprobs = None  # on-policy: ratio exactly 1
        updates = [self.optimizer_step(batch, old_logprobs, ref_logprobs, ratio) for _ in range(cfg.num_iterations)]
        self.sampled = sampled  # for the trackers' completions table
        self.state.step += 1
        self._sync_ref_model()
        self._step_start = None  # the step is finished
        times = {"rollout": rollout_done - start, "update": time.perf_counter() - rollout_done}
        return self._step_metrics(sampled, batch, updates, times)

    def sample_batch(self) -> tuple[Batch, Batch]:
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
            sampled.append(self.rollout_and_score(rows[lo:hi], keys) if keys else self._empty_batch())
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

    def compute_advantages(self, batch: Batch) -> torch.Tensor:
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

    def rollout_and_score(self, rows: list[int], keys: list[int] | None = None) -> Batch:
        """Sample G completions for each of the dataset rows ``rows`` and score them.

        keys: the rows' positions in the training stream (they seed each group's sampler); None = the
        positions just consumed (the last len(rows) ones).
        """
        cfg, g, tok = self.config, self.config.num_generations, self.tokenizer
        examples = self.train_dataset[rows]  # {column: [value per prompt]}
        if cfg.max_prompt_length is not None:
            self._truncated_prompts += sum(self._prompt_tokens[r] > cfg.max_prompt_length for r in rows)
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
        _, per_func, rewards = score_rollout(tok, examples, g, rollout, self.reward_funcs, self.reward_weights,
                                             (cfg.reward_timeout, cfg.on_reward_error))  # fmt: skip
        return Batch(rollout, rewards, per_func, keys=torch.tensor(keys, dtype=torch.long),
                     sampling_logprobs=generation.sampling_logprobs)  # fmt: skip

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

    def seed_step(self) -> None:
        """Seed torch's global RNG from (seed, step): resumes need no RNG replay. (Sampling draws from one
        generator per prompt group: ``_group_seeds``.)"""
        torch.manual_seed(_mix(self.config.seed, self.state.step, 0))

    def _group_seeds(self, keys: list[int]) -> list[int]:
        """Sampler seeds of the groups whose prompts sit at stream positions ``keys``: a function of (seed,
        step, position) only, so what a group samples depends neither on the other prompts in its batch
        nor on the number of processes."""
        step_seed = _mix(self.config.seed, self.state.step, 2)
        return [_mix(step_seed, key, 0) for key in keys]

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
                "prompts/truncated": self.dist.sum_int(self._truncated_prompts),
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
        dataset = self.eval_dataset if dataset is None else as_dataset(dataset, "dataset")
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
        SIGTERM and SIGUSR1 (preemption: Slurm, Kubernetes, spot instances) do the same while ``train`` runs
        in the main thread: they raise ``StopSignal``, a KeyboardInterrupt naming the signal; the previous
        handlers are restored when ``train`` returns. With several processes a stop signal (to any rank) is
        acted on at the end of the step: every rank saves that step together, then raises StopSignal.

        Metrics: a step's metrics.jsonl line is on disk before that step's checkpoint is published (its
        evaluation, which runs after the checkpoint, is then added to the line atomically), so the history
        always covers every logged step up to the checkpoint a resume starts from.
        """
        with self._own_output_dir(bool(resume_from_checkpoint)), stop_signals(not self.dist.enabled) as received:
            try:
                metrics = self._train(resume_from_checkpoint, received)
                self.dist.barrier()  # every rank returns once rank 0 has written the last metrics (after the save)
                return metrics
            except KeyboardInterrupt as stop:  # Ctrl-C, or StopSignal (SIGTERM, SIGUSR1)
                self._save_on_interrupt(getattr(stop, "name", "interrupted"))
                raise

    def _train(self, resume_from_checkpoint, received: list[int]) -> dict[str, float]:
        cfg, main = self.config, self.dist.is_main
        self._resume(resume_from_checkpoint)
        if main:  # only now: the config validated, the dir is ours
            for name, text in {**self.run_files, "grpo_config.yaml": self.config.to_yaml()}.items():
                with reported(self.run_dir / name):
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
                evaluating = self.eval_dataset is not None and ((cfg.eval_steps and step % cfg.eval_steps == 0) or last)
                logged = log is not None and (step % cfg.logging_steps == 0 or evaluating or last)
                if logged:
                    log.write(metrics)  # on disk (fsynced) before this step's checkpoint is published
                if (cfg.save_steps and step % cfg.save_steps == 0) or last:
                    self.save_checkpoint()  # before evaluating: a failing evaluation loses no training
                if evaluating and (main or is_fsdp(self._policy)):
                    evaluated = self.evaluate()
                    metrics.update(evaluated)
                    if logged:
                        log.amend_last(evaluated)  # the step's line, atomically rewritten with them
                if logged:
                    bar.write(format_metrics(metrics, cfg.max_steps))
                    tracker.log_metrics(metrics, step)
                if tracker and cfg.log_completions_steps and step % cfg.log_completions_steps == 0:
                    tracker.log_completions(self.completions_table(), step)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", refresh=False)
                bar.update(1)
                self._stop_if_signalled(received)  # several processes: a stop signal, at the step boundary
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


def _mix(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for (seed, step, stream): distinct, well-spread inputs for torch generators."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) % 2**64
    x ^= x >> 31
    return (x * 0xD6E8FEB86659FD93 % 2**64) >> 1


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    x = x[~x.isnan()]
    return x.std() if x.numel() > 1 else torch.tensor(0.0)
