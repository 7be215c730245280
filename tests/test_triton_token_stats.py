"""Triton token-stats kernels (grpo_fast.kernels.token_stats), forward and backward, three-way.

The kernel on fp32/fp16/bf16 logits and plain torch on the same logits (the reference functions run in
the logits' precision) are both compared with the float64 spec (``reference.token_logprobs`` /
``token_entropy``; the gradient is autograd through them with upstream grad_logp / grad_entropy) on
the same rounded values. The kernel must be within tests/tolerances.py's table and no worse than plain
torch. Plus the inputs that catch indexing bugs: odd V below and above BLOCK_V, T = 1, inactive rows
and batches, strided views, temperature, extreme and -inf logits, in-place and poisoned outputs, the
int64 row offset. On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py).
Run: pytest tests/test_triton_token_stats.py
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from tolerances import assert_close, assert_no_worse, tolerance

from grpo_fast import reference as R
from grpo_fast.kernels import token_stats as ts

pytestmark = pytest.mark.triton
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)
# V below the smallest block (37, 300), inside one block (1000, 2053), over three blocks of 4096 (9001)
SHAPES = [(2, 3, 37), (1, 37, 300), (3, 5, 1000), (2, 4, 2053), (2, 3, 9001)]


def _inputs(b, t, v, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * scale).to(dtype)
    ids = torch.randint(0, v, (b, t), generator=g)
    active = torch.ones(b, t, dtype=torch.bool)
    if b * t > 1:
        active[0, t // 2 :] = False  # a partly inactive sequence
    if b > 2:
        active[-1] = False  # a fully inactive sequence
    grad_logp = torch.randn(b, t, generator=g)
    grad_entropy = torch.randn(b, t, generator=g)
    return logits, ids, active, grad_logp, grad_entropy


def _autograd(logits, ids, active, tau, grad_logp, grad_entropy):
    """(logp, entropy, lse, grad) of the spec run in ``logits``' precision (float64 -> the exact ones)."""
    x = logits.detach().clone().requires_grad_()
    keep = active.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    logp, entropy = R.token_logprobs(x, ids, tau) * keep, R.token_entropy(x, tau) * keep
    loss = (grad_logp.to(keep.dtype) * logp).sum()
    if grad_entropy is not None:
        loss = loss + (grad_entropy.to(keep.dtype) * entropy).sum()
    loss.backward()
    lse = torch.logsumexp(x.detach().to(keep.dtype) / tau, dim=-1) * keep
    return logp.detach(), entropy.detach(), lse, x.grad


def _kernel(logits, ids, active, tau, grad_logp, grad_entropy, out=None):
    logp, entropy, lse = ts.token_stats_forward(logits, ids, active, tau, with_entropy=True)
    out = torch.full_like(logits, float("nan")) if out is None else out  # poisoned: every entry must be written
    grad = ts.token_stats_backward(logits, ids, active, lse, entropy, grad_logp, grad_entropy, tau, out)
    return logp, entropy, lse, grad


def _check_three_way(logits, ids, active, tau, grad_logp, grad_entropy, out=None):
    """Kernel and plain torch vs the float64 spec; returns the kernel's outputs."""
    dtype = logits.dtype
    exact = _autograd(logits.double(), ids, active, tau, grad_logp, grad_entropy)
    plain = _autograd(logits, ids, active, tau, grad_logp, grad_entropy)
    fast = _kernel(logits, ids, active, tau, grad_logp, grad_entropy, out)
    for what, f, p, e in zip(("logprob", "entropy", "logprob: lse", "grad"), fast, plain, exact, strict=True):
        assert_close(f, e, dtype, what)
        assert_no_worse(f, p, e, dtype, what)
    return fast


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    logits, ids, active, gl, ge = _inputs(*shape, dtype)
    _check_three_way(logits, ids, active, 1.0, gl, ge)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_temperature(temperature, dtype):
    logits, ids, active, gl, ge = _inputs(2, 3, 1000, dtype, seed=1)
    _check_three_way(logits, ids, active, temperature, gl, ge)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_grad_entropy(dtype):
    logits, ids, active, gl, _ = _inputs(3, 4, 2053, dtype, seed=2)
    exact = _autograd(logits.double(), ids, active, 1.0, gl, None)
    plain = _autograd(logits, ids, active, 1.0, gl, None)
    grad = _kernel(logits, ids, active, 1.0, gl, None)[3]
    assert_close(grad, exact[3], dtype, "grad")
    assert_no_worse(grad, plain[3], exact[3], dtype, "grad")


def test_without_entropy_forward_gives_zeros():
    logits, ids, active, _, _ = _inputs(3, 4, 1000, F32, seed=3)
    logp, entropy, lse = ts.token_stats_forward(logits, ids, active, 1.0, with_entropy=False)
    ref_logp, ref_entropy, ref_lse, _ = _autograd(logits.double(), ids, active, 1.0, torch.zeros(3, 4), None)
    assert torch.equal(entropy, torch.zeros(3, 4))
    assert_close(logp, ref_logp, F32, "logprob")
    assert_close(lse, ref_lse, F32, "logprob: lse")


def test_single_token_and_single_sequence():
    logits, ids, active, gl, ge = _inputs(1, 1, 2053, BF16, seed=4)
    _check_three_way(logits, ids, active, 1.0, gl, ge)


def test_inactive_rows_read_nothing_and_write_zeros():
    logits, ids, active, gl, ge = _inputs(3, 5, 1000, F32, seed=5)
    poisoned = logits.clone()
    poisoned[~active] = float("nan")  # reading an inactive row would turn its outputs into NaN
    exact = _autograd(logits.double(), ids, active, 1.0, gl, ge)
    logp, entropy, lse, grad = _kernel(poisoned, ids, active, 1.0, gl, ge)
    for x in (logp, entropy, lse):
        assert torch.equal(x[~active], torch.zeros(int((~active).sum())))
    assert torch.equal(grad[~active], torch.zeros_like(grad[~active]))
    assert_close(grad, exact[3], F32, "grad")


def test_fully_inactive_batch():
    logits, ids, _, gl, ge = _inputs(2, 3, 1000, BF16, seed=6)
    active = torch.zeros(2, 3, dtype=torch.bool)
    logits[:] = float("nan")
    logp, entropy, lse, grad = _kernel(logits, ids, active, 1.0, gl, ge)
    for x in (logp, entropy, lse, grad):
        assert torch.equal(x, torch.zeros_like(x))


def test_id_outside_vocabulary_reads_nothing_and_gives_nan():
    """The public API rejects such ids (a host sync); the kernels only guarantee no out-of-bounds access."""
    logits, ids, active, gl, _ = _inputs(2, 3, 1000, F32, seed=14)
    ids[0, 0], ids[1, 2] = 1000, -1
    logp, entropy, lse, grad = _kernel(logits, ids, active, 1.0, gl, None)
    bad = torch.zeros(2, 3, dtype=torch.bool)
    bad[0, 0] = bad[1, 2] = True
    assert logp[bad & active].isnan().all() and not logp[~bad].isnan().any()
    p = torch.softmax(logits.double(), dim=-1)  # no target column: the gradient is -g_logp * p
    assert_close(grad[1, 2], -gl[1, 2].double() * p[1, 2], F32, "grad")


def test_empty_batch():
    logits = torch.randn(0, 5, 37)
    ids, active = torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 5, dtype=torch.bool)
    logp, entropy, lse = ts.token_stats_forward(logits, ids, active, 1.0, True)
    assert logp.shape == entropy.shape == lse.shape == (0, 5)
    out = ts.token_stats_backward(logits, ids, active, lse, entropy, lse, None, 1.0, torch.empty_like(logits))
    assert out.shape == (0, 5, 37)


# ----------------------------------------------------------------------------------------------
# Strides and in-place
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_shifted_view_is_read_in_place(dtype):
    """model_logits[:, :-1]: stride_b = (T + 1) * V, never copied; the in-place gradient stays inside it."""
    b, t, v = 2, 4, 1000
    big, ids, active, gl, ge = _inputs(b, t + 1, v, dtype, seed=7)
    ids, active, gl, ge = ids[:, :-1], active[:, :-1], gl[:, :-1], ge[:, :-1]
    view = big[:, :-1]  # (B, T, V), non-contiguous
    last = big[:, -1].clone()
    expected = _check_three_way(view.contiguous(), ids, active, 1.0, gl, ge)
    got = _kernel(view, ids, active, 1.0, gl, ge, out=view)  # in place, through the strided view
    for x, y in zip(got, expected, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(big[:, -1], last)  # the row outside the view is untouched


def test_transposed_batch_view():
    """A (T, B, V) tensor seen as (B, T, V): stride_b = V < stride_t = B * V, into a strided out."""
    logits, ids, active, gl, ge = _inputs(3, 4, 1000, F16, seed=8)
    view = logits.transpose(0, 1).contiguous().transpose(0, 1)
    out = torch.full_like(view, float("nan"))  # has the view's strides
    assert view.stride() == out.stride() == (1000, 3000, 1)
    got = _kernel(view, ids, active, 1.0, gl, ge, out=out)
    expected = _check_three_way(logits, ids, active, 1.0, gl, ge)
    for x, y in zip(got, expected, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_backward_equals_out_of_place(dtype):
    logits, ids, active, gl, ge = _inputs(3, 4, 2053, dtype, seed=9)
    expected = _kernel(logits, ids, active, 1.0, gl, ge)[3]
    in_place = logits.clone()
    got = _kernel(in_place, ids, active, 1.0, gl, ge, out=in_place)[3]
    assert got.data_ptr() == in_place.data_ptr()
    assert torch.equal(got, expected)


def test_int64_row_offsets(device):
    """Rows 2**32 + 16 elements apart from row 0, with strides that fit int32.

    An int32 offset would wrap to 16 and silently read row 0's neighbourhood. The storage is ~8.6 GB
    of virtual memory of which only the pages of the three active rows are ever touched; rows whose
    int32 offset would be negative are inactive (never read), so a broken kernel fails, not crashes.
    """
    v, stride = 64, 2**30 + 4
    try:
        storage = torch.empty(4 * stride + v, dtype=F16, device=device)  # made there: never copied
    except RuntimeError as err:  # an allocator that refuses 8.6 GB of address space
        pytest.skip(f"cannot reserve 8.6 GB of virtual memory: {err}")
    logits = storage.as_strided((5, 1, v), (stride, v, 1))  # (B, T, V); b * stride_b > 2**32 for b = 4
    small, ids, _, gl, ge = _inputs(5, 1, v, F16, seed=10)
    for b in (0, 1, 4):
        logits[b] = small[b]
    storage[v : 2 * v] = 100.0  # what a wrapped offset of row 4 would read
    active = torch.tensor([[True], [True], [False], [False], [True]])
    logp, entropy, lse = ts.token_stats_forward(logits, ids, active, 1.0, True)
    out = torch.full((5, 1, v), float("nan"), dtype=F16)
    ts.token_stats_backward(logits, ids, active, lse, entropy, gl, ge, 1.0, out)
    exact = _autograd(small.double(), ids, active, 1.0, gl, ge)
    for got, want, what in zip(
        (logp, entropy, lse, out), exact, ("logprob", "entropy", "logprob", "grad"), strict=True
    ):
        assert_close(got, want, F16, what)


# ----------------------------------------------------------------------------------------------
# Extreme values
# ----------------------------------------------------------------------------------------------


def _extreme_rows(v, dtype):
    g = torch.Generator().manual_seed(11)
    rows = torch.randn(4, v, generator=g)
    rows[0] = rows[0] * 3 + 1e4  # |z| ~ 1e4, spread 3: only z - max is small
    rows[1] = 1e4  # all equal: p = 1 / V
    rows[2, 5] = 1e4  # one dominant: p = 1 there, ~0 elsewhere
    rows[3] = rows[3] * 1e4  # spread 1e4
    return rows.reshape(2, 2, v).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(dtype):
    """|z| ~ 1e4. Forward: within the table. Gradient: the table plus the saved lse's rounding.

    p_v is rebuilt from the fp32 lse, so it carries |lse| * 2**-23 of relative error (one rounding of
    lse, one of z / tau where the interpreter does not fuse the multiply-add); a relative change d of
    p_v moves the gradient by d * p_v * (|g_logp| + |g_H| (|log p_v| + |H| + 1)) / tau. Plain torch
    has no such term (its autograd keeps the N x V log-probs), so it is not a fair bound here.
    """
    tau, logits = 0.7, _extreme_rows(1000, dtype)
    ids, active = torch.tensor([[3, 7], [5, 5]]), torch.ones(2, 2, dtype=torch.bool)
    gl, ge = torch.tensor([[1.0, -0.5], [2.0, 0.3]]), torch.tensor([[0.7, 0.2], [-1.0, 0.4]])
    logp, entropy, lse, grad = _kernel(logits, ids, active, tau, gl, ge)
    ref_logp, ref_entropy, ref_lse, ref_grad = _autograd(logits.double(), ids, active, tau, gl, ge)
    assert_close(logp, ref_logp, dtype, "logprob")
    assert_close(entropy, ref_entropy, dtype, "entropy", scale=1.0)  # H ~ 0 in the dominant rows
    assert_close(lse, ref_lse, dtype, "logprob: lse")
    log_p = torch.log_softmax(logits.double() / tau, dim=-1)  # (B, T, V)
    weight = gl.abs().unsqueeze(-1) + ge.abs().unsqueeze(-1) * (log_p.abs() + ref_entropy.abs().unsqueeze(-1) + 1)
    allowance = 2.0**-23 * ref_lse.abs().unsqueeze(-1) * log_p.exp() * weight / tau
    tol = tolerance(dtype, "grad")
    bound = tol.atol * ref_grad.abs().max() + tol.rtol * ref_grad.abs() + allowance
    excess = (grad.double() - ref_grad).abs() - bound
    assert bool((excess <= 0).all()), f"grad off by up to {excess.max():.3g} beyond the bound at {excess.argmax()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minus_inf_logits(dtype):
    """-inf (banned) entries: probability 0, an exact 0 gradient, no NaN from 0 * -inf, and no NaN
    from the running max while a whole 4096-wide block is -inf (first block of row (0, 0), last of
    row (1, 1))."""
    logits, ids, active, gl, ge = _inputs(2, 2, 9001, dtype, seed=12)
    active[:] = True
    banned = torch.zeros_like(logits, dtype=torch.bool)
    banned[..., ::7] = True
    banned[0, 0, :4096] = True
    banned[1, 1, 8192:] = True
    ids[0, 0], ids[1, 1] = 5000, 100
    banned.scatter_(-1, ids.unsqueeze(-1), False)  # never the target
    logits = logits.masked_fill(banned, float("-inf"))
    logp, entropy, lse, grad = _check_three_way(logits, ids, active, 1.0, gl, ge)
    assert not any(x.isnan().any() for x in (logp, entropy, lse, grad))
    assert torch.equal(grad[banned], torch.zeros_like(grad[banned]))


# ----------------------------------------------------------------------------------------------
# Rounding of the low-precision gradient
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_low_precision_gradient_is_the_rounded_fp32_gradient(dtype):
    """Same math in fp32 from the same (exactly upcast) values, then one round-to-nearest-even."""
    logits, ids, active, gl, ge = _inputs(3, 4, 2053, dtype, seed=13)
    low = _kernel(logits, ids, active, 0.7, gl, ge)[3]
    high = _kernel(logits.float(), ids, active, 0.7, gl, ge)[3]
    assert torch.equal(low, high.to(dtype))


@triton.jit
def _store_rounded_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    ts.store_rounded(y_ptr + offs, x, offs < n, True)


def test_soft_bf16_rounding_matches_torch():
    """The interpreter's bf16 route: bit-identical to torch's (round to nearest even) everywhere."""
    special = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.4e38, -3.4e38, 1e-40, -1e-45]
    ties = [1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8)]  # halfway: to even (down, up, down)
    x = torch.cat([torch.tensor(special + ties), torch.randn(4000) * 10.0 ** torch.randint(-30, 30, (4000,))])
    y = torch.empty(x.numel(), dtype=BF16)
    _store_rounded_kernel[(1,)](x, y, x.numel(), BLOCK=8192)
    want = x.to(BF16)
    same = (y.view(torch.int16) == want.view(torch.int16)) | (y.isnan() & want.isnan())
    assert bool(same.all()), f"differs at {x[~same][:5].tolist()}"


# ----------------------------------------------------------------------------------------------
# Launch configuration and argument checks
# ----------------------------------------------------------------------------------------------


def test_block_config_is_listed_in_kernel_configs():
    listed = {(c.name[:3], c.constexprs["BLOCK_V"], c.num_warps) for c in ts.kernel_configs()}
    for v in (1, 37, 1000, 1024, 1025, 2053, 4096, 32000, 151936, 262144):
        for direction, tag in (("forward", "fwd"), ("backward", "bwd")):
            block_v, num_warps = ts.block_config(v, direction)
            assert (tag, block_v, num_warps) in listed
            assert block_v >= min(triton.next_power_of_2(v), 4096) and block_v % (32 * num_warps) == 0


def test_kernel_configs_cover_every_switch_and_dtype():
    configs = ts.kernel_configs()
    assert len({c.name for c in configs}) == len(configs) == 3 * 3 * 2 * 2
    assert {c.logits_dtype for c in configs} == set(ts.LOGIT_DTYPES)
    assert all(not c.constexprs.get("SOFT_BF16", False) for c in configs)  # the GPU path


def _valid():
    logits, ids, active, gl, ge = _inputs(2, 3, 37, F32)
    logp, entropy, lse = ts.token_stats_forward(logits, ids, active, 1.0, True)
    return dict(logits=logits, ids=ids, active=active, lse=lse, entropy=entropy, grad_logp=gl, grad_entropy=ge)


@pytest.mark.parametrize(
    "change, error, name",
    [
        (lambda a: a.update(logits=a["logits"].double()), TypeError, "logits"),
        (lambda a: a.update(logits=a["logits"][0]), ValueError, "logits"),
        (lambda a: a.update(logits=a["logits"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "stride"),
        (lambda a: a.update(logits=a["logits"][..., :0]), ValueError, "V"),
        (lambda a: a.update(ids=a["ids"].int()), TypeError, "ids"),
        (lambda a: a.update(ids=a["ids"][:, :2]), ValueError, "ids"),
        (lambda a: a.update(active=a["active"].float()), TypeError, "active"),
        (lambda a: a.update(temperature=0.0), ValueError, "temperature"),
        (lambda a: a.update(temperature=float("nan")), ValueError, "temperature"),
        (lambda a: a.update(temperature=True), TypeError, "temperature"),
    ],
)
def test_forward_rejects(change, error, name):
    args = _valid()
    args["temperature"] = 1.0
    change(args)
    with pytest.raises(error, match=name):
        ts.token_stats_forward(args["logits"], args["ids"], args["active"], args["temperature"], True)


@pytest.mark.parametrize(
    "change, error, name",
    [
        (lambda a: a.update(out=a["out"].half()), ValueError, "out"),
        (lambda a: a.update(out=a["out"][:, :2]), ValueError, "out"),
        (lambda a: a.update(out=a["out"][:1].expand(2, 3, 37)), ValueError, "overlap"),
        (lambda a: a.update(lse=a["lse"].double()), TypeError, "lse"),
        (lambda a: a.update(grad_logp=a["grad_logp"][:1]), ValueError, "grad_logp"),
        (lambda a: a.update(grad_entropy=a["grad_entropy"].half()), TypeError, "grad_entropy"),
    ],
)
def test_backward_rejects(change, error, name):
    args = {**_valid(), "out": torch.empty(2, 3, 37)}
    change(args)
    with pytest.raises(error, match=name):
        ts.token_stats_backward(**args, temperature=1.0)


def test_backward_rejects_out_overlapping_logits():
    """out must be the logits themselves or elsewhere: a shifted view of the same storage would let one
    program overwrite logits another has yet to read."""
    base = torch.randn(2, 4, 37)
    args = _valid()
    args["logits"] = base[:, :-1]
    with pytest.raises(ValueError, match="storage"):
        ts.token_stats_backward(**args, temperature=1.0, out=base[:, 1:])
    ts.token_stats_backward(**args, temperature=1.0, out=base[:, :-1])  # in place: fine
