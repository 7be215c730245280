"""Held-out evaluation: greedy accuracy and pass@k of a causal LM on a prompt dataset.

Also the small text helpers the trainer shares with it: turning dataset prompts into model input and
sampled token ids back into the completions reward functions see.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .rewards import RewardFunction, accuracy_reward, check_reward_columns, reward_name, score_completions
from .rollout import Rollout, encode_prompts, generate


def prompt_text(tokenizer, prompt) -> str:
    """A dataset prompt as model input: strings as they are; chat message lists through the tokenizer's
    chat template with the generation prompt appended (TRL's conversational format)."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def completion_id_lists(rollout: Rollout) -> list[list[int]]:
    """Token ids of each completion up to and including EOS (the ``completion_ids`` reward kwarg)."""
    return [row[:n] for row, n in zip(rollout.completion_ids.tolist(), rollout.lengths.tolist(), strict=True)]


def decode_completions(tokenizer, id_lists: list[list[int]], prompts: Sequence) -> list:
    """Completion texts without special tokens; chat-format prompts get chat-format completions."""
    texts = tokenizer.batch_decode(id_lists, skip_special_tokens=True)
    return [t if isinstance(p, str) else [{"role": "assistant", "content": t}] for t, p in zip(texts, prompts)]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer,
    dataset,
    reward_funcs: Sequence[RewardFunction] = (accuracy_reward,),
    *,
    max_new_tokens: int,
    k: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_prompt_length: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    reward_timeout: float | None = None,
    on_reward_error: str = "raise",
) -> dict[str, float]:
    """Greedy mean reward of each function on ``dataset`` (for ``accuracy_reward`` that is accuracy);
    with k > 1 also pass@k: the share of prompts where the best of k samples (at ``temperature``)
    scores >= 1 (with exactly k samples per prompt this is the unbiased pass@k estimator).

    Args:
        dataset: rows with a ``prompt`` column plus whatever the reward functions read (e.g. ``answer``).
        reward_timeout, on_reward_error: as in training (``score_completions``' timeout and on_error).
    Returns:
        {"rewards/<name>/mean": ..., "completions/mean_length": ..., ["rewards/<name>/pass@k": ...]}.
    """
    check_reward_columns(dataset.column_names, "dataset")
    names = [reward_name(fn) for fn in reward_funcs]
    budget = {"max_new_tokens": max_new_tokens, "max_prompt_length": max_prompt_length, "batch_size": batch_size,
              "faults": (reward_timeout, on_reward_error)}  # fmt: skip
    greedy, lengths = _score(model, tokenizer, dataset, reward_funcs, 1, {"temperature": 0.0}, **budget)
    out = {f"rewards/{n}/mean": float(greedy[:, i].nanmean()) for i, n in enumerate(names)}
    out["completions/mean_length"] = float(lengths.float().mean())
    if k > 1:
        generator = torch.Generator(_device(model)).manual_seed(seed)
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "generator": generator}
        sampled, _ = _score(model, tokenizer, dataset, reward_funcs, k, sampling, **budget)
        best = sampled.view(-1, k, len(names)).nan_to_num(0.0).amax(1)  # (N, F): best of each prompt's k samples
        out.update({f"rewards/{n}/pass@{k}": float((best[:, i] >= 1).float().mean()) for i, n in enumerate(names)})
    return out


def _score(
    model,
    tokenizer,
    dataset,
    reward_funcs,
    k: int,
    sampling: dict,
    max_new_tokens: int,
    max_prompt_length: int | None,
    batch_size: int,
    faults: tuple[float | None, str] = (None, "raise"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-function rewards (N * k, F), completion lengths (N * k,)): k completions per prompt, rows of
    one prompt adjacent; ``sampling`` holds the ``generate`` keyword arguments, ``faults`` the reward
    functions' (timeout, on_error)."""
    per_function, lengths = [], []
    rows_per_batch = max(1, batch_size // k)
    for start in range(0, len(dataset), rows_per_batch):
        rows = dataset[start : start + rows_per_batch]
        rollout, _, scores, _ = sample_and_score(
            model, tokenizer, rows, k, reward_funcs, max_new_tokens=max_new_tokens,
            max_prompt_length=max_prompt_length, faults=faults, **sampling,
        )  # fmt: skip
        per_function.append(scores)
        lengths.append(rollout.lengths.cpu())
    return torch.cat(per_function), torch.cat(lengths)


def sample_and_score(
    model: nn.Module,
    tokenizer,
    rows: dict[str, list],
    k: int,
    reward_funcs: Sequence[RewardFunction],
    *,
    max_new_tokens: int,
    max_prompt_length: int | None = None,
    faults: tuple[float | None, str] = (None, "raise"),
    **sampling,
) -> tuple[Rollout, list, torch.Tensor, torch.Tensor]:
    """Encode -> generate -> decode -> score: k completions of each prompt of ``rows`` (a dataset slice,
    {column: values} with a ``prompt`` column), rows of one prompt adjacent. ``sampling``: ``generate``'s
    keyword arguments. Returns (rollout, completions, per-function rewards (N * k, F), their sum (N * k,))."""
    prompts = [p for p in rows["prompt"] for _ in range(k)]
    ids, mask = encode_prompts(tokenizer, [prompt_text(tokenizer, p) for p in prompts], max_prompt_length,
                               _device(model))  # fmt: skip
    rollout = generate(model, ids, mask, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, **sampling)
    completions, scores, total = score_rollout(tokenizer, rows, k, rollout, reward_funcs, faults=faults)
    return rollout, completions, scores, total


def score_rollout(
    tokenizer,
    rows: dict[str, list],
    k: int,
    rollout: Rollout,
    reward_funcs: Sequence[RewardFunction],
    weights: Sequence[float] | None = None,
    faults: tuple[float | None, str] = (None, "raise"),
) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Decode the k completions of each prompt of ``rows`` and score them; the reward functions see the
    rows' other columns and ``completion_ids``. Returns (completions, per-function rewards (N * k, F),
    their weighted sum (N * k,)); ``faults`` = the functions' (timeout, on_error)."""
    check_reward_columns(rows, "dataset")
    prompts = [p for p in rows["prompt"] for _ in range(k)]
    columns = {c: [v for v in values for _ in range(k)] for c, values in rows.items() if c != "prompt"}
    columns["completion_ids"] = completion_id_lists(rollout)
    completions = decode_completions(tokenizer, columns["completion_ids"], prompts)
    weights = [1.0] * len(reward_funcs) if weights is None else list(weights)
    scores, total = score_completions(reward_funcs, weights, prompts, completions, columns, *faults)
    return completions, scores, total


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
