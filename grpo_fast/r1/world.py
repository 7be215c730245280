"""The DeepSeek-R1 recipe's toy world: the demo's 3-digit addition (grpo_fast.r1.toy) with a chain of thought
that has words in it, written in two "languages", so that every stage of the recipe has something to
show. Nothing downloads; the tokenizer and the models are built in code.

A readable chain of thought (the cold-start data, written by a programmatic solver) names each column
and each carry in English:

    prompt      864+394=
    readable    <think>ones 4+4=8,tens 6+9=15 carry,hundreds 8+3+1=12 carry</think><answer>1258</answer>

The "pretraining" corpus of the base models is the web-like mix R1-Zero started from: each word is
English or Chinese at random (``个 十 百`` for ones/tens/hundreds, ``进`` for carry), some traces skip
the reasoning and guess the answer, and some give the answer without its tags:

    mixed       <think>个 4+4=8,tens 6+9=15 进,百 8+3+1=12 carry</think><answer>1258</answer>
    no reasoning <think></think><answer>1258</answer>
    untagged    <think>ones 4+4=8,十 6+9=15 进,...</think>1258

So the base model can answer, reasons poorly (guessing without a scratchpad is nearly always wrong for
a model this small), is sometimes badly formatted, and mixes languages in its reasoning (half of its
words are Chinese). Each word is one token in either language (English words are single tokens as in
a BPE vocabulary; the Chinese words are one character each), so choosing a language changes neither
the length nor the difficulty of a trace, only its language consistency.

Prompts, answers and the held-out splits are toy.make_splits' (fixed by toy.SPLIT_SEED).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from datasets import Dataset, concatenate_datasets
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from . import simple as r1_simple
from . import toy

COLUMN_WORDS = {"en": ("ones", "tens", "hundreds"), "zh": ("个", "十", "百")}
CARRY_WORD = {"en": "carry", "zh": "进"}
WORDS = tuple(w for lang in ("en", "zh") for w in (*COLUMN_WORDS[lang], CARRY_WORD[lang]))
# toy's vocabulary first, then a space, the words (English words as single tokens), and the lowercase
# letters so that any lowercase English text still tokenizes (character by character).
VOCAB = toy.VOCAB + (" ",) + WORDS + tuple(string.ascii_lowercase)
# Model sizes: the teacher is the demo's 0.53M-parameter Qwen2; the student has half its width (~1/4 of the
# parameters).
MODEL_SIZES = {
    "teacher": {"hidden_size": 128, "layers": 2, "heads": 4, "ffn": 512},
    "student": {"hidden_size": 64, "layers": 2, "heads": 4, "ffn": 256},
}


@dataclass(frozen=True)
class CorpusStyle:
    """How the base models' pretraining traces are written (probabilities per trace / per word).

    no_reasoning: share of traces with an empty ``<think></think>`` (a guess).
    other_language: chance that each word of a trace is Chinese instead of English.
    untagged_answer: share of traces whose answer follows ``</think>`` without ``<answer>`` tags.
    """

    no_reasoning: float = 0.25
    other_language: float = 0.5
    untagged_answer: float = 0.3


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Tokenizer over ``VOCAB``: tags and the English words are single tokens, everything else one token
    per character (saves/loads with save_pretrained / AutoTokenizer.from_pretrained)."""
    model = models.WordLevel({tok: i for i, tok in enumerate(VOCAB)}, unk_token="<unk>")
    tokenizer = Tokenizer(model)
    latin_words = "|".join(sorted((w for w in WORDS if w.isascii()), key=len, reverse=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(rf"</?[a-z]+>|{latin_words}|."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def build_model(tokenizer, size: str = "teacher", seed: int = 0):
    """A freshly initialised tiny Qwen2 of one of MODEL_SIZES (teacher ~0.54M, student ~0.14M parameters)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"size must be one of {sorted(MODEL_SIZES)}, got {size!r}")
    return toy.build_model(tokenizer, seed=seed, **MODEL_SIZES[size])


def trace(a: int, b: int, languages=("en",) * 4, reasoning: bool = True, tagged: bool = True) -> str:
    """The completion for ``a+b=``: one step per column, least significant first.

    Args:
        languages: the language ("en" or "zh") of each successive word of the reasoning.
        reasoning: False = an empty ``<think></think>`` (the answer is guessed).
        tagged: False = the answer follows ``</think>`` without ``<answer>`` tags.

    >>> trace(864, 394)
    '<think>ones 4+4=8,tens 6+9=15 carry,hundreds 8+3+1=12 carry</think><answer>1258</answer>'
    """
    words = iter(languages)
    steps, carry = [], 0
    if reasoning:
        for column, (da, db) in enumerate(zip(reversed(str(a)), reversed(str(b)), strict=True)):
            total = int(da) + int(db) + carry
            step = f"{COLUMN_WORDS[next(words, 'en')][column]} {da}+{db}" + ("+1" if carry else "") + f"={total}"
            carry = total // 10
            steps.append(step + (f" {CARRY_WORD[next(words, 'en')]}" if carry else ""))
    answer = f"<answer>{a + b}</answer>" if tagged else str(a + b)
    return f"<think>{','.join(steps)}</think>{answer}"


def readable_trace(a: int, b: int) -> str:
    """What the programmatic solver writes for the cold-start set: full reasoning, English only, tagged."""
    return trace(a, b)


def corpus_trace(a: int, b: int, rng: random.Random, style: CorpusStyle = CorpusStyle()) -> str:
    """One pretraining trace drawn from ``style`` (see the module docstring)."""
    reasoning = rng.random() >= style.no_reasoning
    languages = ["zh" if rng.random() < style.other_language else "en" for _ in range(6)]
    tagged = rng.random() >= style.untagged_answer
    return trace(a, b, languages, reasoning, tagged)


def _pairs(dataset: Dataset) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in p.rstrip("=").split("+")) for p in dataset["prompt"]]


def pretraining_corpus(
    dataset: Dataset, seed: int = 0, style: CorpusStyle = CorpusStyle(), simple: Dataset | None = None
) -> Dataset:
    """``dataset`` (prompt, answer) with a ``completion`` column of corpus traces (seeded), followed by
    the ``simple`` queries (grpo_fast.r1.simple) answered in the corpus' style when given."""
    rng = random.Random(seed)
    corpus = dataset.remove_columns(["completion"] if "completion" in dataset.column_names else []).add_column(
        "completion", [corpus_trace(a, b, rng, style) for a, b in _pairs(dataset)]
    )
    if simple is None:
        return corpus
    extra = r1_simple.written(simple, r1_simple.CORPUS_STYLE, seed).select_columns(corpus.column_names)
    return concatenate_datasets([corpus, extra])


def cold_start_set(dataset: Dataset, size: int, seed: int = 0) -> Dataset:
    """``size`` rows of ``dataset`` (drawn with ``seed``) with readable solver traces as completions."""
    if size > len(dataset):
        raise ValueError(f"cold-start size {size} exceeds the {len(dataset)} available prompts")
    rows = random.Random(seed).sample(range(len(dataset)), size)
    subset = dataset.select(rows)
    subset = subset.remove_columns(["completion"] if "completion" in subset.column_names else [])
    return subset.add_column("completion", [readable_trace(a, b) for a, b in _pairs(subset)])


def make_splits(num_train: int = 20_000, num_dev: int = 128, num_test: int = 256, seed: int = 0) -> dict:
    """toy.make_splits with the readable traces as ``completion`` and a ``language`` column ("en", the
    target language of the reasoning). Held-out prompts are fixed whatever ``seed`` is."""
    splits = toy.make_splits(num_train, num_dev, num_test, seed)
    out = {}
    for name, data in splits.items():
        data = data.remove_columns(["completion"])
        data = data.add_column("completion", [readable_trace(a, b) for a, b in _pairs(data)])
        out[name] = data.add_column("language", ["en"] * len(data))
    return out
