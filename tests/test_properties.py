"""Property tests (hypothesis): random shapes, masks and configs; the torch backend against the float64 spec,
invariances of the log-softmax, and the loss's homogeneity in the advantages.

Examples are derandomised (fixed per test) so CI is reproducible; tensors come from a torch.Generator
seeded by a drawn integer. Counts: torch-vs-spec 40, row shift 25, vocab permutation 25, advantage
scaling 30. Run: pytest tests/test_properties.py
"""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close

pytest.importorskip("hypothesis", reason="needs hypothesis (a dev extra): pip install hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import grpo_fast  # noqa: E402
from grpo_fast import LossConfig  # noqa: E402
from grpo_fast import reference as R  # noqa: E402

F32, BF16 = torch.float32, torch.bfloat16
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
PPO = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


pytestmark = pytest.mark.usefixtures("one_thread")


def _settings(n):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


@st.composite
def configs(draw, loss_types=LOSS_TYPES):
    loss_type = draw(st.sampled_from(loss_types))
    eps_high = draw(st.sampled_from((None, 0.28)))
    if loss_type == "cispo":
        eps_high = draw(st.sampled_from((1.2, 5.0)))
    beta = draw(st.sampled_from((0.0, 0.04)))
    return LossConfig(
        loss_type=loss_type,
        importance_sampling_level=draw(st.sampled_from(("token", "sequence"))),
        epsilon_high=eps_high,
        delta=draw(st.sampled_from((None, 1.6))) if loss_type in PPO else None,
        beta=beta,
        kl_estimator=draw(st.sampled_from(("k1", "k2", "k3", "low_var_kl"))),
        use_bias_correction_kl=beta > 0 and draw(st.booleans()),
        temperature=draw(st.sampled_from((0.7, 1.0, 1.5))),
        entropy_coef=draw(st.sampled_from((0.0, 0.05, -0.02))),
        max_completion_length=draw(st.integers(1, 12)),
        gradient_accumulation_steps=draw(st.sampled_from((1, 2))),
    )


@st.composite
def problems(draw):
    """(B, T, V) with odd and even V, a random mask (sometimes with empty rows) and the tensors."""
    b, t, v = draw(st.integers(1, 4)), draw(st.integers(1, 9)), draw(st.integers(2, 70))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from((0.5, 2.0, 6.0)))
    logits = torch.randn(b, t, v, generator=g) * scale
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) < draw(st.sampled_from((0.5, 0.9, 1.0)))).float()
    adv = torch.randn(b, generator=g) if draw(st.booleans()) else torch.randn(b, t, generator=g)
    noise = draw(st.sampled_from((0.0, 0.1, 0.4)))  # 0: old == logp (on-policy values, given explicitly)
    return logits, ids, mask, adv, noise, g


def _side_inputs(logits, ids, temperature, noise, g):
    logp = R.token_logprobs(logits.double(), ids, temperature).float()
    old = logp + noise * torch.randn(logp.shape, generator=g)
    ref = logp + 0.2 * torch.randn(logp.shape, generator=g)
    return old, ref


def _loss_and_grad(fn, logits):
    x = logits.clone().requires_grad_()
    out = fn(x)
    loss = out[0] if isinstance(out, tuple) else out.loss
    loss.backward()
    return out, x.grad


@_settings(40)
@given(problem=problems(), cfg=configs(), dtype=st.sampled_from((F32, BF16)), old_given=st.booleans())
def test_torch_backend_matches_float64_spec(problem, cfg, dtype, old_given):
    logits, ids, mask, adv, noise, g = problem
    logits = logits.to(dtype)
    old, ref = _side_inputs(logits, ids, cfg.temperature, noise, g)
    old = old if old_given else None
    ref = ref if cfg.beta > 0 else None
    n_items = float(mask.sum()) + 3.0

    def fast(x):
        return grpo_fast.grpo_loss(x, ids, adv, mask, old, ref, config=cfg, backend="torch", num_items_in_batch=n_items)

    def exact(x):
        d = lambda y: None if y is None else y.double()  # noqa: E731
        return R.grpo_loss(x, ids, adv.double(), mask.double(), d(old), d(ref), cfg, num_items_in_batch=n_items)

    out, grad = _loss_and_grad(fast, logits)
    (loss64, metrics64, logp64), grad64 = _loss_and_grad(exact, logits.double())
    assert_close(out.loss, loss64, dtype, f"loss: {cfg}")
    assert_close(grad, grad64, dtype, f"grad: {cfg}")
    assert_close(out.logprobs, logp64, dtype, "logprob")
    assert sorted(out.metrics) == sorted(metrics64)
    for key, value in metrics64.items():
        # Metrics are O(1) quantities (fractions, nats, k3 = exp(d) - d - 1 whose fp32 rounding is
        # absolute), so the atol floor is taken at scale 1. The entropy's absolute accuracy is bounded
        # relative to the logit magnitude |z| = |x / tau| (fp32 carries eps |z| on anything derived from
        # z); relative accuracy of near-zero entropies is tested in test_loss_torch.py.
        scale = max(1.0, _z_scale(logits, cfg.temperature)) if key == "entropy" else 1.0
        assert_close(out.metrics[key], value, dtype, f"metric: {key}", scale=scale)
    assert bool((grad[mask == 0] == 0).all())


def _z_scale(logits, temperature):
    return float(logits.double().abs().max()) / temperature


def _on_grid(logits):
    """Logits on a 2^-10 grid, so adding an integer shift up to 64 is exact in fp32."""
    return torch.round(logits * 1024) / 1024


@_settings(25)
@given(problem=problems(), cfg=configs(), shift=st.integers(-64, 64), per_row=st.booleans())
def test_row_constant_shift_invariance(problem, cfg, shift, per_row):
    logits, ids, mask, adv, noise, g = problem
    logits = _on_grid(logits)
    old, ref = _side_inputs(logits, ids, cfg.temperature, noise, g)
    ref = ref if cfg.beta > 0 else None
    c = torch.randint(-64, 65, logits.shape[:-1] + (1,), generator=g).float() if per_row else float(shift)
    shifted = logits + c
    assert torch.equal(shifted - c, logits)  # the shift is exact

    def fast(x):
        return grpo_fast.grpo_loss(x, ids, adv, mask, old, ref, config=cfg, backend="torch")

    (out0, g0), (out1, g1) = _loss_and_grad(fast, logits), _loss_and_grad(fast, shifted)
    # x / tau is rounded in fp32 (tau != 1), so per-token values carry eps |z| of the shifted logits.
    z = _z_scale(shifted, cfg.temperature)
    assert_close(out1.loss, out0.loss, F32, "loss: shifted")
    assert_close(g1, g0, F32, "grad: shifted")
    assert_close(out1.logprobs, out0.logprobs, F32, "logprob: shifted", scale=z)
    tl0 = grpo_fast.token_logprobs(logits, ids, cfg.temperature, True, "torch")
    tl1 = grpo_fast.token_logprobs(shifted, ids, cfg.temperature, True, "torch")
    assert_close(tl1.entropy, tl0.entropy, F32, "entropy: shifted", scale=z)


@_settings(25)
@given(problem=problems(), cfg=configs(), perm_seed=st.integers(0, 2**31 - 1))
def test_vocab_permutation_invariance(problem, cfg, perm_seed):
    logits, ids, mask, adv, noise, g = problem
    old, ref = _side_inputs(logits, ids, cfg.temperature, noise, g)
    ref = ref if cfg.beta > 0 else None
    perm = torch.randperm(logits.shape[-1], generator=torch.Generator().manual_seed(perm_seed))
    inv = torch.argsort(perm)

    def fast(x, i):
        return grpo_fast.grpo_loss(x, i, adv, mask, old, ref, config=cfg, backend="torch")

    out0, g0 = _loss_and_grad(lambda x: fast(x, ids), logits)
    out1, g1 = _loss_and_grad(lambda x: fast(x, inv[ids]), logits[..., perm])
    assert_close(out1.loss, out0.loss, F32, "loss: permuted vocab")
    assert_close(g1, g0[..., perm], F32, "grad: permuted vocab")
    assert_close(out1.logprobs, out0.logprobs, F32, "logprob: permuted vocab")
    for key in out0.metrics:
        assert_close(out1.metrics[key], out0.metrics[key], F32, f"metric: {key} permuted vocab")


@_settings(30)
@given(
    problem=problems(),
    cfg=configs(loss_types=PPO),
    c=st.floats(0.01, 100.0),
    on_policy=st.booleans(),
    backend=st.sampled_from(("torch", "reference")),
)
def test_loss_is_positively_homogeneous_in_advantages(problem, cfg, c, on_policy, backend):
    # With beta = 0 and no entropy bonus the PPO-clip loss is -min(r A, clip(r) A) aggregated linearly:
    # A -> c A (c > 0) scales the loss and its gradient by c (on-policy, r = 1: the REINFORCE loss).
    logits, ids, mask, adv, noise, g = problem
    cfg = cfg.replace(beta=0.0, entropy_coef=0.0, use_bias_correction_kl=False)
    old = None if on_policy else _side_inputs(logits, ids, cfg.temperature, max(noise, 0.1), g)[0]

    def run(a):
        return lambda x: grpo_fast.grpo_loss(x, ids, a, mask, old, config=cfg, backend=backend)

    (out1, g1), (out_c, g_c) = _loss_and_grad(run(adv), logits), _loss_and_grad(run(adv * c), logits)
    assert_close(out_c.loss, out1.loss.double() * c, F32, "loss: c A")
    assert_close(g_c, g1.double() * c, F32, "grad: c A")
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert float(out_c.metrics[key]) == float(out1.metrics[key])  # the sign of A decides, not its size
