"""Triton linear token-stats kernels (grpo_fast.kernels.linear_token_stats), forward and backward, three-way.

The kernels on fp32 / fp16 hidden states and plain torch on the same values (the reference functions
on ``hidden @ weight.T + bias`` computed in the inputs' precision) are both compared with the float64
spec: ``reference.token_logprobs`` / ``token_entropy`` on ``hidden.double() @ weight.double().T + bias``,
gradients by autograd in float64 with upstream grad_logp / grad_entropy. The kernels must be within
TOLERANCES below and no worse than plain torch (tests/tolerances.py's NO_WORSE_FACTOR). Plus the inputs
that catch indexing bugs: N, H, V not multiples of the tiles (37 x 40 x 203), V below one tile, many
small tiles and vocabulary splits, inactive rows (poisoned with NaN: never read), empty and fully
inactive batches, -inf logits, ids outside the vocabulary, both backward modes (the deterministic one
bit-identical run to run), temperature 0.7, and every output the kernels must write poisoned with NaN.

bfloat16 is not tested on CPU: Triton 3.9's interpreter computes tl.dot on bf16 operands wrongly
(garbage), so the launchers refuse bf16 under TRITON_INTERPRET=1. The bf16
variants are covered by the offline compile audit (python -m grpo_fast.audit) and by the gpu-marked
test at the end, which runs only where CUDA is present.
Run: pytest tests/test_triton_linear.py   (CPU, TRITON_INTERPRET=1 set by tests/conftest.py)
"""

from __future__ import annotations

import pytest
import torch
from tolerances import NO_WORSE_FACTOR, NO_WORSE_SLACK, Tol, max_error

import grpo_fast as gf
from grpo_fast import reference as R
from grpo_fast.kernels import linear_token_stats as lts
from grpo_fast.ops import linear_loss, linear_triton

pytestmark = pytest.mark.triton
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (N, H, V): odd everything (37 x 40 x 203), several row / H / vocabulary tiles, V below one tile
SHAPES = [(37, 40, 203), (150, 100, 300), (5, 24, 50)]

_STATS = "fp32 GEMM over H <= 128 terms (~1e-7 relative) then log-softmax over V <= 512: ~1e-6 absolute."
_F32_GRAD = "fp32 logits gradient, then fp32 GEMMs over V or N <= 512 terms: ~1e-6 of the largest element."
_LOW_STATS = "fp16/bf16 products are exact in fp32 and the kernels accumulate in fp32: fp32 error, 5x margin."
_LOW_GRAD = (
    "g is rounded to the input dtype (2^-11 fp16, 2^-8 bf16) before the two gradient GEMMs, as torch's "
    "autograd does; an output is a sum over V (or N) such terms of both signs, so near-zero outputs see an "
    "absolute error ~u sqrt(K) |g w|: measured <= 2.1e-4 of the largest element in fp16 here (K <= 512)."
)
# |actual - expected| <= atol * max|expected| + rtol * |expected|, elementwise (as tests/tolerances.py)
TOLERANCES: dict[tuple[torch.dtype, str], Tol] = {
    (F32, "stats"): Tol(1e-5, 1e-6, _STATS),
    (F32, "grad"): Tol(2e-4, 2e-5, _F32_GRAD),
    (F16, "stats"): Tol(5e-5, 5e-6, _LOW_STATS),
    (F16, "grad"): Tol(2.0**-10, 2.0**-9, _LOW_GRAD),
    (BF16, "stats"): Tol(5e-5, 5e-6, _LOW_STATS),
    (BF16, "grad"): Tol(2.0**-7, 2.0**-6, _LOW_GRAD + " bf16: 8x fp16's bound (gpu only, never run on CPU)."),
}
STATS = ("logp", "entropy", "lse")
GRADS = ("grad_hidden", "grad_weight", "grad_bias")


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch, one_thread):
    """Every output a kernel must write in full starts as NaN (atomic accumulators are zeroed on purpose)."""
    monkeypatch.setattr(lts, "new_output", lambda shape, device: torch.full(shape, float("nan"), device=device))


def _inputs(n, h, v, dtype, seed=0, bias=True, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (scale / h**0.5)  # logits of spread ~scale
    b = torch.randn(v, generator=g) if bias else None
    ids = torch.randint(0, v, (n,), generator=g)
    active = torch.rand(n, generator=g) > 0.25
    active[n // 3 : n // 3 + n // 5] = False  # a run of padding, as after a finished sequence
    grad_logp, grad_entropy = torch.randn(n, generator=g), torch.randn(n, generator=g)
    cast = [x.to(DEVICE, dtype) if x is not None else None for x in (hidden, weight, b)]
    rows = [x.to(DEVICE) for x in (ids, active, grad_logp, grad_entropy)]
    return (*cast, *rows)


def _spec(hidden, weight, bias, ids, active, tau, grad_logp, grad_entropy):
    """(logp, entropy, lse, grad_hidden, grad_weight, grad_bias) by autograd through the reference, in
    the inputs' precision (float64 inputs -> the exact values)."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    z = leaves[0] @ leaves[1].T + (0 if bias is None else leaves[2])  # (N, V)
    keep = active.to(torch.float64 if z.dtype == torch.float64 else torch.float32)
    logp, entropy = R.token_logprobs(z, ids, tau) * keep, R.token_entropy(z, tau) * keep
    lse = torch.logsumexp(z.to(keep.dtype) / tau, dim=-1) * keep
    loss = (grad_logp.to(keep.dtype) * logp).sum()
    if grad_entropy is not None:
        loss = loss + (grad_entropy.to(keep.dtype) * entropy).sum()
    loss.backward()
    grads = [x.grad if x is not None else None for x in leaves]
    return (logp.detach(), entropy.detach(), lse.detach(), *grads)


def _kernels(hidden, weight, bias, ids, active, tau, grad_logp, grad_entropy, deterministic):
    logp, entropy, lse = lts.linear_stats_forward(hidden, weight, bias, ids, active, 1.0 / tau, True)
    grads = lts.linear_stats_backward(
        hidden, weight, bias, ids, active, lse, entropy, grad_logp, grad_entropy, 1.0 / tau, deterministic
    )
    return (logp, entropy, lse, *grads)


def _assert_close(actual, expected, tol: Tol, what: str) -> None:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    bound = tol.atol * e.abs().max() + tol.rtol * e.abs()
    bad = ~((a - e).abs() <= bound)  # NaN counts as bad
    if bool(bad.any()):
        idx = bad.nonzero()[:5].tolist()
        worst = "; ".join(f"{tuple(i)}: {a[tuple(i)].item():.8g} vs {e[tuple(i)].item():.8g}" for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} outside ({tol.why}) e.g. {worst}")


def _assert_no_worse(fast, plain, exact, tol: Tol, what: str) -> None:
    scale = float(exact.abs().max()) if exact.numel() else 0.0
    err_fast, err_plain = max_error(fast, exact), max_error(plain, exact)
    slack = NO_WORSE_SLACK * (tol.atol + tol.rtol) * scale
    assert err_fast <= NO_WORSE_FACTOR * err_plain + slack, f"{what}: {err_fast:.3g} vs plain torch {err_plain:.3g}"


def _check_three_way(hidden, weight, bias, ids, active, tau, gl, ge, deterministic):
    """Kernels and plain torch vs the float64 spec; returns the kernels' six outputs."""
    dtype = hidden.dtype
    f64 = [x.double() if x is not None else None for x in (hidden, weight, bias)]
    exact = _spec(*f64, ids, active, tau, gl, ge)
    plain = _spec(hidden, weight, bias, ids, active, tau, gl, ge)
    fast = _kernels(hidden, weight, bias, ids, active, tau, gl, ge, deterministic)
    for what, f, p, e in zip(STATS + GRADS, fast, plain, exact, strict=True):
        if e is None:
            assert f is None, what
            continue
        tol = TOLERANCES[(dtype, "grad" if what.startswith("grad") else "stats")]
        assert f.dtype == torch.float32, what
        _assert_close(f, e, tol, what)
        _assert_no_worse(f, p, e, tol, what)
    return fast


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, bias):
    hidden, weight, b, ids, active, gl, ge = _inputs(*shape, dtype, seed=shape[0], bias=bias)
    _check_three_way(hidden, weight, b, ids, active, 1.0, gl, ge, deterministic=False)


@pytest.mark.parametrize("with_grad_entropy", [True, False], ids=["grad_entropy", "no_grad_entropy"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_backward_modes_with_temperature(dtype, deterministic, with_grad_entropy):
    hidden, weight, b, ids, active, gl, ge = _inputs(37, 40, 203, dtype, seed=1)
    _check_three_way(hidden, weight, b, ids, active, 0.7, gl, ge if with_grad_entropy else None, deterministic)


@pytest.mark.slow  # ~5 s: 16 x 16 tiles mean many interpreted programs
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_many_small_tiles_and_vocabulary_splits(monkeypatch, deterministic):
    """16 x 16 x 16 tiles: 10 row blocks (two groups of the fused kernel's swizzle), 2 H slices (the
    second ragged), 16 vocabulary tiles (the last ragged) in 4 forward splits merged by the merge kernel."""
    monkeypatch.setattr(lts, "block_config", lambda dtype, kind: lts.Blocks(16, 16, 16, 1))
    assert lts.vocab_splits(10, 250, 16) == (4, 64)
    hidden, weight, b, ids, active, gl, ge = _inputs(150, 20, 250, F32, seed=2)
    _check_three_way(hidden, weight, b, ids, active, 0.7, gl, ge, deterministic)


def test_without_entropy_forward_gives_zeros():
    hidden, weight, b, ids, active, _, _ = _inputs(37, 40, 203, F32, seed=3)
    logp, entropy, lse = lts.linear_stats_forward(hidden, weight, b, ids, active, 1.0, with_entropy=False)
    exact = _spec(hidden.double(), weight.double(), b.double(), ids, active, 1.0, torch.zeros(37), None)
    assert torch.equal(entropy, torch.zeros_like(entropy))
    _assert_close(logp, exact[0], TOLERANCES[(F32, "stats")], "logp")
    _assert_close(lse, exact[2], TOLERANCES[(F32, "stats")], "lse")


def test_minus_inf_logits_contribute_nothing():
    """A vocabulary entry banned by a -inf bias: p = 0 there, no NaN, zero gradient into its row of W."""
    hidden, weight, b, ids, active, gl, ge = _inputs(37, 40, 203, F32, seed=4)
    b[::7] = float("-inf")
    ids = torch.where(ids % 7 == 0, ids + 1, ids)  # targets are allowed tokens
    fast = _kernels(hidden, weight, b, ids, active, 0.7, gl, ge, deterministic=True)
    exact = _spec(hidden.double(), weight.double(), b.double(), ids, active, 0.7, gl, ge)
    for what, f, e in zip(STATS + GRADS, fast, exact, strict=True):
        tol = TOLERANCES[(F32, "grad" if what.startswith("grad") else "stats")]
        _assert_close(f, torch.nan_to_num(e, nan=0.0), tol, what)  # autograd's d/db at -inf is NaN; ours 0
    assert torch.equal(fast[4][::7], torch.zeros_like(fast[4][::7]))


# ----------------------------------------------------------------------------------------------
# Inactive rows, empty batches, out-of-range ids
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_inactive_rows_are_never_read(deterministic):
    hidden, weight, b, ids, active, gl, ge = _inputs(37, 40, 203, F32, seed=5)
    exact = _spec(hidden.double(), weight.double(), b.double(), ids, active, 1.0, gl, ge)
    poisoned = hidden.clone()
    poisoned[~active] = float("nan")  # reading an inactive row would spread NaN into grad_weight
    fast = _kernels(poisoned, weight, b, ids, active, 1.0, gl.clone(), ge.clone(), deterministic)
    inactive = int((~active).sum())
    for x in fast[:3]:
        assert torch.equal(x[~active], torch.zeros(inactive))
    assert torch.equal(fast[3][~active], torch.zeros(inactive, 40))
    for what, f, e in zip(GRADS, fast[3:], exact[3:], strict=True):
        _assert_close(f, e, TOLERANCES[(F32, "grad")], what)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_fully_inactive_batch_gives_zeros(deterministic):
    hidden, weight, b, ids, _, gl, ge = _inputs(37, 40, 203, F32, seed=6)
    active = torch.zeros(37, dtype=torch.bool)
    for x in _kernels(hidden.fill_(float("nan")), weight, b, ids, active, 1.0, gl, ge, deterministic):
        assert torch.equal(x, torch.zeros_like(x))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_empty_batch(deterministic):
    hidden, weight, b, ids, active, gl, ge = _inputs(0, 40, 203, F32)
    logp, entropy, lse, gh, gw, gb = _kernels(hidden, weight, b, ids, active, 1.0, gl, ge, deterministic)
    assert logp.shape == entropy.shape == lse.shape == (0,) and gh.shape == (0, 40)
    assert torch.equal(gw, torch.zeros(203, 40)) and torch.equal(gb, torch.zeros(203))


def test_id_outside_vocabulary_reads_nothing_and_gives_nan():
    """The public API rejects such ids (a host sync); the kernels only compare ids with columns."""
    hidden, weight, b, ids, active, gl, _ = _inputs(37, 40, 203, F32, seed=7)
    active[:] = True
    ids[3], ids[20] = 203, -1
    logp, entropy, lse, gh, gw, gb = _kernels(hidden, weight, b, ids, active, 1.0, gl, None, deterministic=True)
    bad = torch.zeros(37, dtype=torch.bool)
    bad[[3, 20]] = True
    assert logp[bad].isnan().all() and not logp[~bad].isnan().any()
    assert not any(x.isnan().any() for x in (entropy, lse, gh, gw, gb))
    p = torch.softmax(hidden.double() @ weight.double().T + b.double(), dim=-1)  # (N, V)
    expected = -gl[3].double() * p[3] @ weight.double()  # no target column: the gradient is -g_logp p W
    _assert_close(gh[3], expected, TOLERANCES[(F32, "grad")], "grad_hidden[3]")


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_deterministic_mode_is_bit_identical_and_agrees_with_atomic(dtype):
    hidden, weight, b, ids, active, gl, ge = _inputs(150, 100, 300, dtype, seed=8)
    first = _kernels(hidden, weight, b, ids, active, 0.7, gl, ge, deterministic=True)
    second = _kernels(hidden, weight, b, ids, active, 0.7, gl, ge, deterministic=True)
    atomic = _kernels(hidden, weight, b, ids, active, 0.7, gl, ge, deterministic=False)
    for what, x, y, z in zip(STATS + GRADS, first, second, atomic, strict=True):
        assert torch.equal(x, y), f"{what} differs between two deterministic runs"
        _assert_close(z, x, TOLERANCES[(dtype, "grad" if what.startswith("grad") else "stats")], what)


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


BAD_ARGUMENTS = [  # (argument, how it is broken, error, message)
    ("hidden", lambda x: x.T, ValueError, r"hidden.stride\(1\) must be 1"),
    ("hidden", lambda x: x.double(), TypeError, "hidden must be float32"),
    ("hidden", lambda x: x[0], ValueError, "hidden must be 2-D"),
    ("weight", lambda x: x[:, :8], ValueError, "weight must have shape"),
    ("weight", lambda x: x.half(), TypeError, "weight must have hidden's dtype"),
    ("bias", lambda x: x[:5], ValueError, r"bias must have shape \(20,\)"),
    ("ids", lambda x: x.int(), TypeError, "ids must have dtype torch.int64"),
    ("ids", lambda x: x[:3], ValueError, r"ids must have shape \(4,\)"),
    ("active", lambda x: x.float(), TypeError, "active must have dtype torch.bool"),
    ("inv_tau", lambda x: 0.0, ValueError, "inv_tau"),
    ("inv_tau", lambda x: float("inf"), ValueError, "inv_tau"),
    ("inv_tau", lambda x: True, TypeError, "inv_tau must be a float"),
    ("lse", lambda x: x[:3], ValueError, r"lse must have shape \(4,\)"),
    ("grad_logp", lambda x: x.double(), TypeError, "grad_logp must have dtype torch.float32"),
    ("grad_entropy", lambda x: x.half(), TypeError, "grad_entropy must have dtype torch.float32"),
]


@pytest.mark.parametrize("name,broken,error,match", BAD_ARGUMENTS, ids=[f"{a[0]}-{a[3]}" for a in BAD_ARGUMENTS])
def test_bad_arguments_are_rejected(name, broken, error, match):
    h, w, b, ids, act, gl, ge = _inputs(4, 16, 20, F32)
    args = {"hidden": h, "weight": w, "bias": b, "ids": ids, "active": act, "inv_tau": 1.0}
    rows = {"lse": gl, "entropy": gl, "grad_logp": gl, "grad_entropy": ge}
    if name in args:
        with pytest.raises(error, match=match):
            lts.linear_stats_forward(**{**args, name: broken(args[name])}, with_entropy=True)
    args.update(rows)
    with pytest.raises(error, match=match):
        lts.linear_stats_backward(**{**args, name: broken(args[name])})


@pytest.mark.skipif(CUDA, reason="the interpreter's bf16 limitation only")
def test_bf16_is_refused_under_the_interpreter():
    h, w, b, ids, act, _, _ = _inputs(4, 16, 20, BF16)
    with pytest.raises(TypeError, match="bfloat16 under TRITON_INTERPRET=1"):
        lts.linear_stats_forward(h, w, b, ids, act, 1.0, True)


# ----------------------------------------------------------------------------------------------
# Launch configurations (the audit compiles kernel_configs(); the launchers must use no other)
# ----------------------------------------------------------------------------------------------


def test_kernel_configs_cover_every_launch():
    configs = lts.kernel_configs()
    assert len({c.name for c in configs}) == len(configs) == 26
    launched = {
        (c.kernel, c.logits_dtype, c.constexprs["BLOCK_N"], c.constexprs.get("BLOCK_H"), c.num_warps) for c in configs
    }
    kernels = {
        "forward": lts._fwd_kernel,
        "backward_fused": lts._bwd_fused_kernel,
        "backward_hidden": lts._bwd_hidden_kernel,
        "backward_weight": lts._bwd_weight_kernel,
    }
    for dtype in lts.HIDDEN_DTYPES:
        for kind, kernel in kernels.items():
            cfg = lts.block_config(dtype, kind)
            assert (kernel, dtype, cfg.block_n, cfg.block_h, cfg.num_warps) in launched, (kind, dtype)
    for c in configs:
        assert c.args[0].device.type == "meta"  # no memory behind the example launch
        assert not any(isinstance(v, float) for v in c.constexprs.values())  # 1 / tau stays a runtime scalar


# ----------------------------------------------------------------------------------------------
# The autograd glue (grpo_fast/ops/linear_triton.py) against the torch backend
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_glue_matches_torch_backend(deterministic):
    """LinearGRPOTritonFunction as linear.py would call it: same loss, metrics and gradients as the
    torch backend (GSPO with old log-probs, a KL term and an entropy bonus)."""
    b_, t_, h_, v_ = 3, 7, 40, 203
    hidden, weight, bias, ids, active, _, _ = _inputs(b_ * t_, h_, v_, F32, seed=9)
    ids, active = ids.view(b_, t_), active.view(b_, t_)
    g = torch.Generator().manual_seed(10)
    adv, old = torch.randn(b_, generator=g), -3.0 + 0.3 * torch.randn(b_, t_, generator=g)
    ref = old + 0.2 * torch.randn(b_, t_, generator=g)
    cfg = gf.LossConfig(
        loss_type="grpo", importance_sampling_level="sequence", entropy_coef=0.05, temperature=0.7, beta=0.04
    )
    mask = active.float()

    def objective(logp, entropy):
        return R.grpo_objective(logp, entropy, adv, mask, old, ref, cfg)

    results = []
    for use_triton in (False, True):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        metrics = {}
        if use_triton:
            args = (*leaves, ids.reshape(-1), active, old.clone(), objective, 1 / 0.7, deterministic, metrics)
            loss, logp = linear_triton.LinearGRPOTritonFunction.apply(*args)
        else:
            rows = active.reshape(-1).nonzero().squeeze(1)
            standin = _true_logp(hidden, weight, bias, ids, rows, mask)
            args = (*leaves, ids.reshape(-1), rows, standin, objective, 1 / 0.7, 8, metrics)
            loss, logp = linear_loss.LinearGRPOFunction.apply(*args)
        loss.backward()
        results.append((loss, logp * mask, metrics, [x.grad for x in leaves]))
    (loss_t, logp_t, met_t, grads_t), (loss_k, logp_k, met_k, grads_k) = results
    torch.testing.assert_close(loss_k, loss_t, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(logp_k, logp_t, rtol=1e-5, atol=1e-6)
    assert met_k.keys() == met_t.keys()
    for k in met_t:
        torch.testing.assert_close(met_k[k], met_t[k], rtol=2e-5, atol=1e-6)
    for what, x, y in zip(GRADS, grads_k, grads_t, strict=True):
        _assert_close(x, y, TOLERANCES[(F32, "grad")], what)


def test_glue_computes_mixed_precision_in_fp32():
    """An fp16 hidden state with an fp32 head is computed in fp32, as the torch backend does."""
    hidden, weight, b, ids, active, _, _ = _inputs(37, 40, 203, F32, seed=12)
    logp, entropy = linear_triton.forward_stats(hidden.half(), weight, b, ids, active, 1 / 0.7, True)
    exact = _spec(hidden.half().double(), weight.double(), b.double(), ids, active, 0.7, torch.zeros(37), None)
    _assert_close(logp, exact[0], TOLERANCES[(F32, "stats")], "logp")
    _assert_close(entropy, exact[1], TOLERANCES[(F32, "stats")], "entropy")


def _true_logp(hidden, weight, bias, ids, rows, mask):
    """The torch backend's stand-in for off-policy GSPO: the true log-probs first (linear.py's _standin)."""
    lp, _ = linear_loss.forward_stats(hidden, weight, bias, ids.reshape(-1), rows, 1 / 0.7, 8, False)
    return torch.zeros_like(mask).view(-1).index_put_((rows,), lp).view_as(mask)


# ----------------------------------------------------------------------------------------------
# GPU only: bf16 (never run on the CPU-only machines)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: bf16 tl.dot is wrong under the interpreter")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_bf16_on_gpu(deterministic):
    hidden, weight, b, ids, active, gl, ge = _inputs(150, 100, 300, BF16, seed=11)
    _check_three_way(hidden, weight, b, ids, active, 0.7, gl, ge, deterministic)
