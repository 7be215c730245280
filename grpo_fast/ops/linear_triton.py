"""Triton backend of the GRPO loss from hidden states (kernels: grpo_fast/kernels/linear_token_stats.py).

    forward kernel         (logp, H, lse) of every active token                 GEMM 1, no N x V tensor
    objective by autograd  d loss / d logp, d loss / d H at all (B, T) at once  no vocabulary work
    backward kernel(s)     grad_h, grad_W, grad_b from (lse, H, d logp, d H)    GEMMs 2-4 (5 deterministic)

As in the torch backend (grpo_fast/ops/linear_loss.py) the gradients are formed at forward time and
the autograd backward only scales them by the upstream gradient; unlike it, every log-prob is known
before the objective is differentiated, so sequence-level importance sampling (GSPO) needs no extra
forward pass and no stand-ins beyond those for the masked tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .linear_loss import saved_grads


def _kernels():
    from grpo_fast.kernels import linear_token_stats  # imported lazily: triton is optional

    return linear_token_stats


def _operands(hidden2d: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden and weight in one dtype (tl.dot operands): mixed precision computes in the wider one, as
    the torch backend does (bf16 hidden with an fp32 head -> fp32)."""
    dtype = torch.promote_types(hidden2d.dtype, weight.dtype)
    h, w = hidden2d.to(dtype), weight.to(dtype)
    # the kernels need unit stride over H only (any row stride): no copy of a usual (V, H) head
    return (h if h.stride(-1) == 1 else h.contiguous()), (w if w.stride(-1) == 1 else w.contiguous())


def forward_stats(hidden2d, weight, bias, ids, active, inv_tau: float, with_entropy: bool):
    """Forward-only (logp, entropy), each (N,) float32 and 0 where not ``active``: 1 GEMM.

    Args: hidden2d (N, H); weight (V, H); bias (V,) or None; ids (N,) int64; active (N,) bool.
    """
    h, w = _operands(hidden2d, weight)
    logp, entropy, _ = _kernels().linear_stats_forward(h, w, bias, ids, active, inv_tau, with_entropy)
    return logp, entropy


def objective_coefficients(objective: Callable, logp: torch.Tensor, entropy: torch.Tensor):
    """(loss, metrics, d loss / d logp, d loss / d H or None when it is 0) of the (B, T) objective."""
    lp = logp.detach().clone().requires_grad_(True)
    ent = entropy.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss, metrics = objective(lp, ent)
        d_lp, d_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
    d_lp = torch.zeros_like(lp) if d_lp is None else d_lp
    return loss.detach(), metrics, d_lp, d_ent  # d_ent None (no entropy bonus): the kernels skip its term


class LinearGRPOTritonFunction(torch.autograd.Function):
    """loss = objective(logp(hidden @ W.T + b), H(...)) with Triton kernels; gradients formed in forward.

    Args of ``apply``: hidden2d (B * T, H); weight (V, H); bias (V,) or None; ids (B * T,) int64;
    active (B, T) bool; standin (B, T) float32, the log-probs the objective sees at inactive tokens
    (old log-probs when given, else 0: a ratio of 1, never exp(-old) overflowing); objective
    (logp, entropy) -> (loss, metrics); inv_tau float; deterministic bool (see
    ``linear_stats_backward``); metrics_out dict, filled with the objective's metrics.
    Returns (loss, logp (B, T) float32, non-differentiable).
    """

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, ids, active, standin, objective, inv_tau, deterministic, metrics_out):
        kernels = _kernels()
        h, w = _operands(hidden2d, weight)
        flat = active.reshape(-1)  # (N,)
        logp, entropy, lse = kernels.linear_stats_forward(h, w, bias, ids, flat, inv_tau, True)
        logp_bt = torch.where(active, logp.view(active.shape), standin)  # (B, T)
        loss, metrics, d_lp, d_ent = objective_coefficients(objective, logp_bt, entropy.view(active.shape))
        d_ent = None if d_ent is None else d_ent.reshape(-1).float()
        grad_h, grad_w, grad_b = kernels.linear_stats_backward(
            h, w, bias, ids, flat, lse, entropy, d_lp.reshape(-1).float(), d_ent, inv_tau, deterministic
        )
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logp_bt)
        metrics_out.update(metrics)
        return loss, logp_bt

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp):
        return *saved_grads(ctx, grad_loss), None, None, None, None, None, None, None
