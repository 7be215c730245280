"""Per-token log-prob, entropy and log-sum-exp of softmax(logits / temperature), forward and backward.

Per row r = (b, t) of the N = B * T rows, with s = z / tau, lse = logsumexp_v s_v, p_v = exp(s_v - lse):
    logp = s[id] - lse,    H = lse - sum_v p_v s_v,
    d logits_v = (1 / tau) * (g_logp * (1[v == id] - p_v) - g_H * p_v * (log p_v + H)).

Grid: 1-D, one program per row (N programs; CUDA allows 2**31 - 1 on grid dim 0, while dims 1 and 2
stop at 65,535, so neither B nor T goes there). A row is a stream of V values (37 blocks of 4096 at
V = 151,936), which amortises the per-program start-up; inactive rows return at once.

Memory traffic (N*V elements of the logits' dtype):
    forward:  read N*V once (one streaming pass: online max, rescaled sums, the target logit as one
              scalar load), write 3 * N floats.
    backward: read N*V once, write N*V once (possibly in place over the logits).
    total:    2 reads + 1 write, the minimum for a loss on (logp, H) that keeps no N x V tensor
              between the passes. Plain autograd through log_softmax: ~3 reads + 2 writes plus an
              N x V fp32 intermediate saved for the backward.

Numerics: every load is upcast to fp32 at once (also the one route that is exact for bf16 under
TRITON_INTERPRET=1). The forward keeps the running max m of the raw logits and sums relative to it,
    x_v = (z_v - m) / tau,   d = sum exp(x_v),   e = sum exp(x_v) x_v,
    lse = m / tau + log d,   logp = (z[id] - m) / tau - log d,   H = log d - e / d,
so no result is a difference of two numbers of size |z| (z / tau alone rounds by |z| * 2**-24, 6e-4
at |z| = 1e4; lse - sum p s would cancel that much). The backward rebuilds p_v = exp(z_v / tau - lse)
from the saved fp32 lse, so each p_v carries lse's own rounding, |lse| * 2**-24 relative (6e-6 at
|lse| = 100, 6e-4 at 1e4): the price of saving N floats instead of the N x V log-probs torch's
autograd keeps. Entries with z = -inf contribute exactly 0 (never 0 * -inf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .launch import launch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_BLOCK_V = 1024
_MAX_BLOCK_V = 4096
_VALUES_PER_THREAD = {"forward": 32, "backward": 16}  # see block_config
_MAX_ROWS = 2**31 - 1  # CUDA's limit on grid dim 0
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
FLOAT32_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_offset(row, T, stride_b, stride_t):
    """Element offset of row (b, t), in int64: b * stride_b alone can pass 2**31 when N * V does."""
    b = row // T
    t = row - b * T
    return b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t


@triton.jit
def _row_stats(row_ptr, target, V, inv_tau, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """(logp, H, lse) of one row in one pass over its V logits.

    The running max m is taken over the raw logits z (1 / tau > 0 keeps the order) and every exponent
    is formed as (z - m) * scale: z - m is exact near the max even at |z| ~ 1e4, where z / tau alone
    would already round by |z| * 2**-24 ~ 6e-4. Base 2 (scale = log2(e) / tau) because exp2 is one
    MUFU.EX2 instruction where exp costs four (a multiply and a denormal fix-up).
    """
    cols = tl.arange(0, BLOCK_V)
    scale = inv_tau * LOG2E
    m = float("-inf")  # running max of z
    d = 0.0  # sum 2**x, x = (z - m) * scale = (s - max s) / ln 2
    e = 0.0  # sum 2**x * x
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # Reference point of the exponents: m_new, or 0 while every value so far is -inf
        # (-inf - -inf would be NaN); d = e = 0 until then, so any finite point is exact.
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        x = (z - ref) * scale  # (BLOCK_V,) <= 0; -inf for -inf logits and masked lanes
        p = tl.exp2(x)
        alpha = tl.exp2((m - ref) * scale)  # rescales the sums taken relative to m; 0 while m == -inf
        if WITH_ENTROPY:
            # old terms: sum p x' = alpha * (e + shift * d) with shift = (m - ref) * scale; x clamped to
            # the most negative float so that p * x is 0 * -3e38 = 0 where p == 0, not 0 * -inf = NaN
            shift = tl.where(m == float("-inf"), 0.0, (m - ref) * scale)
            e = alpha * (e + shift * d) + tl.sum(p * tl.maximum(x, -FLOAT32_MAX), axis=0)
        d = alpha * d + tl.sum(p, axis=0)
        m = m_new
    log_d = tl.log2(d) * LN2  # log sum_v exp(s_v - max s)
    # An id outside [0, V) reads nothing and gives NaN (the public API rejects such ids beforehand).
    valid = (target >= 0) & (target < V)
    z_target = tl.load(row_ptr + target, mask=valid, other=float("nan")).to(tl.float32)
    return (z_target - m) * inv_tau - log_d, log_d - e / d * LN2, m * inv_tau + log_d


@triton.jit
def _token_stats_fwd_kernel(
    # pointers
    logits_ptr,  # (B, T, V) fp32 / bf16 / fp16, unit stride over V
    ids_ptr,  # (N,) int64, rows in (b, t) row-major order, N = B * T
    active_ptr,  # (N,) bool
    logp_ptr,  # (N,) fp32, out
    entropy_ptr,  # (N,) fp32, out
    lse_ptr,  # (N,) fp32, out
    # shapes
    T,
    V,
    # strides of logits, in elements
    stride_b,
    stride_t,
    # scalars
    inv_tau,  # fp32 1 / temperature, a runtime value: no recompilation per temperature
    # meta-parameters
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0)
    if tl.load(active_ptr + row):
        row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t)
        target = tl.load(ids_ptr + row)
        logp, entropy, lse = _row_stats(row_ptr, target, V, inv_tau, BLOCK_V, WITH_ENTROPY)
        tl.store(logp_ptr + row, logp)
        tl.store(entropy_ptr + row, entropy if WITH_ENTROPY else 0.0)
        tl.store(lse_ptr + row, lse)
    else:
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16, round to nearest even, by integer arithmetic on the bits.

    The same bits as the hardware's cvt.rn.bf16.f32, for the interpreter only: TRITON_INTERPRET=1
    truncates fp32 -> bf16 (numpy has no bf16), 1 ulp off in half the entries. On a GPU the plain
    cast is used: this route costs ~6 instructions per element, +40% in the backward loop.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))  # carries into the exponent when rounding up
    bits = tl.where(x != x, 0x7FC00000, bits)  # NaN stays NaN (its payload could carry to the sign)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_rounded(ptrs, x, mask, SOFT_BF16: tl.constexpr):
    """Store fp32 x in the pointers' dtype, rounding to nearest even."""
    if SOFT_BF16 and ptrs.dtype.element_ty == tl.bfloat16:
        tl.store(ptrs, _round_to_bf16(x), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _row_grad(
    in_row,
    out_row,
    target,
    lse,
    entropy,
    g_logp,
    g_ent,
    V,
    inv_tau,
    BLOCK_V: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """d loss / d logits of one row: one read and one write of each element, the read first.

    log p_v = z_v / tau - lse is one fused multiply-add, rounded once at the size of log p_v (the
    saved fp32 lse carries |lse| * 2**-24 of its own, see the module docstring); p_v = 2**(log p_v *
    log2 e), one MUFU.EX2.
    """
    cols = tl.arange(0, BLOCK_V)
    # 1 / tau folded into the per-row scalars rather than multiplied into every element
    g_logp = g_logp * inv_tau
    g_ent = g_ent * inv_tau
    # int32 column of the target (-1 if outside [0, V)): a 32-bit compare per element, not 64-bit
    target = tl.where((target >= 0) & (target < V), target, -1).to(tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        log_p = tl.load(in_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_tau - lse
        p = tl.exp2(log_p * LOG2E)
        grad = tl.where(cols == target - start, g_logp, 0.0) - g_logp * p
        if HAS_G_ENT:
            # p (log p + H); -inf clamped to the most negative float so that p == 0 gives 0, not NaN
            grad -= g_ent * p * (tl.maximum(log_p, -FLOAT32_MAX) + entropy)
        store_rounded(out_row + offs, grad, mask, SOFT_BF16)


@triton.jit
def _zero_row(out_row, V, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        tl.store(out_row + offs, tl.zeros([BLOCK_V], out_row.dtype.element_ty), mask=offs < V)


@triton.jit
def _token_stats_bwd_kernel(
    # pointers
    logits_ptr,  # (B, T, V) fp32 / bf16 / fp16, unit stride over V
    ids_ptr,  # (N,) int64
    active_ptr,  # (N,) bool
    lse_ptr,  # (N,) fp32, from the forward
    entropy_ptr,  # (N,) fp32, from the forward (read only with HAS_GRAD_ENTROPY)
    grad_logp_ptr,  # (N,) fp32
    grad_entropy_ptr,  # (N,) fp32 (read only with HAS_GRAD_ENTROPY)
    out_ptr,  # (B, T, V) logits' dtype, unit stride over V; may be logits_ptr itself
    # shapes
    T,
    V,
    # strides, in elements
    stride_b,
    stride_t,
    stride_out_b,
    stride_out_t,
    # scalars
    inv_tau,  # fp32 1 / temperature, a runtime value: no recompilation per temperature
    # meta-parameters
    BLOCK_V: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    SOFT_BF16: tl.constexpr,  # exact bf16 rounding in integer ops: True only under TRITON_INTERPRET=1
):
    row = tl.program_id(0)
    out_row = out_ptr + _row_offset(row, T, stride_out_b, stride_out_t)
    if tl.load(active_ptr + row):
        in_row = logits_ptr + _row_offset(row, T, stride_b, stride_t)
        target = tl.load(ids_ptr + row)
        lse = tl.load(lse_ptr + row)
        g_logp = tl.load(grad_logp_ptr + row)
        entropy = 0.0
        g_ent = 0.0
        if HAS_GRAD_ENTROPY:
            entropy = tl.load(entropy_ptr + row)
            g_ent = tl.load(grad_entropy_ptr + row)
        _row_grad(
            in_row, out_row, target, lse, entropy, g_logp, g_ent, V, inv_tau, BLOCK_V, HAS_GRAD_ENTROPY, SOFT_BF16
        )
    else:
        _zero_row(out_row, V, BLOCK_V)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def block_config(vocab: int, direction: str) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the "forward" or "backward" kernel for rows of ``vocab`` logits.

    BLOCK_V = next_pow2(V) clamped to [1024, 4096]; num_warps gives each thread 32 values of a block
    in the forward, 16 in the backward. Why:
    - The budget is instructions as much as bytes: streaming bf16 logits at H100 bandwidth
      (3.35 TB/s / 2 B = 1.7e12 values/s) leaves ~17 instructions per value (132 SMs x 128 lanes x
      1.76 GHz), and the forward's three block reductions per block (max and two sums, ~100
      instructions per thread) are the largest overhead; 32 values per thread spread them thinner
      (12.0 instead of 14.5 instructions per value, bf16 with entropy on sm_90) at ~48-64 registers,
      which still fits 8+ programs of 4 warps per SM (`python -m grpo_fast.audit` prints these counts).
    - The backward has no reductions: 16 values per thread (two 128-bit bf16 loads in flight per
      iteration) keeps it at 32-48 registers; 32 would cost 56-72 for 3% fewer instructions.
    - The 4096 cap: a larger block adds registers, not bytes in flight per SM (more programs do that).
    - The 1024 floor: smaller blocks only help toy vocabularies (real ones are >= 32,000), masked
      lanes cost no memory traffic, and it keeps the compiled variants (and the audit) few.
    """
    block_v = min(max(triton.next_power_of_2(vocab), _MIN_BLOCK_V), _MAX_BLOCK_V)
    return block_v, block_v // (32 * _VALUES_PER_THREAD[direction])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _check_logits(name: str, x) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, T, V), got {tuple(x.shape)}")
    if x.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name}.stride(-1) must be 1 (vocabulary contiguous), got strides {x.stride()}")
    b, t, v = x.shape
    if v == 0 or v > 2**31 - 1 - _MAX_BLOCK_V:
        raise ValueError(f"{name} must have 1 <= V < 2**31 - {_MAX_BLOCK_V}, got V = {v}")
    if b * t > _MAX_ROWS:
        raise ValueError(f"{name} must have B * T <= {_MAX_ROWS} (one program per row), got {b * t}")
    return b, t, v


def _check_rows(name: str, x, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (B, T) tensor of one dtype on the logits' device, made contiguous (N elements: cheap)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (B, T of the logits), got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {x.device}")
    return x.contiguous()


def _inv_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    inv_tau = 1.0 / temperature if temperature > 0 else math.inf
    if not (math.isfinite(temperature) and inv_tau < 3.4e38):  # 1 / tau must be a finite fp32
        raise ValueError(f"temperature must be finite and > 0 (1 / temperature a finite fp32), got {temperature}")
    return inv_tau


def _rows_disjoint(x: torch.Tensor) -> bool:
    """True when no two (b, t) rows of a (B, T, V) tensor with unit stride over V share an element."""
    extent = x.shape[2]  # elements spanned by the dims seen so far, innermost first
    for stride, size in sorted((x.stride(i), x.shape[i]) for i in (0, 1) if x.shape[i] > 1):
        if stride < extent:
            return False
        extent = stride * (size - 1) + extent
    return True


def _check_out(out, logits: torch.Tensor) -> None:
    _check_logits("out", out)
    if out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device:
        raise ValueError(
            f"out must match logits in shape, dtype and device {tuple(logits.shape)}, {logits.dtype}, "
            f"{logits.device}; got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    if not _rows_disjoint(out):
        raise ValueError(f"out's rows overlap (strides {out.stride()}): programs would race on them")
    in_place = out.data_ptr() == logits.data_ptr() and out.stride() == logits.stride()
    shares = out.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    if shares and not in_place:
        raise ValueError("out must be logits itself (same view) or not share its storage")


def _forward_args(logits, ids, active, logp, entropy, lse, inv_tau: float) -> tuple:
    """The forward kernel's runtime arguments, in order (shared with kernel_configs)."""
    _, t, v = logits.shape
    return (logits, ids, active, logp, entropy, lse, t, v, logits.stride(0), logits.stride(1), inv_tau)


def _backward_args(logits, ids, active, lse, entropy, grad_logp, grad_entropy, out, inv_tau: float) -> tuple:
    """The backward kernel's runtime arguments, in order (shared with kernel_configs).

    Without grad_entropy, grad_logp stands in for its pointer: the kernel does not read it then.
    """
    _, t, v = logits.shape
    g_ent = grad_logp if grad_entropy is None else grad_entropy
    strides = (logits.stride(0), logits.stride(1), out.stride(0), out.stride(1))
    return (logits, ids, active, lse, entropy, grad_logp, g_ent, out, t, v, *strides, inv_tau)


def token_stats_forward(logits, ids, active, temperature: float, with_entropy: bool):
    """Per-token log-prob, entropy and log-sum-exp of softmax(logits / temperature).

    Args:
        logits: (B, T, V) float32 / bfloat16 / float16 with stride(-1) == 1; any strides over B and T
            (e.g. ``model_logits[:, :-1]``, never copied).
        ids: (B, T) int64 in [0, V) where active (an id outside gives NaN, reads nothing).
        active: (B, T) bool. Inactive rows read no logits and get 0 in all three outputs.
        temperature: > 0, applied in the kernel as the fp32 scalar 1 / temperature.
        with_entropy: compute H; otherwise the entropy output is all zeros.
    Returns:
        (logp, entropy, lse), each (B, T) float32.
    """
    b, t, v = _check_logits("logits", logits)
    ids = _check_rows("ids", ids, (b, t), torch.int64, logits.device)
    active = _check_rows("active", active, (b, t), torch.bool, logits.device)
    inv_tau = _inv_temperature(temperature)
    logp, entropy, lse = (torch.empty((b, t), dtype=torch.float32, device=logits.device) for _ in range(3))
    if b * t == 0:
        return logp, entropy, lse
    block_v, num_warps = block_config(v, "forward")
    args = _forward_args(logits, ids, active, logp, entropy, lse, inv_tau)
    launch(
        _token_stats_fwd_kernel,
        (b * t,),
        logits.device,
        *args,
        BLOCK_V=block_v,
        WITH_ENTROPY=bool(with_entropy),
        num_warps=num_warps,
    )
    return logp, entropy, lse


def token_stats_backward(
    logits, ids, active, lse, entropy, grad_logp, grad_entropy, temperature: float, out
) -> torch.Tensor:
    """d loss / d logits from the upstream gradients of (logp, entropy), written into ``out``.

        out[b, t, v] = (1 / tau) * (gl * (1[v == id] - p_v) - ge * p_v * (log p_v + H))

    Args:
        logits, ids, active, temperature: as given to ``token_stats_forward``.
        lse, entropy: (B, T) float32 from ``token_stats_forward`` (entropy read only with grad_entropy).
        grad_logp: (B, T) float32. grad_entropy: (B, T) float32, or None for 0.
        out: (B, T, V), logits' dtype, stride(-1) == 1, rows not overlapping; may be ``logits`` itself
            (in-place: every element is read before the same program overwrites it).
    Returns:
        out. Inactive rows are written with zeros and their logits are not read.
    """
    b, t, v = _check_logits("logits", logits)
    _check_out(out, logits)
    shape, device = (b, t), logits.device
    ids = _check_rows("ids", ids, shape, torch.int64, device)
    active = _check_rows("active", active, shape, torch.bool, device)
    lse = _check_rows("lse", lse, shape, torch.float32, device)
    entropy = _check_rows("entropy", entropy, shape, torch.float32, device)
    grad_logp = _check_rows("grad_logp", grad_logp, shape, torch.float32, device)
    if grad_entropy is not None:
        grad_entropy = _check_rows("grad_entropy", grad_entropy, shape, torch.float32, device)
    inv_tau = _inv_temperature(temperature)
    if b * t == 0:
        return out
    block_v, num_warps = block_config(v, "backward")
    args = _backward_args(logits, ids, active, lse, entropy, grad_logp, grad_entropy, out, inv_tau)
    launch(
        _token_stats_bwd_kernel,
        (b * t,),
        logits.device,
        *args,
        BLOCK_V=block_v,
        HAS_GRAD_ENTROPY=grad_entropy is not None,
        SOFT_BF16=isinstance(_token_stats_bwd_kernel, InterpretedFunction),
        num_warps=num_warps,
    )
    return out


# ----------------------------------------------------------------------------------------------
# Every compiled variant, for the offline audit (grpo_fast.audit)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class KernelConfig:
    """One variant the launchers can launch, with the arguments of a representative launch.

    ``args`` are meta tensors (no memory) and ints as the launcher passes them for (8, 1024, V)
    contiguous logits, so Triton's own specialisation of them (dtypes, 16-divisibility of pointers and
    ints) is the one a real launch gets when V is a multiple of 16. ``row_scalar_loads`` counts the
    per-row scalar loads (flag, id, saved stats, the target logit): every other load is of the row.
    """

    name: str
    kernel: object
    args: tuple
    constexprs: dict
    num_warps: int
    logits_dtype: torch.dtype
    row_scalar_loads: int


_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def kernel_configs() -> list[KernelConfig]:
    """Every (kernel, logits dtype, constexprs, num_warps) the two launchers can launch on a GPU."""
    configs = []
    block_v = _MIN_BLOCK_V
    while block_v <= _MAX_BLOCK_V:
        # the largest V a block serves; Qwen2.5's 151,936 for the largest block
        vocab = 151936 if block_v == _MAX_BLOCK_V else block_v
        for dtype in LOGIT_DTYPES:
            for flag in (False, True):
                configs += [_forward_config(vocab, dtype, flag), _backward_config(vocab, dtype, flag)]
        block_v *= 2
    return configs


def _example_rows(vocab: int, dtype: torch.dtype):
    logits = torch.empty((8, 1024, vocab), dtype=dtype, device="meta")  # (B, T, V), no memory
    ids = torch.empty((8, 1024), dtype=torch.int64, device="meta")
    active = torch.empty((8, 1024), dtype=torch.bool, device="meta")
    stats = [torch.empty((8, 1024), dtype=torch.float32, device="meta") for _ in range(4)]
    return logits, ids, active, stats


def _forward_config(vocab: int, dtype: torch.dtype, with_entropy: bool) -> KernelConfig:
    logits, ids, active, stats = _example_rows(vocab, dtype)
    block_v, num_warps = block_config(vocab, "forward")
    constexprs = {"BLOCK_V": block_v, "WITH_ENTROPY": with_entropy}
    name = f"fwd[{_SHORT[dtype]},BLOCK_V={block_v},WITH_ENTROPY={int(with_entropy)},warps={num_warps}]"
    args = _forward_args(logits, ids, active, *stats[:3], 1.0 / 0.7)
    return KernelConfig(name, _token_stats_fwd_kernel, args, constexprs, num_warps, dtype, 3)


def _backward_config(vocab: int, dtype: torch.dtype, has_grad_entropy: bool) -> KernelConfig:
    logits, ids, active, (lse, entropy, g_logp, g_ent) = _example_rows(vocab, dtype)
    block_v, num_warps = block_config(vocab, "backward")
    constexprs = {"BLOCK_V": block_v, "HAS_GRAD_ENTROPY": has_grad_entropy, "SOFT_BF16": False}
    name = f"bwd[{_SHORT[dtype]},BLOCK_V={block_v},HAS_GRAD_ENTROPY={int(has_grad_entropy)},warps={num_warps}]"
    g_ent = g_ent if has_grad_entropy else None
    args = _backward_args(logits, ids, active, lse, entropy, g_logp, g_ent, logits, 1.0 / 0.7)
    return KernelConfig(name, _token_stats_bwd_kernel, args, constexprs, num_warps, dtype, 6 if has_grad_entropy else 4)
