"""backend="triton" through the public API against the float64 reference, for every loss type and option.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (tests/conftest.py). Shapes are small: the
interpreter runs ~2M elements/s.
"""

import itertools

import pytest
import torch

import grpo_fast as gf
from tests.tolerances import assert_close

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.triton]
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


def _inputs(seed, b=3, t=5, v=301, dtype=F32):
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(b, t + 1, v, generator=g) * 2  # sliced [:, :-1] below: non-contiguous logits
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    mask[0] = 0  # a fully masked sequence
    adv = torch.randn(b, generator=g)
    old = -torch.rand(b, t, generator=g) - 5.2  # log-probs near log(1/V): ratios away from 1, clipping active
    ref = old + 0.1 * torch.randn(b, t, generator=g)
    return big.to(dtype), ids, mask, adv, old, ref


def _run(cfg, backend, big, ids, mask, adv, old, ref, inplace=False):
    x = (big.double() if backend == "reference" else big.clone()).requires_grad_()
    logits = x[:, :-1]
    if inplace:  # the gradient goes into an intermediate's storage; the leaf's grad is that buffer
        logits = logits * 1
    out = gf.grpo_loss(logits, ids, adv, mask, old, ref, config=cfg, backend=backend, inplace_backward=inplace)
    out.loss.backward()
    return out, x.grad[:, :-1]


CASES = list(itertools.product(LOSS_TYPES, ("token", "sequence"), (1.0, 0.7), (0.0, 0.05)))


@pytest.mark.parametrize("loss_type,level,tau,entropy_coef", CASES)
def test_triton_matches_float64_reference_fp32(loss_type, level, tau, entropy_coef):
    cfg = gf.LossConfig(
        beta=0.04,
        loss_type=loss_type,
        importance_sampling_level=level,
        temperature=tau,
        entropy_coef=entropy_coef,
        max_completion_length=5,
        use_bias_correction_kl=True,
        delta=1.5 if loss_type == "grpo" else None,
    )
    inputs = _inputs(CASES.index((loss_type, level, tau, entropy_coef)))
    exp, exp_grad = _run(cfg, "reference", *inputs)
    out, grad = _run(cfg, "triton", *inputs)
    assert_close(out.loss, exp.loss, F32, f"loss: {loss_type}/{level}")
    assert_close(grad, exp_grad, F32, f"grad: {loss_type}/{level}")
    assert_close(out.logprobs, exp.logprobs, F32, "logprob: logprobs")
    for k in exp.metrics:
        assert_close(out.metrics[k], exp.metrics[k], F32, f"metric: {k}")


@pytest.mark.parametrize("dtype", (F32, BF16), ids=str)
def test_triton_low_precision_and_inplace(dtype):
    cfg = gf.LossConfig(loss_type="grpo", beta=0.04, entropy_coef=0.1, temperature=1.3)
    inputs = _inputs(100, v=257, dtype=dtype)
    exp, exp_grad = _run(cfg, "reference", *inputs)
    out, grad = _run(cfg, "triton", *inputs, inplace=True)
    assert grad.dtype == dtype
    assert_close(out.loss, exp.loss, dtype, "loss: in place")
    assert_close(grad, exp_grad, dtype, "grad: in place")


def test_triton_t1_and_fully_masked_batch():
    cfg = gf.LossConfig(loss_type="grpo", beta=0.04)
    big, ids, mask, adv, old, ref = _inputs(7, b=2, t=1, v=37)
    exp, exp_grad = _run(cfg, "reference", big, ids, torch.ones_like(mask), adv, old, ref)
    out, grad = _run(cfg, "triton", big, ids, torch.ones_like(mask), adv, old, ref)
    assert_close(out.loss, exp.loss, F32, "loss: T=1")
    assert_close(grad, exp_grad, F32, "grad: T=1")
    out, grad = _run(cfg, "triton", big, ids, torch.zeros_like(mask), adv, old, ref)
    assert out.loss.item() == 0.0 and not grad.any() and not out.logprobs.any()


def test_triton_token_logprobs_forward_only_matches_torch_backend():
    big, ids, mask, *_ = _inputs(9, v=1001)
    logits = big[:, :-1]
    fast = gf.token_logprobs(logits, ids, 0.8, return_entropy=True, backend="triton", mask=mask)
    torch_ = gf.token_logprobs(logits, ids, 0.8, return_entropy=True, backend="torch", mask=mask)
    assert_close(fast.logprobs, torch_.logprobs, F32, "logprob: logprobs")
    assert_close(fast.entropy, torch_.entropy, F32, "entropy: triton vs torch")
