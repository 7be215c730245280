"""The policy update of a GRPO step: log-probs, the fused loss over micro-batches, clipping, AdamW."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

import torch
from torch import nn

from ..config import PER_SEQUENCE_NORMALISED
from ..linear import linear_grpo_loss, linear_token_logprobs
from ..objective import high_entropy_mask, masked_mean, off_policy_mask
from .batch import Batch
from .decoding import unsupported_reason
from .distributed import no_sync
from .modeling import backbone_and_head, completion_hidden
from .rollout import Rollout
from .shared_prefix import SharedPrefixForward, SharedPrompts, groups_share_prompts


def _rows(x: torch.Tensor | None, rows: torch.Tensor, width: int) -> torch.Tensor | None:
    return None if x is None else x[rows, :width]


def _ratio_rows(ratio: torch.Tensor | None, rows: torch.Tensor, width: int) -> torch.Tensor | None:
    """The micro-batch's rows of a (B, T) token-level or (B, 1) sequence-level importance ratio."""
    if ratio is None:
        return None
    return ratio[rows] if ratio.shape[1] == 1 else ratio[rows, :width]


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


def first_nonfinite(model: nn.Module) -> str | None:
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


class PolicyUpdate:
    """GRPOTrainer's policy update: log-probs, the fused loss over micro-batches, clipping, AdamW."""

    def optimizer_step(self, batch: Batch, old_logprobs, ref_logprobs, importance_ratio=None) -> dict[str, float]:
        """Gradient accumulation over micro-batches, clipping, one AdamW step and one scheduler step.

        Normalisers are those of the whole generation batch, over every rank: dapo/cispo/vespo divide by its
        number of loss tokens (num_items_in_batch); grpo, sapo, luspo and dr_grpo by its number of
        sequences (the loss function divides a micro-batch by its own rows * GA, so the loss is rescaled
        by world_size * rows * GA / all rows: exactly 1 for equal, full micro-batches); bnpo keeps TRL's
        per-micro-batch token mean. DDP/FSDP average gradients over the ranks, hence the factor
        world_size (for dapo/cispo/vespo via LossConfig.world_size): the averaged gradient is the gradient of the
        1-process loss. Every rank runs as many forward/backward passes as the rank with the most
        micro-batches (zero-loss passes where it has none left), so the gradient all-reduces pair up.
        """
        cfg, d = self.config, self.dist
        mask = self.loss_mask(batch.rollout)  # (B, T)
        counts = d.all_reduce(torch.tensor([float(mask.sum()), float(mask.shape[0])], dtype=torch.float64))
        num_items = max(float(counts[0]), 1.0)  # loss tokens in the global generation batch (dapo/cispo/vespo)
        all_rows = float(counts[1])
        self.optimizer.zero_grad(set_to_none=True)
        shared = self.shared_prompts(batch)
        micro_batches = self.update_passes(batch, shared is not None)
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
                sampling = _rows(batch.sampling_logprobs, rows, t)
                old = _rows(old_logprobs, rows, t)
                adv = batch.advantages[rows]
                policy_mask, entropy_mask, mask_metrics = self._loss_masks(
                    hidden, weight, bias, r.completion_ids, adv, mask[rows, :t], old, sampling
                )
                out = linear_grpo_loss(
                    hidden,
                    weight,
                    r.completion_ids,
                    adv,
                    mask[rows, :t],
                    old,
                    _rows(ref_logprobs, rows, t),
                    bias=bias,
                    config=self.loss_config,
                    importance_ratio=_ratio_rows(importance_ratio, rows, t),
                    num_items_in_batch=num_items,
                    policy_mask=policy_mask,
                    entropy_mask=entropy_mask,
                )
                scale = self._loss_scale(len(rows), all_rows)
                loss = out.loss if scale == 1.0 else out.loss * scale
                loss.backward()
            loss_sum += loss.item()
            tokens, sequences = float(mask[rows, :t].sum()), float(len(rows))
            for name, value in {**out.metrics, **mask_metrics}.items():
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
        if cfg.entropy_coef != 0.0:  # TRL logs the coefficient whenever the bonus is on
            sums["entropy_coef"] = cfg.entropy_coef
        sums["updates_skipped"] = 0.0
        if math.isfinite(sums["loss"]) and math.isfinite(sums["grad_norm"]):
            self._weights_changed = True  # (a Ctrl-C from here on cannot save this step's start)
            self.optimizer.step()
        else:
            sums["updates_skipped"] = self._nonfinite_update(sums["loss"], sums["grad_norm"])
        self._schedule_step(skipped=bool(sums["updates_skipped"]))
        return sums

    def _loss_masks(self, hidden, weight, bias, ids, advantages, mask, old, sampling):
        """(policy_mask, entropy_mask, metrics) of one update pass, TRL's masks (see ``grpo_objective``): the
        off-policy sequence mask (off_policy_mask_threshold; against the sampler's log-probs, else the old
        policy's, else the current ones: then nothing is dropped) times the high-entropy token mask
        (top_entropy_quantile < 1; the quantile over this pass's tokens, as TRL takes it over a micro-batch),
        which is also the entropy bonus's. They need the current log-probs / entropies first: one forward-only
        GEMM pass. metrics: the share of the pass's loss tokens each mask keeps."""
        cfg = self.config
        quantile = cfg.top_entropy_quantile < 1.0
        if cfg.off_policy_mask_threshold is None and not quantile:
            return None, None, {}
        with torch.no_grad():
            current = linear_token_logprobs(hidden.detach(), weight.detach(), ids,
                                            None if bias is None else bias.detach(), cfg.temperature,
                                            return_entropy=quantile, mask=mask)  # fmt: skip
        policy_mask = entropy_mask = None
        metrics = {}
        if cfg.off_policy_mask_threshold is not None:
            reference = sampling if sampling is not None else old if old is not None else current.logprobs
            policy_mask = off_policy_mask(advantages, current.logprobs, reference, mask, cfg.off_policy_mask_threshold)
            metrics["off_policy_mask/kept_fraction"] = masked_mean(policy_mask.expand_as(mask), mask)
        if quantile:
            entropy_mask = high_entropy_mask(current.entropy, mask, cfg.top_entropy_quantile)
            policy_mask = entropy_mask if policy_mask is None else policy_mask * entropy_mask
            metrics["top_entropy_mask/kept_fraction"] = masked_mean(entropy_mask, mask)
        return policy_mask, entropy_mask, metrics

    def _schedule_step(self, skipped: bool) -> None:
        """The LR schedule follows the step count, the update applied or not. When the run's first update is
        skipped, torch warns that the schedule steps before the optimizer ever did: here that is by design."""
        with warnings.catch_warnings():
            if skipped:
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            self.scheduler.step()

    def _nonfinite_update(self, loss: float, grad_norm: float) -> float:
        """A NaN/inf loss or gradient norm: the update is not applied. on_nonfinite="raise": NonFiniteError
        naming the step and the first non-finite tensor; "skip_step": a warning, and 1.0 (one update skipped)."""
        where = first_nonfinite(self.model) or "none in the parameters or gradients (their norm overflowed)"
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

    def shared_prompts(self, batch: Batch) -> SharedPrompts | None:
        """This step's prompt pass, run once per group and shared by the update's passes, or None (then each
        pass runs [prompt; completion] whole). It applies when the batch's rows come in groups with one
        prompt each and the prompt pass, whose activations live for the whole step, has no more tokens than
        an average micro-batch has completion tokens (a pass's budget, see ``update_passes``): it never
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
        if self.config.loss_type in PER_SEQUENCE_NORMALISED:
            return self.dist.world_size * rows * self.config.gradient_accumulation_steps / all_rows
        return 1.0  # dapo/cispo/vespo: LossConfig.world_size; bnpo: per-micro-batch mean (TRL)

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
    def logprobs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
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
        for rows in self.micro_batches(batch):
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

    def ref_logprobs(self, batch: Batch) -> torch.Tensor:
        """Reference log-probs: the frozen copy, or (peft) the policy with its adapters disabled."""
        if self.ref_model is not None:
            return self.logprobs(self.ref_model, batch)
        with self.model.disable_adapter():
            return self.logprobs(self.base_model, batch)

    def micro_batches(self, batch: Batch) -> list[torch.Tensor]:
        """Row indices of each micro-batch, rows sorted by completion length so that each micro-batch,
        cut to its own longest completion, carries little padding. The loss is unchanged: its normalisers
        are per sequence or over the whole generation batch (except bnpo's per-micro-batch token mean)."""
        if len(batch) == 0:
            return []
        order = batch.rollout.lengths.argsort(stable=True)
        return list(order.split(self.config.per_device_train_batch_size))

    def update_passes(self, batch: Batch, shared: bool) -> list[torch.Tensor]:
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
            return self.micro_batches(batch)
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

    def loss_mask(self, rollout: Rollout) -> torch.Tensor:
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

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def _head_operands(self, hidden: torch.Tensor, head: nn.Linear) -> tuple:
        """(hidden, weight, bias) of the LM-head loss, in bf16 when autocast is on, as an autocast linear
        layer would run: the backbone's final norm keeps fp32 under autocast, which would send the fused
        kernels to their fp32 variants (no tensor cores). Gradients still accumulate in fp32 (.grad)."""
        operands = (hidden, head.weight, head.bias)
        if self.config.cast_lm_head_to_fp32:  # TRL's option: the head in float32 whatever the autocast dtype
            return tuple(None if x is None else x.float() for x in operands)
        if not self.use_bf16:
            return operands
        return tuple(None if x is None else x.to(torch.bfloat16) for x in operands)
