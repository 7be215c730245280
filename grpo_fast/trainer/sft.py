"""Supervised fine-tuning on (prompt, completion) pairs: cross-entropy on the completion tokens only
(prompt tokens are context), through the fused hidden-state path of the GRPO loss.

    result = sft_train(model, tokenizer, dataset, SFTConfig(max_steps=300, output_dir="runs/sft"))

The loss never builds the (B, T, V) logits: it is ``linear_grpo_loss`` on the backbone's hidden states
and the LM-head weight with every advantage set to 1, on-policy (old log-probs = the current ones,
detached). There the importance ratio is exactly 1 (inside any clip range) and its gradient is the
gradient of the log-prob, so the token-mean ("dapo") surrogate -mean(ratio * 1) has exactly the
gradient of the token-mean negative log-likelihood; the NLL itself is logged from the per-token
log-probs the fused pass returns. ``loss="logits"`` is the plain ``cross_entropy`` on materialised
logits (tests check the two give the same gradients).

Batches are padded (prompts on the left, completions on the right); rows are drawn with replacement
(``num_epochs=None``, the demo's warm-start) or in seeded shuffled epochs. Early stopping on greedy dev
accuracy, checked every ``eval_steps``: SFT accuracy rises in sudden phase transitions, and a policy
below ~25% greedy accuracy gives GRPO almost no signal (few groups hold a right answer), so the demo's
warm-start stops on accuracy rather than after a fixed number of steps. With ``output_dir`` set, metrics go to
``output_dir/metrics.jsonl`` and the final model to ``output_dir/checkpoint-<step>`` (grpo_fast.trainer.checkpoint:
the same layout and atomic write as the GRPO trainer's checkpoints).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from ..config import LossConfig
from ..linear import linear_grpo_loss
from .checkpoint import save_checkpoint
from .evaluation import evaluate, prompt_text
from .metrics import MetricsLog
from .modeling import backbone_and_head, completion_hidden
from .rewards import accuracy_reward
from .rollout import encode_prompts
from .schedule import warmup_then_decay

SFT_LOSSES = ("fused", "logits")
# With advantages 1 and on-policy log-probs the clipped surrogate's gradient is the NLL gradient.
_NLL_AS_GRPO = LossConfig(loss_type="dapo", epsilon=0.2, beta=0.0)


@dataclass(frozen=True)
class SFTConfig:
    """learning_rate: AdamW (1e-3 for the 0.5M demo model). batch_size: examples per step.
    max_steps: hard cap. eval_steps: dev evaluation period. target_accuracy: stop once greedy dev
    accuracy >= this (None = run max_steps). max_new_tokens: length budget of the dev evaluation.
    num_epochs: None = draw rows with replacement for max_steps steps; a number = that many passes over
    the data in shuffled order (steps = ceil(num_epochs * rows / batch_size), still capped by max_steps).
    warmup_steps / lr_scheduler_type: linear warm-up, then "constant" or "cosine" decay to 0.
    loss: "fused" (hidden states + LM-head weight, no logits) or "logits". logging_steps: metrics
    period. output_dir: where metrics.jsonl and the final checkpoint go (None = nothing written).
    save_steps: also checkpoint every this many steps (0 = only at the end)."""

    learning_rate: float = 1e-3
    batch_size: int = 64
    max_steps: int = 1000
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_steps: int = 10
    target_accuracy: float | None = 0.30
    max_new_tokens: int = 64
    seed: int = 0
    num_epochs: float | None = None
    warmup_steps: int = 0
    lr_scheduler_type: str = "constant"
    loss: str = "fused"
    logging_steps: int = 10
    output_dir: str | None = None
    save_steps: int = 0

    def __post_init__(self):
        for name in ("batch_size", "max_steps", "eval_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"num_epochs must be > 0 or None, got {self.num_epochs!r}")
        if self.loss not in SFT_LOSSES:
            raise ValueError(f"loss must be one of {SFT_LOSSES}, got {self.loss!r}")
        if self.lr_scheduler_type not in ("constant", "cosine"):
            raise ValueError(f"lr_scheduler_type must be 'constant' or 'cosine', got {self.lr_scheduler_type!r}")

    def total_steps(self, num_examples: int) -> int:
        """Steps the run lasts unless early stopping ends it first."""
        if self.num_epochs is None:
            return self.max_steps
        return min(self.max_steps, max(1, math.ceil(self.num_epochs * num_examples / self.batch_size)))


def sft_train(
    model: nn.Module,
    tokenizer,
    examples,
    config: SFTConfig,
    dev_examples=None,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train ``model`` in place on (prompt, completion) pairs; EOS is appended to each completion.

    Args:
        examples: ``datasets.Dataset`` (or list of dicts) with ``prompt`` and ``completion`` text columns.
        config: SFTConfig.
        dev_examples: rows with ``prompt`` and ``answer`` for the greedy accuracy that stops training
            (needed when config.target_accuracy is set).
        on_step: called with the step number before every step (e.g. to re-pick the thread count).
    Returns:
        {"steps", "loss" (last NLL), "dev_accuracy" (last measured, or None), "seconds", "tokens"
        (completion tokens trained on, EOS included), "checkpoint" (path or None)}.
    """
    if config.target_accuracy is not None and dev_examples is None:
        raise ValueError("SFTConfig.target_accuracy needs dev_examples to measure accuracy on")
    if len(examples) == 0:
        raise ValueError("examples is empty")
    device = next(model.parameters()).device
    backbone, head = backbone_and_head(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    total = config.total_steps(len(examples))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_then_decay(config.lr_scheduler_type, config.warmup_steps, total)
    )
    order = RowOrder(len(examples), config)
    log = _metrics_log(config)
    start, loss, accuracy, step, tokens = time.perf_counter(), float("nan"), None, 0, 0
    model.train()
    while step < total:
        if on_step is not None:
            on_step(step)
        rows = order.next(config.batch_size)
        batch = examples[rows] if hasattr(examples, "column_names") else _columns([examples[i] for i in rows])
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses
        loss, grad_norm, n = _train_step(model, backbone, head, tokenizer, batch, optimizer, config, device)
        scheduler.step()
        step, tokens = step + 1, tokens + n
        record = {"step": step, "loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate}
        if dev_examples is not None and (step % config.eval_steps == 0 or step == total):
            accuracy = evaluate(
                model, tokenizer, dev_examples, [accuracy_reward], max_new_tokens=config.max_new_tokens
            )["rewards/accuracy_reward/mean"]
            record["eval/rewards/accuracy_reward/mean"] = accuracy
        stop = accuracy is not None and config.target_accuracy is not None and accuracy >= config.target_accuracy
        logging = step % config.logging_steps == 0 or "eval/rewards/accuracy_reward/mean" in record
        if log is not None and (logging or stop or step == total):
            log.write({**record, "tokens": tokens, "seconds": time.perf_counter() - start})
        if config.output_dir and ((config.save_steps and step % config.save_steps == 0) or stop or step == total):
            checkpoint = _save(model, optimizer, scheduler, tokenizer, config, step, tokens)
        if stop:
            break
    return {
        "steps": step,
        "loss": loss,
        "dev_accuracy": accuracy,
        "seconds": time.perf_counter() - start,
        "tokens": tokens,
        "checkpoint": str(checkpoint) if config.output_dir else None,
    }


class RowOrder:
    """Row indices per step: with replacement (num_epochs None), or shuffled epochs, from a seeded generator."""

    def __init__(self, size: int, config: SFTConfig):
        self.size, self.epochs = size, config.num_epochs is not None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.queue: list[int] = []

    def next(self, n: int) -> list[int]:
        if not self.epochs:
            return torch.randint(self.size, (n,), generator=self.generator).tolist()
        while len(self.queue) < n:
            self.queue += torch.randperm(self.size, generator=self.generator).tolist()
        rows, self.queue = self.queue[:n], self.queue[n:]
        return rows


def _train_step(model, backbone, head, tokenizer, batch, optimizer, config, device) -> tuple[float, float, int]:
    """One optimizer step; returns (NLL per completion token, gradient norm, completion tokens)."""
    prompt_ids, prompt_mask = encode_prompts(
        tokenizer, [prompt_text(tokenizer, p) for p in batch["prompt"]], None, device
    )
    completion_ids, completion_mask = encode_completions(tokenizer, batch["completion"], device)
    loss, nll = sft_loss(backbone, head, prompt_ids, prompt_mask, completion_ids, completion_mask, config.loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    optimizer.step()
    return nll, grad_norm, int(completion_mask.sum())


def sft_loss(
    backbone: nn.Module,
    head: nn.Linear,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    loss: str = "fused",
) -> tuple[torch.Tensor, float]:
    """(a scalar whose gradient is the token-mean NLL gradient, the token-mean NLL as a float).

    Args:
        prompt_ids, prompt_mask: (B, P) left-padded prompts. completion_ids, completion_mask: (B, T)
            right-padded completions (EOS included) and their float mask.
        loss: "fused" (no (B, T, V) logits; the returned scalar is the GRPO surrogate, -1 in value) or
            "logits" (the scalar is the NLL itself).
    """
    hidden = completion_hidden(backbone, prompt_ids, prompt_mask, completion_ids)  # (B, T, H)
    tokens = completion_mask.sum()
    if loss == "logits":
        logits = head(hidden).float()  # (B, T, V): completion positions only
        token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), completion_ids, reduction="none")  # (B, T)
        nll = (token_loss * completion_mask).sum() / tokens
        return nll, nll.item()
    advantages = torch.ones(completion_ids.shape[0], device=hidden.device)  # (B,)
    out = linear_grpo_loss(
        hidden, head.weight, completion_ids, advantages, completion_mask, bias=head.bias, config=_NLL_AS_GRPO
    )
    return out.loss, float(-(out.logprobs * completion_mask).sum() / tokens)


def encode_completions(tokenizer, completions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded completion ids with EOS appended, and their mask: ((B, T) int64, (B, T) float32)."""
    rows = [r + [tokenizer.eos_token_id] for r in tokenizer(list(completions), add_special_tokens=False)["input_ids"]]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1.0
    return ids.to(device), mask.to(device)


def _metrics_log(config: SFTConfig):
    if not config.output_dir:
        return None
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    return MetricsLog(out / "metrics.jsonl")


def _save(model, optimizer, scheduler, tokenizer, config: SFTConfig, step: int, tokens: int) -> Path:
    state = {"step": step, "tokens": tokens, "seed": config.seed}
    text = yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
    return save_checkpoint(
        config.output_dir, step, model, optimizer, scheduler, state, tokenizer, {"sft_config.yaml": text}
    )


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}
