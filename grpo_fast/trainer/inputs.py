"""Checks and preparation of what a user hands the trainer: rewards, datasets, tokenizer, model."""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from .evaluation import prompt_text
from .rewards import RewardFunction, check_reward_columns, get_reward_function
from .rows import Rows

if TYPE_CHECKING:
    from datasets import Dataset


def is_peft_model(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("peft_config", "get_base_model", "disable_adapter"))


def apply_peft(model: nn.Module, peft_config) -> nn.Module:
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


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of every decoder layer (transformers >= 5.23 renamed the method)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def fused_adamw(model: nn.Module) -> bool:
    """AdamW's fused kernel (one op per step instead of a dozen per parameter; transformers' Trainer
    defaults to it, optim="adamw_torch_fused") where it applies: trainable floating-point parameters on CPU
    or CUDA, none of them an FSDP2 DTensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() and type(p.data) is torch.Tensor for p in params
    )


def frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def use_bf16(bf16: bool | None, device: torch.device) -> bool:
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if bf16 and not cuda_bf16:
        raise ValueError(f"bf16=True needs a CUDA device with bfloat16 support; the model is on {device}")
    return cuda_bf16 if bf16 is None else bf16


def reward_functions(reward_funcs) -> list[RewardFunction]:
    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    out = [get_reward_function(f) if isinstance(f, str) else f for f in funcs]
    for f in out:
        if not callable(f):
            raise TypeError(f"reward functions must be callables or built-in names, got {type(f).__name__}")
    if not out:
        raise ValueError("reward_funcs must name at least one reward function")
    return out


def reward_weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"reward_weights has {len(weights)} entries but there are {n} reward functions")
    return [float(w) for w in weights]


def as_dataset(data, name: str) -> Dataset:
    if isinstance(data, (list, tuple)):  # checked before Arrow refuses mixed types in its own words
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise TypeError(f"{name} row {i} must be a dict of columns, got {type(row).__name__}")
            if "prompt" in row:
                _check_prompt(row["prompt"], f"{name} row {i}")
    dataset = _from_list(list(data)) if isinstance(data, (list, tuple)) else data
    if "prompt" not in dataset.column_names:
        raise ValueError(f"{name} needs a 'prompt' column, got columns {dataset.column_names}")
    check_reward_columns(dataset.column_names, name)
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    for i, prompt in enumerate(dataset["prompt"]):
        _check_prompt(prompt, f"{name} row {i}")
    return dataset


def _from_list(rows: list[dict]):
    """``datasets.Dataset.from_list`` where datasets imports, else the same columns in memory."""
    try:
        from datasets import Dataset
    except ImportError:
        return Rows(rows)
    return Dataset.from_list(rows)


def _check_prompt(prompt, where: str) -> None:
    """A prompt is a non-blank string or a non-empty list of chat messages (dicts with a "content")."""
    expected = "a non-empty string or a non-empty list of chat messages ({'role': ..., 'content': ...})"
    if not isinstance(prompt, (str, list, tuple)):
        raise TypeError(f"{where}: the prompt must be {expected}, got {type(prompt).__name__} {prompt!r:.100}")
    chat = not isinstance(prompt, str) and all(isinstance(m, dict) and "content" in m for m in prompt)
    if not (prompt.strip() if isinstance(prompt, str) else prompt and chat):
        raise ValueError(f"{where}: the prompt must be {expected}, got {prompt!r:.100}")


def prompt_lengths(tokenizer, dataset: Dataset, name: str, chunk: int = 8192) -> list[int]:
    """The token count of every prompt of ``dataset`` as the trainer encodes it (chat prompts through the
    chat template, no special tokens added).

    Raises:
        ValueError naming ``name`` and the row of a prompt the tokenizer cannot encode: its chat template
        fails, it holds text the tokenizer only knows as its unknown token, or it encodes to no token.
    """
    prompts, lengths = list(dataset["prompt"]), []
    unk = tokenizer.unk_token_id
    if unk in (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id):
        unk = None  # no unknown token of its own (GPT-2's is its end-of-text token)
    for start in range(0, len(prompts), chunk):
        part = enumerate(prompts[start : start + chunk], start)
        texts = [_encodable(tokenizer, p, f"{name} row {i}") for i, p in part]
        for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
            if not ids or (unk is not None and unk in ids):
                problem = f"has text the tokenizer does not know (it would be encoded as {tokenizer.unk_token!r})"
                raise ValueError(f"{name} row {start + i}: the prompt {texts[i]!r:.100} "
                                 f"{problem if ids else 'encodes to no token'}; use a tokenizer that covers it or "
                                 "change that row")  # fmt: skip
            lengths.append(len(ids))
    return lengths


def _encodable(tokenizer, prompt, where: str) -> str:
    if not isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: the tokenizer cannot encode the prompt: the 'prompt' column holds chat messages "
                         "but the tokenizer has no chat template; use a model whose tokenizer has one (grpo-fast "
                         "tiny-model DIR --chat-template qwen makes a tiny one) or plain-text prompts")  # fmt: skip
    try:
        return prompt_text(tokenizer, prompt)
    except Exception as error:  # a missing or failing chat template: whatever the tokenizer raises
        why = f"{type(error).__name__}: {error}"
        raise ValueError(f"{where}: the tokenizer cannot encode the prompt ({why})") from error


def check_prompt_budget(name: str, lengths: list[int], max_prompt_length: int | None, new_tokens: tuple[str, int],
                        positions: int | None) -> int:  # fmt: skip
    """Warn once when prompts of ``name`` are longer than ``max_prompt_length`` (they keep their last tokens)
    and refuse a prompt + completion that can exceed the model's ``positions``; returns the number cut."""
    cut = [n for n in lengths if max_prompt_length is not None and n > max_prompt_length]
    if cut:
        warnings.warn(f"{len(cut)} of {len(lengths)} {name} prompts are longer than max_prompt_length = "
                      f"{max_prompt_length} tokens (the longest: {max(cut)}): they keep only their last "
                      f"{max_prompt_length} tokens; raise max_prompt_length to keep them whole", UserWarning,
                      stacklevel=3)  # fmt: skip
    kept = [min(n, max_prompt_length or n) for n in lengths]
    row = max(range(len(kept)), key=kept.__getitem__)
    budget, tokens = new_tokens
    if positions is not None and kept[row] + tokens > positions:
        raise ValueError(
            f"the longest {name} prompt (row {row}: {kept[row]} tokens) + {budget} {tokens} = {kept[row] + tokens} "
            f"tokens exceeds the model's max_position_embeddings = {positions}; lower max_prompt_length or {budget}"
        )
    return len(cut)


def check_tokenizer(tokenizer, model: nn.Module) -> None:
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


def load_tokenizer(model):
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", "")
    if not path:
        raise ValueError("tokenizer=None needs a model loaded from a directory (model.name_or_path is empty)")
    return AutoTokenizer.from_pretrained(path)
