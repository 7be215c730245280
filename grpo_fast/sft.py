"""Minimal supervised warm-start: cross-entropy on the completion tokens only (prompt tokens are context).

Used by the demo to bring a randomly initialised model to the point where GRPO has a signal: a policy
that is almost never right samples groups whose rewards are all 0, so every advantage is 0 and GRPO
cannot move (TARGETS.md: below ~25% greedy accuracy the demo collapses). SFT accuracy rises in sudden
phase transitions, so the warm-start stops on *dev accuracy* (checked every ``eval_steps``) rather than
after a fixed number of steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .evaluation import evaluate, prompt_text
from .modeling import backbone_and_head, completion_hidden
from .rewards import accuracy_reward
from .rollout import encode_prompts


@dataclass(frozen=True)
class SFTConfig:
    """learning_rate: AdamW (1e-3 for the 0.5M demo model). batch_size: examples per step.
    max_steps: hard cap. eval_steps: dev evaluation period. target_accuracy: stop once greedy dev
    accuracy >= this (None = run max_steps). max_new_tokens: length budget of the dev evaluation."""

    learning_rate: float = 1e-3
    batch_size: int = 64
    max_steps: int = 1000
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_steps: int = 10
    target_accuracy: float | None = 0.30
    max_new_tokens: int = 64
    seed: int = 0


def sft_train(model: nn.Module, tokenizer, examples, config: SFTConfig, dev_examples=None) -> dict:
    """Train ``model`` in place on (prompt, completion) pairs; EOS is appended to each completion.

    Args:
        examples: ``datasets.Dataset`` (or list of dicts) with ``prompt`` and ``completion`` text columns.
        config: SFTConfig.
        dev_examples: rows with ``prompt`` and ``answer`` for the greedy accuracy that stops training
            (needed when config.target_accuracy is set).
    Returns:
        {"steps", "loss" (last), "dev_accuracy" (last measured, or None), "seconds"}.
    """
    if config.target_accuracy is not None and dev_examples is None:
        raise ValueError("SFTConfig.target_accuracy needs dev_examples to measure accuracy on")
    device = next(model.parameters()).device
    backbone, head = backbone_and_head(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    start, loss, accuracy, step = time.perf_counter(), float("nan"), None, 0
    model.train()
    while step < config.max_steps:
        rows = torch.randint(len(examples), (config.batch_size,), generator=generator).tolist()
        batch = examples[rows] if hasattr(examples, "column_names") else _columns([examples[i] for i in rows])
        loss = _train_step(model, backbone, head, tokenizer, batch, optimizer, config, device)
        step += 1
        if dev_examples is not None and (step % config.eval_steps == 0 or step == config.max_steps):
            accuracy = evaluate(
                model, tokenizer, dev_examples, [accuracy_reward], max_new_tokens=config.max_new_tokens
            )["rewards/accuracy_reward/mean"]
            if config.target_accuracy is not None and accuracy >= config.target_accuracy:
                break
    return {"steps": step, "loss": loss, "dev_accuracy": accuracy, "seconds": time.perf_counter() - start}


def _train_step(model, backbone, head, tokenizer, batch, optimizer, config, device) -> float:
    prompt_ids, prompt_mask = encode_prompts(
        tokenizer, [prompt_text(tokenizer, p) for p in batch["prompt"]], None, device
    )
    completion_ids, completion_mask = encode_completions(tokenizer, batch["completion"], device)
    hidden = completion_hidden(backbone, prompt_ids, prompt_mask, completion_ids)  # (B, T, H)
    logits = head(hidden).float()  # (B, T, V): completion positions only
    token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), completion_ids, reduction="none")  # (B, T)
    loss = (token_loss * completion_mask).sum() / completion_mask.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    return loss.item()


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


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}
