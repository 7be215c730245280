"""Rule-based rewards and the reward-function protocol."""

import importlib.util
import logging
import math
import sys
import time

import pytest

from grpo_fast.trainer import rewards
from grpo_fast.trainer.rewards import (
    RewardFunctionError,
    RewardTimeoutError,
    accuracy_reward,
    answer_matcher,
    answers_match,
    call_reward_function,
    extract_answer,
    format_reward,
    get_reward_function,
    gold_answer,
    make_format_reward,
    math_verify_match,
    score_completions,
    soft_overlong_punishment,
)

HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None
needs_math_verify = pytest.mark.skipif(not HAS_MATH_VERIFY, reason="needs math-verify (pip install 'grpo-fast[math]')")


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


@pytest.mark.parametrize(
    "gold, expected",
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("#### 1,000\n", "1,000"),
        ("so it is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{3", None),  # unbalanced
        (" 42 ", "42"),
    ],
)
def test_gold_answer_extracts_gsm8k_and_boxed_forms(gold, expected):
    assert gold_answer(gold) == expected


# (completion, gold, a person's score, the plain normaliser's score): GSM8K and MATH-style answers, right
# and wrong; math-verify scores every row as a person would, the plain normaliser misses the LaTeX ones
TABLE = [
    ("<answer>72</answer>", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1, 1),
    ("<answer>72</answer>", "#### 73", 0, 0),
    ("So she earned $10.", "#### 10", 1, 1),
    ("The total is 1,000 dollars", "#### 1000", 1, 1),
    ("<answer>18.0</answer>", "#### 18", 1, 1),
    ("the answer is 5", "#### 6", 0, 0),
    ("I cannot tell.", "#### 4", 0, 0),
    ("<answer>50%</answer>", "50", 1, 1),
    ("<answer>\\frac{1}{2}</answer>", "0.5", 1, 0),
    ("\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", 1, 0),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1, 0),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0, 0),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1, 0),
    ("\\boxed{2\\sqrt{3}}", "2\\sqrt{2}", 0, 0),
    ("\\boxed{x = 2}", "2", 1, 0),
    ("\\boxed{x = 3}", "2", 0, 0),
    ("\\boxed{10^{3}}", "1000", 1, 0),
    ("\\boxed{10^{4}}", "1000", 0, 0),
    ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", 1, 0),
    ("\\boxed{\\{1, 3\\}}", "\\{2, 1\\}", 0, 0),
    ("\\boxed{[0, 1)}", "[0,1)", 1, 0),
    ("\\boxed{(0, 1)}", "[0,1)", 0, 0),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1, 0),
    ("\\boxed{0.75}", "\\frac{3}{4}", 1, 0),
    ("\\boxed{\\pi}", "\\pi", 1, 1),
    ("\\boxed{3.14}", "\\pi", 0, 0),
    ("\\boxed{25\\%}", "\\frac{1}{4}", 1, 0),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", 1, 0),
    ("\\boxed{\\frac{1}{2}}", "-0.5", 0, 0),
    ("\\boxed{2x + 2}", "2(x+1)", 1, 0),
    ("\\boxed{2x + 1}", "2(x+1)", 0, 0),
    ("\\boxed{3}", "The answer is \\boxed{3}.", 1, 1),
    ("\\boxed{-3}", "The answer is \\boxed{3}.", 0, 0),
    ("<think>12 * 6</think><answer>72</answer>", "#### 72", 1, 1),
]


@needs_math_verify
@pytest.mark.parametrize("completion, gold, human, plain", TABLE)
def test_math_verify_scores_as_a_person_would(completion, gold, human, plain):
    assert math_verify_match(extract_answer(completion), gold) is bool(human)


@pytest.mark.parametrize("completion, gold, human, plain", TABLE)
def test_plain_normaliser_scores_plain_answers_and_misses_latex(completion, gold, human, plain):
    assert answers_match(extract_answer(completion), gold) is bool(plain)
    assert not plain or human  # it never accepts a wrong answer


@pytest.mark.parametrize("installed", [True, False])
def test_accuracy_says_once_which_matcher_it_uses(caplog, monkeypatch, installed):
    if installed and not HAS_MATH_VERIFY:
        pytest.skip("needs math-verify (pip install 'grpo-fast[math]')")
    if not installed:
        monkeypatch.setitem(sys.modules, "math_verify", None)  # as if not installed: find_spec gives None
    answer_matcher.cache_clear()
    with caplog.at_level(logging.WARNING, logger="grpo_fast.trainer.rewards"):
        first = accuracy_reward(None, ["\\boxed{0.5}"], answer=["\\frac{1}{2}"])
        accuracy_reward(None, ["\\boxed{0.5}"], answer=["\\frac{1}{2}"])
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("accuracy:")]
    assert len(said) == 1
    answer_matcher.cache_clear()  # the next test finds what is installed again
    if installed:
        assert "math-verify" in said[0] and first == [1.0]
    else:
        assert "plain normaliser" in said[0] and "grpo-fast[math]" in said[0] and first == [0.0]


@needs_math_verify
def test_two_plain_numbers_are_compared_without_parsing(monkeypatch):
    """GSM8K's and the toy task's answers are plain numbers: math-verify's parse (ms each) is not called."""

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed")

    monkeypatch.setattr("math_verify.parse", no_parse)
    assert not math_verify_match("1,258", "#### 1259") and not math_verify_match("-3.5", "3.5")
    assert math_verify_match("$1,258", "#### 1258")
    with pytest.raises(AssertionError, match="parsed"):
        math_verify_match("\\frac{1}{2}", "0.5")


@needs_math_verify
def test_math_verify_works_in_the_reward_timeout_thread():
    """With reward_timeout the reward runs in a worker thread, where math-verify's SIGALRM limits cannot be set."""
    completions = ["\\boxed{\\sqrt{8}}", "\\boxed{3}", "<answer>x = 2</answer>"]
    out = call_reward_function(accuracy_reward, [None] * 3, completions, {"answer": ["2\\sqrt{2}", "4", "2"]}, 60)
    assert out == [1.0, 0.0, 1.0]


def test_reward_timeout_cuts_a_hanging_verification(monkeypatch):
    def hanging(predicted, gold):
        while True:  # a verification that never returns (pure Python: the thread can be abandoned)
            time.sleep(0.01)

    monkeypatch.setattr(rewards, "answer_matcher", lambda: hanging)
    start = time.monotonic()
    with pytest.raises(RewardTimeoutError, match="'accuracy_reward' did not return within the 0.5 s"):
        call_reward_function(accuracy_reward, ["p"], ["<answer>1</answer>"], {"answer": ["1"]}, timeout=0.5)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "style, good, bad",
    [
        ("think_answer", ["<think>a</think><answer>1</answer>"], ["<think>a</think> 1", "\\boxed{1}"]),
        ("think", ["<think>a</think>\n\nThe answer is 1.", "  <think>\nx</think>1"],
         ["<think>a</think>", "<think>a</think>  \n", "1", "<think>a</think> 1 <think>b</think>"]),
        ("boxed", ["<think>a</think> so \\boxed{1}", "It is \\boxed{\\frac{1}{2}}."],
         ["<think>\\boxed{1}</think> 1", "\\boxed{}", "\\boxed{1", "1"]),
    ],
)  # fmt: skip
def test_format_styles(style, good, bad):
    fn = make_format_reward(style)
    assert fn.__name__ == "format_reward"  # one metric name whatever the style
    assert fn(None, good + bad) == [1.0] * len(good) + [0.0] * len(bad)
    assert get_reward_function("format", style)(None, good) == [1.0] * len(good)
    with pytest.raises(ValueError, match="format_style must be one of"):
        make_format_reward("xml")
