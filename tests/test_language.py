"""Language-consistency reward: Unicode scripts, words, the reasoning block, the reward protocol."""

import math

import pytest

pytest.importorskip("datasets", reason="needs the datasets package (the R1 recipe's data): pip install datasets")

from grpo_fast.r1 import world as r1_toy  # noqa: E402
from grpo_fast.r1.language import (  # noqa: E402
    char_script,
    language_consistency,
    language_consistency_reward,
    make_language_reward,
    reasoning_text,
    script_words,
    target_scripts,
)
from grpo_fast.trainer.rewards import score_completions  # noqa: E402


def test_char_script_reads_unicode_names():
    assert [char_script(c) for c in "aZé"] == ["Latin"] * 3
    assert [char_script(c) for c in "十进位"] == ["Han"] * 3
    assert (char_script("я"), char_script("α"), char_script("ひ"), char_script("カ")) == (
        "Cyrillic",
        "Greek",
        "Hiragana",
        "Katakana",
    )
    assert char_script("한") == "Hangul" and char_script("Ｋ") == "Latin"  # fullwidth Latin is Latin
    assert [char_script(c) for c in "7+ ,。<>_"] == [None] * 8  # digits, symbols, punctuation: no language


def test_words_latin_runs_and_one_word_per_cjk_character():
    assert script_words("ones 4+4=8,十位 carry") == [
        ("ones", "Latin"),
        ("十", "Han"),
        ("位", "Han"),
        ("carry", "Latin"),
    ]
    assert script_words("abc十def") == [("abc", "Latin"), ("十", "Han"), ("def", "Latin")]
    assert script_words("café") == [("café", "Latin")]  # a combining accent stays in its word
    assert script_words("123 + 456 = 579") == []


def test_consistency_is_the_share_of_target_words():
    assert language_consistency("ones 4+4=8,tens 6+9=15 carry") == 1.0
    assert language_consistency("个 4+4=8,十 6+9=15 进") == 0.0
    assert language_consistency("个 4+4=8,十 6+9=15 进", "zh") == 1.0
    assert language_consistency("ones 4+4=8,十 6+9=15 carry") == pytest.approx(2 / 3)
    assert language_consistency("ones 十", "Han") == 0.5  # a script name works as a target
    assert language_consistency("4+4=8") is None and language_consistency("") is None
    assert language_consistency("これは漢字", "ja") == 1.0  # Japanese mixes three scripts
    with pytest.raises(ValueError, match="target language"):
        target_scripts("klingon")


def test_reasoning_is_the_think_block():
    assert reasoning_text("<think>a 十</think><answer>b</answer>") == "a 十"
    assert reasoning_text("<think>unclosed 十") == "unclosed 十"
    assert reasoning_text("no tags<answer>answer words</answer>") == "no tags"
    # the answer's words do not count: only the chain of thought is judged
    assert language_consistency(reasoning_text("<think>ones 1+1=2</think><answer>二</answer>")) == 1.0


def test_reward_protocol_targets_and_none():
    completions = [
        "<think>ones 4+4=8,tens 6+9=15 carry</think><answer>158</answer>",
        "<think>个 4+4=8,tens 6+9=15 进</think><answer>158</answer>",
        "<think></think><answer>158</answer>",
        [{"role": "assistant", "content": "<think>十</think><answer>1</answer>"}],
    ]
    prompts = ["p"] * 4
    assert language_consistency_reward(prompts, completions) == [1.0, pytest.approx(1 / 3), None, 0.0]
    assert language_consistency_reward(prompts, completions, language=["en", "zh", "en", "zh"])[1] == pytest.approx(
        2 / 3
    )
    fixed = make_language_reward("zh")
    assert fixed.__name__ == "language_consistency_reward" and fixed(prompts, completions)[3] == 1.0
    # in the trainer's scorer None is NaN: left out of the weighted sum (adds 0), not a crash
    per_function, total = score_completions([language_consistency_reward], [1.0], prompts, completions, {})
    assert math.isnan(per_function[2, 0]) and total[2] == 0.0 and total[0] == 1.0


def test_toy_traces_measure_as_designed():
    assert language_consistency(reasoning_text(r1_toy.readable_trace(864, 394))) == 1.0
    all_zh = r1_toy.trace(864, 394, languages=["zh"] * 6)
    assert language_consistency(reasoning_text(all_zh)) == 0.0
    mixed = r1_toy.trace(864, 394, languages=["en", "zh", "en", "zh", "en"])
    assert language_consistency(reasoning_text(mixed)) == pytest.approx(3 / 5)  # 3 columns + 2 carries
    assert language_consistency(reasoning_text(r1_toy.trace(864, 394, reasoning=False))) is None
