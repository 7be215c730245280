"""Glue to Hugging Face causal LMs: load a model, split it into backbone + LM head, and run the
backbone on prompt + completion to get the hidden states that predict the completion tokens.

The loss is computed from these hidden states and the LM-head weight (grpo_fast.linear_grpo_loss),
so the (B, T, V) logits are never built by the trainer.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import torch
from torch import nn


def attn_implementation(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """flash_attention_2 for a bf16 / fp16 model on CUDA when the flash-attn package imports, sdpa otherwise.

    flash-attn computes in fp16 / bf16 only, so an fp32 model (the trainer's fp32 weights, run without
    autocast by ``bf16: false``, SFT and evaluation) would fail in its first forward; sdpa picks a flash
    kernel by itself for half-precision inputs (under autocast too). A package that is installed but
    does not import (built against another torch or CUDA: undefined symbols) counts as absent.
    """
    if torch.device(device).type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    try:
        importlib.import_module("flash_attn")
    except (ImportError, OSError):
        return "sdpa"
    return "flash_attention_2"


def load_model(path: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` from a local directory, with the attention picked above.

    dtype None = float32 (training keeps fp32 master weights; bf16 is used through autocast on CUDA).
    A directory of LoRA adapters (a peft checkpoint: adapter_config.json) loads its base model from the
    local directory the adapters name, and returns it with the adapters merged in.
    """
    from transformers import AutoModelForCausalLM

    check_model_path(path)
    adapters = Path(path) / "adapter_config.json"
    base = _adapter_base(adapters) if adapters.exists() else path
    dtype = dtype or torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=dtype, attn_implementation=attn_implementation(device, dtype)
    )
    if adapters.exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model.to(device)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as on the Hugging Face Hub


def check_model_path(path: str) -> None:
    """A local model directory must exist and hold config.json (or adapter_config.json); a path that does not
    exist is passed on (to the Hub) only when it looks like a Hub id ``org/name`` whose ``org`` is no local
    directory. FileNotFoundError naming the path otherwise (instead of a Hub lookup that times out)."""
    local = Path(path)
    if local.is_dir():
        if not any((local / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise FileNotFoundError(f"model directory {path} has no config.json: not a saved model; give a "
                                    "directory written by save_pretrained (e.g. RUN_DIR/checkpoint-N)")  # fmt: skip
        return
    if local.exists():
        raise FileNotFoundError(f"model path {path} is a file, not a model directory; give the directory")
    if not _HUB_ID.match(str(path)) or str(path).startswith((".", "~")) or local.parent.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist; check the path (a Hugging Face Hub id "
                                "looks like org/name)")  # fmt: skip


def _adapter_base(adapter_config: Path) -> str:
    """The local base-model directory a peft checkpoint names (nothing is downloaded)."""
    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").exists():
        raise ValueError(
            f"{adapter_config.parent} holds LoRA adapters whose base model {base!r} is not a local model "
            "directory; load the base model and apply the adapters with peft.PeftModel.from_pretrained"
        )
    return base


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(decoder that returns hidden states, LM-head linear layer) of a causal LM.

    Raises ValueError for models whose logits are not a plain linear map of the last hidden state
    (logit soft-capping or scaling), because the hidden-state loss would silently differ there.
    """
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, name, None) not in (None, 1.0):
            raise ValueError(
                f"model config sets {name}={getattr(config, name)}; the hidden-state loss needs logits = "
                "hidden @ lm_head.weight.T (+ bias)"
            )
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the model's output embeddings must be an nn.Linear, got {type(head).__name__}")
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    return backbone, head


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting only attended tokens, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_hidden(
    backbone: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor
) -> torch.Tensor:
    """Last hidden states at the positions that predict the completion tokens.

    Args:
        backbone: the decoder from ``backbone_and_head``.
        prompt_ids, prompt_mask: (B, P) left-padded prompts and their attention mask.
        completion_ids: (B, T) completions (anything after EOS is ignored by causality: those tokens
            only ever attend backwards, so they need no attention mask).
    Returns:
        (B, T, H): ``out[:, t]`` predicts ``completion_ids[:, t]``.
    """
    p, t = prompt_ids.shape[1], completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + T)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(completion_ids)], dim=1)  # (B, P + T)
    out = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state[:, p - 1 : p + t - 1]  # (B, T, H)
