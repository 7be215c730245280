"""Per-token log-prob and entropy from logits, differentiable, at the minimum memory traffic.

Forward reads the logits once (one streaming pass per token row: row max and log-normaliser,
target logit, entropy); backward reads them once more and writes the gradient once:
    dz_v = (1 / tau) * (g_logp * (1[v = id] - p_v) - g_H * p_v * (log p_v + H)).
So forward + backward = 2 reads + 1 write of the N x V logits, whatever loss is built on the
(B, T) outputs. Rows whose ``active`` flag is False do no vocabulary pass at all, except in the
compiled CPU forward, which computes every row and zeroes the inactive ones.

Two implementations share the registration below: ``torch`` and ``triton`` (grpo_fast.kernels.token_stats;
CUDA, or CPU under TRITON_INTERPRET=1). The torch forward on CPU is ``_row_stats`` compiled by
``torch.compile`` (inductor turns it into per-row loops: no (rows, V) temporary, one kernel), falling
back to the eager, row-chunked ``forward_eager`` where compilation is unavailable or switched off
(``GRPO_FAST_EAGER=1``). The torch backward on CPU is ``_row_grads`` compiled the same way (one read of
the logits, one write of the gradient), with the eager ``backward_eager`` as its fallback and on other
devices.
The op is a ``torch.library.custom_op`` so ``torch.compile(fullgraph=True)`` traces around it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Rows per block so that one block of float32 is ~16 MB (27 rows at V = 151936): large enough that the
# ~20 small ops per block do not dominate (one-row blocks are an order of magnitude slower), small
# enough to stay in cache; the size was chosen by timing 2**21, 2**22 and 2**23 on a CPU.
BLOCK_ELEMENTS = 1 << 22


def block_rows(vocab: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(vocab, 1))


def _row_blocks(active: torch.Tensor, rows: int):
    """Yield (b, t0, t1): runs of consecutive active rows of sequence b, at most ``rows`` long.

    Runs of one sequence are slices of the (B, T, V) logits, whatever its strides: no gather copy.
    """
    act = active.cpu()
    padded = torch.nn.functional.pad(act, (1, 1))  # (B, T + 2), False at both ends
    starts = (act & ~padded[:, :-2]).nonzero().tolist()  # first row of each run, row-major order
    ends = (act & ~padded[:, 2:]).nonzero().tolist()  # last row of each run, same order
    for (b, t0), (_, last) in zip(starts, ends, strict=True):
        t1 = last + 1
        for s in range(t0, t1, rows):
            yield b, s, min(s + rows, t1)


def _shifted_block(block: torch.Tensor, shift: torch.Tensor, inv_tau: float, out: torch.Tensor) -> torch.Tensor:
    """(block - shift) / tau in float32, into out. Shifting by the row max before scaling keeps every
    exponent exact near the max even at |z| ~ 1e4, where z / tau alone would round by |z| * 2**-24."""
    torch.sub(block, shift, out=out) if block.dtype == torch.float32 else out.copy_(block).sub_(shift)
    return out.div_(1.0 / inv_tau) if inv_tau != 1.0 else out  # a division rounds as plain torch's z / tau


def forward_eager(logits, ids, active, inv_tau: float, with_entropy: bool):
    """Returns (logp, entropy, norm): norm[..., 0] = m, the raw row max, and norm[..., 1] = log s,
    so that log p_v = (z_v - m) / tau - log s with no large cancelling terms (lse = m / tau + log s)."""
    b, t, v = logits.shape
    logp = logits.new_zeros((b, t), dtype=torch.float32)
    entropy = torch.zeros_like(logp)
    norm = logits.new_zeros((b, t, 2), dtype=torch.float32)
    rows = block_rows(v)
    x_buf = logits.new_empty((rows, v), dtype=torch.float32)
    p_buf = torch.empty_like(x_buf)
    for i, t0, t1 in _row_blocks(active, rows):
        block = logits[i, t0:t1]  # (M, V), a slice: no copy
        m = block.amax(dim=-1, keepdim=True).float()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row: no NaN from -inf - -inf
        x = _shifted_block(block, m, inv_tau, x_buf[: t1 - t0])  # (z - m) / tau <= 0
        p = torch.exp(x, out=p_buf[: t1 - t0])  # unnormalised probabilities
        s = p.sum(-1, keepdim=True)
        log_s = s.log().view(-1)
        norm[i, t0:t1, 0] = m.view(-1)
        norm[i, t0:t1, 1] = log_s
        logp[i, t0:t1] = x.gather(-1, ids[i, t0:t1].unsqueeze(-1)).view(-1) - log_s
        if with_entropy:
            entropy[i, t0:t1] = log_s - expected_value(p, x) / s.view(-1)
    return logp, entropy, norm


def _row_stats(logits, ids, active, tau, with_entropy: bool, with_norm: bool = True):
    """``forward_eager``'s statistics for every row at once, written for ``torch.compile``: the same
    formulas (shift by the row max, then divide by tau), but as whole-tensor expressions that inductor
    fuses into a max pass and one pass of sums per row, so nothing of size V is stored. tau: 0-d float32
    tensor (a Python float would compile once per temperature). with_norm False: no norm (None), for
    callers that need no gradient."""
    m = logits.amax(dim=-1, keepdim=True).float()
    m = torch.where(torch.isfinite(m), m, 0.0)  # an all -inf row: no NaN from -inf - -inf
    x = (logits.float() - m) / tau  # (B, T, V) expression, never materialised
    p = torch.exp(x)
    s = p.sum(-1)
    log_s = torch.log(s)
    zero = torch.zeros_like(log_s)
    target = x.gather(-1, torch.where(active, ids, 0).unsqueeze(-1)).squeeze(-1)  # inactive rows: any id
    logp = torch.where(active, target - log_s, zero)
    entropy = zero
    if with_entropy:
        expected = torch.where(p > 0, p * x, 0.0).sum(-1)  # -inf logits (p = 0) contribute 0, not NaN
        entropy = torch.where(active, log_s - expected / s, zero)
    if not with_norm:
        return logp, entropy, None
    norm = torch.stack([torch.where(active, m.squeeze(-1), zero), torch.where(active, log_s, zero)], dim=-1)
    return logp, entropy, norm


@dataclass
class CompiledPass:
    """A CPU pass compiled on its first use in this process: fn (the compiled function), whether it ran,
    whether compiling failed (then the eager path is used for good), whether that was warned about."""

    fn: Callable | None = None
    ran: bool = False
    failed: bool = False
    warned: bool = False


ROW_STATS = CompiledPass()  # _row_stats
ROW_GRADS = CompiledPass()  # _row_grads
# The compiled path runs only in the process that imported this module: a process forked from it inherits
# inductor's compile workers and locks mid-state and can deadlock in them (seen with fork-started trainers).
_HOME_PID = os.getpid()


def _run_compiled(state: CompiledPass, fn, args: tuple, eager, what: str):
    """``state.fn`` (``fn`` compiled once per process, dynamic shapes) on args, or ``eager()`` when
    compilation is switched off (``GRPO_FAST_EAGER=1``), has never worked here (e.g. no C++ compiler; a
    warning says so), fails for this call, or this is a forked child (see ``_HOME_PID``)."""
    off = os.environ.get("GRPO_FAST_EAGER", "").lower() in ("1", "true", "yes", "on")
    if off or state.failed or os.getpid() != _HOME_PID:
        return eager()
    if state.fn is None:
        state.fn = torch.compile(fn, dynamic=True, fullgraph=True)
    try:
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
            out = state.fn(*args)
    except Exception as err:  # a toolchain or compiler failure: the eager path computes the same numbers
        state.failed = not state.ran  # it never worked in this process: stop trying
        if not state.warned:
            state.warned = True
            reason = f"{type(err).__name__}: {str(err)[:300]}"
            message = f"grpo_fast: torch.compile of the CPU {what} failed ({reason}); using the eager path"
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        return eager()
    state.ran = True
    return out


def forward_cpu(logits, ids, active, inv_tau: float, with_entropy: bool, with_norm: bool = True):
    """The compiled ``_row_stats`` (compiled once per process and variant: dtype, entropy and norm flags,
    sizes of 1; any other shape reuses it), or ``forward_eager`` where ``_run_compiled`` says so or the
    input is empty. with_norm False may return None for the norm (the compiled path then never allocates it)."""

    def eager():
        return forward_eager(logits, ids, active, inv_tau, with_entropy)

    if logits.numel() == 0:
        return eager()
    tau = torch.tensor(1.0 / inv_tau, dtype=torch.float32)
    args = (_baseless(logits), _baseless(ids), _baseless(active), tau, with_entropy, with_norm)
    return _run_compiled(ROW_STATS, _row_stats, args, eager, "token statistics")


def _row_grads(logits, ids, active, norm, entropy, grad_logp, grad_entropy, tau, with_entropy_grad: bool, out):
    """d loss / d logits (B, T, V) into ``out`` (None: over the logits), as one fused pass for
    ``torch.compile``: the formula of the module docstring, from ``_row_stats``' norm (m, log s);
    inactive rows get 0."""
    log_p = (logits.float() - norm[..., 0:1]) / tau - norm[..., 1:2]
    p = torch.exp(log_p)
    gl = grad_logp.unsqueeze(-1)
    if with_entropy_grad:  # p = 0 entries (logit -inf) contribute 0, not 0 * -inf
        coef = gl + grad_entropy.unsqueeze(-1) * (log_p + entropy.unsqueeze(-1))
        g = -p * torch.where(p > 0, coef, 0.0)
    else:
        g = -p * gl
    target = torch.arange(logits.shape[-1], device=logits.device) == ids.unsqueeze(-1)
    g = torch.where(active.unsqueeze(-1), torch.where(target, g + gl, g) / tau, 0.0)
    (logits if out is None else out).copy_(g)


def grad_cpu(logits, ids, active, norm, entropy, grad_logp, grad_entropy, inv_tau: float, out) -> torch.Tensor:
    """d loss / d logits of CPU logits (B, T, V) into ``out`` (which may be the logits themselves) and
    returned: the compiled ``_row_grads`` (one read, one write), or ``backward_eager``.
    grad_entropy: None when the loss does not use the entropy."""

    def eager():
        return backward_eager(logits, ids, active, norm, entropy, grad_logp, grad_entropy, inv_tau, out)

    if logits.numel() == 0:
        return eager()
    tau = torch.tensor(1.0 / inv_tau, dtype=torch.float32)
    with_ent = grad_entropy is not None
    ge = grad_entropy if with_ent else grad_logp  # a stand-in the graph does not read
    same = out.data_ptr() == logits.data_ptr() and out.stride() == logits.stride()
    target = None if same else _baseless(out)
    tensors = (logits, ids, active, norm, entropy, grad_logp, ge)
    args = (*(_baseless(t) for t in tensors), tau, with_ent, target)
    _run_compiled(ROW_GRADS, _row_grads, args, eager, "logit gradients")
    return out


def _baseless(t: torch.Tensor) -> torch.Tensor:
    """The same memory as t, as a tensor that is not a view: torch.compile guards on a view's base sizes,
    so a slice of a reused buffer (or logits[:, :-1]) would otherwise recompile for every new base."""
    if t._base is None:
        return t
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


_DOT_ELEMENTS = 1 << 20  # elements of one row block's product temporary in ``expected_value`` (4 MB fp32)


def expected_value(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sum_v p_v z_v per row of (M, V) float32 tensors, exactly in fp32; entries with p = 0 (logit -inf,
    z = -inf) contribute 0, not NaN.

    Elementwise products and sums in row blocks, not a matmul: a matmul would run in bf16 under a
    caller's autocast and in TF32 with ``allow_tf32`` (entropy errors ~1e-3), and this needs no check of
    the result on the host. The temporary is one block, never (M, V).
    """
    rows = max(1, _DOT_ELEMENTS // max(p.shape[-1], 1))
    out = p.new_empty(p.shape[0], dtype=torch.float32)
    for r in range(0, p.shape[0], rows):
        pb, zb = p[r : r + rows], z[r : r + rows]
        torch.sum(torch.where(pb > 0, pb * zb, 0.0), -1, out=out[r : r + rows])
    return out


def backward_eager(logits, ids, active, norm, entropy, grad_logp, grad_entropy, inv_tau: float, out):
    if not bool(active.all()):
        out[~active] = 0
    rows = block_rows(logits.shape[-1])
    x_buf = logits.new_empty((rows, logits.shape[-1]), dtype=torch.float32)
    g_buf = torch.empty_like(x_buf)
    for i, t0, t1 in _row_blocks(active, rows):
        m, log_s = norm[i, t0:t1, 0:1], norm[i, t0:t1, 1:2]  # (M, 1) each
        log_p = _shifted_block(logits[i, t0:t1], m, inv_tau, x_buf[: t1 - t0]).sub_(log_s)
        gl = grad_logp[i, t0:t1].unsqueeze(-1)  # (M, 1)
        target = out[i, t0:t1]  # may be the logits block itself (in place): log_p was read out first
        g = target if target.dtype == torch.float32 else g_buf[: t1 - t0]
        torch.exp(log_p, out=g)  # p
        if grad_entropy is None:
            g.mul_(-gl)
        else:
            ge = grad_entropy[i, t0:t1].unsqueeze(-1)
            # -p (gl + ge (log p + H)); p = 0 entries (logit -inf) contribute 0, not 0 * -inf
            coef = log_p.add_(entropy[i, t0:t1].unsqueeze(-1)).mul_(ge).add_(gl)
            g.mul_(torch.where(g > 0, coef, torch.zeros_like(coef)).neg_())
        g.scatter_add_(-1, ids[i, t0:t1].unsqueeze(-1), gl)
        if inv_tau != 1.0:
            g.mul_(inv_tau)
        if g is not target:
            target.copy_(g)
    return out


def _triton():
    from grpo_fast.kernels import token_stats as kernels  # imported lazily: triton is optional

    return kernels


@torch.library.custom_op("grpo_fast::token_stats", mutates_args=())
def _token_stats_op(
    logits: torch.Tensor, ids: torch.Tensor, active: torch.Tensor, inv_tau: float, with_entropy: bool, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton:
        logp, entropy, lse = _triton().token_stats_forward(logits, ids, active, 1.0 / inv_tau, with_entropy)
        return logp, entropy, torch.stack([torch.zeros_like(lse), lse], dim=-1)  # m = 0, log s = lse
    if logits.device.type == "cpu":
        return forward_cpu(logits, ids, active, inv_tau, with_entropy)
    return forward_eager(logits, ids, active, inv_tau, with_entropy)


@_token_stats_op.register_fake
def _(logits, ids, active, inv_tau, with_entropy, use_triton):
    shape = logits.shape[:-1]
    f32 = {"dtype": torch.float32}
    return logits.new_empty(shape, **f32), logits.new_empty(shape, **f32), logits.new_empty((*shape, 2), **f32)


@torch.library.custom_op("grpo_fast::token_stats_backward", mutates_args=())
def _token_stats_backward_op(
    logits: torch.Tensor,
    ids: torch.Tensor,
    active: torch.Tensor,
    norm: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    inv_tau: float,
    use_triton: bool,
) -> torch.Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return _backward(logits, ids, active, norm, entropy, grad_logp, grad_entropy, inv_tau, use_triton, out)


@_token_stats_backward_op.register_fake
def _(logits, ids, active, norm, entropy, grad_logp, grad_entropy, inv_tau, use_triton):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _backward(logits, ids, active, norm, entropy, grad_logp, grad_entropy, inv_tau, use_triton, out):
    grad_logp = grad_logp.float().contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.float().contiguous()
    if use_triton:
        lse = norm[..., 0] * inv_tau + norm[..., 1]  # the kernels' own lse: m = 0 when they made it
        return _triton().token_stats_backward(
            logits, ids, active, lse, entropy, grad_logp, grad_entropy, 1.0 / inv_tau, out
        )
    if logits.device.type == "cpu":
        return grad_cpu(logits, ids, active, norm, entropy, grad_logp, grad_entropy, inv_tau, out)
    return backward_eager(logits, ids, active, norm, entropy, grad_logp, grad_entropy, inv_tau, out)


def _setup_context(ctx, inputs, output):
    logits, ids, active, inv_tau, with_entropy, use_triton = inputs
    _, entropy, norm = output
    ctx.save_for_backward(logits, ids, active, norm, entropy)
    ctx.inv_tau, ctx.with_entropy, ctx.use_triton = inv_tau, with_entropy, use_triton
    # an output nothing differentiates (the entropy of a loss without entropy bonus) gets None, not zeros:
    # its term is then skipped without looking at the values (no host synchronisation)
    ctx.set_materialize_grads(False)


def _backward_fn(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, ids, active, norm, entropy = ctx.saved_tensors
    if grad_logp is None and grad_entropy is None:
        return None, None, None, None, None, None
    if grad_logp is None:
        grad_logp = torch.zeros_like(entropy)
    if not ctx.with_entropy:
        grad_entropy = None
    grad = _token_stats_backward_op(
        logits, ids, active, norm, entropy, grad_logp, grad_entropy, ctx.inv_tau, ctx.use_triton
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
        logp, entropy, norm = _token_stats_op(logits, ids, active, inv_tau, with_entropy, use_triton)
        ctx.save_for_backward(logits, ids, active, norm, entropy)
        ctx.inv_tau, ctx.with_entropy, ctx.use_triton = inv_tau, with_entropy, use_triton
        ctx.mark_non_differentiable(norm)
        ctx.set_materialize_grads(False)  # as _setup_context
        return logp, entropy, norm

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        logits, ids, active, norm, entropy = ctx.saved_tensors
        grad_logp = torch.zeros_like(entropy) if grad_logp is None else grad_logp
        grad_entropy = grad_entropy if ctx.with_entropy else None
        out = logits.detach()
        _backward(logits, ids, active, norm, entropy, grad_logp, grad_entropy, ctx.inv_tau, ctx.use_triton, out)
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
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    if not (needs_grad or use_triton or torch.compiler.is_compiling()) and logits.device.type == "cpu":
        logp, entropy, _ = forward_cpu(logits, ids, active, inv_tau, with_entropy, with_norm=False)  # no (B, T, 2)
        return logp, entropy
    fn = _InplaceTokenStats.apply if inplace_backward else _token_stats_op
    logp, entropy, _ = fn(logits, ids, active, inv_tau, with_entropy, use_triton)
    return logp, entropy
