"""Per-token log-prob, entropy and log-sum-exp of the LM head softmax((h W^T + b) / tau), straight from
the hidden states, forward and backward, with no logits in global memory (Cut Cross-Entropy style:
Wijmans et al. 2024, arXiv 2411.09009; written from the paper's algorithm, not from its code).

Per active row n of the N rows, with z = h W^T + b (V logits), s = z / tau, lse = logsumexp_v s_v,
p = exp(s - lse):
    logp = s[id] - lse,    H = lse - sum_v p_v s_v,
    d loss / d z_v = g_v = (gl (1[v == id] - p_v) - ge p_v (log p_v + H)) / tau,
    grad_h = g W,   grad_W = g^T h,   grad_b = sum_n g.
A (BLOCK_N, BLOCK_V) tile of z is formed by tl.dot over H in BLOCK_H slices (inputs in their own
dtype, fp32 accumulation) and lives only in registers / shared memory.

Rows: the launchers sort the rows stably so that the active ones come first (``order``, a device
argsort of N flags, plus the active count on the device: no host synchronisation). A row block past
the active count does no GEMM work at all, and a block is never part active and part padding except
at the one boundary, so inactive tokens (prompt padding, finished sequences) cost nothing.

Kernels (every grid 1-D; none is bounded by T):
    _fwd_kernel          grid (row blocks x vocab splits). Each program streams its share of the
                         vocabulary through an online (max, sum 2^x, sum 2^x x) merge per row and
                         picks the target logit from its tile; writes 4 partials per (row, split).
                         GEMM 1 (2 N H V flops). Splitting V keeps >= ~512 programs in flight when
                         N is small (N = 1024 rows are 16 row blocks: most of an H100's 132 SMs would idle).
    _merge_kernel        grid (N / 256): merges the splits' partials -> logp, H, lse (zeros if inactive).
    _bwd_fused_kernel    grid (row blocks x vocab blocks), grouped so that GROUP_N row blocks walk the
                         vocabulary together (each W tile is read from DRAM once per group, the group's
                         hidden rows stay in L2). Recomputes its z tile (GEMM 2), forms g, then per H
                         slice atomically adds g W_tile into grad_h (GEMM 3) and g^T h_tile into grad_W
                         (GEMM 4), and sum_n g into grad_b. Non-deterministic: fp32 atomics in any order.
    _bwd_hidden_kernel   deterministic, grid (row blocks): walks all vocab tiles in order, recomputes z
                         (GEMM 2), accumulates grad_h[rows] = sum_v g W in global fp32 (its own rows
                         only: read-modify-write, no atomics) (GEMM 3).
    _bwd_weight_kernel   deterministic, grid (vocab blocks): walks the active row blocks in order,
                         recomputes z (GEMM 4), accumulates grad_W[vocab block] = sum_n g^T h (GEMM 5)
                         the same way, and grad_b in registers.
GEMM count for forward + backward: 4 with atomics (the minimum 3 plus the one recomputation that saves
storing N x V), 5 deterministic (each backward kernel recomputes z for itself).

Numerics: as kernels/token_stats.py. The running max m is of the raw z (1 / tau > 0 keeps the order),
exponents are (z - m) / tau in base 2 (one MUFU.EX2), and logp = (z[id] - m) / tau - log d,
H = log d - e / d, lse = m / tau + log d, so no result is a difference of two numbers of size |z|.
Columns past V and rows past the active count are -inf logits: they contribute exactly 0, never
0 * inf. The backward rebuilds p = exp(z / tau - lse) from the saved fp32 lse, and casts g to the
input dtype for the two gradient GEMMs (fp32 accumulation): bf16 as is, as the torch backend's bf16
GEMMs; fp16 after scaling each tile to a largest |g| of 2**14 (``_gemm_operand``: fp16 would flush
|g| < 6e-8 to 0), where the torch backend computes fp16 in fp32.
fp32 inputs use input_precision="ieee" (exact fp32 FMA, like torch's default fp32 matmul; TF32 would
round the inputs to 10 bits): bf16/fp16 are the fast paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .launch import launch

HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MERGE_BLOCK = 256  # rows per program of the split-merge kernel (elementwise over N; 2 rows per thread)
_TARGET_PROGRAMS = 512  # forward programs to aim for: ~4 per SM on H100 (132 SMs) and A100 (108)
_MIN_TILES_PER_SPLIT = 4  # vocabulary tiles per split at least, so a split's partials are amortised
_MAX_INDEX = 2**31 - 1  # rows and vocabulary positions are int32 inside the kernels
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
FLOAT32_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


# ----------------------------------------------------------------------------------------------
# Device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows,  # (BLOCK_N,) int32 row indices of hidden (any valid index where not row_mask)
    row_mask,  # (BLOCK_N,) rows that exist and are active
    cols,  # (BLOCK_V,) int32 vocabulary indices
    col_mask,  # (BLOCK_V,) cols < V (or the split's end)
    H,
    stride_hn,
    stride_wv,
    BLOCK_H: tl.constexpr,
):
    """z = h[rows] W[cols]^T + b[cols]: (BLOCK_N, BLOCK_V) fp32; -inf outside row_mask x col_mask."""
    k = tl.arange(0, BLOCK_H)
    h_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hn + k[None, :]  # (BLOCK_N, BLOCK_H)
    w_ptrs = weight_ptr + cols.to(tl.int64)[:, None] * stride_wv + k[None, :]  # (BLOCK_V, BLOCK_H)
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        k_mask = (k0 + k) < H
        h = tl.load(h_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")  # ieee: fp32 stays fp32, not TF32
    acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(row_mask[:, None] & col_mask[None, :], acc, float("-inf"))


@triton.jit
def _grad_tile(z, cols, target, lse, entropy, g_logp, g_ent, inv_tau, HAS_GRAD_ENTROPY: tl.constexpr):
    """d loss / d z of one tile, fp32 (BLOCK_N, BLOCK_V); 0 where z is -inf (masked rows and columns).

    g_logp and g_ent arrive already multiplied by 1 / tau (per row, not per element). log p is clamped
    to the most negative float so that p == 0 gives 0 * -3e38 = 0, not 0 * -inf = NaN.
    """
    log_p = z * inv_tau - lse[:, None]
    p = tl.exp2(log_p * LOG2E)
    g = tl.where(cols[None, :] == target[:, None], g_logp[:, None], 0.0) - g_logp[:, None] * p
    if HAS_GRAD_ENTROPY:
        g -= g_ent[:, None] * p * (tl.maximum(log_p, -FLOAT32_MAX) + entropy[:, None])
    return g


@triton.jit
def _gemm_operand(g, weight_ptr):
    """g as the gradient GEMMs' operand in the weight's dtype, and the factor that undoes its scaling on
    their fp32 products.

    bf16 has fp32's exponent range: g is rounded, nothing more. fp16 stops at 6e-8 (2**-24), and g is
    often far smaller (d loss / d logp ~ 1 / tokens times p ~ 1e-6 gives 1e-10), so a plain cast would
    flush it to 0; the tile is scaled first so that its largest |g| is 2**14 (no overflow of 65504),
    which leaves an entry flushed only below 2**-38 of that largest one. 1e30 caps the factor for an
    all-zero tile (its products are 0 whatever the factor).
    """
    if weight_ptr.dtype.element_ty == tl.float16:
        top = tl.max(tl.max(tl.abs(g), axis=1), axis=0)
        scale = tl.minimum(16384.0 / top, 1e30)
        return (g * scale).to(tl.float16), 1.0 / scale
    else:
        return g.to(weight_ptr.dtype.element_ty), 1.0


@triton.jit
def _row_block(order_ptr, count, block, N, BLOCK_N: tl.constexpr):
    """(positions, rows, active mask, in-range mask) of row block ``block`` in the active-first order."""
    pos = block * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = pos < N
    rows = tl.load(order_ptr + pos, mask=in_range, other=0)
    return pos, rows, pos < count, in_range


@triton.jit
def _target_column(ids_ptr, rows, row_mask, V):
    """int32 target column per row, -1 where masked or outside [0, V): an int32 compare per element."""
    target = tl.load(ids_ptr + rows, mask=row_mask, other=-1)
    return tl.where((target >= 0) & (target < V), target, -1).to(tl.int32)


@triton.jit
def _row_scalars(
    rows,
    row_mask,
    V,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    ids_ptr,
    inv_tau,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    """Per-row (target, lse, H, gl / tau, ge / tau) of the backward; 0 (and target -1) outside row_mask."""
    target = _target_column(ids_ptr, rows, row_mask, V)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g_logp = tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0) * inv_tau
    entropy = tl.zeros_like(lse)
    g_ent = tl.zeros_like(lse)
    if HAS_GRAD_ENTROPY:
        entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        g_ent = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0) * inv_tau
    return target, lse, entropy, g_logp, g_ent


# ----------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    # pointers
    hidden_ptr,  # (N, H) fp32 / bf16 / fp16, unit stride over H
    weight_ptr,  # (V, H) hidden's dtype, unit stride over H
    bias_ptr,  # (V,) fp32 (zeros when the head has none)
    ids_ptr,  # (N,) int64
    order_ptr,  # (N,) int32 row indices, active rows first
    count_ptr,  # () int32 number of active rows
    part_ptr,  # (S, 4, N) fp32 out: per (split, position) max m, sum 2^x, sum 2^x x, target logit
    # shapes
    N,
    H,
    V,
    vocab_per_split,  # a multiple of BLOCK_V
    # strides, in elements
    stride_hn,
    stride_wv,
    # scalars
    inv_tau,  # fp32 1 / temperature, a runtime value: no recompilation per temperature
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BLOCK_N)
    block = pid % row_blocks  # row blocks fastest: programs in flight share a split's W slice in L2
    split = pid // row_blocks
    count = tl.load(count_ptr)
    pos, rows, row_mask, _ = _row_block(order_ptr, count, block, N, BLOCK_N)
    if block * BLOCK_N < count:
        target = _target_column(ids_ptr, rows, row_mask, V)
        scale = inv_tau * LOG2E
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max of z
        d = tl.zeros((BLOCK_N,), tl.float32)  # sum 2^x, x = (z - m) * scale
        e = tl.zeros((BLOCK_N,), tl.float32)  # sum 2^x x
        z_target = tl.zeros((BLOCK_N,), tl.float32)
        v_start = split * vocab_per_split
        v_end = tl.minimum(v_start + vocab_per_split, V)
        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = _logits_tile(
                hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, cols < v_end, H, stride_hn, stride_wv, BLOCK_H
            )
            m_new = tl.maximum(m, tl.max(z, axis=1))
            # exponents relative to m_new, or to 0 while a row is all -inf so far (d = e = 0 then)
            ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            x = (z - ref[:, None]) * scale  # (BLOCK_N, BLOCK_V) <= 0, -inf where masked
            p = tl.exp2(x)
            alpha = tl.exp2((m - ref) * scale)  # rescales the old sums; 0 while m == -inf
            if WITH_ENTROPY:
                # old terms: sum 2^x' x' = alpha (e + shift d); x clamped so that p == 0 adds 0, not NaN
                shift = tl.where(m == float("-inf"), 0.0, (m - ref) * scale)
                e = alpha * (e + shift * d) + tl.sum(p * tl.maximum(x, -FLOAT32_MAX), axis=1)
            d = alpha * d + tl.sum(p, axis=1)
            m = m_new
            z_target += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        # (S, 4, N): the split's four planes one after another (pointer steps of N: no int32 4 * N)
        out = part_ptr + split.to(tl.int64) * 4 * N + pos
        tl.store(out, m, mask=row_mask)
        out += N
        tl.store(out, d, mask=row_mask)
        out += N
        tl.store(out, e, mask=row_mask)
        out += N
        tl.store(out, z_target, mask=row_mask)


@triton.jit
def _merge_kernel(
    # pointers
    part_ptr,  # (S, 4, N) fp32 from _fwd_kernel
    ids_ptr,  # (N,) int64
    order_ptr,  # (N,) int32, active rows first
    count_ptr,  # () int32
    logp_ptr,  # (N,) fp32 out
    entropy_ptr,  # (N,) fp32 out
    lse_ptr,  # (N,) fp32 out
    # shapes
    N,
    V,
    S,  # vocabulary splits
    # scalars
    inv_tau,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    pos, rows, active, in_range = _row_block(order_ptr, tl.load(count_ptr), tl.program_id(0), N, BLOCK_N)
    scale = inv_tau * LOG2E
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    d = tl.zeros((BLOCK_N,), tl.float32)
    e = tl.zeros((BLOCK_N,), tl.float32)
    z_target = tl.zeros((BLOCK_N,), tl.float32)
    src = part_ptr + pos  # (S, 4, N), walked plane by plane in steps of N
    for _ in range(0, S):  # splits in order: deterministic
        m_s = tl.load(src, mask=active, other=float("-inf"))
        src += N
        d_s = tl.load(src, mask=active, other=0.0)
        src += N
        m_new = tl.maximum(m, m_s)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m - ref) * scale)
        beta = tl.exp2((m_s - ref) * scale)
        if WITH_ENTROPY:
            e_s = tl.load(src, mask=active, other=0.0)
            shift = tl.where(m == float("-inf"), 0.0, (m - ref) * scale)
            shift_s = tl.where(m_s == float("-inf"), 0.0, (m_s - ref) * scale)
            e = alpha * (e + shift * d) + beta * (e_s + shift_s * d_s)
        src += N
        d = alpha * d + beta * d_s
        m = m_new
        z_target += tl.load(src, mask=active, other=0.0)  # the split holding the target has it, others 0
        src += N
    d = tl.where(active, d, 1.0)  # inactive rows: log 1 = 0 rather than log 0, their outputs are 0 anyway
    log_d = tl.log2(d) * LN2
    # an id outside [0, V) matched no column: NaN (the public API rejects such ids beforehand)
    target = _target_column(ids_ptr, rows, active, V)
    logp = tl.where(target >= 0, (z_target - m) * inv_tau - log_d, float("nan"))
    entropy = log_d - e / d * LN2 if WITH_ENTROPY else tl.zeros_like(log_d)
    tl.store(logp_ptr + rows, tl.where(active, logp, 0.0), mask=in_range)
    tl.store(entropy_ptr + rows, tl.where(active, entropy, 0.0), mask=in_range)
    tl.store(lse_ptr + rows, tl.where(active, m * inv_tau + log_d, 0.0), mask=in_range)


# ----------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bwd_fused_kernel(
    # pointers
    hidden_ptr,  # (N, H) fp32 / bf16 / fp16, unit stride over H
    weight_ptr,  # (V, H) hidden's dtype, unit stride over H
    bias_ptr,  # (V,) fp32 (zeros when the head has none)
    ids_ptr,  # (N,) int64
    order_ptr,  # (N,) int32, active rows first
    count_ptr,  # () int32
    lse_ptr,  # (N,) fp32 from the forward
    entropy_ptr,  # (N,) fp32 from the forward (read only with HAS_GRAD_ENTROPY)
    grad_logp_ptr,  # (N,) fp32
    grad_entropy_ptr,  # (N,) fp32 (read only with HAS_GRAD_ENTROPY)
    grad_hidden_ptr,  # (N, H) fp32, zero-filled, accumulated atomically
    grad_weight_ptr,  # (V, H) fp32, zero-filled, accumulated atomically
    grad_bias_ptr,  # (V,) fp32, zero-filled, accumulated atomically
    # shapes
    N,
    H,
    V,
    # strides, in elements
    stride_hn,
    stride_wv,
    stride_ghn,
    stride_gwv,
    # scalars
    inv_tau,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    # grouped order: GROUP_N row blocks take each vocabulary block in turn (W tile from DRAM once per group)
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_N * tl.cdiv(V, BLOCK_V)
    first = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(row_blocks - first, GROUP_N)
    block = first + (pid % per_group) % group_rows
    cols = (pid % per_group) // group_rows * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    count = tl.load(count_ptr)
    _, rows, row_mask, _ = _row_block(order_ptr, count, block, N, BLOCK_N)
    if block * BLOCK_N < count:
        target, lse, entropy, g_logp, g_ent = _row_scalars(
            rows, row_mask, V, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, ids_ptr, inv_tau, HAS_GRAD_ENTROPY
        )
        z = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, H, stride_hn, stride_wv, BLOCK_H
        )
        g = _grad_tile(z, cols, target, lse, entropy, g_logp, g_ent, inv_tau, HAS_GRAD_ENTROPY)
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(g, axis=0), mask=col_mask, sem="relaxed")
        g, unscale = _gemm_operand(g, weight_ptr)  # tensor-core input, fp32 accumulation
        k = tl.arange(0, BLOCK_H)
        rows64 = rows.to(tl.int64)[:, None]
        cols64 = cols.to(tl.int64)[:, None]
        for k0 in range(0, H, BLOCK_H):
            k_mask = (k0 + k)[None, :] < H
            w = tl.load(weight_ptr + cols64 * stride_wv + k0 + k[None, :], mask=col_mask[:, None] & k_mask, other=0.0)
            h = tl.load(hidden_ptr + rows64 * stride_hn + k0 + k[None, :], mask=row_mask[:, None] & k_mask, other=0.0)
            gh = tl.dot(g, w, input_precision="ieee") * unscale  # (BLOCK_N, BLOCK_H)
            gw = tl.dot(tl.trans(g), h, input_precision="ieee") * unscale  # (BLOCK_V, BLOCK_H)
            tl.atomic_add(
                grad_hidden_ptr + rows64 * stride_ghn + k0 + k[None, :],
                gh,
                mask=row_mask[:, None] & k_mask,
                sem="relaxed",
            )
            tl.atomic_add(
                grad_weight_ptr + cols64 * stride_gwv + k0 + k[None, :],
                gw,
                mask=col_mask[:, None] & k_mask,
                sem="relaxed",
            )


@triton.jit
def _bwd_hidden_kernel(
    # pointers
    hidden_ptr,  # (N, H) fp32 / bf16 / fp16, unit stride over H
    weight_ptr,  # (V, H) hidden's dtype, unit stride over H
    bias_ptr,  # (V,) fp32
    ids_ptr,  # (N,) int64
    order_ptr,  # (N,) int32, active rows first
    count_ptr,  # () int32
    lse_ptr,  # (N,) fp32
    entropy_ptr,  # (N,) fp32 (read only with HAS_GRAD_ENTROPY)
    grad_logp_ptr,  # (N,) fp32
    grad_entropy_ptr,  # (N,) fp32 (read only with HAS_GRAD_ENTROPY)
    grad_hidden_ptr,  # (N, H) fp32 out, every element written (zeros for inactive rows)
    # shapes
    N,
    H,
    V,
    # strides, in elements
    stride_hn,
    stride_wv,
    stride_ghn,
    # scalars
    inv_tau,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    block = tl.program_id(0)
    count = tl.load(count_ptr)
    _, rows, row_mask, in_range = _row_block(order_ptr, count, block, N, BLOCK_N)
    k = tl.arange(0, BLOCK_H)
    out = grad_hidden_ptr + rows.to(tl.int64)[:, None] * stride_ghn + k[None, :]  # (BLOCK_N, BLOCK_H)
    if block * BLOCK_N < count:
        target, lse, entropy, g_logp, g_ent = _row_scalars(
            rows, row_mask, V, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, ids_ptr, inv_tau, HAS_GRAD_ENTROPY
        )
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            z = _logits_tile(
                hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, H, stride_hn, stride_wv, BLOCK_H
            )
            g = _grad_tile(z, cols, target, lse, entropy, g_logp, g_ent, inv_tau, HAS_GRAD_ENTROPY)
            g, unscale = _gemm_operand(g, weight_ptr)
            w_ptrs = weight_ptr + cols.to(tl.int64)[:, None] * stride_wv + k[None, :]
            # the previous tile's stores by any thread of the program are visible before they are re-read
            tl.debug_barrier()
            for k0 in range(0, H, BLOCK_H):
                k_mask = (k0 + k)[None, :] < H
                w = tl.load(w_ptrs + k0, mask=col_mask[:, None] & k_mask, other=0.0)
                acc = tl.dot(g, w, input_precision="ieee") * unscale  # (BLOCK_N, BLOCK_H)
                # the first tile writes (no zero-fill pass), later ones add in a fixed order: deterministic
                acc += tl.load(out + k0, mask=in_range[:, None] & k_mask & (v0 > 0), other=0.0)
                tl.store(out + k0, acc, mask=in_range[:, None] & k_mask)
    else:
        for k0 in range(0, H, BLOCK_H):
            zeros = tl.zeros((BLOCK_N, BLOCK_H), tl.float32)
            tl.store(out + k0, zeros, mask=in_range[:, None] & ((k0 + k)[None, :] < H))


@triton.jit
def _bwd_weight_kernel(
    # pointers
    hidden_ptr,  # (N, H) fp32 / bf16 / fp16, unit stride over H
    weight_ptr,  # (V, H) hidden's dtype, unit stride over H
    bias_ptr,  # (V,) fp32
    ids_ptr,  # (N,) int64
    order_ptr,  # (N,) int32, active rows first
    count_ptr,  # () int32
    lse_ptr,  # (N,) fp32
    entropy_ptr,  # (N,) fp32 (read only with HAS_GRAD_ENTROPY)
    grad_logp_ptr,  # (N,) fp32
    grad_entropy_ptr,  # (N,) fp32 (read only with HAS_GRAD_ENTROPY)
    grad_weight_ptr,  # (V, H) fp32 out, every element written
    grad_bias_ptr,  # (V,) fp32 out, every element written
    # shapes
    N,
    H,
    V,
    # strides, in elements
    stride_hn,
    stride_wv,
    stride_gwv,
    # scalars
    inv_tau,
    # meta-parameters
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    k = tl.arange(0, BLOCK_H)
    out = grad_weight_ptr + cols.to(tl.int64)[:, None] * stride_gwv + k[None, :]  # (BLOCK_V, BLOCK_H)
    grad_bias = tl.zeros((BLOCK_V,), tl.float32)
    # at least one pass, so that with no active row the (all-zero) gradient is still written
    count = tl.load(count_ptr)
    for n0 in range(0, tl.maximum(count, 1), BLOCK_N):
        _, rows, row_mask, _ = _row_block(order_ptr, count, n0 // BLOCK_N, N, BLOCK_N)
        target, lse, entropy, g_logp, g_ent = _row_scalars(
            rows, row_mask, V, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, ids_ptr, inv_tau, HAS_GRAD_ENTROPY
        )
        z = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, H, stride_hn, stride_wv, BLOCK_H
        )
        g = _grad_tile(z, cols, target, lse, entropy, g_logp, g_ent, inv_tau, HAS_GRAD_ENTROPY)
        grad_bias += tl.sum(g, axis=0)
        g, unscale = _gemm_operand(g, weight_ptr)
        h_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hn + k[None, :]
        tl.debug_barrier()  # the previous row block's stores are visible to every thread of the program
        for k0 in range(0, H, BLOCK_H):
            k_mask = (k0 + k)[None, :] < H
            h = tl.load(h_ptrs + k0, mask=row_mask[:, None] & k_mask, other=0.0)
            acc = tl.dot(tl.trans(g), h, input_precision="ieee") * unscale  # (BLOCK_V, BLOCK_H)
            acc += tl.load(out + k0, mask=col_mask[:, None] & k_mask & (n0 > 0), other=0.0)
            tl.store(out + k0, acc, mask=col_mask[:, None] & k_mask)
    tl.store(grad_bias_ptr + cols, grad_bias, mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and warps of one kernel: BLOCK_N rows x BLOCK_V vocabulary x BLOCK_H hidden."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int


KERNEL_KINDS = ("forward", "backward_fused", "backward_hidden", "backward_weight")


def block_config(dtype: torch.dtype, kind: str) -> Blocks:
    """Tiles of the ``kind`` kernel (one of KERNEL_KINDS) for hidden/weight of ``dtype``.

    bf16 / fp16 (tensor cores: HMMA on sm_80, wgmma on sm_90):
    - forward (BLOCK_N, BLOCK_V, BLOCK_H) = (64, 128, 64), 8 warps: the matmul tutorials' tile; one
      pipeline stage of operands is (64 + 128) x 64 x 2 B = 24 KB of shared memory. 8 warps rather
      than 4 keep the fp32 logits tile at 32 registers per thread (4 warps: 255 registers on sm_80;
      8 warps: 128-174 on sm_80, 128-142 on sm_90).
    - backward kernels: (64, 128, 32), 8 warps. Besides the logits tile they hold g in the input
      dtype as a GEMM operand and, per H slice, a second accumulator (64 x BLOCK_H for grad_h,
      128 x BLOCK_H for grad_W): BLOCK_H = 64 costs 215-255 registers on sm_80, 32 brings them to
      180-196 (113-186 on sm_90), with no spills either way.
    fp32 (input_precision="ieee": FMA, no tensor cores; operands are held in registers, so tiles are
    small): (32, 64, 16) with 4 warps for the forward, 8 for the fused and hidden backward kernels;
    (16, 64, 16) with 4 warps for the weight one. These sit near ptxas's register targets: with 4 warps
    the fused kernel spilled 4 B on sm_80 (Triton 3.9) and the hidden / weight ones 4 B on sm_80 and
    sm_90 (Triton 3.6); the weight kernel with 32 rows and 8 warps 4 B on sm_90 (Triton 3.9). 64-row
    tiles spill in every backward kernel. Figures from ``python -m grpo_fast.audit`` (Triton 3.9 and
    3.6, default 3 pipeline stages), which must report no spill under both.
    """
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kind must be one of {KERNEL_KINDS}, got {kind!r}")
    if dtype == torch.float32:
        if kind == "backward_weight":
            return Blocks(16, 64, 16, 4)
        return Blocks(32, 64, 16, 4 if kind == "forward" else 8)
    return Blocks(64, 128, 64 if kind == "forward" else 32, 8)


GROUP_N = 8  # row blocks sharing each W tile in the fused backward: 8 x 64 rows x H (0.9 MB bf16 at 896)


def vocab_splits(row_blocks: int, vocab: int, block_v: int) -> tuple[int, int]:
    """(S, vocabulary per split) of the forward: S splits so that row_blocks x S reaches ~512 programs,
    each split at least 4 vocabulary tiles long (its 4 partials per row are then small next to its
    GEMM work); the vocabulary per split is a multiple of block_v."""
    tiles = triton.cdiv(vocab, block_v)
    splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, row_blocks), tiles // _MIN_TILES_PER_SPLIT))
    per_split = triton.cdiv(tiles, splits) * block_v
    return triton.cdiv(vocab, per_split), per_split


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _check_matrix(name: str, x, dtypes) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name}.stride(1) must be 1 (hidden dimension contiguous), got strides {x.stride()}")


def _check_head(hidden, weight, bias) -> tuple[int, int, int]:
    """Validate (hidden, weight, bias); returns (N, H, V)."""
    _check_matrix("hidden", hidden, HIDDEN_DTYPES)
    _check_matrix("weight", weight, HIDDEN_DTYPES)
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h or v == 0 or h == 0:
        raise ValueError(f"weight must have shape (V >= 1, H = {h}) with H >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype} (tl.dot operands), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on hidden's device {hidden.device}, got {weight.device}")
    if n > _MAX_INDEX - 1024 or v > _MAX_INDEX - 1024:
        raise ValueError(f"hidden rows N and vocabulary V must be < 2**31 - 1024, got N = {n}, V = {v}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (v,):
            raise ValueError(f"bias must have shape ({v},) (V of weight), got {tuple(bias.shape)}")
        if bias.dtype not in HIDDEN_DTYPES:
            raise TypeError(f"bias must be float32, bfloat16 or float16, got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias must be on hidden's device {hidden.device}, got {bias.device}")
    return n, h, v


def _check_rows(name: str, x, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An (N,) tensor of one dtype on hidden's device, made contiguous (N elements: cheap)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},) (N rows of hidden), got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on hidden's device {device}, got {x.device}")
    return x.contiguous()


def _check_inv_tau(inv_tau) -> float:
    if isinstance(inv_tau, bool) or not isinstance(inv_tau, (int, float)):
        raise TypeError(f"inv_tau must be a float, got {type(inv_tau).__name__}")
    if not (math.isfinite(inv_tau) and 0 < inv_tau < 3.4e38):
        raise ValueError(f"inv_tau (1 / temperature) must be a finite fp32 > 0, got {inv_tau}")
    return float(inv_tau)


def _check_interpretable(kernel, dtype: torch.dtype) -> None:
    if isinstance(kernel, InterpretedFunction) and dtype == torch.bfloat16:
        raise TypeError(
            "hidden must not be bfloat16 under TRITON_INTERPRET=1: Triton 3.9's interpreter computes "
            "tl.dot on bf16 wrongly; use float16 / float32 there (bf16 is for GPUs)"
        )


def new_output(shape, device) -> torch.Tensor:
    """An fp32 output every element of which a kernel writes (tests poison it through this)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _active_order(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order (N,) int32: active rows first, each group in row order; count () int32), on the device.
    The flags are sorted as int8: CUDA sorts no bool tensor before torch 2.6."""
    order = torch.argsort(active.logical_not().to(torch.int8), stable=True).to(torch.int32)
    return order, active.sum(dtype=torch.int32)


def _bias_or_zeros(bias, weight) -> torch.Tensor:
    """The bias as fp32 (V,), zeros when there is none. The kernels always add one: V values cost
    nothing next to the V x H weight, and a single bias type halves the compiled variants."""
    if bias is None:
        return torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    return bias.to(torch.float32).contiguous()


def _forward_args(hidden, weight, bias, ids, order, count, parts, per_split: int, inv_tau: float) -> tuple:
    """The forward kernel's runtime arguments, in order (shared with kernel_configs)."""
    shapes = (*hidden.shape, weight.shape[0], per_split)  # N, H, V, vocabulary per split
    return (hidden, weight, bias, ids, order, count, parts, *shapes, hidden.stride(0), weight.stride(0), inv_tau)


def _merge_args(parts, ids, order, count, logp, entropy, lse, vocab: int, inv_tau: float) -> tuple:
    return (parts, ids, order, count, logp, entropy, lse, ids.shape[0], vocab, parts.shape[0], inv_tau)


def linear_stats_forward(hidden, weight, bias, ids, active, inv_tau: float, with_entropy: bool):
    """Per-token log-prob, entropy and log-sum-exp of softmax((hidden @ weight.T + bias) * inv_tau).

    Args:
        hidden: (N, H) float32 / bfloat16 / float16, stride(1) == 1.
        weight: (V, H) hidden's dtype, stride(1) == 1 (e.g. ``lm_head.weight``).
        bias: (V,) float32 / bfloat16 / float16 or None (read as fp32: a copy of V values).
        ids: (N,) int64 target ids in [0, V) where active (an id outside gives NaN and reads nothing).
        active: (N,) bool. Inactive rows do no GEMM work and get 0 in all three outputs.
        inv_tau: 1 / temperature, a finite float > 0 (an fp32 runtime scalar in the kernels).
        with_entropy: compute H; otherwise the entropy output is all zeros.
    Returns:
        (logp, entropy, lse), each (N,) float32.
    """
    n, h, v = _check_head(hidden, weight, bias)
    ids = _check_rows("ids", ids, n, torch.int64, hidden.device)
    active = _check_rows("active", active, n, torch.bool, hidden.device)
    inv_tau = _check_inv_tau(inv_tau)
    _check_interpretable(_fwd_kernel, hidden.dtype)
    logp, entropy, lse = (new_output((n,), hidden.device) for _ in range(3))
    if n == 0:
        return logp, entropy, lse
    order, count = _active_order(active)
    cfg = block_config(hidden.dtype, "forward")
    row_blocks = triton.cdiv(n, cfg.block_n)
    splits, per_split = vocab_splits(row_blocks, v, cfg.block_v)
    parts = new_output((splits, 4, n), hidden.device)  # (m, sum 2^x, sum 2^x x, target logit) per split
    args = _forward_args(hidden, weight, _bias_or_zeros(bias, weight), ids, order, count, parts, per_split, inv_tau)
    launch(
        _fwd_kernel,
        (row_blocks * splits,),
        hidden.device,
        *args,
        BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v,
        BLOCK_H=cfg.block_h,
        WITH_ENTROPY=bool(with_entropy),
        num_warps=cfg.num_warps,
    )
    merge = _merge_args(parts, ids, order, count, logp, entropy, lse, v, inv_tau)
    launch(
        _merge_kernel,
        (triton.cdiv(n, MERGE_BLOCK),),
        hidden.device,
        *merge,
        BLOCK_N=MERGE_BLOCK,
        WITH_ENTROPY=bool(with_entropy),
        num_warps=MERGE_BLOCK // 64,
    )
    return logp, entropy, lse


def _row_args(ids, order, count, lse, entropy, grad_logp, grad_entropy) -> tuple:
    """The per-row pointers of the backward kernels; without grad_entropy, grad_logp stands in for it
    (and entropy is not read either)."""
    return (ids, order, count, lse, entropy, grad_logp, grad_logp if grad_entropy is None else grad_entropy)


def _fused_args(hidden, weight, bias, rows: tuple, grad_h, grad_w, grad_b, inv_tau: float) -> tuple:
    n, h = hidden.shape
    strides = (hidden.stride(0), weight.stride(0), grad_h.stride(0), grad_w.stride(0))
    return (hidden, weight, bias, *rows, grad_h, grad_w, grad_b, n, h, weight.shape[0], *strides, inv_tau)


def _hidden_args(hidden, weight, bias, rows: tuple, grad_h, inv_tau: float) -> tuple:
    n, h = hidden.shape
    strides = (hidden.stride(0), weight.stride(0), grad_h.stride(0))
    return (hidden, weight, bias, *rows, grad_h, n, h, weight.shape[0], *strides, inv_tau)


def _weight_args(hidden, weight, bias, rows: tuple, grad_w, grad_b, inv_tau: float) -> tuple:
    n, h = hidden.shape
    strides = (hidden.stride(0), weight.stride(0), grad_w.stride(0))
    return (hidden, weight, bias, *rows, grad_w, grad_b, n, h, weight.shape[0], *strides, inv_tau)


def _check_backward_rows(n, device, lse, entropy, grad_logp, grad_entropy) -> tuple:
    lse = _check_rows("lse", lse, n, torch.float32, device)
    entropy = _check_rows("entropy", entropy, n, torch.float32, device)
    grad_logp = _check_rows("grad_logp", grad_logp, n, torch.float32, device)
    if grad_entropy is not None:
        grad_entropy = _check_rows("grad_entropy", grad_entropy, n, torch.float32, device)
    return lse, entropy, grad_logp, grad_entropy


def linear_stats_backward(
    hidden,
    weight,
    bias,
    ids,
    active,
    lse,
    entropy,
    grad_logp,
    grad_entropy,
    inv_tau: float,
    deterministic: bool = False,
):
    """Gradients of sum_n (grad_logp[n] logp[n] + grad_entropy[n] H[n]) w.r.t. hidden, weight and bias.

    Args:
        hidden, weight, bias, ids, active, inv_tau: as given to ``linear_stats_forward``.
        lse, entropy: (N,) float32 from ``linear_stats_forward`` (entropy read only with grad_entropy;
            it must then have been computed with with_entropy=True).
        grad_logp: (N,) float32. grad_entropy: (N,) float32, or None for 0.
        deterministic: False: one fused kernel with fp32 atomic adds (4 GEMMs with the forward; the
            summation order, hence the last bits, vary run to run). True: no atomics, one kernel over
            row blocks (grad_hidden) and one over vocabulary blocks (grad_weight, grad_bias), each
            recomputing its logits (5 GEMMs); bit-identical run to run.
    Returns:
        (grad_hidden (N, H), grad_weight (V, H), grad_bias (V,) or None when bias is None), float32.
        Inactive rows get zero grad_hidden and contribute nothing.
    """
    n, h, v = _check_head(hidden, weight, bias)
    device = hidden.device
    ids = _check_rows("ids", ids, n, torch.int64, device)
    active = _check_rows("active", active, n, torch.bool, device)
    lse, entropy, grad_logp, grad_entropy = _check_backward_rows(n, device, lse, entropy, grad_logp, grad_entropy)
    inv_tau = _check_inv_tau(inv_tau)
    _check_interpretable(_bwd_fused_kernel, hidden.dtype)
    if n == 0:
        grad_b = None if bias is None else torch.zeros(v, dtype=torch.float32, device=device)
        return new_output((0, h), device), torch.zeros((v, h), dtype=torch.float32, device=device), grad_b
    order, count = _active_order(active)
    rows = _row_args(ids, order, count, lse, entropy, grad_logp, grad_entropy)
    full_bias = _bias_or_zeros(bias, weight)
    flags = {"HAS_GRAD_ENTROPY": grad_entropy is not None}
    if deterministic:
        grad_h, grad_w, grad_b = new_output((n, h), device), new_output((v, h), device), new_output((v,), device)
        cfg = block_config(hidden.dtype, "backward_hidden")
        args = _hidden_args(hidden, weight, full_bias, rows, grad_h, inv_tau)
        launch(_bwd_hidden_kernel, (triton.cdiv(n, cfg.block_n),), device, *args, **_meta(cfg), **flags)
        cfg = block_config(hidden.dtype, "backward_weight")
        args = _weight_args(hidden, weight, full_bias, rows, grad_w, grad_b, inv_tau)
        launch(_bwd_weight_kernel, (triton.cdiv(v, cfg.block_v),), device, *args, **_meta(cfg), **flags)
    else:
        grad_h, grad_w, grad_b = (torch.zeros(s, dtype=torch.float32, device=device) for s in ((n, h), (v, h), (v,)))
        cfg = block_config(hidden.dtype, "backward_fused")
        grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(v, cfg.block_v),)
        if grid[0] > _MAX_INDEX:
            raise ValueError(f"N x V = {n} x {v} needs {grid[0]} programs (> 2**31 - 1); use deterministic=True")
        args = _fused_args(hidden, weight, full_bias, rows, grad_h, grad_w, grad_b, inv_tau)
        launch(_bwd_fused_kernel, grid, device, *args, **_meta(cfg), GROUP_N=GROUP_N, **flags)
    return grad_h, grad_w, None if bias is None else grad_b


def _meta(cfg: Blocks) -> dict:
    return {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_H": cfg.block_h, "num_warps": cfg.num_warps}


# ----------------------------------------------------------------------------------------------
# Every compiled variant, for the offline audit (grpo_fast.audit)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class KernelConfig:
    """One variant the launchers can launch, with the arguments of a representative launch.

    The same fields as kernels/token_stats.py's KernelConfig. ``args`` are meta tensors (no memory) and
    ints as the launchers pass them for N = 8192 rows of Qwen2.5-0.5B's head (H = 896, V = 151936), so
    Triton's own specialisation (dtypes, 16-divisibility of pointers and ints) is a real launch's.
    ``logits_dtype`` is the hidden/weight dtype; ``row_scalar_loads`` counts the per-row (or, for the
    weight kernel, per-row-block) scalar loads: ids, order, count, lse, H, gl, ge, bias.
    """

    name: str
    kernel: object
    args: tuple
    constexprs: dict
    num_warps: int
    logits_dtype: torch.dtype
    row_scalar_loads: int


_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_EXAMPLE = {"n": 8192, "h": 896, "v": 151936, "inv_tau": 1.0 / 0.7}


def kernel_configs() -> list[KernelConfig]:
    """Every (kernel, dtype, constexprs, num_warps) the two launchers can launch on a GPU."""
    configs = [_merge_config(flag) for flag in (False, True)]
    for dtype in HIDDEN_DTYPES:
        for flag in (False, True):
            configs += [_forward_config(dtype, flag)]
            configs += [_backward_config(dtype, kind, flag) for kind in KERNEL_KINDS[1:]]
    return configs


def _example(dtype: torch.dtype) -> dict:
    n, h, v = _EXAMPLE["n"], _EXAMPLE["h"], _EXAMPLE["v"]

    def meta(*shape, dt=torch.float32):
        return torch.empty(shape, dtype=dt, device="meta")

    return {
        "hidden": meta(n, h, dt=dtype),
        "weight": meta(v, h, dt=dtype),
        "bias": meta(v),
        "ids": meta(n, dt=torch.int64),
        "order": meta(n, dt=torch.int32),
        "count": meta(dt=torch.int32),
        "rowf": [meta(n) for _ in range(4)],  # lse, entropy, grad_logp, grad_entropy / logp, H, lse
    }


def _name(kind: str, dtype: torch.dtype, constexprs: dict, num_warps: int) -> str:
    flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items())
    return f"linear_{kind}[{_SHORT[dtype]},{flags},warps={num_warps}]"


def _forward_config(dtype: torch.dtype, with_entropy: bool) -> KernelConfig:
    x = _example(dtype)
    cfg = block_config(dtype, "forward")
    n, v = _EXAMPLE["n"], _EXAMPLE["v"]
    splits, per_split = vocab_splits(triton.cdiv(n, cfg.block_n), v, cfg.block_v)
    parts = torch.empty((splits, 4, n), dtype=torch.float32, device="meta")
    args = _forward_args(
        x["hidden"], x["weight"], x["bias"], x["ids"], x["order"], x["count"], parts, per_split, _EXAMPLE["inv_tau"]
    )
    constexprs = {**_meta(cfg), "WITH_ENTROPY": with_entropy}
    constexprs.pop("num_warps")
    name = _name("forward", dtype, constexprs, cfg.num_warps)
    return KernelConfig(name, _fwd_kernel, args, constexprs, cfg.num_warps, dtype, 4)


def _merge_config(with_entropy: bool) -> KernelConfig:
    x = _example(torch.float32)
    n = _EXAMPLE["n"]
    parts = torch.empty((2, 4, n), dtype=torch.float32, device="meta")
    args = _merge_args(parts, x["ids"], x["order"], x["count"], *x["rowf"][:3], _EXAMPLE["v"], _EXAMPLE["inv_tau"])
    constexprs = {"BLOCK_N": MERGE_BLOCK, "WITH_ENTROPY": with_entropy}
    num_warps = MERGE_BLOCK // 64
    name = _name("merge", torch.float32, constexprs, num_warps)
    return KernelConfig(name, _merge_kernel, args, constexprs, num_warps, torch.float32, 4)


def _backward_config(dtype: torch.dtype, kind: str, has_grad_entropy: bool) -> KernelConfig:
    x = _example(dtype)
    cfg = block_config(dtype, kind)
    n, h, v = _EXAMPLE["n"], _EXAMPLE["h"], _EXAMPLE["v"]
    lse, entropy, g_logp, g_ent = x["rowf"]
    rows = _row_args(x["ids"], x["order"], x["count"], lse, entropy, g_logp, g_ent if has_grad_entropy else None)
    grad_h = torch.empty((n, h), dtype=torch.float32, device="meta")
    grad_w = torch.empty((v, h), dtype=torch.float32, device="meta")
    grad_b = torch.empty((v,), dtype=torch.float32, device="meta")
    constexprs = {**_meta(cfg), "HAS_GRAD_ENTROPY": has_grad_entropy}
    constexprs.pop("num_warps")
    inv_tau = _EXAMPLE["inv_tau"]
    if kind == "backward_fused":
        kernel, args = (
            _bwd_fused_kernel,
            _fused_args(x["hidden"], x["weight"], x["bias"], rows, grad_h, grad_w, grad_b, inv_tau),
        )
        constexprs = {**constexprs, "GROUP_N": GROUP_N}
    elif kind == "backward_hidden":
        kernel, args = _bwd_hidden_kernel, _hidden_args(x["hidden"], x["weight"], x["bias"], rows, grad_h, inv_tau)
    else:
        kernel, args = (
            _bwd_weight_kernel,
            _weight_args(x["hidden"], x["weight"], x["bias"], rows, grad_w, grad_b, inv_tau),
        )
    scalars = 7 if has_grad_entropy else 5
    return KernelConfig(
        _name(kind, dtype, constexprs, cfg.num_warps), kernel, args, constexprs, cfg.num_warps, dtype, scalars
    )
