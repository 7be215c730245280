"""The models the trainer benchmarks build from a config (random weights, nothing downloaded), by name.

``toy``: the demo's 0.53M-parameter Qwen2 and character tokenizer (grpo_fast.r1.toy), scored by the demo's
accuracy reward. ``qwen2.5-0.5b``: Qwen2.5-0.5B's architecture (V 151936, H 896, 24 layers, 14 query and
2 key/value heads, FFN 4864, tied embeddings) with random weights; ``tiny-qwen2``: the same code path at
toy size, for ``bench.gpu_check --dry-run``. A random model's completions are noise and never answer the
addition prompts, so those two are scored by ``hash_reward``, which spreads rewards over [0, 1] and so gives
the update non-zero advantages. Their tokenizer is the demo's with filler words up to the model's
vocabulary, so every sampled id decodes.
"""

from __future__ import annotations

import re
import zlib

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from grpo_fast.r1 import toy
from grpo_fast.trainer.rewards import accuracy_reward

# name -> Qwen2Config fields besides the tokenizer's ids (None: the demo's model)
MODELS = {
    "toy": None,
    "qwen2.5-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rope_theta=1e6,
    ),
    "tiny-qwen2": dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1e6,
    ),
}


SCALED = re.compile(r"qwen2-v(\d+)-h(\d+)")  # "qwen2-v32000-h512": see scaled_fields


def scaled_name(vocab: int, hidden: int) -> str:
    return f"qwen2-v{vocab}-h{hidden}"


def scaled_fields(vocab: int, hidden: int) -> dict:
    """A Qwen2 of vocabulary ``vocab`` and width ``hidden`` for the scaling grid (bench.trainer_scaling):
    hidden 128 is the demo's model (2 layers, 4 heads of 32, FFN 4 x hidden); every doubling of the width
    adds a layer, heads stay 32 wide, FFN 4 x hidden, all heads are key/value heads (as the demo's)."""
    if hidden % 32 or hidden < 64:
        raise ValueError(f"hidden must be a multiple of 32 and >= 64, got {hidden}")
    layers = 2 + max(0, (hidden // 128).bit_length() - 1)
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32)  # fmt: skip


def hash_reward(prompts, completions, **kwargs) -> list[float]:
    """A reward that depends only on the completion's text (CRC-32 in [0, 1]): deterministic, spread out."""
    return [(zlib.crc32(str(c).encode()) % 1001) / 1000 for c in completions]


def filler_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """The demo's character tokenizer, its vocabulary padded with words "<w123>" up to ``vocab_size``."""
    vocab = list(toy.VOCAB) + [f"<w{i}>" for i in range(len(toy.VOCAB), vocab_size)]
    tokenizer = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"</?[a-z]+>|."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def build(name: str, device, seed: int = 0):
    """(tokenizer, model on ``device``, reward function) for a name in ``MODELS`` or a ``scaled_name``."""
    scaled = SCALED.fullmatch(name)
    if name not in MODELS and not scaled:
        raise ValueError(f"model must be one of {sorted(MODELS)} or {SCALED.pattern}, got {name!r}")
    if MODELS.get(name, 0) is None:
        tokenizer = toy.build_tokenizer()
        return tokenizer, toy.build_model(tokenizer, seed=seed).to(device), accuracy_reward
    fields = scaled_fields(*map(int, scaled.groups())) if scaled else MODELS[name]
    tokenizer = filler_tokenizer(fields["vocab_size"])
    ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = Qwen2Config(**fields, **ids, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         max_position_embeddings=4096, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: 0.5B parameters initialise in seconds on a GPU
        model = Qwen2ForCausalLM(config)
    return tokenizer, model, hash_reward
