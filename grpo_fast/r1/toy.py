"""The embedded demo task: 3-digit addition with a per-column scratchpad, on a tiny Qwen2.

Nothing here downloads anything. The tokenizer is character-level and built in code (tags are single
tokens), the model is a Qwen2 architecture from a config (~0.53M parameters), and the data are
synthetic:

    prompt      864+394=
    completion  <think>4+4=8,6+9=15,8+3+1=12</think><answer>1258</answer><eos>

The scratchpad writes one column per step, least significant first, with the carry as "+1". A
direct-answer format learns far slower.

Splits are fixed by ``SPLIT_SEED`` (not by the run seed), so every run is scored on the same held-out
prompts, and the test, dev and training prompts are pairwise disjoint.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from ..optional import require

if TYPE_CHECKING:
    from datasets import Dataset

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
VOCAB = SPECIAL_TOKENS + TAGS + tuple("0123456789+=,")
SPLIT_SEED = 1234
LOW, HIGH = 100, 999  # operands are 3-digit numbers


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over ``VOCAB``: every tag is one token, every other character one token.

    It saves and loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` (tokenizer.json).
    """
    model = models.WordLevel({tok: i for i, tok in enumerate(VOCAB)}, unk_token="<unk>")
    tokenizer = Tokenizer(model)
    # A tag is matched whole before the one-character fallback, so "<think>" is one token.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"</?[a-z]+>|."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # no spaces between characters when decoding
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def tiny_qwen2_config(tokenizer, hidden_size: int = 128, layers: int = 2, heads: int = 4, ffn: int = 512):
    """Qwen2 config of the demo model: hidden 128, 2 layers, 4 heads, FFN 512, tied embeddings (~0.53M)."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        attn_implementation="sdpa",
    )


def build_model(tokenizer, seed: int = 0, **config_kwargs) -> Qwen2ForCausalLM:
    """A freshly initialised tiny Qwen2 (float32, sdpa attention); initialisation is seeded."""
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(tiny_qwen2_config(tokenizer, **config_kwargs))


def scratchpad(a: int, b: int) -> str:
    """The target completion for ``a+b=`` (without the end-of-sequence token).

    >>> scratchpad(864, 394)
    '<think>4+4=8,6+9=15,8+3+1=12</think><answer>1258</answer>'
    """
    steps, carry = [], 0
    for da, db in zip(reversed(str(a)), reversed(str(b))):
        total = int(da) + int(db) + carry
        steps.append(f"{da}+{db}" + ("+1" if carry else "") + f"={total}")
        carry = total // 10
    return f"<think>{','.join(steps)}</think><answer>{a + b}</answer>"


def addition_rows(pairs: list[tuple[int, int]]) -> list[dict]:
    """One dict per pair: prompt ("a+b="), answer (the sum as text), completion (the scratchpad target, for SFT)."""
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b), "completion": scratchpad(a, b)} for a, b in pairs]


def addition_dataset(pairs: list[tuple[int, int]]) -> Dataset:
    """``addition_rows`` as a ``datasets.Dataset`` (columns prompt, answer, completion)."""
    Dataset = require("datasets", "the addition task's datasets (grpo_fast.r1.toy.addition_dataset)").Dataset
    return Dataset.from_list(addition_rows(pairs))


def make_splits(num_train: int = 20_000, num_dev: int = 128, num_test: int = 256, seed: int = 0) -> dict:
    """Disjoint train / dev / test splits of the addition task (``split_pairs``) as Datasets.

    Returns:
        {"train": Dataset, "dev": Dataset, "test": Dataset}
    """
    return {name: addition_dataset(pairs) for name, pairs in split_pairs(num_train, num_dev, num_test, seed).items()}


def split_pairs(num_train: int = 20_000, num_dev: int = 128, num_test: int = 256, seed: int = 0) -> dict:
    """Disjoint train / dev / test lists of (a, b) pairs.

    test and dev are fixed by ``SPLIT_SEED`` whatever ``seed`` is (every run is scored on the same
    prompts); ``seed`` only picks which of the remaining pairs form the training set.
    """
    held_out = _distinct_pairs(random.Random(SPLIT_SEED), num_dev + num_test, exclude=set())
    test, dev = held_out[:num_test], held_out[num_test:]
    train = _distinct_pairs(random.Random(seed), num_train, exclude=set(held_out))
    return {"train": train, "dev": dev, "test": test}


def _distinct_pairs(rng: random.Random, n: int, exclude: set) -> list[tuple[int, int]]:
    available = (HIGH - LOW + 1) ** 2 - len(exclude)
    if n > available:
        raise ValueError(f"asked for {n} distinct pairs but only {available} are left after the held-out split")
    chosen: dict[tuple[int, int], None] = {}  # insertion-ordered set: the order is the rng's
    while len(chosen) < n:
        pair = (rng.randint(LOW, HIGH), rng.randint(LOW, HIGH))
        if pair not in exclude:
            chosen[pair] = None
    return list(chosen)
