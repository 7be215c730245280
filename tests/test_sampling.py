"""Rejection sampling: each filter, their order, dedupe, the per-prompt cap, statistics, the JSONL set."""

import json

import pytest
import torch

pytest.importorskip("datasets", reason="needs the datasets package (the R1 recipe's data): pip install datasets")

from datasets import load_dataset  # noqa: E402

from grpo_fast.r1 import world as r1_toy  # noqa: E402
from grpo_fast.r1.language import language_consistency_reward  # noqa: E402
from grpo_fast.r1.rejection import (  # noqa: E402
    FILTERS,
    RejectionSamplingConfig,
    Sample,
    filter_samples,
    first_failed_filter,
    read_sft_set,
    rejection_sample,
    sample_completions,
    write_sft_set,
)
from grpo_fast.trainer.rewards import accuracy_reward, format_reward  # noqa: E402

GOOD = "<think>ones 1+2=3</think><answer>3</answer>"


def sample(i=0, text=GOOD, tokens=10, truncated=False, correct=1.0, fmt=1.0, lang=1.0):
    return Sample(i, text, tokens, truncated, correct, fmt, lang)


def test_each_filter_rejects_its_own_failure():
    cfg = RejectionSamplingConfig(max_new_tokens=20, max_tokens=15)
    assert first_failed_filter(sample(), cfg) is None
    assert first_failed_filter(sample(truncated=True), cfg) == "length"
    assert first_failed_filter(sample(tokens=16), cfg) == "length"  # within the budget but over max_tokens
    assert first_failed_filter(sample(fmt=0.0), cfg) == "format"
    assert first_failed_filter(sample(correct=0.0), cfg) == "correct"
    assert first_failed_filter(sample(correct=None), cfg) == "correct"  # no gold answer: cannot be verified
    assert first_failed_filter(sample(lang=0.8), cfg) == "language"
    assert first_failed_filter(sample(lang=None), cfg) == "language"  # no reasoning words: not readable
    # the first failing filter in order is the one reported
    assert first_failed_filter(sample(tokens=99, fmt=0.0, correct=0.0, lang=0.0), cfg) == "length"
    assert first_failed_filter(sample(fmt=0.0, correct=0.0, lang=0.0), cfg) == "format"


def test_filters_can_be_switched_off_or_loosened():
    loose = RejectionSamplingConfig(require_correct=False, require_format=False, min_language_consistency=None)
    assert first_failed_filter(sample(correct=0.0, fmt=0.0, lang=None), loose) is None
    assert first_failed_filter(sample(lang=0.8), RejectionSamplingConfig(min_language_consistency=0.75)) is None
    with pytest.raises(ValueError, match="min_language_consistency"):
        RejectionSamplingConfig(min_language_consistency=1.5)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        RejectionSamplingConfig(samples_per_prompt=0)


def test_dedupe_cap_and_statistics():
    cfg = RejectionSamplingConfig(max_new_tokens=20, max_per_prompt=2)
    samples = [
        sample(0, GOOD),
        sample(0, " " + GOOD + " "),  # the same text up to whitespace: a duplicate
        sample(0, GOOD.replace("ones", "ones ")),  # differs (whitespace inside collapses: still a duplicate)
        sample(0, GOOD.replace("1+2", "2+1")),  # a different correct trace: kept (2nd of prompt 0)
        sample(0, GOOD.replace("1+2", "0+3")),  # a third good one: over the cap
        sample(1, GOOD, correct=0.0),
        sample(1, GOOD, lang=0.5),
        sample(2, GOOD, truncated=True),
        sample(2, GOOD),  # prompt 2's first valid sample
    ]
    kept, stats = filter_samples(samples, cfg)
    assert [(s.prompt_index, s.completion) for s in kept] == [
        (0, GOOD),
        (0, GOOD.replace("1+2", "2+1")),
        (2, GOOD),
    ]
    assert stats["rejected"] == {"length": 1, "format": 0, "correct": 1, "language": 1, "duplicate": 2, "cap": 1}
    assert set(stats["rejected"]) == set(FILTERS)
    assert stats["sampled"] == 9 and stats["kept"] == 3 and stats["kept_rate"] == pytest.approx(3 / 9)
    assert sum(stats["rejected"].values()) == stats["sampled"] - stats["kept"]
    assert stats["prompts"] == 3 and stats["prompts_with_kept"] == 2
    # each filter's own pass rate counts every sample, not only those that reached it
    assert stats["pass_rate"] == {"length": 8 / 9, "format": 1.0, "correct": 8 / 9, "language": 8 / 9}
    assert stats["mean_kept_tokens"] == 10
    no_dedupe = RejectionSamplingConfig(max_new_tokens=20, max_per_prompt=9, dedupe=False)
    assert len(filter_samples(samples, no_dedupe)[0]) == 6


def test_empty_input():
    kept, stats = filter_samples([], RejectionSamplingConfig())
    assert kept == [] and stats["sampled"] == 0 and stats["kept_rate"] == 0.0


def test_sft_set_round_trip(tmp_path):
    rows = [{"prompt": "1+2=", "answer": "3", "completion": GOOD, "language": "en", "tokens": 10}]
    path = write_sft_set(tmp_path / "set.jsonl", rows, {"kept": 1, "sampled": 4})
    assert read_sft_set(path) == rows
    assert json.loads((tmp_path / "set.stats.json").read_text()) == {"kept": 1, "sampled": 4}
    loaded = load_dataset("json", data_files=str(path), split="train")
    assert loaded[0]["completion"] == GOOD and loaded.column_names[:2] == ["prompt", "answer"]


def test_sampled_scores_match_the_reward_functions(one_thread):
    """End to end on a fresh tiny model: each sample's scores are the rewards of its own text."""
    tok = r1_toy.build_tokenizer()
    model = r1_toy.build_model(tok, "student", seed=0)
    data = r1_toy.make_splits(num_train=3, num_dev=1, num_test=1)["train"]
    cfg = RejectionSamplingConfig(samples_per_prompt=3, max_new_tokens=12, seed=1)
    samples = sample_completions(model, tok, data, cfg)
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for s in samples:
        answer = [data[s.prompt_index]["answer"]]
        assert s.correct == accuracy_reward(["p"], [s.completion], answer=answer)[0]
        assert s.well_formed == format_reward(["p"], [s.completion])[0]
        assert s.language == pytest.approx(language_consistency_reward(["p"], [s.completion])[0])  # float32
        assert 1 <= s.tokens <= 12 and (s.tokens == 12 or not s.truncated)
    again = sample_completions(model, tok, data, cfg)
    assert [s.completion for s in again] == [s.completion for s in samples]  # seeded
    # an untrained model is never right: nothing survives the correctness filter
    rows, stats = rejection_sample(model, tok, data, cfg)
    assert rows == [] and stats["kept"] == 0 and stats["config"]["samples_per_prompt"] == 3
    loose = RejectionSamplingConfig(3, max_new_tokens=12, require_correct=False, require_format=False,
                                    min_language_consistency=None, max_tokens=12, seed=1)  # fmt: skip
    rows, stats = rejection_sample(model, tok, data, loose)
    assert stats["kept"] == len(rows) == stats["prompts_with_kept"] <= 3
    assert all(set(r) == {"prompt", "answer", "completion", "language", "tokens"} for r in rows)
    assert torch.is_grad_enabled()
