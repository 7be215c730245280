"""Rule-based rewards and the reward-function protocol."""

import math

import pytest

from grpo_fast.trainer.rewards import (
    RewardFunctionError,
    accuracy_reward,
    answers_match,
    call_reward_function,
    extract_answer,
    format_reward,
    get_reward_function,
    score_completions,
    soft_overlong_punishment,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>2+2=4</think><answer>4</answer>", "4"),
        ("<answer>1</answer> then <answer> 12 </answer>", "12"),  # the last tag wins, stripped
        ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{3} and later \\boxed{7}", "7"),
        ("\\boxed{3", "3"),  # unbalanced box: falls through to the last number
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),  # GSM8K
        ("it costs $1,234.50 in total, not 9", "9"),  # last number
        ("the answer is 1,234", "1,234"),
        ("-3 degrees", "-3"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "predicted, gold, match",
    [
        ("1,258", "1258", True),
        ("$5", "5", True),
        ("5.0", "5", True),
        ("0.5", ".5", True),
        ("50%", "50", True),
        ("72", "Natalia sold 48/2 = 24 clips.\n#### 72", True),  # gold given as a full GSM8K solution
        ("\\frac{1}{2}", "The answer is \\boxed{\\frac{1}{2}}", True),
        ("12", "13", False),
        (None, "1", False),
        ("Paris", " paris ", True),
    ],
)
def test_answers_match(predicted, gold, match):
    assert answers_match(predicted, gold) is match


def test_accuracy_reward_columns_and_chat_completions():
    completions = ["<answer>7</answer>", "<answer>8</answer>", "blah 7"]
    assert accuracy_reward(None, completions, answer=["7", "7", "7"]) == [1.0, 0.0, 1.0]
    assert accuracy_reward(None, completions, solution=["\\boxed{8}"] * 3) == [0.0, 1.0, 0.0]
    assert accuracy_reward(None, completions) == [None, None, None]  # no gold column: does not apply
    chat = [[{"role": "assistant", "content": "<answer>7</answer>"}]]
    assert accuracy_reward(None, chat, answer=["7"]) == [1.0]


def test_format_reward():
    good = ["<think>a</think><answer>1</answer>", "  <think>\nx\n</think>\n<answer>2</answer>\n"]
    bad = ["<answer>1</answer>", "<think>a</think><answer>1</answer> trailing", "<think>a<answer>1</answer>", ""]
    assert format_reward(None, good + bad) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_soft_overlong_punishment_follows_dapo():
    fn = soft_overlong_punishment(max_completion_length=20, soft_punish_cache=5)
    lengths = [1, 15, 16, 18, 20, 21]
    out = fn(None, [""] * len(lengths), completion_ids=[[0] * n for n in lengths])
    assert out == [0.0, 0.0, -0.2, -0.6, -1.0, -1.0]
    with pytest.raises(ValueError, match="soft_punish_cache"):
        soft_overlong_punishment(10, 11)


def test_raising_reward_function_is_named_with_its_sample():
    def picky_reward(prompts, completions, answer, **kwargs):
        return [1.0 / (len(c) - 3) for c in completions]  # raises on the 3-character completion

    with pytest.raises(RewardFunctionError) as info:
        call_reward_function(picky_reward, ["p0", "p1"], ["long one", "abc"], {"answer": ["x", "y"]})
    message = str(info.value)
    assert "'picky_reward'" in message and "ZeroDivisionError" in message
    assert "sample 1" in message and "'abc'" in message and "answer='y'" in message
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_reward_function_results_are_checked():
    def short(prompts, completions, **kwargs):
        return [1.0]

    def infinite(prompts, completions, **kwargs):
        return [math.inf] * len(completions)

    with pytest.raises(RewardFunctionError, match="'short' must return a list of 2 values"):
        call_reward_function(short, ["a", "b"], ["c", "d"], {})
    with pytest.raises(RewardFunctionError, match="'infinite' returned inf for sample 0"):
        call_reward_function(infinite, ["a"], ["c"], {})


def test_score_completions_weights_and_none():
    def half(prompts, completions, **kwargs):
        return [0.5, None, None]

    def one(prompts, completions, **kwargs):
        return [1.0, 1.0, None]

    per_function, total = score_completions([half, one], [2.0, 1.0], ["p"] * 3, ["c"] * 3, {})
    assert per_function.shape == (3, 2) and math.isnan(per_function[1, 0])
    assert total.tolist() == [2.0, 1.0, 0.0]  # None is skipped; all-None samples get 0


def test_builtin_names():
    assert get_reward_function("accuracy") is accuracy_reward
    with pytest.raises(ValueError, match="unknown reward function 'acc'"):
        get_reward_function("acc")
