"""GRPO loss from hidden states, chunked over tokens, with the gradient formed at forward time.

Per chunk of C token rows (torch backend):
    logits = h_c @ W.T (+ b)                      GEMM 1: 2 C H V flops
    row statistics (lse, log p[id], entropy)      in place on the chunk, C x V float32
    d loss / d logp, d loss / d H for the chunk   from the (B, T) objective, see ``chunk_coefficients``
    g = (dlogp (onehot - p) - dH p (log p + H)) / tau
    grad_h[c] = g @ W                             GEMM 2
    grad_W   += g.T @ h_c  (float32 accumulator)  GEMM 3
So forward + backward costs the three GEMMs a loss needs (6 N H V flops) and O(C x V) extra memory;
the backward pass only scales the stored gradients by the upstream gradient. On CPU with a real
vocabulary (``COMPILED_MIN_VOCAB``) the row statistics and g are token_stats' compiled row passes,
g written over the logits: one (C, V) buffer; otherwise eager passes with a second one.

The gradient can be formed at forward time because the GRPO objective is separable over tokens once
the per-sequence statistics are known: every loss type weights token t by a factor that depends on the
mask only, and the ratio of token t depends on its own log-prob. The exceptions are sequence-level
importance sampling (GSPO) with old log-probs, whose weight exp(mean_t(logp - old)) needs all of a
sequence's log-probs first, sequence-level weights multiplying the KL term (bias correction), and vespo's
weight phi(exp(sum_t (logp - old))) with old log-probs: they cost one extra forward-only GEMM pass (4 GEMMs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import token_stats

# A chunk's float32 temporaries (two C x V buffers) stay near 2 x 128 MB: O(C x V) memory, while C is
# large enough that the per-chunk read-modify-write of the (V, H) weight-gradient accumulator is
# amortised over many rows (at V = 151936 this gives C = 220 rows).
_CHUNK_ELEMENTS = 1 << 25
_GRAD_W_BLOCK = 8192  # vocabulary rows per low-precision grad_W product (8192 x H bf16: 14 MB at H = 896)
# On CPU, from this vocabulary size on, a chunk's row statistics and gradient are token_stats' compiled row
# passes (2 reads + 1 read/write of the chunk, no second (C, V) buffer: 134 MB less at V = 151936, see
# bench.run's fused-linear memory). The compilation costs seconds once per process, which a toy
# vocabulary (the demo's V = 21) would never earn back.
COMPILED_MIN_VOCAB = 8192


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary of this size (at least 16, at most 4096)."""
    return int(min(4096, max(16, _CHUNK_ELEMENTS // max(vocab, 1))))


class Workspace:
    """Two reusable (C, V) float32 buffers (and a low-precision GEMM output when needed).

    Fresh multi-hundred-MB tensors per chunk would be page-faulted in every time (several times slower
    than writing into memory already mapped), so every chunk reuses these.
    """

    def __init__(self, chunk: int, weight: torch.Tensor, hidden_dtype: torch.dtype):
        v = weight.shape[0]
        self.z = torch.empty(chunk, v, dtype=torch.float32, device=weight.device)
        self._p: torch.Tensor | None = None  # the second buffer, allocated when first asked for
        # bf16 GEMMs with fp32 accumulation; fp16 runs in fp32 (fp16 logits overflow beyond 65504)
        low = weight.dtype if weight.dtype == hidden_dtype == torch.bfloat16 else torch.float32
        self.z_low = None if low == torch.float32 else torch.empty(chunk, v, dtype=low, device=weight.device)
        # one vocabulary block of a chunk's grad_W product, in low precision (a (V, H) one would be 272 MB
        # for Qwen2.5-0.5B's head in bf16)
        rows = min(v, _GRAD_W_BLOCK)
        self.gw_low = None if low == torch.float32 else weight.new_empty((rows, weight.shape[1]))

    @property
    def p(self) -> torch.Tensor:
        if self._p is None:
            self._p = torch.empty_like(self.z)
        return self._p

    def logits(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """float32 logits (C, V) of one chunk in the z buffer. Mixed precision computes in fp32."""
        c = h.shape[0]
        z = self.z[:c]
        if self.z_low is not None:
            z.copy_(torch.mm(h, weight.T, out=self.z_low[:c]))
        else:
            torch.mm(h.float(), weight.float().T if weight.dtype != torch.float32 else weight.T, out=z)
        if bias is not None:
            z.add_(bias.float())
        return z


def chunk_stats(z: torch.Tensor, ids: torch.Tensor, inv_tau: float, logp_out: torch.Tensor):
    """Row statistics of float32 logits z (C, V): log p = z / tau - lse into ``logp_out``, then p into z.

    One fused log-softmax pass (row max, sum of exponentials, write) and one exp pass; no temporaries.
    Returns (logp (C,), entropy (C,), p (C, V) = z, log p (C, V) = logp_out[:C]), all float32.
    """
    if inv_tau != 1.0:
        z.mul_(inv_tau)
    logp_v = torch._log_softmax(z, 1, False, out=logp_out[: z.shape[0]])  # (C, V)
    p = torch.exp(logp_v, out=z)
    entropy = token_stats.expected_value(p, logp_v).neg_()  # -sum_v p log p; p = 0 entries add 0
    logp = logp_v.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return logp, entropy, p, logp_v


def chunk_logprobs(z: torch.Tensor, ids: torch.Tensor, inv_tau: float, logp_out: torch.Tensor) -> torch.Tensor:
    """(C,) log-probabilities of ``ids`` under float32 logits z (C, V) / tau: one fused log-softmax pass."""
    if inv_tau != 1.0:
        z.mul_(inv_tau)
    logp_v = torch._log_softmax(z, 1, False, out=logp_out[: z.shape[0]])
    return logp_v.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def chunk_grad_logits(logp_v, p, entropy, ids, dlogp, dent, inv_tau: float) -> torch.Tensor:
    """g = (dlogp (onehot - p) - dH p (log p + H)) / tau, reusing the (C, V) buffers logp_v and p."""
    if dent is None:
        g = p.mul_((-dlogp * inv_tau).unsqueeze(-1))
    else:
        logp_v.masked_fill_(logp_v.isneginf(), 0.0)  # p log p -> 0 where p = 0
        g = logp_v.add_(entropy.unsqueeze(-1)).mul_(dent.unsqueeze(-1)).add_(dlogp.unsqueeze(-1))
        g.mul_(p).mul_(-inv_tau)
    g.scatter_add_(-1, ids.unsqueeze(-1), (dlogp * inv_tau).unsqueeze(-1))
    return g


def chunk_coefficients(
    objective: Callable, logp_all: torch.Tensor, ent_all: torch.Tensor, rows: torch.Tensor, logp_c, ent_c
):
    """d objective / d logp and d objective / d H at the chunk's rows (flat indices into (B, T)).

    ``logp_all``/``ent_all`` (B, T) hold stand-ins for the rows not yet computed; because the
    objective is separable over tokens given the sequence statistics, the stand-ins do not change
    the derivative at the chunk's rows.
    """
    lp = logp_all.detach().clone()
    ent = ent_all.detach().clone()
    lp.view(-1)[rows] = logp_c
    ent.view(-1)[rows] = ent_c
    lp.requires_grad_(True)
    ent.requires_grad_(True)
    with torch.enable_grad():
        loss, _ = objective(lp, ent)
        d_lp, d_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
    d_lp = torch.zeros_like(lp) if d_lp is None else d_lp
    d_ent = None if d_ent is None else d_ent.reshape(-1)[rows]
    return d_lp.reshape(-1)[rows], d_ent


def _all_rows(r: torch.Tensor) -> torch.Tensor:
    return torch.ones((1, r.numel()), dtype=torch.bool, device=r.device)


def forward_stats(hidden2d, weight, bias, ids, rows, inv_tau: float, chunk: int, with_entropy: bool):
    """Forward-only (logp, entropy) at ``rows`` of (N, H) hidden states: 1 GEMM, chunked. On CPU the
    statistics are token_stats' compiled row reductions over the chunk's logits (one (C, V) buffer)."""
    with fp32_math(hidden2d.device):
        return _forward_stats(hidden2d, weight, bias, ids, rows, inv_tau, chunk, with_entropy)


def _forward_stats(hidden2d, weight, bias, ids, rows, inv_tau: float, chunk: int, with_entropy: bool):
    logp = hidden2d.new_zeros(rows.numel(), dtype=torch.float32)
    entropy = torch.zeros_like(logp)
    ws = Workspace(min(chunk, max(rows.numel(), 1)), weight, hidden2d.dtype)
    for start in range(0, rows.numel(), chunk):
        r = rows[start : start + chunk]
        z = ws.logits(hidden2d[r], weight, bias)
        if z.device.type == "cpu":  # compiled per-row reductions straight from z: no second (C, V) buffer
            lp, ent, _ = token_stats.forward_cpu(z[None], ids[r][None], _all_rows(r), inv_tau, with_entropy)
            lp = lp[0]
            entropy[start : start + r.numel()] = ent[0]
        elif with_entropy:
            lp, ent, _, _ = chunk_stats(z, ids[r], inv_tau, ws.p)
            entropy[start : start + r.numel()] = ent
        else:
            lp = chunk_logprobs(z, ids[r], inv_tau, ws.p)
        logp[start : start + r.numel()] = lp
    return logp, entropy


class LinearGRPOFunction(torch.autograd.Function):
    """loss = objective(logp(hidden @ W.T + b), H(...)); all gradients formed in forward."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, ids, rows, standin, objective, inv_tau, chunk, metrics_out):
        with fp32_math(hidden2d.device):
            loss, logp_all, grads, metrics = _loss_and_grads(hidden2d, weight, bias, ids, rows, standin, objective,
                                                             inv_tau, chunk)  # fmt: skip
        ctx.save_for_backward(*grads)
        ctx.dtypes = (hidden2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logp_all)
        metrics_out.update(metrics)
        return loss.detach(), logp_all

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp):
        return *saved_grads(ctx, grad_loss), None, None, None, None, None, None, None


def saved_grads(ctx, grad_loss: torch.Tensor) -> tuple:
    """(grad_h, grad_w, grad_b) formed in forward (``ctx.saved_tensors``, fp32 accumulators) times the
    upstream gradient, in the inputs' dtypes (``ctx.dtypes``), in place: no (V, H)-sized copy.

    The factor is applied even when it is loss.backward()'s 1: finding that out would be a host
    synchronisation (a stalled stream, a broken CUDA-graph capture), while the multiply is one pass over
    the (V, H) accumulator, small next to the GEMMs that formed it. Because the saved tensors are
    overwritten, a second backward is refused.
    """
    if getattr(ctx, "consumed", False):
        raise RuntimeError("the fused head loss supports one backward per forward (its saved gradients are "
                           "scaled in place); compute the loss again to backpropagate again")  # fmt: skip
    ctx.consumed = True
    scale = grad_loss.to(torch.float32)
    grads = [None if g is None else g.mul_(scale.to(g.dtype)) for g in ctx.saved_tensors]
    h_dtype, w_dtype, b_dtype = ctx.dtypes
    grad_h, grad_w, grad_b = grads
    grad_w = narrow_in_place(grad_w, w_dtype)
    return grad_h.to(h_dtype), grad_w, None if grad_b is None else grad_b.to(b_dtype)


def fp32_math(device: torch.device):
    """A caller's autocast switched off: the chunked head computes in the precision it chooses (its fp32
    products and reductions would otherwise run in bf16, the logits gradient too)."""
    return torch.autocast(device.type, enabled=False)


def _loss_and_grads(hidden2d, weight, bias, ids, rows, standin, objective, inv_tau, chunk):
    """LinearGRPOFunction's work: (loss, logp (B, T), (grad_h, grad_w, grad_b), metrics)."""
    n, h = hidden2d.shape
    grad_h = torch.zeros(n, h, dtype=hidden2d.dtype, device=hidden2d.device)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    logp_all = standin.clone()  # (B, T) filled in chunk by chunk
    ent_all = torch.zeros_like(standin)
    ws = Workspace(min(chunk, max(rows.numel(), 1)), weight, hidden2d.dtype)
    compiled = weight.device.type == "cpu" and weight.shape[0] >= COMPILED_MIN_VOCAB
    for start in range(0, rows.numel(), chunk):
        r = rows[start : start + chunk]
        h_c = hidden2d[r]  # (C, H)
        z = ws.logits(h_c, weight, bias)
        if compiled:
            lp, ent, norm = token_stats.forward_cpu(z[None], ids[r][None], _all_rows(r), inv_tau, True)
            lp, ent = lp[0], ent[0]
        else:
            lp, ent, p, logp_v = chunk_stats(z, ids[r], inv_tau, ws.p)
        d_lp, d_ent = chunk_coefficients(objective, logp_all, ent_all, r, lp, ent)
        logp_all.view(-1)[r] = lp
        ent_all.view(-1)[r] = ent
        if compiled:  # g written over z
            d_ent = None if d_ent is None else d_ent[None]
            z3, ids3 = z[None], ids[r][None]
            token_stats.grad_cpu(z3, ids3, _all_rows(r), norm, ent[None], d_lp[None], d_ent, inv_tau, out=z3)
            g = z
        else:
            g = chunk_grad_logits(logp_v, p, ent, ids[r], d_lp, d_ent, inv_tau)  # (C, V) float32
        _accumulate_grads(g, h_c, weight, r, grad_h, grad_w, grad_b, ws)
    loss, metrics = objective(logp_all, ent_all)
    return loss, logp_all, (grad_h, grad_w, grad_b), metrics


def narrow_in_place(acc: torch.Tensor, dtype: torch.dtype, block: int = 1 << 20) -> torch.Tensor:
    """The float32 accumulator converted to a narrower dtype inside its own storage.

    A plain ``acc.to(bfloat16)`` would hold both (1.5x the fp32 size; +272 MB for a 151936 x 896 head).
    Element i of the result is written at byte 2i, after the source block holding byte 4i has been
    read into a small temporary, so no unread source value is overwritten. The result keeps the fp32
    storage (its first half holds the values).
    """
    if dtype == acc.dtype or not acc.is_contiguous() or acc.element_size() < torch.finfo(dtype).bits // 8:
        return acc.to(dtype)
    n = acc.numel()
    out = torch.empty(0, dtype=dtype, device=acc.device).set_(acc.untyped_storage(), 0, acc.shape)
    src, dst = acc.view(-1), out.view(-1)
    for a in range(0, n, block):
        dst[a : a + block].copy_(src[a : a + block].to(dtype))
    return out


def _accumulate_grads(g, h_c, weight, rows, grad_h, grad_w, grad_b, ws: Workspace):
    """grad_h[rows] = g @ W; grad_W += g.T @ h_c in float32; grad_b += sum of g over rows."""
    if ws.z_low is None:
        w32 = weight if weight.dtype == torch.float32 else weight.float()
        grad_h[rows] = (g @ w32).to(grad_h.dtype)
        grad_w.addmm_(g.T, h_c.float())
    else:
        g_low = ws.z_low[: g.shape[0]].copy_(g)
        grad_h[rows] = (g_low @ weight).to(grad_h.dtype)
        # the chunk's product in low precision (fp32 accumulation inside the GEMM), the sum across chunks in
        # fp32, one vocabulary block at a time so the low-precision product stays small
        for v0 in range(0, g_low.shape[1], ws.gw_low.shape[0]):
            v1 = min(v0 + ws.gw_low.shape[0], g_low.shape[1])
            grad_w[v0:v1].add_(torch.mm(g_low[:, v0:v1].T, h_c, out=ws.gw_low[: v1 - v0]))
    if grad_b is not None:
        grad_b.add_(g.sum(0))
