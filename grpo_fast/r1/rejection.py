"""Rejection sampling into an SFT set (DeepSeek-R1, arXiv 2501.12948, section 2.3.3): sample k completions
per prompt from a checkpoint, keep only the correct and readable ones, write them as JSONL.

    rows, stats = rejection_sample(model, tokenizer, prompts, RejectionSamplingConfig(samples_per_prompt=4))
    write_sft_set("runs/x/sft_set.jsonl", rows, stats)     # + runs/x/sft_set.stats.json

A sample is kept when it passes every filter, checked in this order (the statistics count each
rejected sample under the first filter it fails, and also give each filter's own pass rate):

    length      it ended (EOS within max_new_tokens) and has at most max_tokens tokens (R1: "long")
    format      <think>...</think><answer>...</answer> (rewards.format_reward)
    correct     its final answer equals the gold one (rewards.accuracy_reward)
    language    its reasoning is at least min_language_consistency in the target language
                (language.language_consistency_reward; a reasoning without words fails: R1 keeps
                only readable chains of thought and drops mixed-language ones)
    duplicate   the same completion text was already kept for this prompt
    cap         the prompt already has max_per_prompt kept samples (first ones in sampling order win)

The output rows carry the prompt's dataset columns (``answer``, ``language``, ...) plus ``completion``,
so the file is both an SFT set (prompt, completion) and a prompt set the rewards can score.

R1's SFT set also holds non-reasoning data (about 1 row in 4), simple queries answered without a chain
of thought. ``filter_non_reasoning`` checks such rows from a curated source (format, correct, no
reasoning, one per prompt) and ``mix_sets`` makes the mixed set at a ratio of reasoning to
non-reasoning rows, with a reasoning-only set of the same size beside it (the control):

    mixed, control, stats = mix_sets(reasoning_rows, non_reasoning_rows, ratio=3.0)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..trainer.evaluation import sample_and_score
from ..trainer.rewards import accuracy_reward, format_reward
from .language import language_consistency_reward, reasoning_text

FILTERS = ("length", "format", "correct", "language", "duplicate", "cap")
NON_REASONING_FILTERS = ("format", "correct", "reasoning", "duplicate")


@dataclass(frozen=True)
class RejectionSamplingConfig:
    """samples_per_prompt: k completions drawn per prompt. temperature / top_p: the sampler (R1 does
    not give them for this stage; 1.0 keeps the policy's own distribution). max_new_tokens: generation
    budget (a completion that has not ended by then is dropped). max_tokens: longest kept completion,
    EOS included (None = the generation budget). require_correct / require_format: the correctness and
    format filters. min_language_consistency: least share of the reasoning's words in the target
    language (None = no language filter). max_per_prompt: cap on kept samples per prompt. dedupe:
    drop repeated completions of one prompt. batch_size: completions generated at once."""

    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    max_tokens: int | None = None
    require_correct: bool = True
    require_format: bool = True
    min_language_consistency: float | None = 1.0
    max_per_prompt: int = 1
    dedupe: bool = True
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self):
        for name in ("samples_per_prompt", "max_new_tokens", "max_per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens!r}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        lc = self.min_language_consistency
        if lc is not None and not 0 <= lc <= 1:
            raise ValueError(f"min_language_consistency must be in [0, 1] or None, got {lc!r}")


@dataclass(frozen=True)
class Sample:
    """One sampled completion and its scores. prompt_index: the prompt's row; tokens: completion length
    with EOS; truncated: no EOS within the budget; correct / well_formed: accuracy and format rewards
    (1.0 / 0.0; correct None when the prompt has no gold answer); language: consistency in [0, 1] or
    None when the reasoning has no words."""

    prompt_index: int
    completion: str
    tokens: int
    truncated: bool
    correct: float | None
    well_formed: float
    language: float | None


def filter_checks(sample: Sample, config: RejectionSamplingConfig) -> dict[str, bool]:
    """Whether ``sample`` passes each of the length / format / correct / language filters on its own
    (a filter switched off in ``config`` passes everything)."""
    budget = config.max_new_tokens if config.max_tokens is None else config.max_tokens
    threshold = config.min_language_consistency
    return {
        "length": not sample.truncated and sample.tokens <= budget,
        "format": not config.require_format or sample.well_formed >= 1,
        "correct": not config.require_correct or (sample.correct is not None and sample.correct >= 1),
        "language": threshold is None or (sample.language is not None and sample.language >= threshold),
    }


def first_failed_filter(sample: Sample, config: RejectionSamplingConfig) -> str | None:
    """The first of length / format / correct / language this sample fails, or None (the duplicate and
    cap filters depend on the other samples: see ``filter_samples``)."""
    return next((name for name, ok in filter_checks(sample, config).items() if not ok), None)


def filter_samples(samples: list[Sample], config: RejectionSamplingConfig) -> tuple[list[Sample], dict]:
    """The samples that pass every filter, in input order, and the statistics (see the module docstring).

    Returns:
        (kept, stats): stats = {"sampled", "kept", "kept_rate", "prompts", "prompts_with_kept",
        "rejected" {filter: count (first failing filter)}, "pass_rate" {filter: share passing it alone},
        "mean_kept_tokens"}.
    """
    rejected = dict.fromkeys(FILTERS, 0)
    alone = dict.fromkeys(FILTERS[:4], 0)
    seen: dict[int, set[str]] = {}
    kept: list[Sample] = []
    for sample in samples:
        checks = filter_checks(sample, config)
        for name, ok in checks.items():
            alone[name] += ok
        failed = next((name for name, ok in checks.items() if not ok), None)
        texts = seen.setdefault(sample.prompt_index, set())
        key = " ".join(sample.completion.split())
        if failed is None and config.dedupe and key in texts:
            failed = "duplicate"
        if failed is None and len(texts) >= config.max_per_prompt:
            failed = "cap"
        if failed is not None:
            rejected[failed] += 1
            continue
        texts.add(key)
        kept.append(sample)
    n = len(samples)
    stats = {
        "sampled": n,
        "kept": len(kept),
        "kept_rate": len(kept) / n if n else 0.0,
        "prompts": len({s.prompt_index for s in samples}),
        "prompts_with_kept": len({s.prompt_index for s in kept}),
        "rejected": rejected,
        "pass_rate": {k: v / n if n else 0.0 for k, v in alone.items()},
        "mean_kept_tokens": sum(s.tokens for s in kept) / len(kept) if kept else math.nan,
    }
    return kept, stats


def _fields(config: RejectionSamplingConfig) -> dict:
    return {k: getattr(config, k) for k in config.__dataclass_fields__}


@torch.no_grad()
def sample_completions(
    model, tokenizer, dataset, config: RejectionSamplingConfig, on_batch: Callable[[], None] | None = None
) -> list[Sample]:
    """k completions per prompt of ``dataset`` (rows with ``prompt`` and the columns the rewards read,
    e.g. ``answer``, ``language``), scored; samples of one prompt are adjacent."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(config.seed)
    k = config.samples_per_prompt
    funcs = [accuracy_reward, format_reward, language_consistency_reward]
    samples: list[Sample] = []
    rows_per_batch = max(1, config.batch_size // k)
    for start in range(0, len(dataset), rows_per_batch):
        if on_batch is not None:
            on_batch()
        rows = dataset[start : start + rows_per_batch]
        rollout, completions, scores, _ = sample_and_score(
            model,
            tokenizer,
            rows,
            k,
            funcs,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            generator=generator,
        )  # (B, 3) scores
        for i, completion in enumerate(completions):
            correct, well_formed, language = (None if math.isnan(x) else x for x in scores[i].tolist())
            samples.append(
                Sample(start + i // k, completion if isinstance(completion, str) else completion[-1]["content"],
                       int(rollout.lengths[i]), bool(rollout.truncated[i]), correct, well_formed or 0.0, language)
            )  # fmt: skip
    return samples


def rejection_sample(
    model, tokenizer, dataset, config: RejectionSamplingConfig, on_batch: Callable[[], None] | None = None
) -> tuple[list[dict], dict]:
    """Sample, score and filter; returns (rows of the SFT set, statistics).

    Each row is the prompt's dataset row (prompt, answer, ...) with ``completion`` set to the kept
    sample (an existing ``completion`` column is replaced) and ``tokens`` its length.
    """
    samples = sample_completions(model, tokenizer, dataset, config, on_batch)
    kept, stats = filter_samples(samples, config)
    rows = []
    for s in kept:
        row = dict(dataset[s.prompt_index])
        row.update(completion=s.completion, tokens=s.tokens)
        rows.append(row)
    stats["config"] = _fields(config)
    return rows, stats


def write_sft_set(path: str | Path, rows: list[dict], stats: dict) -> Path:
    """Write ``rows`` as JSONL to ``path`` and ``stats`` to ``<path without suffix>.stats.json``; returns path.
    The JSONL loads with ``datasets.load_dataset("json", data_files=path)`` or
    ``grpo_fast.trainer.data.load_data_file``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    path.with_suffix(".stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return path


def read_sft_set(path: str | Path) -> list[dict]:
    """The rows of a JSONL SFT set."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def filter_non_reasoning(rows: list[dict]) -> tuple[list[dict], dict]:
    """The non-reasoning rows (prompt, completion, answer) to keep, in input order, and their statistics.
    A row is kept when it is well-formed (rewards.format_reward), its answer is right, its ``<think>``
    block is empty (a simple query is answered without reasoning) and its prompt has no kept row yet;
    a rejected row counts under the first of NON_REASONING_FILTERS it fails.

    Returns:
        (kept, {"offered", "kept", "rejected" {filter: count}, "pass_rate" {filter: share passing it alone}})
    """
    if not rows:
        return [], {"offered": 0, "kept": 0, "rejected": dict.fromkeys(NON_REASONING_FILTERS, 0), "pass_rate": {}}
    prompts, texts = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    well_formed = format_reward(prompts, texts)
    correct = accuracy_reward(prompts, texts, answer=[r.get("answer") for r in rows])
    rejected, alone = dict.fromkeys(NON_REASONING_FILTERS, 0), dict.fromkeys(NON_REASONING_FILTERS[:3], 0)
    seen, kept = set(), []
    for row, formed, right in zip(rows, well_formed, correct, strict=True):
        checks = {"format": formed >= 1, "correct": right is not None and right >= 1,
                  "reasoning": not reasoning_text(row["completion"]).strip()}  # fmt: skip
        for name, ok in checks.items():
            alone[name] += ok
        failed = next((name for name, ok in checks.items() if not ok), None)
        if failed is None and row["prompt"] in seen:
            failed = "duplicate"
        if failed is not None:
            rejected[failed] += 1
            continue
        seen.add(row["prompt"])
        kept.append(row)
    n = len(rows)
    pass_rate = {k: v / n for k, v in alone.items()}
    return kept, {"offered": n, "kept": len(kept), "rejected": rejected, "pass_rate": pass_rate}


def mix_sizes(total: int, ratio: float) -> tuple[int, int]:
    """(reasoning rows, non-reasoning rows) of a set of ``total`` rows at ``ratio`` reasoning rows per
    non-reasoning one (R1: 600k / 200k, ratio 3).

    >>> mix_sizes(2000, 3.0)
    (1500, 500)
    """
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio!r}")
    non_reasoning = round(total / (ratio + 1))
    return total - non_reasoning, non_reasoning


def mix_sets(reasoning: list[dict], non_reasoning: list[dict], ratio: float = 3.0) -> tuple[list, list, dict]:
    """The mixed SFT set, the reasoning-only set of the same size and the statistics of the mix.

    Every reasoning row is offered; the mix keeps the first of them and the first kept non-reasoning
    rows at ``ratio`` (fewer non-reasoning rows when the source runs short, the mix then has the ratio
    it can); the reasoning-only set is the same number of reasoning rows. Both sets are in the rows'
    order with the non-reasoning rows spread evenly through the mix (so a prefix has the ratio too).

    Returns:
        (mixed rows, reasoning-only rows, {"reasoning", "non_reasoning", "size", "ratio", "target_ratio"})
    """
    want_reasoning, want_non_reasoning = mix_sizes(len(reasoning), ratio)
    n_non = min(want_non_reasoning, len(non_reasoning))
    n_reasoning = len(reasoning) - n_non
    mixed = _interleave(reasoning[:n_reasoning], non_reasoning[:n_non])
    control = list(reasoning[: n_reasoning + n_non])
    stats = {"reasoning": n_reasoning, "non_reasoning": n_non, "size": len(mixed),
             "ratio": n_reasoning / n_non if n_non else math.inf, "target_ratio": ratio}  # fmt: skip
    return mixed, control, stats


def _interleave(first: list, second: list) -> list:
    """``first`` with ``second``'s rows spread evenly through it, both in order."""
    total = len(first) + len(second)
    out, j = [], 0
    for i in range(total):
        if j < len(second) and (j + 1) * total <= (i + 1) * len(second):
            out.append(second[j])
            j += 1
        else:
            out.append(first[i - j])
    return out
