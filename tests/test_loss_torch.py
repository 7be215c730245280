"""The chunked torch backend (grpo_fast/ops/token_stats.py) three-way against the float64 spec.

For fp32 and bf16 logits: backend="torch" and plain torch in the same precision (the reference
functions run on the low-precision logits) are both compared with ``reference.grpo_loss`` in float64
on the same (rounded) values. The torch backend must be within the tolerance table and no worse than
plain torch (tests/tolerances.py: factor 2 plus a small slack). Loss, logits gradient, metrics,
log-probs. Plus the shapes and values that catch indexing bugs (odd V, T=1, B=1, masked rows, empty
batches, extreme and -inf logits, temperature, non-contiguous logits, in-place backward, chunking).
Run: pytest tests/test_loss_torch.py
"""

from __future__ import annotations

import os

import pytest
import torch
from tolerances import assert_close, assert_no_worse

import grpo_fast
from grpo_fast import LossConfig
from grpo_fast import reference as R
from grpo_fast.ops import token_stats as ts_mod

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")


pytestmark = pytest.mark.usefixtures("one_thread")


def _make(seed, b, t, v, dtype, scale=2.0, temperature=1.0, masked=True, logits=None, ids=None):
    """Inputs with fp32 side tensors; logits rounded to ``dtype``; old/ref near the true log-probs."""
    g = torch.Generator().manual_seed(seed)
    if logits is None:
        logits = torch.randn(b, t, v, generator=g) * scale
    logits = logits.to(dtype)
    ids = torch.randint(0, v, (b, t), generator=g) if ids is None else ids
    adv = torch.randn(b, generator=g)
    mask = torch.ones(b, t)
    if masked and b * t > 1:
        mask[0, t // 2 + 1 :] = 0  # a partially masked row (no-op when T is 1)
        if b > 2:
            mask[-1] = 0  # a fully masked row
    logp = R.token_logprobs(logits.double(), ids, temperature).float()
    old = logp + 0.3 * torch.randn(b, t, generator=g)
    ref = logp + 0.2 * torch.randn(b, t, generator=g)
    return logits, ids, adv, mask, old, ref


def _exact(cfg, logits, ids, adv, mask, old, ref, **kw):
    """The spec in float64 on the same (already rounded) logits: (loss, grad, metrics, logprobs)."""
    x = logits.double().requires_grad_()
    d = lambda y: None if y is None else y.double()  # noqa: E731
    loss, metrics, logp = R.grpo_loss(x, ids, d(adv), d(mask), d(old), d(ref), cfg, **kw)
    loss.backward()
    return loss.detach(), x.grad, metrics, logp.detach()


def _plain(cfg, logits, ids, adv, mask, old, ref, **kw):
    """Plain torch in the logits' precision: the reference functions run on the low-precision tensor."""
    x = logits.clone().requires_grad_()
    loss, metrics, logp = R.grpo_loss(x, ids, adv, mask, old, ref, cfg, **kw)
    loss.backward()
    return loss.detach(), x.grad, metrics, logp.detach()


def _fast(cfg, logits, ids, adv, mask, old, ref, backend="torch", **kw):
    x = logits.clone().requires_grad_()
    out = grpo_fast.grpo_loss(x, ids, adv, mask, old, ref, config=cfg, backend=backend, **kw)
    out.loss.backward()
    assert out.loss.dtype == F32 and out.logprobs.dtype == F32
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    return out.loss.detach(), x.grad, out.metrics, out.logprobs.detach()


def _three_way(cfg, inputs, label, **kw):
    dtype = inputs[0].dtype
    exact, fast, plain = _exact(cfg, *inputs, **kw), _fast(cfg, *inputs, **kw), _plain(cfg, *inputs, **kw)
    for i, kind in ((0, "loss"), (1, "grad"), (3, "logprob")):
        assert_close(fast[i], exact[i], dtype, f"{kind}: {label}")
        assert_no_worse(fast[i], plain[i], exact[i], dtype, f"{kind}: {label}")
    assert sorted(fast[2]) == sorted(exact[2])
    for key in exact[2]:
        assert_close(fast[2][key], exact[2][key], dtype, f"metric: {key} {label}")
        assert_no_worse(fast[2][key], plain[2][key], exact[2][key], dtype, f"metric: {key} {label}")
    return exact, fast


SHAPES = [(2, 5, 37), (3, 4, 1001), (3, 1, 37), (1, 7, 37), (4, 37, 53)]


@pytest.mark.parametrize("dtype", (F32, BF16), ids=str)
@pytest.mark.parametrize("temperature", (1.0, 0.7, 1.5))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_three_way_shapes(shape, temperature, dtype):
    cfg = LossConfig(loss_type="grpo", beta=0.04, temperature=temperature, entropy_coef=0.05)
    inputs = _make(sum(shape), *shape, dtype, temperature=temperature)
    _three_way(cfg, inputs, f"{shape} tau={temperature}")


@pytest.mark.parametrize("dtype", (F32, BF16), ids=str)
@pytest.mark.parametrize("level", ("token", "sequence"))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_three_way_loss_types(loss_type, level, dtype):
    cfg = LossConfig(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=0.04,
        kl_estimator="k3",
        use_bias_correction_kl=level == "sequence",
        delta=1.4 if loss_type in ("grpo", "dapo") else None,
        epsilon_high=5.0 if loss_type == "cispo" else 0.28,
        entropy_coef=0.02,
        temperature=0.7,
        max_completion_length=9,
        gradient_accumulation_steps=2,
    )
    inputs = _make(len(loss_type), 3, 6, 101, dtype, temperature=0.7)
    g = torch.Generator().manual_seed(1)
    ratio = 0.5 + torch.rand(3, 6 if level == "token" else 1, generator=g)
    _three_way(cfg, inputs, f"{loss_type} {level}", importance_ratio=ratio, num_items_in_batch=25)


# Extreme logits. Where the log-probs stay of order log V (equal rows, a dominant target, realistic
# logits on a large offset) the result is representable in fp32 and, at temperature 1, must meet the
# table against float64. Where the target's log-prob is itself ~ -1e4 (random 1e4-scale logits, a
# dominant non-target token), or at temperature != 1 (x / tau of |x| ~ 1e3..1e4 is already rounded by
# 3e-5..5e-4 in fp32), no fp32 path can meet an absolute tolerance: only the three-way "no worse than
# plain torch" rule applies.
EXTREME = {
    "equal_rows_1e4": True,
    "dominant_target": True,
    "offset_1e3": True,
    "random_1e4": False,
    "dominant_other": False,
}


def _extreme_inputs(kind, dtype, tau, b=2, t=3, v=37):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, v, (b, t), generator=g)
    if kind == "random_1e4":
        logits = torch.randn(b, t, v, generator=g) * 1e4
    elif kind == "equal_rows_1e4":
        logits = torch.full((b, t, v), 1e4)
        logits[1] = -1e4
    elif kind.startswith("dominant"):
        logits = torch.randn(b, t, v, generator=g)
        logits[..., 3] = 1e4  # one token has all the mass
        ids = ids.masked_fill(ids == 3, 4) if kind == "dominant_other" else torch.full_like(ids, 3)
    else:  # LLM-like logits on a large common offset (logits are not centred in practice)
        logits = torch.randn(b, t, v, generator=g) * 3 + 1e3
    return _make(7, b, t, v, dtype, temperature=tau, logits=logits, ids=ids)


@pytest.mark.parametrize("dtype", (F32, BF16), ids=str)
@pytest.mark.parametrize("tau", (1.0, 0.7))
@pytest.mark.parametrize("coef", (0.0, 0.1))
@pytest.mark.parametrize("kind", list(EXTREME))
def test_extreme_logits(kind, coef, tau, dtype):
    inputs = _extreme_inputs(kind, dtype, tau)
    cfg = LossConfig(loss_type="grpo", beta=0.04, entropy_coef=coef, temperature=tau)
    label = f"{kind} entropy_coef={coef} tau={tau}"
    representable = EXTREME[kind] and tau == 1.0
    exact, fast, plain = _exact(cfg, *inputs), _fast(cfg, *inputs), _plain(cfg, *inputs)
    assert bool(torch.isfinite(fast[1]).all()) and bool(torch.isfinite(fast[0]))
    if kind == "random_1e4" and tau != 1.0 and dtype == F32:
        # Log-probs reach -5e4 here, where one fp32 ulp is 0.004: both paths are within a few ulps of
        # the float64 value and which lands closer on six tokens is chance, so compare in ulps instead.
        ulp = torch.finfo(F32).eps * exact[3].abs().max()
        assert float((fast[3].double() - exact[3]).abs().max()) <= 2 * ulp
        return
    for i, kind_ in ((0, "loss"), (1, "grad"), (3, "logprob")):
        assert_no_worse(fast[i], plain[i], exact[i], dtype, f"{kind_}: {label}")
        if representable:
            assert_close(fast[i], exact[i], dtype, f"{kind_}: {label}")
    for key in exact[2]:
        assert_no_worse(fast[2][key], plain[2][key], exact[2][key], dtype, f"metric: {key} {label}")
        if representable:
            assert_close(fast[2][key], exact[2][key], dtype, f"metric: {key} {label}")


@pytest.mark.parametrize("backend", ("torch", "reference"))
def test_extreme_logits_entropy_metric(backend):
    # The entropy metric for rows of equal logits at 1e4 is log V exactly; both backends read the same
    # fp32 logits, so each should report log V to fp32 accuracy.
    logits = torch.full((1, 2, 37), 1e4)
    out = grpo_fast.token_logprobs(logits, torch.zeros(1, 2, dtype=torch.long), return_entropy=True, backend=backend)
    expected = torch.full((1, 2), float(torch.log(torch.tensor(37.0, dtype=F64))), dtype=F64)
    assert_close(out.entropy, expected, F32, f"entropy: equal logits 1e4, {backend}")
    assert_close(out.logprobs, -expected, F32, f"logprob: equal logits 1e4, {backend}")


@pytest.mark.parametrize("coef", (0.0, 0.1))
def test_neg_inf_logits_off_target(coef):
    b, t, v = 3, 4, 37
    inputs = list(_make(3, b, t, v, F32, temperature=0.7))
    logits, ids = inputs[0], inputs[1]
    banned = torch.zeros(v, dtype=torch.bool)
    banned[[0, 5, 36]] = True
    ids[ids.unsqueeze(-1).eq(torch.nonzero(banned).squeeze(1)).any(-1)] = 1
    logits[..., banned] = float("-inf")
    cfg = LossConfig(loss_type="grpo", beta=0.04, entropy_coef=coef, temperature=0.7)
    fast = _fast(cfg, *inputs)
    # Exact: -inf replaced by -1e4, whose probability is exactly 0 in float64 as well.
    finite = [logits.masked_fill(logits.isneginf(), -1e4)] + inputs[1:]
    exact = _exact(cfg, *finite)
    assert_close(fast[0], exact[0], F32, "loss: -inf logits")
    assert_close(fast[1], exact[1], F32, "grad: -inf logits")
    assert_close(fast[3], exact[3], F32, "logprob: -inf logits")
    assert_close(fast[2]["entropy"], exact[2]["entropy"], F32, "metric: entropy with -inf logits")
    assert bool((fast[1][..., banned] == 0).all())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("backend", ("torch", "reference"))
def test_all_tokens_masked(loss_type, backend):
    inputs = list(_make(5, 3, 4, 37, F32))
    inputs[3] = torch.zeros(3, 4)
    cfg = LossConfig(loss_type=loss_type, beta=0.04, entropy_coef=0.1, max_completion_length=4)
    loss, grad, metrics, logp = _fast(cfg, *inputs, backend=backend)
    assert float(loss) == 0.0
    assert bool((grad == 0).all()) and bool((logp == 0).all())
    assert all(bool(torch.isfinite(m)) for m in metrics.values())


@pytest.mark.parametrize("backend", ("torch", "reference"))
@pytest.mark.parametrize("b,t", ((0, 5), (3, 0), (0, 0)))
def test_empty_batch(backend, b, t):
    logits = torch.randn(b, t, 37, requires_grad=True)
    ids = torch.zeros(b, t, dtype=torch.long)
    cfg = LossConfig(loss_type="grpo", beta=0.04, entropy_coef=0.1)
    out = grpo_fast.grpo_loss(logits, ids, torch.zeros(b), None, None, torch.zeros(b, t), config=cfg, backend=backend)
    assert float(out.loss.detach()) == 0.0 and out.logprobs.shape == (b, t)
    out.loss.backward()
    assert logits.grad.shape == logits.shape and bool((logits.grad == 0).all())
    assert all(bool(torch.isfinite(m)) for m in out.metrics.values())
    tl = grpo_fast.token_logprobs(logits.detach(), ids, return_entropy=True, backend=backend)
    assert tl.logprobs.shape == (b, t) and tl.entropy.shape == (b, t)


def test_non_contiguous_logits():
    b, t, v = 3, 5, 37
    g = torch.Generator().manual_seed(9)
    big = torch.randn(b, t + 1, v, generator=g)
    _, ids, adv, mask, old, ref = _make(9, b, t, v, F32)
    cfg = LossConfig(loss_type="grpo", beta=0.04, entropy_coef=0.05, temperature=0.7)
    contiguous = _fast(cfg, big[:, :-1].contiguous(), ids, adv, mask, old, ref)
    # A (B, T, V) view with a row stride of (T + 1) * V: the usual logits[:, :-1] of a causal LM.
    leaf = big.clone().requires_grad_()
    out = grpo_fast.grpo_loss(leaf[:, :-1], ids, adv, mask, old, ref, config=cfg, backend="torch")
    out.loss.backward()
    assert_close(out.loss, contiguous[0], F32, "loss: view")
    assert_close(leaf.grad[:, :-1], contiguous[1], F32, "grad: view")
    assert bool((leaf.grad[:, -1] == 0).all())
    # A non-unit vocabulary stride (vocab-major storage).
    vmajor = big[:, :-1].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert vmajor.stride(-1) != 1
    strided = _fast(cfg, vmajor, ids, adv, mask, old, ref)
    for i, kind in ((0, "loss"), (1, "grad"), (3, "logprob")):
        assert_close(strided[i], contiguous[i], F32, f"{kind}: vocab-strided")
    exact = _exact(cfg, big[:, :-1], ids, adv, mask, old, ref)
    assert_close(contiguous[1], exact[1], F32, "grad: view vs exact")


@pytest.mark.parametrize("dtype", (F32, BF16), ids=str)
def test_inplace_backward(dtype):
    cfg = LossConfig(loss_type="grpo", beta=0.04, entropy_coef=0.05, temperature=0.7)
    inputs = _make(11, 3, 5, 37, dtype, temperature=0.7)
    expected = _fast(cfg, *inputs)
    x = inputs[0].clone()
    x[inputs[3] == 0] = float("nan")  # poison: masked rows must be overwritten with 0, never read
    x.requires_grad_()
    out = grpo_fast.grpo_loss(x, *inputs[1:], config=cfg, backend="torch", inplace_backward=True)
    ptr = x.data_ptr()
    out.loss.backward()
    assert x.grad.data_ptr() == ptr  # the gradient lives in the logits' storage
    assert torch.equal(x.grad, expected[1])
    assert_close(out.loss, expected[0], dtype, "loss: inplace")
    # Through a producer: the gradient reaching lm_head's weight is the same.
    g = torch.Generator().manual_seed(12)
    h, w = torch.randn(3, 5, 8, generator=g), torch.randn(37, 8, generator=g)
    grads = []
    for inplace in (False, True):
        wi = w.clone().requires_grad_()
        logits = (h @ wi.T).to(dtype)  # (B, T, V)
        grpo_fast.grpo_loss(logits, *inputs[1:], config=cfg, backend="torch", inplace_backward=inplace).loss.backward()
        grads.append(wi.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("chunk_rows", (1, 3, 7))
def test_chunk_boundaries(monkeypatch, chunk_rows):
    monkeypatch.setenv("GRPO_FAST_EAGER", "1")  # the row-chunked eager forward (CPU's default is compiled)
    v = 37
    cfg = LossConfig(loss_type="grpo", beta=0.04, entropy_coef=0.05, temperature=0.7)
    inputs = _make(13, 4, 6, v, F32, temperature=0.7)
    exact = _exact(cfg, *inputs)
    whole = _fast(cfg, *inputs)
    monkeypatch.setattr(ts_mod, "BLOCK_ELEMENTS", chunk_rows * v + v // 2)
    assert ts_mod.block_rows(v) == chunk_rows
    chunked = _fast(cfg, *inputs)
    for i, kind in ((0, "loss"), (1, "grad"), (3, "logprob")):
        assert_close(chunked[i], whole[i], F32, f"{kind}: {chunk_rows}-row chunks vs one chunk")
        assert_close(chunked[i], exact[i], F32, f"{kind}: {chunk_rows}-row chunks vs exact")
    tl = grpo_fast.token_logprobs(inputs[0], inputs[1], 0.7, True, "torch", inputs[3])
    assert_close(tl.logprobs, exact[3], F32, "logprob: token_logprobs chunked")


@pytest.mark.parametrize("dtype", (F32, BF16), ids=str)
@pytest.mark.parametrize("with_mask", (False, True))
@pytest.mark.parametrize("return_entropy", (False, True))
def test_token_logprobs(return_entropy, with_mask, dtype):
    b, t, v = 3, 5, 101
    logits, ids, _, mask, _, _ = _make(17, b, t, v, dtype)
    m = mask if with_mask else None
    active = mask if with_mask else torch.ones(b, t)
    g = torch.Generator().manual_seed(18)
    w_lp, w_h = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    for tau in (1.0, 0.7):
        x64 = logits.double().requires_grad_()
        lp64 = R.token_logprobs(x64, ids, tau) * active
        h64 = R.token_entropy(x64, tau) * active
        ((lp64 * w_lp).sum() + (h64 * w_h).sum() * return_entropy).backward()
        results = {}
        for backend in ("torch", "reference"):
            x = logits.clone().requires_grad_()
            out = grpo_fast.token_logprobs(x, ids, tau, return_entropy, backend, m)
            assert out.logprobs.dtype == F32
            assert (out.entropy is None) == (not return_entropy)
            obj = (out.logprobs * w_lp).sum() + ((out.entropy * w_h).sum() if return_entropy else 0)
            obj.backward()
            results[backend] = (out, x.grad)
            assert bool((out.logprobs[active == 0] == 0).all())
            assert_close(out.logprobs, lp64, dtype, f"logprob: {backend} tau={tau}")
            if backend == "torch" or dtype == F32:
                # Plain autograd in bf16 rounds the log-prob and entropy gradients separately and then
                # adds them in bf16, where they can cancel: its error is not bounded by the table.
                assert_close(x.grad, x64.grad, dtype, f"grad: token_logprobs {backend} tau={tau}")
            if return_entropy:
                assert bool((out.entropy[active == 0] == 0).all())
                assert_close(out.entropy, h64, dtype, f"entropy: {backend} tau={tau}")
        ids_before = ids.clone()
        with torch.no_grad():  # the no-gradient path (no norm kept, ids not copied when there is no mask)
            quiet = grpo_fast.token_logprobs(logits, ids, tau, return_entropy, "torch", m)
        assert torch.equal(ids, ids_before)
        torch.testing.assert_close(quiet.logprobs, results["torch"][0].logprobs, rtol=1e-6, atol=1e-6)
        if return_entropy:
            torch.testing.assert_close(quiet.entropy, results["torch"][0].entropy, rtol=1e-6, atol=1e-6)
        (fast, fast_grad), (plain, plain_grad) = results["torch"], results["reference"]
        assert_no_worse(fast.logprobs, plain.logprobs, lp64, dtype, "logprob")
        assert_no_worse(fast_grad, plain_grad, x64.grad, dtype, "grad")
        if return_entropy:
            assert_no_worse(fast.entropy, plain.entropy, h64, dtype, "entropy")


def test_poisoned_masked_rows_give_exact_zeros():
    # NaN in the logits of masked rows: the torch backend never reads them (no vocabulary pass), so
    # log-probs, entropies and gradients there are exactly 0 and nothing else is contaminated.
    cfg = LossConfig(loss_type="grpo", beta=0.04, entropy_coef=0.1, temperature=0.7)
    inputs = list(_make(19, 4, 5, 37, F32, temperature=0.7))
    clean = _fast(cfg, *inputs)
    inputs[0] = inputs[0].clone()
    inputs[0][inputs[3] == 0] = float("nan")
    loss, grad, metrics, logp = _fast(cfg, *inputs)
    assert torch.equal(loss, clean[0]) and torch.equal(grad, clean[1])
    assert bool((grad[inputs[3] == 0] == 0).all()) and bool((logp[inputs[3] == 0] == 0).all())
    tl = grpo_fast.token_logprobs(inputs[0], inputs[1], 0.7, True, "torch", inputs[3])
    assert bool((tl.logprobs[inputs[3] == 0] == 0).all()) and bool((tl.entropy[inputs[3] == 0] == 0).all())
    assert bool(torch.isfinite(tl.logprobs).all()) and bool(torch.isfinite(tl.entropy).all())


@pytest.mark.parametrize("backend", ("torch", "reference"))
def test_padding_ids_at_masked_positions(backend):
    # Ids are validated only where the mask is 1 (validation.check_ids), so padding ids such as -100
    # (the HF ignore index) at masked positions are accepted and must be ignored by every backend.
    cfg = LossConfig(loss_type="grpo", beta=0.04)
    inputs = list(_make(21, 3, 5, 37, F32))
    padded = inputs[1].masked_fill(inputs[3] == 0, -100)
    ok = inputs[1].masked_fill(inputs[3] == 0, 0)
    expected = _fast(cfg, inputs[0], ok, *inputs[2:], backend=backend)
    got = _fast(cfg, inputs[0], padded, *inputs[2:], backend=backend)
    for i in (0, 1, 3):
        assert torch.equal(got[i], expected[i])
    tl = grpo_fast.token_logprobs(inputs[0], padded, mask=inputs[3], backend=backend)
    assert torch.equal(tl.logprobs, expected[3])


def test_confident_token_entropy():
    # Found by hypothesis: a confident token at ordinary logit sizes, H = 2.48e-6 nats. Plain fp32 torch
    # (-sum p log p) is 1.2% off here (log p of p = 1 - 1.6e-7 is at fp32's limit), so only the
    # three-way rule applies: computing H as lse - E[z] cancels two numbers of size |z| ~ 13 and must
    # still be no worse than plain torch.
    logits = torch.tensor([[[9.2460, -1.7606]]])
    h64 = R.token_entropy(logits.double(), 0.7)
    plain = R.token_entropy(logits, 0.7)
    out = grpo_fast.token_logprobs(logits, torch.tensor([[0]]), 0.7, return_entropy=True, backend="torch")
    assert_no_worse(out.entropy, plain, h64, F32, "entropy: confident token")


def _hard_logits(kind: str, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(2, 5, V) logits, ids and active rows that stress the row statistics."""
    g = torch.Generator().manual_seed(hash(kind) % 1000)
    v = 151 if kind != "wide" else 4099
    z = torch.randn(2, 6, v, generator=g) * 3
    ids = torch.randint(0, v, (2, 6), generator=g)
    active = torch.ones(2, 6, dtype=torch.bool)
    if kind == "huge":
        z = z * 3e3
    elif kind == "neg_inf":
        z[0, 1, ::2] = float("-inf")  # off-target -inf entries
        ids[0, 1] = 1
        z[1, 2] = float("-inf")  # an inactive all -inf row with an out-of-range id
        z[1, 2, 3] = 0.0
        active[1, 2], ids[1, 2] = False, -100
    elif kind == "masked":
        active[0, 3:], active[1] = False, False
        ids[1] = 10**6  # never read
    return z[:, :5].to(dtype), ids[:, :5], active[:, :5]  # a non-contiguous slice, as logits[:, :-1]


@pytest.mark.parametrize("tau", (1.0, 0.7))
@pytest.mark.parametrize("dtype", (F32, BF16, torch.float16), ids=str)
@pytest.mark.parametrize("kind", ("random", "huge", "neg_inf", "masked", "wide"))
def test_compiled_cpu_forward_equals_eager(kind, dtype, tau):
    """The CPU forward is the compiled ``_row_stats``; it computes what the eager chunked path computes."""
    z, ids, active = _hard_logits(kind, dtype)
    compiled = ts_mod.forward_cpu(z, ids, active, 1.0 / tau, True)
    assert ts_mod.ROW_STATS.ran and not ts_mod.ROW_STATS.failed
    eager = ts_mod.forward_eager(z, ids, active, 1.0 / tau, True)
    for got, want, name in zip(compiled, eager, ("logp", "entropy", "norm")):
        assert bool(torch.isfinite(got).all()), name
        assert bool((got[~active] == 0).all()), f"{name}: inactive rows must be exactly 0"
        scale = 3e3 if kind == "huge" else 1.0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5 * scale, msg=name)
    no_norm = ts_mod.forward_cpu(z, ids, active, 1.0 / tau, True, with_norm=False)  # the no-gradient variant
    assert no_norm[2] is None
    for got, want, name in zip(no_norm[:2], compiled[:2], ("logp", "entropy")):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"{name} without the norm")


@pytest.mark.parametrize("inplace", (False, True))
@pytest.mark.parametrize("with_entropy_grad", (False, True))
@pytest.mark.parametrize("tau", (1.0, 0.7))
@pytest.mark.parametrize("dtype", (F32, BF16), ids=str)
@pytest.mark.parametrize("kind", ("random", "huge", "neg_inf", "masked", "wide"))
def test_compiled_cpu_gradient_equals_eager(kind, dtype, tau, with_entropy_grad, inplace):
    """The CPU backward (``grad_cpu``: the op's backward and the fused linear loss's per-chunk gradient)
    is the compiled ``_row_grads``; it writes what the eager backward writes, 0 on inactive rows, into a
    new tensor or over the logits."""
    z, ids, active = _hard_logits(kind, dtype)
    _, entropy, norm = ts_mod.forward_eager(z, ids, active, 1.0 / tau, True)
    g = torch.Generator().manual_seed(3)
    gl = torch.randn(ids.shape, generator=g)
    ge = torch.randn(ids.shape, generator=g) if with_entropy_grad else None
    want = ts_mod.backward_eager(z, ids, active, norm, entropy, gl, ge, 1.0 / tau, torch.full_like(z, float("nan")))
    z = z.clone()  # the slice's own storage, so that in place overwrites nothing else
    out = z if inplace else torch.full_like(z, float("nan"))  # poisoned: every element must be written
    assert ts_mod.grad_cpu(z, ids, active, norm, entropy, gl, ge, 1.0 / tau, out) is out
    assert ts_mod.ROW_GRADS.ran and not ts_mod.ROW_GRADS.failed
    assert bool(torch.isfinite(out).all())
    assert bool((out[~active] == 0).all()), "inactive rows must be exactly 0"
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == F32 else {"rtol": 1.6e-2, "atol": 1e-5}
    torch.testing.assert_close(out, want, **tol)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    """A toolchain that cannot compile (no C++ compiler, say) gives one warning and the eager numbers."""

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(ts_mod, "ROW_STATS", ts_mod.CompiledPass(fn=broken))
    z, ids, active = _hard_logits("masked", F32)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        out = ts_mod.forward_cpu(z, ids, active, 1.0, True)
    assert ts_mod.ROW_STATS.failed
    for got, want in zip(out, ts_mod.forward_eager(z, ids, active, 1.0, True)):
        assert torch.equal(got, want)
    ts_mod.forward_cpu(z, ids, active, 1.0, True)  # no second warning, no second attempt


def test_eager_switch(monkeypatch):
    monkeypatch.setenv("GRPO_FAST_EAGER", "1")
    monkeypatch.setattr(ts_mod, "ROW_STATS", ts_mod.CompiledPass())
    z, ids, active = _hard_logits("random", F32)
    ts_mod.forward_cpu(z, ids, active, 1.0, True)
    assert ts_mod.ROW_STATS.fn is None  # never compiled


def test_slices_of_new_buffers_do_not_recompile():
    """Slices (logits[:, :-1], a chunk of a reused buffer) are passed to the compiled function as plain
    tensors: a view would make torch.compile guard on its base's sizes and recompile for every buffer."""
    import warnings

    z, ids, active = _hard_logits("random", F32)
    ts_mod.forward_cpu(z[:, :3], ids[:, :3], active[:, :3], 1.0, True)
    bigger = torch.randn(5, 9, z.shape[-1])
    ids2, active2 = torch.zeros(5, 9, dtype=torch.long), torch.ones(5, 9, dtype=torch.bool)
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        warnings.simplefilter("error")  # a recompile would surface as the fallback's warning
        out = ts_mod.forward_cpu(bigger[1:4, 2:8], ids2[1:4, 2:8], active2[1:4, 2:8], 1.0, True)
    want = ts_mod.forward_eager(bigger[1:4, 2:8], ids2[1:4, 2:8], active2[1:4, 2:8], 1.0, True)
    torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=2e-5)


def _child_stats(queue):
    z, ids, active = _hard_logits("wide", torch.float16)  # a variant the parent has not compiled
    queue.put(ts_mod.forward_cpu(z, ids, active, 1.0, False)[0].tolist())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_uses_the_eager_path():
    """A child forked after the parent compiled must not enter torch.compile (it can deadlock in the
    inherited compile workers): it computes the same numbers on the eager path, promptly."""
    z, ids, active = _hard_logits("masked", F32)
    ts_mod.forward_cpu(z, ids, active, 1.0, True)  # the parent compiles (inductor's workers start)
    assert ts_mod.ROW_STATS.ran
    context = torch.multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_stats, args=(queue,))
    child.start()
    child.join(timeout=120)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive, "the forked child hung"
    z, ids, active = _hard_logits("wide", torch.float16)
    want = ts_mod.forward_eager(z, ids, active, 1.0, False)[0]
    torch.testing.assert_close(torch.tensor(queue.get(timeout=10)), want, rtol=1e-5, atol=2e-5)
