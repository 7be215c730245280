"""Fused linear path (hidden states -> loss) against the float64 reference on materialised logits."""

import itertools

import pytest
import torch

import grpo_fast as gf
from grpo_fast import reference
from grpo_fast.ops import linear_loss

B, T, H, V = 3, 5, 16, 53
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")


def _inputs(seed, dtype=torch.float64, bias=True, off_policy=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[0] = 0  # one fully masked sequence
    logits = hidden @ weight.T + (0 if b is None else b)
    logp = reference.token_logprobs(logits, ids)
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64) if off_policy else None
    ref = logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return hidden, weight, b, ids, adv, mask, old, ref


def _run(cfg, backend, dtype, seed=0, chunk_size=4, **kw):
    hidden, weight, b, ids, adv, mask, old, ref = _inputs(seed, **kw)
    leaves = [x.to(dtype).requires_grad_() if x is not None else None for x in (hidden, weight, b)]
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    extra = {} if backend == "reference" else {"chunk_size": chunk_size}
    out = gf.linear_grpo_loss(
        leaves[0],
        leaves[1],
        ids,
        cast(adv),
        cast(mask),
        cast(old),
        cast(ref),
        bias=leaves[2],
        config=cfg,
        backend=backend,
        **extra,
    )
    out.loss.backward()
    grads = [x.grad.double() for x in leaves if x is not None]
    return out, [out.loss.double()] + grads


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


CASES = list(itertools.product(LOSS_TYPES, ("token", "sequence"), (True, False), (0.0, 0.05), (1.0, 0.7)))


@pytest.mark.parametrize("row_passes", ("eager", "compiled"))
@pytest.mark.parametrize("loss_type,level,off_policy,entropy_coef,temperature", CASES)
def test_torch_backend_matches_float64_reference(
    loss_type, level, off_policy, entropy_coef, temperature, row_passes, monkeypatch
):
    """Both CPU row-pass implementations: the eager one (toy vocabularies) and token_stats' compiled one
    (real vocabularies; here switched on for V = 53)."""
    if row_passes == "compiled":
        monkeypatch.setattr(linear_loss, "COMPILED_MIN_VOCAB", 0)
    cfg = gf.LossConfig(
        beta=0.04,
        loss_type=loss_type,
        importance_sampling_level=level,
        entropy_coef=entropy_coef,
        temperature=temperature,
        max_completion_length=8,
        use_bias_correction_kl=True,
        delta=1.5 if loss_type == "grpo" else None,
    )
    ref_out, expected = _run(cfg, "reference", torch.float64, off_policy=off_policy)
    out, actual = _run(cfg, "torch", torch.float32, off_policy=off_policy)
    # fp32 GEMMs + fp32 row statistics over V=53: errors ~1e-6; the bound is 2e-4 on grads.
    for what, a, e in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), actual, expected):
        assert _rel(a, e) <= 2e-4, f"{what}: rel err {_rel(a, e):.2e}"
    torch.testing.assert_close(out.logprobs.double(), ref_out.logprobs.double(), rtol=0, atol=1e-5)
    assert out.metrics.keys() == ref_out.metrics.keys()
    for k in out.metrics:
        torch.testing.assert_close(out.metrics[k].double(), ref_out.metrics[k].double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 15, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    cfg = gf.LossConfig(loss_type="grpo", beta=0.04, importance_sampling_level="sequence", entropy_coef=0.1)
    _, expected = _run(cfg, "reference", torch.float64)
    _, actual = _run(cfg, "torch", torch.float32, chunk_size=chunk_size)
    for a, e in zip(actual, expected):  # the torch path computes in float32 whatever the input dtype
        assert _rel(a, e) <= 2e-5


def test_bf16_hidden_with_fp32_head_and_bf16_head():
    cfg = gf.LossConfig(loss_type="grpo", beta=0.04)
    _, expected = _run(cfg, "reference", torch.float64, bias=False)
    hidden, weight, _, ids, adv, mask, old, ref = _inputs(0, bias=False)
    for w_dtype in (torch.float32, torch.bfloat16):
        h = hidden.bfloat16().requires_grad_()
        w = weight.to(w_dtype).requires_grad_()
        out = gf.linear_grpo_loss(h, w, ids, adv.float(), mask.float(), old.float(), ref.float(), config=cfg)
        out.loss.backward()
        assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == w_dtype
        # bf16 inputs carry ~3 significant digits: relative errors of a few 1e-2 are the input rounding.
        assert _rel(out.loss.double(), expected[0]) < 3e-2
        assert _rel(h.grad.double(), expected[1]) < 6e-2
        assert _rel(w.grad.double(), expected[2]) < 6e-2


def test_all_masked_and_empty_batches_give_zero_loss_and_gradients():
    hidden, weight, _, ids, adv, mask, old, ref = _inputs(1, bias=False)
    for h, i, a, m, o, r in (
        (hidden, ids, adv, torch.zeros_like(mask), old, ref),
        (hidden[:0], ids[:0], adv[:0], mask[:0], old[:0], ref[:0]),
    ):
        hh, w = h.float().requires_grad_(), weight.float().requires_grad_()
        out = gf.linear_grpo_loss(hh, w, i, a.float(), m.float(), o.float(), r.float())
        out.loss.backward()
        assert out.loss.item() == 0.0 and torch.isfinite(out.loss)
        assert not hh.grad.any() and not w.grad.any()


def test_linear_token_logprobs_forward_only():
    hidden, weight, b, ids, _, mask, _, _ = _inputs(2)
    logits = hidden @ weight.T + b
    expected_lp = reference.token_logprobs(logits, ids, 0.8)
    expected_h = reference.token_entropy(logits, 0.8)
    out = gf.linear_token_logprobs(
        hidden.float(), weight.float(), ids, b.float(), temperature=0.8, return_entropy=True, chunk_size=3
    )
    torch.testing.assert_close(out.logprobs.double(), expected_lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.entropy.double(), expected_h, rtol=0, atol=2e-5)
    masked = gf.linear_token_logprobs(hidden.float(), weight.float(), ids, b.float(), mask=mask)
    assert masked.entropy is None
    assert (masked.logprobs[mask == 0] == 0).all()
    torch.testing.assert_close(
        masked.logprobs[mask == 1].double(), reference.token_logprobs(logits, ids)[mask == 1], rtol=0, atol=2e-5
    )


def test_hidden_may_be_flat():
    hidden, weight, b, ids, adv, mask, old, ref = _inputs(3)
    a = gf.linear_grpo_loss(hidden.reshape(B * T, H), weight, ids, adv, mask, old, ref, bias=b)
    c = gf.linear_grpo_loss(hidden, weight, ids, adv, mask, old, ref, bias=b)
    torch.testing.assert_close(a.loss, c.loss)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"weight": torch.zeros(V, H + 1)}, "weight"),
        ({"bias": torch.zeros(V + 1)}, "bias"),
        ({"hidden": torch.zeros(B, T + 1, H)}, "hidden"),
        ({"backend": "cuda"}, "backend"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_linear_bad_inputs(kwargs, match):
    hidden, weight, b, ids, adv, mask, old, ref = _inputs(4)
    args = {"hidden": hidden, "weight": weight, "bias": b}
    args.update({k: v for k, v in kwargs.items() if k in args})
    extra = {k: v for k, v in kwargs.items() if k not in args}
    with pytest.raises((ValueError, TypeError), match=match):
        gf.linear_grpo_loss(args["hidden"], args["weight"], ids, adv, mask, old, ref, bias=args["bias"], **extra)


TRITON_CASES = [("grpo", "token", 0.0, 1.0), ("dapo", "sequence", 0.05, 0.7), ("sapo", "token", 0.05, 1.0),
                ("cispo", "sequence", 0.0, 0.7), ("luspo", "token", 0.0, 1.0), ("dr_grpo", "sequence", 0.05, 1.0),
                ("bnpo", "token", 0.0, 0.7), ("vespo", "sequence", 0.05, 0.7)]  # fmt: skip


@pytest.mark.parametrize("loss_type,level,entropy_coef,temperature", TRITON_CASES)
@pytest.mark.parametrize("off_policy", (True, False))
@pytest.mark.triton
def test_triton_backend_through_the_public_api(loss_type, level, entropy_coef, temperature, off_policy):
    """backend="triton" (under TRITON_INTERPRET=1 on CPU) against the float64 reference, fp32 inputs."""
    cfg = gf.LossConfig(beta=0.04, loss_type=loss_type, importance_sampling_level=level, entropy_coef=entropy_coef,
                        temperature=temperature, max_completion_length=8, use_bias_correction_kl=True)  # fmt: skip
    ref_out, expected = _run(cfg, "reference", torch.float64, off_policy=off_policy)
    out, actual = _run(cfg, "triton", torch.float32, off_policy=off_policy)
    for what, a, e in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), actual, expected):
        assert _rel(a, e) <= 2e-4, f"{what}: rel err {_rel(a, e):.2e}"
    torch.testing.assert_close(out.logprobs.double(), ref_out.logprobs.double(), rtol=0, atol=1e-5)


@pytest.mark.triton
def test_triton_linear_token_logprobs_matches_torch_backend():
    hidden, weight, b, ids, _, mask, _, _ = _inputs(5)
    args = (hidden.float(), weight.float(), ids, b.float())
    fast = gf.linear_token_logprobs(*args, temperature=0.8, return_entropy=True, backend="triton", mask=mask)
    slow = gf.linear_token_logprobs(*args, temperature=0.8, return_entropy=True, backend="torch", mask=mask)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, rtol=0, atol=2e-5)
    torch.testing.assert_close(fast.entropy, slow.entropy, rtol=0, atol=2e-5)
