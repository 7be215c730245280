"""Before a method is timed, check that it computes the benchmark's objective: its loss, gradients and
log-probs on small inputs (two sequences, one with a masked tail) against grpo_fast.reference in
float64 on the same input values.

The tolerances catch a peer configured differently (another loss type, clip range or KL weight moves
the loss by far more than rounding), not precision differences: TRL's bf16 path takes log_softmax
in bf16, whose spacing near log p = -14 is 0.06.
"""

from __future__ import annotations

import dataclasses

import torch

from bench.logits_methods import CONFIG
from grpo_fast import reference

# (loss relative, gradient relative to its largest entry, log-prob / entropy absolute) per dtype
TOLERANCE = {torch.float32: (1e-4, 2e-3, 2e-3), torch.bfloat16: (5e-2, 5e-2, 0.15), torch.float16: (2e-2, 2e-2, 0.05)}


def mask_tail(x):
    """A copy of the inputs with the last 5 tokens of sequence 1 masked, so loss types that normalise
    differently disagree (the tensors are shared, only the mask is new)."""
    mask = x.mask.clone()
    if mask.shape[0] > 1 and mask.shape[1] > 5:
        mask[1, -5:] = 0
    return dataclasses.replace(x, mask=mask)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _reference(leaves_f64: list[torch.Tensor], logits_f64: torch.Tensor, x) -> tuple[torch.Tensor, list]:
    f64 = {"dtype": torch.float64}
    loss, _, _ = reference.grpo_loss(
        logits_f64, x.ids, x.adv.to(**f64), x.mask.to(**f64), x.old.to(**f64), x.ref.to(**f64), CONFIG
    )
    return loss, list(torch.autograd.grad(loss, leaves_f64))


def _check_loss(method, x, leaves, make_logits) -> dict:
    """Loss and gradients of the method vs the float64 reference; ``make_logits`` maps the float64 leaves
    to (B, T, V) logits."""
    loss_tol, grad_tol, _ = TOLERANCE[leaves[0].dtype]
    for leaf in leaves:
        leaf.grad = None
    loss = method.loss(x)
    if loss is None:  # the GEMM floor computes no loss
        return {}
    loss.backward()
    ref64 = [leaf.detach().double().requires_grad_() for leaf in leaves]
    ref_loss, ref_grads = _reference(ref64, make_logits(ref64), x)
    loss_err = abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30)
    grad_err = max(_rel(leaf.grad, g) for leaf, g in zip(leaves, ref_grads))
    for leaf in leaves:
        leaf.grad = None
    if not (loss_err <= loss_tol and grad_err <= grad_tol):
        raise AssertionError(
            f"{method.name}: loss {float(loss):.6g} vs reference {float(ref_loss):.6g} (relative error {loss_err:.2e},"
            f" tolerance {loss_tol:g}); gradient relative error {grad_err:.2e} (tolerance {grad_tol:g})"
        )
    return {"loss_rel_err": loss_err, "grad_rel_err": grad_err}


def check_logits(method, mode: str, x) -> dict:
    x = mask_tail(x)
    if mode == "loss":
        return _check_loss(method, x, [x.logits], lambda leaves: leaves[0][:, : x.ids.shape[1]])
    _, _, tol = TOLERANCE[x.logits.dtype]
    with torch.no_grad():
        logp, entropy = method.logprobs(x)
    logits64 = x.logits.detach().double()[:, : x.ids.shape[1]]
    return _compare_logprobs(method, x, logp, entropy, logits64, tol)


def check_linear(method, mode: str, x) -> dict:
    x = mask_tail(x)
    if mode == "loss":
        return _check_loss(method, x, [x.hidden, x.weight], lambda leaves: leaves[0] @ leaves[1].T)
    _, _, tol = TOLERANCE[x.hidden.dtype]
    with torch.no_grad():
        logp, entropy = method.logprobs(x)
    logits64 = x.hidden.detach().double() @ x.weight.detach().double().T
    return _compare_logprobs(method, x, logp, entropy, logits64, tol)


def _compare_logprobs(method, x, logp, entropy, logits64, tol) -> dict:
    if logp is None:  # the GEMM floor computes no log-probs
        return {}
    active = x.mask.bool()
    errors = {"logp_abs_err": float((logp.double() - reference.token_logprobs(logits64, x.ids))[active].abs().max())}
    if entropy is not None:
        errors["entropy_abs_err"] = float((entropy.double() - reference.token_entropy(logits64))[active].abs().max())
    if max(errors.values()) > tol:
        raise AssertionError(f"{method.name}: log-prob/entropy errors {errors} above {tol:g}")
    return errors
