"""A random tiny Qwen2 or Llama with a byte-level tokenizer and a chat template, built in code (no download):
``grpo-fast tiny-model DIR`` writes one, for trying the real path (chat prompts, Hub-style datasets, the CLI)
offline. Untrained: its completions are random bytes, so rewards stay near 0; it exercises the machinery,
it does not learn a task in a few steps."""

from __future__ import annotations

from pathlib import Path

import torch

# ChatML (Qwen2/2.5/3) and Llama-3's header format, without their default system prompts or tool calls
CHAT_TEMPLATES = {
    "qwen": (
        "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "llama": (
        "{{ '<|begin_of_text|>' }}{%- for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt "
        "%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    "none": None,
}
# (special tokens, eos, pad) per template: the end-of-turn token ends a completion, as in the real models
_SPECIAL = {
    "qwen": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|endoftext|>"),
    "llama": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"],
              "<|eot_id|>", "<|pad|>"),
    "none": (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>"),
}  # fmt: skip


def byte_level_tokenizer(chat_template: str = "qwen"):
    """A ``PreTrainedTokenizerFast``: one token per byte (GPT-2's byte alphabet, no merges) plus the special
    tokens of ``chat_template`` (qwen, llama or none), left padding for generation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _check_template(chat_template)
    specials, eos, pad = _SPECIAL[chat_template]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=pad, padding_side="left")
    fast.chat_template = CHAT_TEMPLATES[chat_template]
    return fast


def tiny_model(tokenizer, family: str = "qwen2", seed: int = 0, hidden_size: int = 64, layers: int = 2,
               max_positions: int = 2048) -> torch.nn.Module:  # fmt: skip
    """A randomly initialised Qwen2 or Llama causal LM (tied embeddings) sized for ``tokenizer``; the
    initialisation draws from its own generator state (the caller's RNG is left as it was)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if family not in classes:
        raise ValueError(f"family must be one of {', '.join(classes)}, got {family!r}")
    config_class, model_class = classes[family]
    config = config_class(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=max_positions, tie_word_embeddings=True,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.eos_token_id)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def save_tiny_model(path: str | Path, chat_template: str = "qwen", seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer to ``path`` (``AutoModelForCausalLM`` / ``AutoTokenizer``
    load them): a Qwen2 with the qwen (ChatML) or no template, a Llama with the llama one."""
    tokenizer = byte_level_tokenizer(chat_template)
    model = tiny_model(tokenizer, "llama" if chat_template == "llama" else "qwen2", seed=seed)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _check_template(name: str) -> None:
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"chat template must be one of {', '.join(CHAT_TEMPLATES)}, got {name!r}")
