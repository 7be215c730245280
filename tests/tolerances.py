"""Tolerances per dtype, in one table, and the comparison helper every numerical test uses.

A value passes when, element by element,

    |actual - expected| <= atol * scale + rtol * |expected|,    scale = max |expected| (or given)

so ``rtol`` is the relative error allowed on each element and ``atol`` a floor *relative to the
largest element*: one table then serves a loss of 1e-3 and a gradient of 1e-7 alike, and the
near-zero gradient entries of the non-target vocabulary do not need a per-test absolute tolerance.

Low-precision rows are for low-precision *inputs* (bf16/fp16 logits): every backend computes in
float32 from them, and they are compared with the float64 reference on the same rounded values,
so only the stored output (the logits gradient, in the logits' dtype) carries the 8-bit / 11-bit
mantissa rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float  # relative to the largest |expected| (see the module docstring)
    why: str


_F64 = "float64 vs float64: only summation order differs (~1e-16 per op, 1e-10 leaves room)."
_F32_LOSS = "the issue's requirement: fp32 loss within 2e-5 relative of the float64 spec."
_F32_GRAD = "the issue's requirement: fp32 gradient within 2e-4 relative (elementwise, floor 2e-5 of max)."
_F32_TOKEN = "fp32 log-softmax over V <= ~1e3: ~1e-6 absolute on values of order log V."
_BF16_GRAD = (
    "bf16 keeps 8 significant bits: one rounding of the gradient is <= 2^-8 relative; autograd may add two "
    "rounded bf16 gradients (log-prob and entropy branches), so 2^-7."
)
_F16_GRAD = "fp16 keeps 11 significant bits: <= 2^-11 per rounding, two roundings as for bf16: 2^-10."
_LOW_EXACT = "low-precision logits are exact in fp32, and every path computes in fp32: fp32 error, 5x margin."

TOLERANCES: dict[torch.dtype, dict[str, Tol]] = {
    torch.float64: {
        "loss": Tol(1e-10, 1e-12, _F64),
        "grad": Tol(1e-9, 1e-11, _F64),
        "logprob": Tol(1e-10, 1e-12, _F64),
        "entropy": Tol(1e-10, 1e-12, _F64),
        "metric": Tol(1e-10, 1e-12, _F64),
    },
    torch.float32: {
        "loss": Tol(2e-5, 2e-6, _F32_LOSS),
        "grad": Tol(2e-4, 2e-5, _F32_GRAD),
        "logprob": Tol(1e-5, 1e-6, _F32_TOKEN),
        "entropy": Tol(1e-5, 1e-6, _F32_TOKEN),
        "metric": Tol(2e-5, 2e-6, "metrics are masked means of fp32 per-token values, like the loss."),
    },
    torch.bfloat16: {
        "loss": Tol(1e-4, 1e-5, _LOW_EXACT),
        "grad": Tol(2.0**-7, 1e-4, _BF16_GRAD),
        "logprob": Tol(5e-5, 5e-6, _LOW_EXACT),
        "entropy": Tol(5e-5, 5e-6, _LOW_EXACT),
        "metric": Tol(1e-4, 1e-5, _LOW_EXACT),
    },
    torch.float16: {
        "loss": Tol(1e-4, 1e-5, _LOW_EXACT),
        "grad": Tol(2.0**-10, 1e-4, _F16_GRAD),
        "logprob": Tol(5e-5, 5e-6, _LOW_EXACT),
        "entropy": Tol(5e-5, 5e-6, _LOW_EXACT),
        "metric": Tol(1e-4, 1e-5, _LOW_EXACT),
    },
}

# The fast path may be at most this many times less accurate than plain torch in the same precision,
# plus a slack of this fraction of the table's bound at the largest element: when plain torch happens
# to round a scalar almost exactly (error 2e-10), a fast path 1 ulp off must not fail.
NO_WORSE_FACTOR = 2.0
NO_WORSE_SLACK = 0.1


def tolerance(dtype: torch.dtype, what: str) -> Tol:
    """The table entry; ``what`` is "kind" or "kind: free text" with kind a key of the table."""
    return TOLERANCES[dtype][what.split(":")[0].strip()]


def _as_f64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to(torch.float64).cpu()


def _scale(expected: torch.Tensor, scale: float | None) -> float:
    if scale is not None:
        return float(scale)
    finite = expected[torch.isfinite(expected)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _report(actual, expected, bound, dtype, what, tol, worst=5) -> str:
    err = (actual - expected).abs()
    excess = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err - bound)
    flat = excess.reshape(-1)
    bad = int((flat > 0).sum())
    top = torch.topk(flat, max(1, min(worst, bad))).indices
    lines = [f"{what} [{dtype}]: mismatch (rtol={tol.rtol:g}, atol={tol.atol:g} x max|expected|; {tol.why})"]
    lines.append(f"  {bad} of {flat.numel()} elements outside tolerance; worst:")
    shape = tuple(actual.shape)
    for i in top.tolist():
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), shape)) if shape else ()
        a, e = actual.reshape(-1)[i].item(), expected.reshape(-1)[i].item()
        allowed = bound.reshape(-1)[i].item()
        diff = abs(a - e)
        lines.append(f"    at {idx}: actual={a:.10g} expected={e:.10g} diff={diff:.3g} allowed={allowed:.3g}")
    return "\n".join(lines)


def assert_close(actual, expected, dtype: torch.dtype, what: str, scale: float | None = None) -> None:
    """Assert ``actual`` matches ``expected`` within the table's tolerance for (dtype, kind of ``what``).

    On failure the message lists the worst mismatching indices with both values. NaN matches only
    NaN and infinities must be equal. ``scale`` overrides max|expected| as the base of ``atol``.
    """
    tol = tolerance(dtype, what)
    a, e = _as_f64(actual), _as_f64(expected)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if a.numel() == 0:
        return
    same_special = (a == e) | (torch.isnan(a) & torch.isnan(e))  # equal infinities and NaN == NaN
    bound = tol.atol * _scale(e, scale) + tol.rtol * e.abs()
    ok = torch.where(torch.isfinite(e), (a - e).abs() <= bound, same_special)
    if not bool(ok.all()):
        bound = torch.where(torch.isfinite(bound), bound, torch.zeros_like(bound))
        raise AssertionError(_report(a, e, bound, dtype, what, tol))


def max_error(actual, expected) -> float:
    """max |actual - expected| (inf if any NaN appears only on one side)."""
    a, e = _as_f64(actual), _as_f64(expected)
    if a.numel() == 0:
        return 0.0
    err = (a - e).abs()
    err = torch.where((a == e) | (torch.isnan(a) & torch.isnan(e)), torch.zeros_like(err), err)
    return float(torch.nan_to_num(err, nan=float("inf")).max())


def assert_no_worse(fast, plain, exact, dtype: torch.dtype, what: str) -> None:
    """Three-way check: the fast path's max error vs float64 is at most NO_WORSE_FACTOR x plain torch's
    (same low precision) plus NO_WORSE_SLACK x the table's bound at the largest |exact|."""
    tol = tolerance(dtype, what)
    e = _as_f64(exact)
    slack = NO_WORSE_SLACK * (tol.atol + tol.rtol) * _scale(e, None)
    err_fast, err_plain = max_error(fast, exact), max_error(plain, exact)
    if not err_fast <= NO_WORSE_FACTOR * err_plain + slack:
        a = _as_f64(fast)
        bound = torch.full_like(e, NO_WORSE_FACTOR * err_plain + slack)
        raise AssertionError(
            f"{what} [{dtype}]: fast path max error {err_fast:.3g} > {NO_WORSE_FACTOR} x plain torch's "
            f"{err_plain:.3g} + slack {slack:.3g}\n" + _report(a, e, bound, dtype, what, tol)
        )
