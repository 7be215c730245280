"""The toy world's non-reasoning task family: queries whose answer needs no chain of thought, the stand-in
for the non-reasoning part of DeepSeek-R1's SFT data (writing, factual QA, ... reused from DeepSeek-V3,
answered without a chain of thought when the query is simple).

A query names an operation and a 3-digit number; the answer is read off the number:

    copy 472=       <think></think><answer>472</answer>       repeat the number
    tens 472=       <think></think><answer>7</answer>         the digit in that column
    (also ``ones`` and ``hundreds``)

There are 4 x 900 = 3,600 queries; 256 of them are held out (fixed by toy.SPLIT_SEED whatever the run
seed), the rest are training queries.

Two programmatic writers answer them, both always with the right digits:

- CORPUS_STYLE, the web-like pretraining corpus (r1_toy.pretraining_corpus): half of its answers
  spell the number out first in a needless chain of thought (``<think>百 4,tens 7,个 2</think>``, words
  in either language as the addition traces), and some leave out the answer tags;
- SOURCE_STYLE (``source_answer_set``), the curated source the rejection-sampled SFT set draws its non-reasoning rows
  from (R1 reused DeepSeek-V3's SFT data): mostly the clean answer above, with a share of needless
  chains of thought, untagged answers and slips that the non-reasoning filters remove
  (grpo_fast.r1.rejection.filter_non_reasoning).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset

from . import toy

KINDS = ("copy", "ones", "tens", "hundreds")
COLUMN_WORDS = {"en": ("ones", "tens", "hundreds"), "zh": ("个", "十", "百")}


@dataclass(frozen=True)
class SimpleStyle:
    """How a writer answers the simple queries (probabilities per answer).

    reasoning: share of answers with a needless chain of thought (the number spelt out by column).
    other_language: chance that each word of that chain is Chinese instead of English.
    untagged_answer: share of answers that follow ``</think>`` without ``<answer>`` tags.
    wrong: share of answers off by one in their last digit (a slip)."""

    reasoning: float = 0.5
    other_language: float = 0.5
    untagged_answer: float = 0.3
    wrong: float = 0.0


CORPUS_STYLE = SimpleStyle()
SOURCE_STYLE = SimpleStyle(reasoning=0.15, other_language=0.0, untagged_answer=0.05, wrong=0.05)


def answer(kind: str, number: int) -> str:
    """The right answer of the query ``f"{kind} {number}="``.

    >>> answer("copy", 472), answer("tens", 472), answer("hundreds", 472)
    ('472', '7', '4')
    """
    if kind == "copy":
        return str(number)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return str(number)[2 - KINDS.index(kind) + 1]


def completion(kind: str, number: int, reasoning: bool = False, languages=("en",) * 3, tagged: bool = True,
               wrong: bool = False) -> str:  # fmt: skip
    """An answer to ``f"{kind} {number}="``: no reasoning (the default: ``<think></think>``) or the number
    spelt out by column in ``languages`` (one per column, most significant first).

    >>> completion("tens", 472), completion("copy", 472, reasoning=True)
    ('<think></think><answer>7</answer>', '<think>hundreds 4,tens 7,ones 2</think><answer>472</answer>')
    """
    text = answer(kind, number)
    if wrong:
        text = text[:-1] + str((int(text[-1]) + 1) % 10)
    steps = []
    if reasoning:
        for column, (digit, lang) in enumerate(zip(str(number), languages, strict=True)):
            steps.append(f"{COLUMN_WORDS[lang][2 - column]} {digit}")
    tail = f"<answer>{text}</answer>" if tagged else text
    return f"<think>{','.join(steps)}</think>{tail}"


def styled_completion(kind: str, number: int, rng: random.Random, style: SimpleStyle) -> str:
    """One answer drawn from ``style``."""
    reasoning = rng.random() < style.reasoning
    languages = ["zh" if rng.random() < style.other_language else "en" for _ in range(3)]
    tagged = rng.random() >= style.untagged_answer
    return completion(kind, number, reasoning, languages, tagged, wrong=rng.random() < style.wrong)


def _dataset(queries: list[tuple[str, int]]) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [f"{kind} {n}=" for kind, n in queries],
            "answer": [answer(kind, n) for kind, n in queries],
            "completion": [completion(kind, n) for kind, n in queries],
            "language": ["en"] * len(queries),
        }
    )


def make_splits(num_test: int = 256, seed: int = 0) -> dict:
    """{"train", "test"} Datasets of the simple queries (prompt, answer, completion = the clean answer,
    language): the test queries are fixed by toy.SPLIT_SEED, ``seed`` orders the training ones."""
    queries = [(kind, n) for kind in KINDS for n in range(toy.LOW, toy.HIGH + 1)]
    if not 0 <= num_test < len(queries):
        raise ValueError(f"num_test must be in [0, {len(queries)}), got {num_test!r}")
    random.Random(toy.SPLIT_SEED).shuffle(queries)
    test, train = queries[:num_test], queries[num_test:]
    random.Random(seed).shuffle(train)
    return {"train": _dataset(train), "test": _dataset(test)}


def _queries(dataset: Dataset) -> list[tuple[str, int]]:
    out = []
    for prompt in dataset["prompt"]:
        kind, number = prompt.rstrip("=").split(" ")
        out.append((kind, int(number)))
    return out


def written(dataset: Dataset, style: SimpleStyle, seed: int = 0) -> Dataset:
    """``dataset`` of simple queries with ``completion`` written in ``style`` (seeded)."""
    rng = random.Random(seed)
    texts = [styled_completion(kind, n, rng, style) for kind, n in _queries(dataset)]
    return dataset.remove_columns(["completion"]).add_column("completion", texts)


def source_answer_set(dataset: Dataset, size: int, seed: int = 0) -> Dataset:
    """The first ``size`` queries of ``dataset`` answered by the curated source (SOURCE_STYLE)."""
    return written(dataset.select(range(min(size, len(dataset)))), SOURCE_STYLE, seed)
