"""No silent NaN: extreme inputs through every backend of the public ops, and the debug mode that names
where a NaN or inf enters.

Table-driven. ``LOGIT_CASES`` builds (B, T, V) logits, ids and a mask for each extreme kind (+-1e4
logits, all-equal rows, one dominant token, -inf over part or all of the vocabulary, fully masked
sequences and batches, empty batches); each runs through ``grpo_loss`` and ``token_logprobs`` on the
"reference", "torch" and "triton" backends (the kernels under TRITON_INTERPRET=1 on CPU) with fp32 and
fp16 logits at temperature 1 (GRPO, token-level ratio) and bf16 at 0.7 (DAPO, sequence-level GSPO
ratio), KL and entropy terms on. ``LINEAR_CASES`` does the same from hidden states through
``linear_grpo_loss`` / ``linear_token_logprobs`` on "torch" (fp32, bf16, fp16) and "triton" (fp32,
fp16; bf16 on a GPU). V = 262144 runs on the torch backend only, with N = 2 tokens.

Every output must be finite (loss, every input gradient, metrics, log-probs, entropy) and exactly 0
where nothing is read (masked tokens, -inf logits). Against the float64 reference on the same
(rounded) inputs: the tolerance table (tests/tolerances.py) where the answer is representable in fp32
(log-probs of order log V), a few fp32 ulps of the largest log-prob where they reach -1e4.

Run: pytest tests/test_numerics.py   (~25 s of CPU on 2 cores; the interpreter takes most of it)
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from tolerances import assert_close, tolerance

import grpo_fast as gf
from grpo_fast import debug

pytestmark = pytest.mark.usefixtures("one_thread")
F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
BACKENDS = ("reference", "torch", "triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- inputs from logits
def _logit_case(kind: str, b: int = 3, t: int = 4, v: int = 37):
    """(logits (B, T, V) float32, ids (B, T), mask (B, T), representable): one extreme kind.

    representable: the log-probs stay of order log V, so an fp32 path must meet the table against
    float64; otherwise the target's log-prob is ~ -1e4, where one fp32 ulp is ~1e-3.
    """
    g = torch.Generator().manual_seed(sorted(LOGIT_CASES).index(kind))
    logits = torch.randn(b, t, v, generator=g) * 2
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t)
    mask[0, t // 2 :] = 0  # a partly masked sequence in every case
    representable = True
    if kind == "pm_1e4":  # logits of both signs at |z| ~ 1e4
        logits = torch.randn(b, t, v, generator=g) * 1e4
        representable = False
    elif kind == "all_equal":  # p = 1/V exactly, at +1e4, -1e4 and 0
        logits = torch.tensor([1e4, -1e4, 0.0])[:, None, None].expand(b, t, v).clone()
    elif kind == "dominant_target":  # p = 1 at the target: log-prob 0, entropy 0
        logits[..., 3] = 1e4
        ids.fill_(3)
    elif kind == "dominant_other":  # the target's log-prob is ~ -1e4
        logits[..., 3] = 1e4
        ids = ids.masked_fill(ids == 3, 4)
        representable = False
    elif kind == "neg_inf_vocab":  # a masked vocabulary: a third of the entries are -inf
        banned = torch.arange(v) % 3 == 0
        logits[..., banned] = NEG_INF
        ids = ids.masked_fill(banned[ids], 1)
    elif kind == "neg_inf_all_but_target":  # one allowed token per row: p = 1, log-prob 0
        logits = torch.full((b, t, v), NEG_INF)
        logits.scatter_(-1, ids.unsqueeze(-1), torch.randn(b, t, 1, generator=g))
    elif kind == "masked_sequence":  # a whole sequence without a token in the loss
        mask[1] = 0
    elif kind == "masked_batch":
        mask.zero_()
    elif kind == "empty_b0":
        logits, ids, mask = logits[:0], ids[:0], mask[:0]
    elif kind == "empty_t0":
        logits, ids, mask = logits[:, :0], ids[:, :0], mask[:, :0]
    return logits, ids, mask, representable


LOGIT_CASES = (
    "pm_1e4",
    "all_equal",
    "dominant_target",
    "dominant_other",
    "neg_inf_vocab",
    "neg_inf_all_but_target",
    "masked_sequence",
    "masked_batch",
    "empty_b0",
    "empty_t0",
)


def _config(tau: float) -> gf.LossConfig:
    """tau 1: GRPO, token-level ratio; tau 0.7: DAPO, sequence-level (GSPO). KL (k3) and entropy on."""
    if tau == 1.0:
        return gf.LossConfig(loss_type="grpo", beta=0.04, entropy_coef=0.1, max_completion_length=4)
    return gf.LossConfig(loss_type="dapo", importance_sampling_level="sequence", epsilon_high=0.28, beta=0.04,
                         entropy_coef=0.1, temperature=tau, use_bias_correction_kl=True)  # fmt: skip


def _side_inputs(exact_logp: torch.Tensor, seed: int):
    """advantages (B,), old and ref log-probs (B, T) near the true ones (ratios near 1, KL small)."""
    g = torch.Generator().manual_seed(seed)
    b, t = exact_logp.shape
    adv = torch.randn(b, generator=g)
    # 0.3 nats: k3 = exp(d) - d - 1 ~ d^2 / 2 stays well above its fp32 cancellation error (~1e-7)
    old = (exact_logp + 0.3 * torch.randn(b, t, generator=g, dtype=F64)).float()
    ref = (exact_logp + 0.3 * torch.randn(b, t, generator=g, dtype=F64)).float()
    return adv, old, ref


def _run_logits(backend, logits, ids, mask, adv, old, ref, cfg):
    x = logits.clone().requires_grad_()
    out = gf.grpo_loss(x, ids, adv, mask, old, ref, config=cfg, backend=backend)
    out.loss.backward()
    return out, x.grad


def _exact_logits(logits: torch.Tensor) -> torch.Tensor:
    """float64 copy for the spec, -inf as -1e4: exp(-1e4 - max) is exactly 0 in float64 too, so the
    math is the same (and the float64 spec never meets -inf at a masked token's padding id)."""
    return logits.double().masked_fill(logits.isneginf(), -1e4)


def _assert_finite(what: str, *tensors) -> None:
    for i, x in enumerate(tensors):
        assert bool(torch.isfinite(x).all()), f"{what}[{i}]: non-finite values at {(~torch.isfinite(x)).nonzero()[:5]}"


def _assert_logprobs_within_ulps(actual, exact, what: str, ulps: float = 8.0) -> None:
    """|actual - exact| <= ulps fp32 ulps of max|exact|: for log-probs of ~ -1e4 (1 ulp ~ 1e-3)."""
    actual, exact = actual.detach().double(), exact.detach().double()
    bound = ulps * torch.finfo(F32).eps * float(exact.abs().max().clamp(min=1.0))
    err = float((actual - exact).abs().max()) if exact.numel() else 0.0
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} ({ulps:g} fp32 ulps of max |log-prob|)"


KIND_BACKEND = [(kind, backend) for kind in LOGIT_CASES for backend in BACKENDS]


# (dtype, temperature): each dtype at one of the two configs (the interpreter's time is the budget).
DTYPE_TAU = [(F32, 1.0), (BF16, 0.7), (F16, 1.0)]


@pytest.mark.parametrize("dtype,tau", DTYPE_TAU, ids=lambda x: str(x))
@pytest.mark.parametrize("kind,backend", KIND_BACKEND)
def test_grpo_loss_extreme_inputs(kind, backend, dtype, tau):
    raw, ids, mask, representable = _logit_case(kind)
    logits = raw.to(dtype)
    cfg = _config(tau)
    exact_logp = gf.reference.token_logprobs(_exact_logits(logits), ids, tau) * mask  # masked tokens: 0
    adv, old, ref = _side_inputs(exact_logp, seed=LOGIT_CASES.index(kind))
    exact, exact_grad = _run_logits("reference", _exact_logits(logits), ids, mask, adv, old, ref, cfg)
    label = f"{kind} {dtype} tau={tau} {backend}"
    out, grad = _run_logits(backend, logits, ids, mask, adv, old, ref, cfg)
    _assert_finite(f"{label}: loss, grad, logprobs", out.loss, grad, out.logprobs)
    _assert_finite(f"{label}: metrics", *out.metrics.values())
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert not grad[mask == 0].any(), f"{label}: gradient at masked tokens"
    assert not grad[logits.isneginf()].any(), f"{label}: gradient at -inf logits"
    assert not out.logprobs[mask == 0].any(), f"{label}: log-prob at masked tokens"
    if not mask.any():
        assert float(out.loss.detach()) == 0.0, f"{label}: a batch without tokens must give loss 0"
        return
    if not representable:
        _assert_logprobs_within_ulps(out.logprobs, exact.logprobs, f"logprobs: {label}")
        return
    assert_close(out.loss, exact.loss, dtype, f"loss: {label}")
    assert_close(grad, exact_grad, dtype, f"grad: {label}")
    assert_close(out.logprobs, exact.logprobs, dtype, f"logprob: {label}")
    for key, value in exact.metrics.items():
        assert_close(out.metrics[key], value, dtype, f"metric: {key} {label}")


@pytest.mark.parametrize("dtype", (F32,), ids=str)  # low-precision logits: in the grpo_loss table above
@pytest.mark.parametrize("kind,backend", KIND_BACKEND)
def test_token_logprobs_extreme_inputs(kind, backend, dtype):
    raw, ids, mask, representable = _logit_case(kind)
    logits = raw.to(dtype)
    tau, label = 0.7, f"{kind} {dtype} {backend}"
    exact = gf.token_logprobs(_exact_logits(logits), ids, tau, return_entropy=True, backend="reference", mask=mask)
    out = gf.token_logprobs(logits, ids, tau, return_entropy=True, backend=backend, mask=mask)
    _assert_finite(f"{label}: logprobs, entropy", out.logprobs, out.entropy)
    assert not out.logprobs[mask == 0].any() and not out.entropy[mask == 0].any()
    assert bool((out.entropy >= 0).all()), f"{label}: negative entropy"
    if representable:
        assert_close(out.logprobs, exact.logprobs, dtype, f"logprob: {label}")
        assert_close(out.entropy, exact.entropy, dtype, f"entropy: {label}")
    else:
        _assert_logprobs_within_ulps(out.logprobs, exact.logprobs, f"logprobs: {label}")


@pytest.mark.parametrize("dtype", (F32, BF16), ids=str)
@pytest.mark.parametrize("kind", ("pm_1e4", "all_equal", "neg_inf_vocab", "neg_inf_all_but_target"))
def test_vocabulary_262144_torch_backend(kind, dtype):
    """Gemma-3's vocabulary (262144) on the torch backend, N = 2 tokens (the kernels' V-loop is the
    same code at any V; under the interpreter this size would take minutes)."""
    v = 262144
    g = torch.Generator().manual_seed(11)
    ids = torch.tensor([[5, v - 1]])
    if kind == "pm_1e4":
        logits = torch.randn(1, 2, v, generator=g) * 1e4
    elif kind == "all_equal":
        logits = torch.full((1, 2, v), 1e4)
    elif kind == "neg_inf_vocab":
        logits = torch.randn(1, 2, v, generator=g)
        logits[..., 6 : v - 2] = NEG_INF  # all but 8 entries banned, across the whole row
    else:
        logits = torch.full((1, 2, v), NEG_INF)
        logits[0, 0, 5], logits[0, 1, v - 1] = 3.0, -2.0
    logits = logits.to(dtype)
    cfg = _config(1.0)
    exact_logp = gf.reference.token_logprobs(_exact_logits(logits), ids)
    adv, old, ref = _side_inputs(exact_logp, seed=3)
    mask = torch.ones(1, 2)
    exact, exact_grad = _run_logits("reference", _exact_logits(logits), ids, mask, adv, old, ref, cfg)
    out, grad = _run_logits("torch", logits, ids, mask, adv, old, ref, cfg)
    _assert_finite(kind, out.loss, grad, out.logprobs, *out.metrics.values())
    assert not grad[logits.isneginf()].any()
    if kind == "pm_1e4":
        _assert_logprobs_within_ulps(out.logprobs, exact.logprobs, f"logprobs: V={v} {kind}")
        return
    assert_close(out.loss, exact.loss, dtype, f"loss: V={v} {kind}")
    assert_close(grad, exact_grad, dtype, f"grad: V={v} {kind}")
    assert_close(out.metrics["entropy"], exact.metrics["entropy"], dtype, f"metric: entropy V={v} {kind}")
    if kind == "all_equal":  # log-prob -log V, entropy log V
        assert_close(out.logprobs, torch.full((1, 2), -math.log(v), dtype=F64), F32, "logprob: all equal")


# ----------------------------------------------------------------------------- inputs from hidden states
H = 16


def _linear_case(kind: str, b: int = 3, t: int = 4, v: int = 37):
    """(hidden (B, T, H), weight (V, H), bias (V,), ids, mask, representable), float32 values whose
    logits hidden @ weight.T + bias are the extreme kind (and fp16-representable: |z| < 65504)."""
    g = torch.Generator().manual_seed(100 + sorted(LINEAR_CASES).index(kind))
    hidden = torch.randn(b, t, H, generator=g)
    weight = torch.randn(v, H, generator=g) / H**0.5
    bias = torch.randn(v, generator=g) * 0.1
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t)
    mask[0, t // 2 :] = 0
    representable = True
    if kind == "pm_1e4":  # logits ~ 1e4 * N(0, 1), both signs
        hidden = hidden * 1e4
        representable = False
    elif kind == "all_equal":  # every logit of a row equal (1e4, -1e4, 0): p = 1/V
        weight = torch.ones(v, H)
        bias.zero_()
        hidden = torch.tensor([1e4, -1e4, 0.0])[:, None, None].expand(b, t, H) / H
    elif kind == "dominant_target":
        weight[3], bias[3] = 0.0, 1e4
        ids.fill_(3)
    elif kind == "dominant_other":
        weight[3], bias[3] = 0.0, 1e4
        ids = ids.masked_fill(ids == 3, 4)
        representable = False
    elif kind == "neg_inf_bias":  # a masked vocabulary through the head's bias
        banned = torch.arange(v) % 3 == 0
        bias[banned] = NEG_INF
        ids = ids.masked_fill(banned[ids], 1)
    elif kind == "masked_sequence":
        mask[1] = 0
    elif kind == "masked_batch":
        mask.zero_()
    elif kind == "empty_b0":
        hidden, ids, mask = hidden[:0], ids[:0], mask[:0]
    return hidden, weight, bias, ids, mask, representable


LINEAR_CASES = (
    "pm_1e4",
    "all_equal",
    "dominant_target",
    "dominant_other",
    "neg_inf_bias",
    "masked_sequence",
    "masked_batch",
    "empty_b0",
)
# The interpreter computes tl.dot on bf16 wrongly, and the triton backend refuses bf16 there with a
# TypeError; on a GPU bf16 joins the table.
LINEAR_PARAMS = [("torch", F32, 1.0), ("torch", F32, 0.7), ("torch", BF16, 1.0), ("torch", F16, 0.7),
                 ("triton", F32, 0.7), ("triton", F16, 1.0)]  # fmt: skip
if not INTERPRETED:
    LINEAR_PARAMS.append(("triton", BF16, 0.7))


def _run_linear(backend, hidden, weight, bias, ids, mask, adv, old, ref, cfg):
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    extra = {"chunk_size": 5} if backend == "torch" else {}  # several chunks, a ragged last one
    out = gf.linear_grpo_loss(leaves[0], leaves[1], ids, adv, mask, old, ref, bias=leaves[2], config=cfg,
                              backend=backend, **extra)  # fmt: skip
    out.loss.backward()
    return out, [x.grad for x in leaves]


def _term_scales(logits64, hidden, weight, ids, mask, adv, old, ref, cfg):
    """Per gradient, the size of the terms it sums: |dL/dz| @ |W| for d hidden, |dL/dz|^T @ |h| for
    d W, sum_t |dL/dz| for d bias (dL/dz: the float64 logits gradient). A sum that cancels (an
    all-equal row gives d hidden = 0 exactly) keeps fp32 noise of its terms, not of its result."""
    _, gz = _run_logits("reference", logits64, ids, mask, adv, old, ref, cfg)
    gz = gz.abs().reshape(-1, gz.shape[-1])  # (N, V)
    h = hidden.double().abs().reshape(-1, hidden.shape[-1])  # (N, H)
    return [float((gz @ weight.double().abs()).max()), float((gz.T @ h).max()), float(gz.sum(0).max())]


@pytest.mark.parametrize("backend,dtype,tau", LINEAR_PARAMS, ids=lambda x: str(x))
@pytest.mark.parametrize("kind", LINEAR_CASES)
def test_linear_grpo_loss_extreme_inputs(kind, backend, dtype, tau):
    raw = _linear_case(kind)
    hidden, weight, bias = (x.to(dtype) for x in raw[:3])
    ids, mask, representable = raw[3:]
    cfg, label = _config(tau), f"{kind} {backend} {dtype} tau={tau}"
    # old/ref from the backend's own forward pass, as the trainer computes them (the torch backend
    # rounds low-precision logits like the model's head; an old/ref from other rounding would be off
    # by up to ~|z| x 2^-8 = 40 nats at |z| ~ 1e4, and exp(ref - logp) of k3 would overflow)
    own = gf.linear_token_logprobs(hidden, weight, ids, bias, tau, backend=backend, mask=mask).logprobs
    adv, old, ref = _side_inputs(own.double(), seed=LINEAR_CASES.index(kind))
    out, grads = _run_linear(backend, hidden, weight, bias, ids, mask, adv, old, ref, cfg)
    _assert_finite(f"{label}: loss, grads, logprobs", out.loss, *grads, out.logprobs)
    _assert_finite(f"{label}: metrics", *out.metrics.values())
    assert [g.dtype for g in grads] == [dtype] * 3
    assert not grads[0][mask == 0].any(), f"{label}: hidden gradient at masked tokens"
    banned = bias.isneginf()
    assert not grads[1][banned].any() and not grads[2][banned].any(), f"{label}: gradient at banned entries"
    assert not out.logprobs[mask == 0].any()
    if not mask.any():
        assert float(out.loss.detach()) == 0.0 and not any(g.any() for g in grads)
        return
    logits64 = _exact_logits(hidden.double() @ weight.double().T + bias.double())  # (B, T, V), rounded inputs
    bias64 = bias.double().masked_fill(banned, -1e4)
    exact, exact_grads = _run_linear("reference", hidden.double(), weight.double(), bias64, ids, mask, adv, old, ref,
                                     cfg)  # fmt: skip
    if dtype == F32 and not representable:
        _assert_logprobs_within_ulps(out.logprobs, exact.logprobs, f"logprobs: {label}", ulps=16)
    elif dtype == F32:
        assert_close(out.loss, exact.loss, F32, f"loss: {label}")
        assert_close(out.logprobs, exact.logprobs, F32, f"logprob: {label}")
        # + the rounding of fp32 logits of size |z|, which the triton kernels' saved lse carries into p
        zmax = float(logits64[mask.bool()].abs().max()) / tau
        slack = 1 + 4 * torch.finfo(F32).eps * zmax / tolerance(F32, "grad").atol
        scales = _term_scales(logits64, hidden, weight, ids, mask, adv, old, ref, cfg)
        for name, g, e, scale in zip(("hidden", "weight", "bias"), grads, exact_grads, scales):
            assert_close(g, e, F32, f"grad: d loss / d {name}, {label}", scale=scale * slack)
    else:
        # Low precision: the torch backend rounds each logit to the inputs' dtype (as the model's own
        # head does: bf16 keeps 8 significant bits, fp16 11), so log-probs carry up to ~|z| x 2^-8 of
        # that rounding; the triton kernels accumulate in fp32.
        rounding = 2.0**-8 if dtype == BF16 else 2.0**-11
        z = float(logits64[mask.bool()].abs().max()) / tau
        bound = 4 * rounding * max(z, 1.0)
        err = float((out.logprobs.double() - exact.logprobs.detach()).abs().max())
        assert err <= bound, f"{label}: log-prob error {err:.3g} > {bound:.3g} (4 roundings of max |z| = {z:.3g})"


@pytest.mark.parametrize("backend,dtype,tau", [p for p in LINEAR_PARAMS if p[2] == 0.7], ids=lambda x: str(x))
@pytest.mark.parametrize("kind", ("pm_1e4", "all_equal", "dominant_other", "neg_inf_bias", "masked_batch"))
def test_linear_token_logprobs_extreme_inputs(kind, backend, dtype, tau):
    raw = _linear_case(kind)
    hidden, weight, bias = (x.to(dtype) for x in raw[:3])
    ids, mask, _ = raw[3:]
    out = gf.linear_token_logprobs(hidden, weight, ids, bias, tau, return_entropy=True, backend=backend, mask=mask)
    _assert_finite(f"{kind} {backend} {dtype}", out.logprobs, out.entropy)
    assert not out.logprobs[mask == 0].any() and not out.entropy[mask == 0].any()
    assert bool((out.entropy >= 0).all()) and bool((out.logprobs <= 0).all())


def test_linear_vocabulary_262144_torch_backend():
    v, g = 262144, torch.Generator().manual_seed(5)
    hidden = (torch.randn(1, 2, 64, generator=g) * 1e3).requires_grad_()  # logits ~ 1e3 * N(0, 64)
    weight = torch.randn(v, 64, generator=g).requires_grad_()
    bias = torch.zeros(v)
    bias[::2] = NEG_INF  # half the vocabulary banned
    ids = torch.tensor([[1, v - 1]])
    cfg = gf.LossConfig(loss_type="grpo", beta=0.0)
    out = gf.linear_grpo_loss(hidden, weight, ids, torch.ones(1), bias=bias, config=cfg, backend="torch")
    out.loss.backward()
    _assert_finite("V=262144 linear", out.loss, hidden.grad, weight.grad, out.logprobs, *out.metrics.values())
    assert not weight.grad[::2].any()


def test_linear_reference_backend_empty_batch():
    """The reference backend of linear_grpo_loss / linear_token_logprobs on an empty batch (torch and
    triton are in the table above). Fix in linear.py: ``.view(b, t, weight.shape[0])`` in both reference
    branches, and the loss through ``_finish_linear`` (else a mean over no sequences is NaN)."""
    hidden = torch.zeros(0, 4, H, requires_grad=True)
    weight, ids = torch.randn(37, H), torch.zeros(0, 4, dtype=torch.long)
    out = gf.linear_grpo_loss(
        hidden, weight, ids, torch.zeros(0), config=gf.LossConfig(loss_type="grpo", beta=0.0), backend="reference"
    )
    assert float(out.loss.detach()) == 0.0
    assert gf.linear_token_logprobs(hidden.detach(), weight, ids, backend="reference").logprobs.shape == (0, 4)


# ----------------------------------------------------------------------------- NaN in, NaN out; debug mode
def _finite_inputs(b=2, t=3, v=11):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, t, v, generator=g)
    ids = torch.randint(1, v, (b, t), generator=g)
    logp = gf.reference.token_logprobs(logits, ids)
    return {"logits": logits, "ids": ids, "adv": torch.randn(b, generator=g), "old": logp + 0.1, "ref": logp - 0.1}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", (float("nan"), float("inf")))
def test_nan_or_inf_in_a_used_logit_is_not_hidden(backend, bad):
    """Without debug mode a NaN/+inf logit makes the loss NaN on every backend: visible, never a
    silently wrong finite number."""
    x = _finite_inputs()
    x["logits"][1, 2, 4] = bad
    cfg = gf.LossConfig(loss_type="grpo", beta=0.04)
    out = gf.grpo_loss(x["logits"], x["ids"], x["adv"], None, x["old"], x["ref"], config=cfg, backend=backend)
    assert math.isnan(float(out.loss.detach()))


# (function, argument to poison, index, value, expected message); every call otherwise finite.
def _grpo(x, backend, **over):
    args = {"completion_mask": None, "old_logprobs": x["old"], "ref_logprobs": x["ref"], **over}
    return gf.grpo_loss(
        x["logits"], x["ids"], x["adv"], config=gf.LossConfig(loss_type="grpo", beta=0.04), backend=backend, **args
    )


DEBUG_CASES = {
    "logits_nan": ("logits", (1, 2, 5), float("nan"),
                   r"logits holds nan at index \(1, 2, 5\) \(sequence 1, token 2, vocabulary entry 5\); 1 non-finite"),
    "logits_pos_inf": ("logits", (0, 1, 3), float("inf"), r"logits holds inf at index \(0, 1, 3\)"),
    "old_logprobs_nan": ("old", (1, 0), float("nan"),
                         r"old_logprobs holds nan at index \(1, 0\) \(sequence 1, token 0\)"),
    "ref_logprobs_neg_inf": ("ref", (0, 2), NEG_INF, r"ref_logprobs holds -inf at index \(0, 2\)"),
    "advantages_inf": ("adv", (1,), float("inf"), r"advantages holds inf at index \(1,\) \(sequence 1\)"),
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DEBUG_CASES))
def test_debug_mode_names_the_first_bad_input(case, backend):
    key, index, value, message = DEBUG_CASES[case]
    x = _finite_inputs()
    x[key][index] = value
    with debug.detect_nonfinite(), pytest.raises(ValueError, match=message):
        _grpo(x, backend)


def test_debug_mode_importance_ratio_and_token_logprobs():
    x = _finite_inputs()
    ratio = torch.ones(2, 1)
    ratio[1, 0] = float("nan")
    with debug.detect_nonfinite():
        with pytest.raises(ValueError, match=r"importance_ratio holds nan at index \(1, 0\)"):
            _grpo(x, "torch", importance_ratio=ratio)
        x["logits"][0, 0, 7] = float("nan")
        with pytest.raises(ValueError, match=r"logits holds nan at index \(0, 0, 7\)"):
            gf.token_logprobs(x["logits"], x["ids"], backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_debug_mode_neg_inf_logits_allowed_except_at_the_scored_token(backend):
    x = _finite_inputs()
    x["logits"][..., 0] = NEG_INF  # banned token 0, never sampled (ids >= 1)
    with debug.detect_nonfinite():
        out = _grpo(x, backend)
        assert math.isfinite(float(out.loss.detach()))
        x["logits"][1, 1, x["ids"][1, 1]] = NEG_INF
        msg = r"logits holds -inf at index \(1, 1, \d+\) .*scored at sequence 1, token 1: its log-prob would be -inf"
        with pytest.raises(ValueError, match=msg):
            _grpo(x, backend)


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_debug_mode_skips_masked_logit_rows_but_not_masked_side_inputs(backend):
    """The torch and triton backends never read the logits of masked tokens: NaN there is no error and
    the loss stays finite. The objective does read old/ref log-probs and advantages at masked tokens
    (NaN * mask 0 is NaN), so NaN there is an error, and without debug mode it is indeed a NaN loss."""
    x = _finite_inputs()
    mask = torch.ones(2, 3)
    mask[0, 2] = 0
    mask[1] = 0
    x["logits"][0, 2] = float("nan")
    x["logits"][1] = float("nan")
    x["ids"][0, 2] = -100  # HF's ignore index at a masked position
    with debug.detect_nonfinite():
        out = _grpo(x, backend, completion_mask=mask)
        assert math.isfinite(float(out.loss.detach()))
        x["old"][1, 1] = float("nan")
        with pytest.raises(ValueError, match=r"old_logprobs holds nan at index \(1, 1\)"):
            _grpo(x, backend, completion_mask=mask)
    assert math.isnan(float(_grpo(x, backend, completion_mask=mask).loss.detach()))


def _linear_inputs(b=2, t=3, h=8, v=11):
    g = torch.Generator().manual_seed(1)
    return {
        "hidden": torch.randn(b, t, h, generator=g),
        "weight": torch.randn(v, h, generator=g),
        "bias": torch.randn(v, generator=g),
        "ids": torch.randint(1, v, (b, t), generator=g),
    }


LINEAR_DEBUG_CASES = {
    "hidden_nan": ("hidden", (1, 0, 3), float("nan"),
                   r"hidden holds nan at index \(1, 0, 3\) \(sequence 1, token 0, hidden unit 3\)"),
    "weight_inf": ("weight", (7, 2), float("inf"),
                   r"weight holds inf at index \(7, 2\) \(vocabulary entry 7, hidden unit 2\)"),
    "weight_neg_inf": ("weight", (0, 0), NEG_INF, r"weight holds -inf at index \(0, 0\)"),
    "bias_nan": ("bias", (4,), float("nan"), r"bias holds nan at index \(4,\) \(vocabulary entry 4\)"),
}  # fmt: skip


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("case", list(LINEAR_DEBUG_CASES))
def test_debug_mode_linear(case, backend):
    key, index, value, message = LINEAR_DEBUG_CASES[case]
    x = _linear_inputs()
    x[key][index] = value
    adv = torch.ones(2)
    with debug.detect_nonfinite():
        with pytest.raises(ValueError, match=message):
            gf.linear_grpo_loss(x["hidden"], x["weight"], x["ids"], adv, bias=x["bias"], backend=backend,
                                config=gf.LossConfig(loss_type="grpo", beta=0.0))  # fmt: skip
        with pytest.raises(ValueError, match=message):
            gf.linear_token_logprobs(x["hidden"], x["weight"], x["ids"], x["bias"], backend=backend)


def test_debug_mode_linear_flat_hidden_and_banned_bias():
    x = _linear_inputs()
    flat = x["hidden"].reshape(6, 8).clone()
    flat[4, 5] = float("nan")
    with debug.detect_nonfinite():
        with pytest.raises(ValueError, match=r"hidden holds nan at index \(4, 5\) \(row 4 = sequence 1, token 1;"):
            gf.linear_token_logprobs(flat, x["weight"], x["ids"], x["bias"])
        x["bias"][0] = NEG_INF  # a banned token no id scores: allowed
        allowed = gf.linear_token_logprobs(x["hidden"], x["weight"], x["ids"], x["bias"])
        assert bool(torch.isfinite(allowed.logprobs).all())
        x["bias"][x["ids"][0, 1]] = NEG_INF
        with pytest.raises(ValueError, match=r"bias holds -inf at index \(\d+,\) .*sequence 0, token 1"):
            gf.linear_token_logprobs(x["hidden"], x["weight"], x["ids"], x["bias"])


def test_debug_mode_switches(monkeypatch):
    x = _finite_inputs()
    x["logits"][0, 0, 0] = float("nan")
    monkeypatch.delenv(debug.ENV_VAR, raising=False)
    assert not debug.enabled()
    assert math.isnan(float(_grpo(x, "torch").loss.detach()))  # off by default: no check, NaN propagates
    monkeypatch.setenv(debug.ENV_VAR, "1")
    with pytest.raises(ValueError, match="logits holds nan"):
        _grpo(x, "torch")
    with debug.detect_nonfinite(False):  # the block wins over the variable
        assert not debug.enabled()
        _grpo(x, "torch")
    assert debug.enabled()
    monkeypatch.setenv(debug.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="GRPO_FAST_DEBUG must be one of"):
        debug.enabled()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        with debug.detect_nonfinite("yes"):
            pass


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_linear_fp16_logits_beyond_fp16_range(backend):
    """fp16 hidden states and head whose logits reach ~1.3e5 (> fp16's 65504): the logits are formed in
    fp32, so log-probs match the float64 spec instead of turning into inf - inf = NaN."""
    g = torch.Generator().manual_seed(3)
    hidden = (torch.randn(2, 3, 16, generator=g) * 60).half()
    weight = (torch.randn(29, 16, generator=g) * 120).half()
    exact = hidden.double() @ weight.double().T
    assert float(exact.abs().max()) > 65504
    ids = torch.randint(0, 29, (2, 3), generator=g)
    h = hidden.clone().requires_grad_()
    cfg = gf.LossConfig(loss_type="grpo", beta=0.0)
    out = gf.linear_grpo_loss(h, weight, ids, torch.tensor([1.0, -1.0]), config=cfg, backend=backend)
    out.loss.backward()
    _assert_finite(f"fp16 head, {backend}", out.loss, h.grad, out.logprobs)
    expected = gf.reference.token_logprobs(exact, ids)
    err = float((out.logprobs.detach().double() - expected).abs().max())
    assert err <= 1e-6 * float(expected.abs().max()) + 1e-3, err
