"""Per-token log-prob and entropy from logits, differentiable, at the minimum memory traffic.

Forward reads the logits once (one streaming pass per token row: log-sum-exp, target logit,
entropy); backward reads them once more and writes the gradient once:
    dz_v = (1 / tau) * (g_logp * (1[v = id] - p_v) - g_H * p_v * (log p_v + H)).
So forward + backward = 2 reads + 1 write of the N x V logits, whatever loss is built on the
(B, T) outputs. Rows whose ``active`` flag is False do no vocabulary pass at all.

Two implementations share the registration below: ``torch`` (chunked over rows; the fast path
on CPU) and ``triton`` (grpo_fast.kernels.token_stats; CUDA, or CPU under TRITON_INTERPRET=1).
The op is a ``torch.library.custom_op`` so ``torch.compile(fullgraph=True)`` traces around it.
"""

from __future__ import annotations

import torch

# Rows per chunk so that one chunk's float32 temporaries stay ~16 MB: small enough to be cheap in
# memory (O(chunk x V), never O(N x V)), large enough that per-chunk Python overhead is negligible.
_CHUNK_ELEMENTS = 1 << 22


def _chunk_rows(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


def _active_rows(active: torch.Tensor, t: int):
    """Indices (b, t) of the active rows of a (B, T) mask, in chunks-ready 1-D form."""
    flat = active.reshape(-1).nonzero().squeeze(1)  # (M,)
    return flat // t, flat % t


def _entropy_terms(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """sum_v p_v z_v per row, with 0 (not NaN) for -inf entries of z."""
    p = torch.exp(z - lse.unsqueeze(-1))
    return torch.where(p > 0, p * z, torch.zeros_like(z)).sum(-1)


def _forward_torch(logits, ids, active, inv_tau: float, with_entropy: bool):
    b, t, v = logits.shape
    logp = logits.new_zeros((b, t), dtype=torch.float32)
    entropy = torch.zeros_like(logp)
    lse = torch.zeros_like(logp)
    rows_b, rows_t = _active_rows(active, t)
    step = _chunk_rows(v)
    for start in range(0, rows_b.numel(), step):
        ib, it = rows_b[start : start + step], rows_t[start : start + step]
        z = logits[ib, it].float().mul_(inv_tau)  # (M, V) float32
        row_lse = torch.logsumexp(z, dim=-1)  # (M,)
        lse[ib, it] = row_lse
        logp[ib, it] = z.gather(-1, ids[ib, it].unsqueeze(-1)).squeeze(-1) - row_lse
        if with_entropy:
            entropy[ib, it] = row_lse - _entropy_terms(z, row_lse)
    return logp, entropy, lse


def _backward_torch(logits, ids, active, lse, entropy, grad_logp, grad_entropy, inv_tau: float, out):
    b, t, v = logits.shape
    if not bool(active.all()):
        out[~active] = 0
    rows_b, rows_t = _active_rows(active, t)
    step = _chunk_rows(v)
    for start in range(0, rows_b.numel(), step):
        ib, it = rows_b[start : start + step], rows_t[start : start + step]
        z = logits[ib, it].float().mul_(inv_tau)  # (M, V)
        log_p = z.sub_(lse[ib, it].unsqueeze(-1))  # log p_v, in place of z
        p = torch.exp(log_p)
        gl = grad_logp[ib, it].unsqueeze(-1)  # (M, 1)
        grad = p * (-gl)
        if grad_entropy is not None:
            h = entropy[ib, it].unsqueeze(-1)
            ent = torch.where(p > 0, p * (log_p + h), torch.zeros_like(p))
            grad.sub_(ent.mul_(grad_entropy[ib, it].unsqueeze(-1)))
        grad.scatter_add_(-1, ids[ib, it].unsqueeze(-1), gl)
        out[ib, it] = grad.mul_(inv_tau).to(out.dtype)
    return out


def _triton():
    from grpo_fast.kernels import token_stats as kernels  # imported lazily: triton is optional

    return kernels


@torch.library.custom_op("grpo_fast::token_stats", mutates_args=())
def _token_stats_op(
    logits: torch.Tensor, ids: torch.Tensor, active: torch.Tensor, inv_tau: float, with_entropy: bool, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton:
        return _triton().token_stats_forward(logits, ids, active, 1.0 / inv_tau, with_entropy)
    return _forward_torch(logits, ids, active, inv_tau, with_entropy)


@_token_stats_op.register_fake
def _(logits, ids, active, inv_tau, with_entropy, use_triton):
    shape = logits.shape[:-1]
    return tuple(logits.new_empty(shape, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("grpo_fast::token_stats_backward", mutates_args=())
def _token_stats_backward_op(
    logits: torch.Tensor,
    ids: torch.Tensor,
    active: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    inv_tau: float,
    use_triton: bool,
) -> torch.Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return _backward(logits, ids, active, lse, entropy, grad_logp, grad_entropy, inv_tau, use_triton, out)


@_token_stats_backward_op.register_fake
def _(logits, ids, active, lse, entropy, grad_logp, grad_entropy, inv_tau, use_triton):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _backward(logits, ids, active, lse, entropy, grad_logp, grad_entropy, inv_tau, use_triton, out):
    grad_logp = grad_logp.float().contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.float().contiguous()
    if use_triton:
        return _triton().token_stats_backward(
            logits, ids, active, lse, entropy, grad_logp, grad_entropy, 1.0 / inv_tau, out
        )
    return _backward_torch(logits, ids, active, lse, entropy, grad_logp, grad_entropy, inv_tau, out)


def _setup_context(ctx, inputs, output):
    logits, ids, active, inv_tau, with_entropy, use_triton = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, ids, active, lse, entropy)
    ctx.inv_tau, ctx.with_entropy, ctx.use_triton = inv_tau, with_entropy, use_triton


def _backward_fn(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, ids, active, lse, entropy = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not ctx.with_entropy:
        grad_entropy = None
    grad = _token_stats_backward_op(
        logits, ids, active, lse, entropy, grad_logp, grad_entropy, ctx.inv_tau, ctx.use_triton
    )
    return grad, None, None, None, None, None


_token_stats_op.register_autograd(_backward_fn, setup_context=_setup_context)


class _InplaceTokenStats(torch.autograd.Function):
    """The same op, with the gradient written into the logits' own storage (opt-in, eager only).

    Saves N x V of memory when nothing else needs the logits after the loss (the usual case: the
    logits come out of lm_head and go only into this loss).
    """

    @staticmethod
    def forward(ctx, logits, ids, active, inv_tau, with_entropy, use_triton):
        logp, entropy, lse = _token_stats_op(logits, ids, active, inv_tau, with_entropy, use_triton)
        ctx.save_for_backward(logits, ids, active, lse, entropy)
        ctx.inv_tau, ctx.with_entropy, ctx.use_triton = inv_tau, with_entropy, use_triton
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        logits, ids, active, lse, entropy = ctx.saved_tensors
        grad_entropy = grad_entropy if ctx.with_entropy else None
        out = logits.detach()
        _backward(logits, ids, active, lse, entropy, grad_logp, grad_entropy, ctx.inv_tau, ctx.use_triton, out)
        return out, None, None, None, None, None


def token_stats(
    logits: torch.Tensor,
    ids: torch.Tensor,
    active: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    use_triton: bool,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable per-token (logp, entropy), each (B, T) float32; inputs already validated.

    Args:
        logits: (B, T, V) float32/bfloat16/float16, last dim contiguous (other strides free).
        ids: (B, T) int64 in [0, V). active: (B, T) bool; inactive rows get 0 and zero gradient.
        temperature: > 0. with_entropy: compute H (else zeros, no gradient).
        use_triton: Triton kernels instead of the chunked torch implementation.
        inplace_backward: write d loss / d logits into the logits' storage.
    """
    inv_tau = 1.0 / float(temperature)
    fn = _InplaceTokenStats.apply if inplace_backward else _token_stats_op
    logp, entropy, _ = fn(logits, ids, active, inv_tau, with_entropy, use_triton)
    return logp, entropy
