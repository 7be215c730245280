"""Debug mode: find where a NaN or inf enters the loss, before any kernel runs.

Off by default: it reads every float input once (a full pass over the logits, and a host sync on CUDA).
Switch it on for a whole process with the environment variable ``GRPO_FAST_DEBUG=1``, or for a block::

    with grpo_fast.debug.detect_nonfinite():
        out = grpo_fast.grpo_loss(logits, ids, adv, mask, old, ref)
    # ValueError: logits holds nan at index (1, 2, 5) (sequence 1, token 2, vocabulary entry 5) ...

When on, ``grpo_loss``, ``token_logprobs``, ``linear_grpo_loss`` and ``linear_token_logprobs`` check
their float inputs and raise ValueError naming the argument, the first bad value (in row-major order),
its index and what each axis means, and how many bad values there are. Rules:

- NaN and +inf are errors in every input.
- -inf is allowed in ``logits`` and in the LM-head ``bias``, where it bans a vocabulary entry
  (probability 0, gradient 0), except at a token the loss scores (``completion_ids``): its log-prob
  would be -inf. -inf anywhere else (hidden states, weights, log-probs, advantages) is an error.
- The logits / hidden-state rows of tokens with mask 0 are skipped: the torch and triton backends never
  read them (the reference backend multiplies them by 0, so NaN there is NaN in its loss). Every value
  of the other inputs is checked, masked positions included: the objective reads them all, and a NaN
  multiplied by a mask of 0 is still NaN.
- Nothing is checked inside ``torch.compile`` (value checks would break the graph).

``detect_nonfinite(False)`` switches the checks off inside a block even when the variable is set. The
block's setting is per thread (a ``contextvars`` value): other threads keep the process-wide setting.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

ENV_VAR = "GRPO_FAST_DEBUG"
_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")
_forced: contextvars.ContextVar[bool | None] = contextvars.ContextVar("grpo_fast_debug", default=None)

# Which arguments may hold -inf (a banned vocabulary entry), which are read only at active tokens, and
# what the axes of each one mean.
_NEG_INF_ALLOWED = ("logits", "bias")
_TOKEN_ROWS = ("logits", "hidden")
_AXES = {
    "logits": ("sequence", "token", "vocabulary entry"),
    "hidden": ("sequence", "token", "hidden unit"),
    "weight": ("vocabulary entry", "hidden unit"),
    "bias": ("vocabulary entry",),
}
_PER_TOKEN_AXES = ("sequence", "token")


def enabled() -> bool:
    """True inside ``detect_nonfinite()``, else when GRPO_FAST_DEBUG is set to 1/true/yes/on."""
    forced = _forced.get()
    if forced is not None:
        return forced
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value not in _ON + _OFF:
        raise ValueError(f"{ENV_VAR} must be one of {_ON} (on) or {_OFF[1:]} (off), got {value!r}")
    return value in _ON


@contextlib.contextmanager
def detect_nonfinite(enabled: bool = True) -> Iterator[None]:
    """Check the inputs of every grpo_fast op in this block for NaN/inf (or, with False, don't)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    token = _forced.set(enabled)
    try:
        yield
    finally:
        _forced.reset(token)


def data_checks_enabled() -> bool:
    """Checks that read tensor values (a host sync on CUDA) run eagerly, not inside torch.compile,
    where they would break the graph; compiled code is validated by its eager first run or tests."""
    return not torch.compiler.is_compiling()


def check_inputs(active: torch.Tensor, ids: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """In debug mode, raise ValueError at the first NaN/inf among the values the op will use.

    Args:
        active: (B, T) bool, the tokens in the op (mask != 0).
        ids: (B, T) int64 token ids, valid (in range) wherever ``active``.
        tensors: the op's float inputs by argument name: ``logits`` (B, T, V), ``hidden`` (B, T, H) or
            (B * T, H), ``weight`` (V, H), ``bias`` (V,), ``advantages`` (B,) or (B, T), and (B, T)
            or (B, 1) log-probs / ratios. None entries are skipped.
    """
    if not data_checks_enabled() or not enabled():  # data checks first: off under torch.compile, untraced
        return
    for name, x in tensors.items():
        if x is None or not x.is_floating_point():
            continue
        x = x.detach()
        allow_neg_inf = name in _NEG_INF_ALLOWED
        bad = (x.isnan() | x.isposinf()) if allow_neg_inf else ~torch.isfinite(x)
        if name in _TOKEN_ROWS:
            bad &= _active_rows(x, active)
        _raise_at_first(name, x, bad, active.shape[1])
        if allow_neg_inf:
            _check_targets(name, x, active, ids)


def _active_rows(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """(B, T, 1) or (B * T, 1) bool: the rows of logits / hidden states the op reads."""
    b, t = active.shape
    return active.reshape(b, t, 1) if x.dim() == 3 else active.reshape(b * t, 1)


def _where(name: str, index: tuple[int, ...], tokens: int) -> str:
    """What an index of argument ``name`` means, e.g. "sequence 1, token 2, vocabulary entry 5"."""
    if name == "hidden" and len(index) == 2:  # flat (B * T, H)
        row, unit = index
        return f"row {row} = sequence {row // tokens}, token {row % tokens}; hidden unit {unit}"
    axes = _AXES.get(name, _PER_TOKEN_AXES)
    return ", ".join(f"{axis} {i}" for axis, i in zip(axes, index))


def _raise_at_first(name: str, x: torch.Tensor, bad: torch.Tensor, tokens: int) -> None:
    """Raise at the first True of ``bad`` (row-major order); ``tokens`` = T, to decode flat rows."""
    count = int(bad.sum())
    if count == 0:
        return
    flat = int(bad.reshape(-1).to(torch.uint8).argmax())  # argmax returns the first maximum
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(bad.shape)))
    value = float(x[index])
    where = _where(name, index, tokens)
    raise ValueError(
        f"{name} holds {value} at index {index} ({where}); {count} non-finite value(s) where the op reads "
        f"{name} (debug mode: {ENV_VAR}=1 or grpo_fast.debug.detect_nonfinite())"
    )


def _check_targets(name: str, x: torch.Tensor, active: torch.Tensor, ids: torch.Tensor) -> None:
    """-inf is a banned token in logits/bias, but not at a scored token (its log-prob would be -inf)."""
    ids = ids.long()
    target = x.gather(-1, ids.unsqueeze(-1)).squeeze(-1) if name == "logits" else x[ids]  # (B, T)
    bad = target.isneginf() & active
    if not bool(bad.any()):
        return
    b, t = (int(i) for i in bad.nonzero()[0])
    v = int(ids[b, t])
    index = (b, t, v) if name == "logits" else (v,)
    raise ValueError(
        f"{name} holds -inf at index {index} (vocabulary entry {v}), the token scored at sequence {b}, token {t}: "
        f"its log-prob would be -inf; {int(bad.sum())} scored token(s) have -inf {name} "
        f"(debug mode: {ENV_VAR}=1 or grpo_fast.debug.detect_nonfinite())"
    )
