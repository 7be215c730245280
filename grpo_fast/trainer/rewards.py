"""Rule-based rewards (DeepSeek-R1, arXiv 2501.12948: accuracy + format, no neural reward model) and
the protocol the trainer calls them with.

Protocol (TRL's): ``fn(prompts, completions, **kwargs) -> list[float | None]`` with one entry per
completion. ``prompts`` and ``completions`` are strings (or chat message lists for conversational
data); kwargs carry every dataset column except ``prompt`` (e.g. ``answer``), plus ``completion_ids``
(list of token-id lists, EOS included). A dataset column named like an argument the protocol reserves
(``RESERVED_ARGUMENTS``: the sampled text and what TRL passes besides) is refused, never passed: it would
replace the sampled text. ``None`` means "this function does not apply to this sample":
it becomes NaN and is left out of the weighted sum, as in TRL. A tuple, 1-d tensor or 1-d numpy array of
Python or numpy numbers is taken as the list it holds.

Faults: a function that raises, returns something other than one finite float or None per completion
(NaN and inf included), or does not return within ``timeout`` seconds is a ``RewardFunctionError``
naming it (and the sample, when one sample is to blame). ``score_completions(on_error="skip")`` logs
the error instead and scores that function's batch as None, so training continues.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import numbers
import re
import threading
import time
import warnings
from collections.abc import Callable, Sequence

import torch

RewardFunction = Callable[..., list]
RESERVED_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")  # never dataset columns
ON_ERROR = ("raise", "skip")
logger = logging.getLogger(__name__)

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_GSM8K = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_PLAIN_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something unusable; the message names it and the sample."""


class RewardTimeoutError(RewardFunctionError):
    """A reward function did not return within the per-call timeout."""


def completion_text(completion) -> str:
    """The text of a completion: the string itself, or the content of the last chat message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a str or a list of chat messages, got {type(completion).__name__}")


def extract_answer(text: str) -> str | None:
    """The final answer in ``text``, trying in order: the last ``<answer>..</answer>``, the last
    ``\\boxed{..}`` (nested braces allowed), a GSM8K ``#### x`` line, the last number. None if none."""
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    gsm8k = _GSM8K.findall(text)
    if gsm8k:
        return gsm8k[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: no answer rather than a guess


def normalize_answer(answer: str) -> str:
    """Canonical form for comparison: numbers without thousands separators, "$", "%" or trailing ".0";
    other text lower-cased with whitespace collapsed."""
    s = answer.strip().strip("$").strip()
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    numeric = s.replace(",", "").rstrip("%").rstrip(".").strip()
    try:
        value = float(numeric)
    except ValueError:
        return " ".join(s.lower().split())
    if not math.isfinite(value):
        return " ".join(s.lower().split())
    return str(int(value)) if value == int(value) else repr(value)


def gold_answer(gold: str) -> str | None:
    """The answer in a gold column's text: after GSM8K's ``#### x``, inside the last ``\\boxed{}``, else the
    whole text stripped (None for a ``\\boxed{`` without its closing brace)."""
    marked = _GSM8K.findall(gold)
    if marked:
        return marked[-1].strip()
    if "\\boxed" in gold:
        boxed = _last_boxed(gold)
        return None if boxed is None else boxed.strip()
    return gold.strip()


def answers_match(predicted: str | None, gold: str) -> bool:
    """True when the normalised answers are equal (the gold may be a full GSM8K solution or hold a
    ``\\boxed{}``): the plain normaliser, no mathematics."""
    if predicted is None:
        return False
    expected = gold_answer(gold)
    return expected is not None and normalize_answer(predicted) == normalize_answer(expected)


def math_verify_match(predicted: str | None, gold: str) -> bool:
    """True when ``answers_match`` says so or math-verify proves the answers equal (LaTeX, fractions,
    radicals, percentages, sets, intervals, equations ``x = 2`` against ``2``). Needs math-verify.

    In the main thread math-verify's own 5 s limits (SIGALRM) apply; in another thread (the trainer's
    ``reward_timeout`` runs reward functions in one) signals cannot be used, and ``reward_timeout`` is the
    limit."""
    from math_verify import parse, verify

    if answers_match(predicted, gold):
        return True
    expected = gold_answer(gold)
    if predicted is None or expected is None or (_is_plain_number(predicted) and _is_plain_number(expected)):
        return False  # two plain numbers the normaliser found unequal: no parse needed (GSM8K, the toy task)
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"\\boxed{{{expected}}}", parsing_timeout=limit)
    answer_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=limit)
    return bool(gold_parsed and answer_parsed and verify(gold_parsed, answer_parsed, timeout_seconds=limit))


def _is_plain_number(text: str) -> bool:
    return _PLAIN_NUMBER.fullmatch(text.strip().strip("$").strip()) is not None


@functools.cache
def answer_matcher() -> Callable[[str | None, str], bool]:
    """How ``accuracy`` compares answers: ``math_verify_match`` when math-verify is installed, else
    ``answers_match``; the first call says which (logger ``grpo_fast.trainer.rewards``, WARNING)."""
    if importlib.util.find_spec("math_verify") is None:
        logger.warning("accuracy: math-verify is not installed; answers are compared by the plain normaliser "
                       "(numbers and text; LaTeX such as \\frac{1}{2} against 0.5 scores 0): pip install "
                       "'grpo-fast[math]' to verify them mathematically")  # fmt: skip
        return answers_match
    logger.warning("accuracy: answers are verified mathematically with math-verify")
    return math_verify_match


def accuracy_reward(prompts, completions, answer=None, solution=None, **kwargs) -> list[float | None]:
    """1.0 if the extracted final answer equals the gold one, else 0.0 (DeepSeek-R1 accuracy reward);
    compared by ``answer_matcher()`` (math-verify when installed).

    The gold answer comes from the ``answer`` column (GSM8K's "#### x" and ``\\boxed{}`` are extracted)
    or, failing that, ``solution`` (TRL's math datasets); a sample with no gold answer gets None.
    """
    gold = answer if answer is not None else solution
    if gold is None:
        return [None] * len(completions)
    match = answer_matcher()
    return [
        None if g is None else float(match(extract_answer(completion_text(c)), str(g)))
        for c, g in zip(completions, gold, strict=True)
    ]


FORMAT_STYLES = {
    "think_answer": "<think>...</think><answer>...</answer> (DeepSeek-R1)",
    "think": "<think>...</think> then the answer as text (Qwen3)",
    "boxed": "an optional <think>...</think>, then text with the answer in \\boxed{...}",
}
_THINK = re.compile(r"^\s*<think>.*?</think>(.*)$", re.DOTALL)


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 if the completion is exactly ``<think>...</think><answer>...</answer>`` (whitespace allowed
    around the blocks), else 0.0 (DeepSeek-R1 format reward)."""
    return [float(bool(_FORMAT.match(completion_text(c)))) for c in completions]


def make_format_reward(style: str = "think_answer") -> RewardFunction:
    """The ``format`` reward for one of ``FORMAT_STYLES``; every style's function is named ``format_reward``
    (its metrics are ``rewards/format_reward/*``)."""
    if style not in FORMAT_STYLES:
        raise ValueError(f"format_style must be one of {sorted(FORMAT_STYLES)}, got {style!r}")
    if style == "think_answer":
        return format_reward
    check = _think_then_text if style == "think" else _boxed_answer

    def styled(prompts, completions, **kwargs) -> list[float]:
        return [float(check(completion_text(c))) for c in completions]

    styled.__name__ = styled.__qualname__ = "format_reward"
    styled.__doc__ = f"1.0 if the completion is {FORMAT_STYLES[style]}, else 0.0."
    return styled


def _think_then_text(text: str) -> bool:
    """One ``<think>`` block first, then a non-blank answer with no think tag in it."""
    found = _THINK.match(text)
    rest = found.group(1) if found else ""
    return bool(rest.strip()) and "<think>" not in rest and "</think>" not in rest


def _boxed_answer(text: str) -> bool:
    """An optional leading ``<think>`` block, then text holding a balanced, non-empty ``\\boxed{}``."""
    found = _THINK.match(text)
    rest = found.group(1) if found else text
    if "<think>" in rest or "</think>" in rest:
        return False
    boxed = _last_boxed(rest)
    return boxed is not None and bool(boxed.strip())


def soft_overlong_punishment(max_completion_length: int, soft_punish_cache: int) -> RewardFunction:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13) as a reward function.

    With L_max = max_completion_length and L_cache = soft_punish_cache, a completion of |y| tokens gets
    0 if |y| <= L_max - L_cache, ((L_max - L_cache) - |y|) / L_cache inside the buffer, -1 beyond L_max.
    DAPO used L_max = 20480, L_cache = 4096. Needs the ``completion_ids`` kwarg (the trainer passes it).
    """
    if not 0 < soft_punish_cache <= max_completion_length:
        raise ValueError(
            f"soft_punish_cache must be in (0, max_completion_length={max_completion_length}], got {soft_punish_cache}"
        )
    expected = max_completion_length - soft_punish_cache

    def soft_overlong_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
        rewards = []
        for ids in completion_ids:
            n = len(ids)
            rewards.append(
                0.0 if n <= expected else -1.0 if n > max_completion_length else (expected - n) / soft_punish_cache
            )
        return rewards

    return soft_overlong_reward


REWARD_FUNCTIONS: dict[str, RewardFunction] = {"accuracy": accuracy_reward, "format": format_reward}


def get_reward_function(name: str, format_style: str = "think_answer") -> RewardFunction:
    """A built-in reward function by name (see ``REWARD_FUNCTIONS``); ``format`` in ``format_style``."""
    if name not in REWARD_FUNCTIONS:
        raise ValueError(f"unknown reward function {name!r}; built-in ones are {sorted(REWARD_FUNCTIONS)}")
    return make_format_reward(format_style) if name == "format" else REWARD_FUNCTIONS[name]


def check_reward_columns(columns, name: str) -> None:
    """ValueError when ``name`` (a dataset) has a column named like a reserved reward argument."""
    for column in columns:
        if column in RESERVED_ARGUMENTS:
            raise ValueError(
                f"{name} has a column {column!r}, a name reward functions receive the sampled text (or trainer "
                f"data) under ({', '.join(RESERVED_ARGUMENTS)} are reserved): it would replace it; rename it, e.g. "
                f"{name}.rename_column({column!r}, 'reference_{column}')"
            )


def reward_name(fn) -> str:
    """The name metrics use for a reward function (``rewards/<name>/mean``)."""
    return getattr(fn, "__name__", type(fn).__name__)


def call_reward_function(
    fn: RewardFunction, prompts: list, completions: list, columns: dict, timeout: float | None = None
) -> list[float]:
    """Call ``fn`` once on the batch and check its result; None entries become NaN.

    Args:
        timeout: seconds the call may take (None = no limit). With a limit, ``fn`` runs in a daemon
            worker thread; a call still running at the deadline is abandoned (Python cannot stop a
            thread: it runs on in the background and its result is discarded). A function that needs
            the main thread (``signal.alarm``-based time limits) needs ``timeout=None``.
    Raises:
        RewardTimeoutError naming the function and the timeout.
        RewardFunctionError naming the function and the first sample it fails on, chained to the
        original exception (the batch is re-run one sample at a time, within the same timeout, to find
        that sample), or the first unusable value it returned (NaN, inf, a non-number; a wrong length).
    """
    name = reward_name(fn)
    timeout = _check_timeout(timeout)
    try:
        values = _call(fn, {"prompts": prompts, "completions": completions, **columns}, timeout)
    except RewardTimeoutError:
        raise
    except Exception as error:
        index = _first_failing_sample(fn, prompts, completions, columns, timeout)
        where = "" if index is None else f" on sample {index}: {_describe(prompts, completions, columns, index)}"
        raise RewardFunctionError(f"reward function {name!r} raised {type(error).__name__}: {error}{where}") from error
    values = _as_list(values)
    if not isinstance(values, list) or len(values) != len(completions):
        shape = f" of shape {tuple(values.shape)}" if hasattr(values, "shape") else ""
        got = f"{len(values)}" if isinstance(values, list) else f"a {type(values).__name__}{shape}"
        raise RewardFunctionError(
            f"reward function {name!r} must return a list of {len(completions)} values (one per completion; a tuple, "
            f"1-d tensor or 1-d numpy array also does), got {got}"
        )
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(float("nan"))
        elif isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
        else:
            raise RewardFunctionError(
                f"reward function {name!r} returned {v!r} for sample {i} (expected a finite float, or None "
                f"where the function does not apply): {_describe(prompts, completions, columns, i)}"
            )
    if values and all(v is None for v in values):
        warnings.warn(
            f"reward function {name!r} returned None for every completion of a batch: it applies to none of "
            "them and adds nothing to their rewards (is a dataset column it reads missing?)",
            RuntimeWarning,
            stacklevel=2,
        )
    return out


def _as_list(values):
    """A reward function's result as a list: lists and tuples as they are, 1-d tensors and numpy arrays
    (whatever has ``tolist`` and ``ndim == 1``) as their Python numbers; anything else unchanged."""
    if isinstance(values, (list, tuple)):
        return list(values)
    if getattr(values, "ndim", None) == 1 and hasattr(values, "tolist"):
        return values.tolist()
    return values


def _check_timeout(timeout) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be None or a finite number of seconds > 0, got {timeout!r}")
    return float(timeout)


def _call(fn: RewardFunction, kwargs: dict, timeout: float | None):
    """``fn(**kwargs)``; with a timeout, in a daemon thread that is abandoned at the deadline."""
    if timeout is None:
        return fn(**kwargs)
    result: dict = {}

    def run():
        try:
            result["value"] = fn(**kwargs)
        except BaseException as error:  # re-raised in the caller's thread below
            result["error"] = error

    worker = threading.Thread(target=run, name=f"reward-{reward_name(fn)}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        n = len(kwargs["completions"])
        raise RewardTimeoutError(
            f"reward function {reward_name(fn)!r} did not return within the {timeout:g} s per-call timeout on a "
            f"batch of {n} completion(s); the call was abandoned (it runs on in a background thread, its result "
            "is discarded)"
        )
    if "error" in result:
        raise result["error"]
    return result["value"]


def _first_failing_sample(fn, prompts, completions, columns, timeout: float | None = None) -> int | None:
    """The first sample ``fn`` raises on alone; None if none does or ``timeout`` runs out first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for i in range(len(completions)):
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return None
        try:
            one = {k: v[i : i + 1] for k, v in columns.items()}
            _call(fn, {"prompts": prompts[i : i + 1], "completions": completions[i : i + 1], **one}, remaining)
        except RewardTimeoutError:
            return None
        except Exception:
            return i
    return None


def _describe(prompts, completions, columns, i: int, limit: int = 200) -> str:
    def short(x):
        s = repr(x)
        return s if len(s) <= limit else s[:limit] + "...'"

    extra = ", ".join(f"{k}={short(v[i])}" for k, v in columns.items() if k != "completion_ids")
    return f"prompt={short(prompts[i])}, completion={short(completions[i])}" + (f", {extra}" if extra else "")


def score_completions(
    reward_funcs: Sequence[RewardFunction],
    weights: Sequence[float],
    prompts: list,
    completions: list,
    columns: dict,
    timeout: float | None = None,
    on_error: str = "raise",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of a batch: per function, and their weighted sum (TRL: NaN entries are skipped).

    Args:
        timeout: per-call limit in seconds for each reward function (see ``call_reward_function``).
        on_error: "raise" a RewardFunctionError, or "skip": log it (logger ``grpo_fast.trainer.rewards``,
            level WARNING) and score that function's whole batch as None, i.e. left out of the sum.
    Returns:
        (per_function (B, F) float32 with NaN where a function returned None or was skipped,
        total (B,) float32). A sample for which every function returned None gets total 0.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    rows = []
    for fn in reward_funcs:
        try:
            rows.append(call_reward_function(fn, prompts, completions, columns, timeout))
        except RewardFunctionError as error:
            if on_error == "raise":
                raise
            logger.warning("%s -> skipped: its rewards for this batch are None (left out of the sum)", error)
            rows.append([float("nan")] * len(completions))
    per_function = torch.tensor(rows, dtype=torch.float32).T.reshape(len(completions), len(reward_funcs))  # (B, F)
    weighted = per_function * torch.tensor(list(weights), dtype=torch.float32)  # (B, F)
    return per_function, torch.nansum(weighted, dim=1)
