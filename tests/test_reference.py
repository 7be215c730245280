"""The float64 spec (grpo_fast/reference.py) against hand-derived numbers, gradcheck and invariants.

Hand examples: each expected value is worked out in the test with math.log / math.exp from the
formulas in grpo_fast/reference.py's docstrings, and the branch taken (clip active or not) is asserted so the example
exercises what it claims. gradcheck covers every loss_type x level x delta x KL option with
temperature != 1, an entropy bonus and a rollout importance ratio. Run: pytest tests/test_reference.py
"""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch
from tolerances import assert_close

import grpo_fast
from grpo_fast import LossConfig
from grpo_fast import reference as R

F64 = torch.float64
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
PPO = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


pytestmark = pytest.mark.usefixtures("one_thread")


# One 1 x 2 example (B=1, T=2, V=3) used by the hand derivations below.
LOGITS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
IDS = [1, 2]


def _hand_logp(row, i, tau=1.0):
    lse = math.log(sum(math.exp(z / tau) for z in row))
    return row[i] / tau - lse


def _hand_entropy(row, tau=1.0):
    lse = math.log(sum(math.exp(z / tau) for z in row))
    ps = [math.exp(z / tau - lse) for z in row]
    return -sum(p * math.log(p) for p in ps)


def _example(adv, old, ref=None, mask=(1.0, 1.0), batch=1):
    logits = torch.tensor([LOGITS] * batch, dtype=F64, requires_grad=True)  # (B, 2, 3)
    ids = torch.tensor([IDS] * batch)
    adv = torch.tensor(adv, dtype=F64)
    old = torch.tensor([old] * batch, dtype=F64)
    ref = None if ref is None else torch.tensor([ref] * batch, dtype=F64)
    mask = torch.tensor([mask] * batch, dtype=F64)
    return logits, ids, adv, mask, old, ref


def _loss(cfg, adv, old, ref=None, mask=(1.0, 1.0), batch=1, **kw):
    logits, ids, adv, mask, old, ref = _example(adv, old, ref, mask, batch)
    return R.grpo_loss(logits, ids, adv, mask, old, ref, cfg, **kw)


def _close(actual, expected, what="loss"):
    # Metrics are returned as float32 scalars by design; everything else stays float64.
    dtype = torch.float32 if what.startswith("metric") and actual.dtype == torch.float32 else F64
    assert_close(actual, torch.tensor(expected, dtype=F64), dtype, what)


# ----------------------------------------------------------------------------- hand-derived examples


def test_hand_logprobs_and_entropy_with_temperature():
    x = torch.tensor([LOGITS], dtype=F64)
    ids = torch.tensor([IDS])
    for tau in (1.0, 0.7, 1.5):
        expected = [_hand_logp(LOGITS[t], IDS[t], tau) for t in range(2)]
        _close(R.token_logprobs(x, ids, tau)[0], expected, "logprob")
        _close(R.token_entropy(x, tau)[0], [_hand_entropy(row, tau) for row in LOGITS], "entropy")
    # Uniform logits: every log-prob is -log V and the entropy is log V.
    u = torch.full((1, 1, 7), 3.25, dtype=F64)
    _close(R.token_logprobs(u, torch.tensor([[4]]))[0, 0], -math.log(7), "logprob")
    _close(R.token_entropy(u)[0, 0], math.log(7), "entropy")


def test_hand_grpo_token_level_clipped():
    lp0, lp1 = _hand_logp(LOGITS[0], 1), _hand_logp(LOGITS[1], 2)
    old0, old1 = -0.9, -0.1
    a = 0.5
    r0, r1 = math.exp(lp0 - old0), math.exp(lp1 - old1)
    assert r0 > 1.2 and 0.8 < r1 < 1.2  # token 0 clipped (A > 0, r > 1 + eps), token 1 not
    l0 = -min(r0 * a, 1.2 * a)  # = -0.6
    l1 = -min(r1 * a, r1 * a)
    assert l0 == pytest.approx(-0.6)
    loss, metrics, logp = _loss(LossConfig(loss_type="grpo", beta=0.0), [a], [old0, old1])
    _close(loss, (l0 + l1) / 2)
    _close(logp[0], [lp0, lp1], "logprob")
    _close(metrics["clip_ratio/high_mean"], 0.5, "metric")
    _close(metrics["clip_ratio/low_mean"], 0.0, "metric")
    _close(metrics["clip_ratio/region_mean"], 0.5, "metric")
    _close(metrics["entropy"], (_hand_entropy(LOGITS[0]) + _hand_entropy(LOGITS[1])) / 2, "metric")


def test_hand_negative_advantage_low_clip_and_delta():
    lp0, lp1 = _hand_logp(LOGITS[0], 1), _hand_logp(LOGITS[1], 2)
    old0, old1 = -0.9, 0.4
    a = -2.0
    r0, r1 = math.exp(lp0 - old0), math.exp(lp1 - old1)
    assert r0 > 1.3 and r1 < 0.8  # token 0: unclipped branch wins (A < 0); token 1: low clip region
    # PPO: -min(r A, clip(r) A); for A < 0 the larger ratio gives the smaller product.
    l0 = -min(r0 * a, 1.2 * a)  # = -r0 * a
    l1 = -min(r1 * a, 0.8 * a)  # = -0.8 * a
    loss, metrics, _ = _loss(LossConfig(loss_type="grpo", beta=0.0), [a], [old0, old1])
    _close(loss, (l0 + l1) / 2)
    _close(metrics["clip_ratio/low_mean"], 0.5, "metric")
    _close(metrics["clip_ratio/high_mean"], 0.0, "metric")
    # INTELLECT-2 delta caps the unclipped ratio: r0 -> 1.3.
    loss_d, _, _ = _loss(LossConfig(loss_type="grpo", beta=0.0, delta=1.3), [a], [old0, old1])
    _close(loss_d, (-min(1.3 * a, 1.2 * a) + l1) / 2)


def test_hand_aggregations_two_sequences():
    # B=2 identical sequences; the second has its last token masked. Per-token losses on-policy,
    # beta = 0: l = -A (ratio 1). A = (1.5, -0.5).
    a = [1.5, -0.5]
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=F64)
    logits = torch.tensor([LOGITS] * 2, dtype=F64)
    ids = torch.tensor([IDS] * 2)
    adv = torch.tensor(a, dtype=F64)
    l = [[-a[0], -a[0]], [-a[1], 0.0]]  # masked token contributes nothing
    expected = {
        "grpo": ((l[0][0] + l[0][1]) / 2 + l[1][0] / 1) / 2,
        "bnpo": (l[0][0] + l[0][1] + l[1][0]) / 3,
        "dr_grpo": (l[0][0] + l[0][1] + l[1][0]) / (2 * 5),
        "dapo": (l[0][0] + l[0][1] + l[1][0]) / 3,
        "luspo": ((l[0][0] + l[0][1]) + l[1][0]) / 2,
    }
    for loss_type, value in expected.items():
        cfg = LossConfig(loss_type=loss_type, beta=0.0, max_completion_length=5)
        loss, _, _ = R.grpo_loss(logits, ids, adv, mask, config=cfg)
        _close(loss, value, f"loss: {loss_type}")
        # GA divides every loss type except dapo, whose normaliser scales num_items_in_batch (the whole
        # generation batch) by GA / steps_per_generation = 1 when steps_per_generation defaults to GA.
        cfg2 = cfg.replace(gradient_accumulation_steps=2)
        ga_value = value if loss_type == "dapo" else value / 2
        _close(R.grpo_loss(logits, ids, adv, mask, config=cfg2)[0], ga_value, f"loss: {loss_type} GA=2")
    # dapo with the generation-batch token count: sum / num_items_in_batch.
    cfg = LossConfig(loss_type="dapo", beta=0.0)
    loss, _, _ = R.grpo_loss(logits, ids, adv, mask, config=cfg, num_items_in_batch=12)
    _close(loss, (l[0][0] + l[0][1] + l[1][0]) / 12)
    # steps_per_generation=4, GA=2: normaliser = 12 / 1 * 2 / 4 = 6.
    cfg = cfg.replace(gradient_accumulation_steps=2, steps_per_generation=4)
    _close(R.grpo_loss(logits, ids, adv, mask, config=cfg, num_items_in_batch=12)[0], sum(map(sum, l)) / 6)


def test_hand_sequence_level_gspo():
    lp0, lp1 = _hand_logp(LOGITS[0], 1), 0.0  # token 1 is masked: its log-prob is reported as 0
    old0, old1 = -0.9, -5.0
    a = 1.0
    # Token 1 is masked: the sequence log-weight is the mean over token 0 only.
    s = math.exp(lp0 - old0)
    assert s > 1.2
    l = -min(s * a, 1.2 * a)
    loss, metrics, logp = _loss(
        LossConfig(loss_type="grpo", beta=0.0, importance_sampling_level="sequence"), [a], [old0, old1], mask=(1, 0)
    )
    _close(loss, l)
    _close(logp[0], [lp0, lp1], "logprob")
    _close(metrics["clip_ratio/high_mean"], 1.0, "metric")


def test_hand_cispo():
    lp0, lp1 = _hand_logp(LOGITS[0], 1), _hand_logp(LOGITS[1], 2)
    old0, old1 = -0.9, -0.1
    r0, r1 = math.exp(lp0 - old0), math.exp(lp1 - old1)
    a = 0.7
    cap = 1.5  # CISPO caps the ratio itself at epsilon_high
    assert r0 > cap > r1
    l = [-cap * a * lp0, -r1 * a * lp1]
    loss, metrics, _ = _loss(LossConfig(loss_type="cispo", beta=0.0, epsilon_high=cap), [a], [old0, old1])
    _close(loss, sum(l) / 2)
    assert not any(k.startswith("clip_ratio") for k in metrics)


def test_hand_sapo():
    lp0, lp1 = _hand_logp(LOGITS[0], 1), _hand_logp(LOGITS[1], 2)
    old0, old1 = -0.9, -0.1
    r0, r1 = math.exp(lp0 - old0), math.exp(lp1 - old1)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # Negative advantage: tau = tau_neg = 1.05; l = -(4 / tau) sigmoid(tau (r - 1)) A.
    a, tau = -0.7, 1.05
    l = [-(4 / tau) * sig(tau * (r - 1)) * a for r in (r0, r1)]
    loss, _, _ = _loss(LossConfig(loss_type="sapo", beta=0.0), [a], [old0, old1])
    _close(loss, sum(l) / 2)
    # Two sequences on-policy (r = 1, gate sigmoid(0) * 4 / tau = 2 / tau), the second one token long.
    adv = torch.tensor([1.5, -0.5], dtype=F64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=F64)
    s0, s1 = -(2 / 1.0) * 1.5, -(2 / 1.05) * -0.5
    cfg = LossConfig(loss_type="sapo", beta=0.0)
    loss, _, _ = R.grpo_loss(torch.tensor([LOGITS] * 2, dtype=F64), torch.tensor([IDS] * 2), adv, mask, config=cfg)
    _close(loss, ((s0 + s0) / 2 + s1) / 2, "loss: sapo on-policy")


def _hand_phi(log_w, k, lam):
    log_w = min(max(log_w, math.log(1e-8)), 20.0)
    return math.exp(lam + k * log_w - lam * math.exp(log_w))


def test_hand_vespo_weight_loss_gradient_and_ratio():
    # VESPO: w = exp(sum_t (logp - old) + sum_t log rho) per sequence, phi = exp(lam + k log w - lam w),
    # l_t = -sg(phi) A logp_t, normalised like dapo (tokens in the batch).
    lp = [_hand_logp(LOGITS[0], 1), _hand_logp(LOGITS[1], 2)]
    old = [-0.9, -0.1]
    rho = [0.8, 1.3]
    for a, k, lam in ((0.7, 2.0, 3.0), (-1.5, 3.0, 2.0)):  # A >= 0: (k_pos, lambda_pos); A < 0: the negatives
        for ratio in (None, rho):
            log_w = sum(lp[t] - old[t] for t in range(2)) + (0.0 if ratio is None else sum(map(math.log, ratio)))
            phi = _hand_phi(log_w, k, lam)
            assert abs(phi - 1) > 0.05  # off-policy: a weight that matters
            logits = torch.tensor([LOGITS], dtype=F64, requires_grad=True)
            kw = {} if ratio is None else {"importance_ratio": torch.tensor([ratio], dtype=F64)}
            cfg = LossConfig(loss_type="vespo", beta=0.0)
            loss, metrics, _ = R.grpo_loss(logits, torch.tensor([IDS]), torch.tensor([a], dtype=F64),
                                           old_logprobs=torch.tensor([old], dtype=F64), config=cfg, **kw)  # fmt: skip
            what = f"A={a} rho={ratio}"
            _close(loss, -phi * a * (lp[0] + lp[1]) / 2, f"loss: vespo {what}")
            _close(metrics["vespo/phi_seq_mean"], phi, f"metric: phi {what}")
            assert not any(key.startswith("clip_ratio") for key in metrics)
            loss.backward()  # phi is a constant: d l / d z = -phi A / 2 (onehot - p)
            expected = []
            for t, row in enumerate(LOGITS):
                lse = math.log(sum(math.exp(z) for z in row))
                expected.append([-phi * a / 2 * ((v == IDS[t]) - math.exp(z - lse)) for v, z in enumerate(row)])
            _close(logits.grad[0], expected, f"grad: vespo {what}")


def test_hand_vespo_masked_token_clamps_and_custom_gamma():
    # A masked token counts neither in w nor through its rollout ratio; k / lambda are the config's;
    # log w is clamped to [log 1e-8, 20] (a far off-policy sequence gets phi ~ 0, never NaN).
    lp0 = _hand_logp(LOGITS[0], 1)
    cfg = LossConfig(loss_type="vespo", beta=0.0, vespo_k_pos=0.5, vespo_lambda_pos=1.7)
    ratio = torch.tensor([[1.2, 1e-30]], dtype=F64)
    loss, metrics, _ = _loss(cfg, [0.4], [-1.0, 5.0], mask=(1.0, 0.0), importance_ratio=ratio)
    phi = _hand_phi(lp0 + 1.0 + math.log(1.2), 0.5, 1.7)
    _close(loss, -phi * 0.4 * lp0)
    _close(metrics["vespo/phi_seq_mean"], phi, "metric")
    for old, expected in ((-60.0, _hand_phi(20.0, 2.0, 3.0)), (60.0, _hand_phi(math.log(1e-8), 2.0, 3.0))):
        loss, metrics, _ = _loss(LossConfig(loss_type="vespo", beta=0.0), [1.0], [old, old])
        assert torch.isfinite(loss) and float(metrics["vespo/phi_seq_mean"]) == pytest.approx(expected, abs=1e-12)


def test_hand_policy_mask_and_entropy_mask():
    # policy_mask multiplies the policy term only (not KL, not the normaliser); entropy_mask picks the tokens the
    # bonus averages over (TRL's high-entropy mask), while the entropy metric stays the mean over the mask.
    lp0, lp1 = _hand_logp(LOGITS[0], 1), _hand_logp(LOGITS[1], 2)
    ref0, ref1 = lp0 - 0.3, lp1 + 0.2
    k3 = [math.exp(x) - x - 1 for x in (-0.3, 0.2)]
    h0, h1 = _hand_entropy(LOGITS[0]), _hand_entropy(LOGITS[1])
    a, beta, coef = 0.25, 0.1, 0.05
    cfg = LossConfig(loss_type="grpo", beta=beta, entropy_coef=coef)
    keep, bonus = torch.tensor([[0.0, 1.0]], dtype=F64), torch.tensor([[1.0, 0.0]], dtype=F64)
    loss, metrics, _ = _loss(cfg, [a], [lp0, lp1], ref=[ref0, ref1], policy_mask=keep, entropy_mask=bonus)
    per_token = [0.0 + beta * k3[0], -a + beta * k3[1]]  # on-policy: ratio 1, token 0's policy term dropped
    _close(loss, sum(per_token) / 2 - coef * h0)
    _close(metrics["entropy"], (h0 + h1) / 2, "metric")
    # a (B, 1) sequence mask of 0 leaves only the KL term; an empty entropy mask gives no bonus
    loss, _, _ = _loss(cfg, [a], [lp0, lp1], ref=[ref0, ref1], policy_mask=torch.zeros(1, 1, dtype=F64),
                       entropy_mask=torch.zeros(1, 2, dtype=F64))  # fmt: skip
    _close(loss, beta * (k3[0] + k3[1]) / 2)


def test_hand_kl_estimators_and_entropy_bonus():
    lp0, lp1 = _hand_logp(LOGITS[0], 1), _hand_logp(LOGITS[1], 2)
    ref0, ref1 = lp0 - 0.3, lp1 + 0.2
    d = [ref0 - lp0, ref1 - lp1]  # ref - logp
    kl = {
        "k1": [-x for x in d],
        "k2": [0.5 * x * x for x in d],
        "k3": [math.exp(x) - x - 1 for x in d],
        "low_var_kl": [math.exp(x) - x - 1 for x in d],
    }
    a, beta, coef = 0.25, 0.1, 0.05
    h = (_hand_entropy(LOGITS[0]) + _hand_entropy(LOGITS[1])) / 2
    for est, values in kl.items():
        cfg = LossConfig(loss_type="grpo", beta=beta, kl_estimator=est, entropy_coef=coef)
        loss, metrics, _ = _loss(cfg, [a], [lp0, lp1], ref=[ref0, ref1])
        per_token = [-a + beta * k for k in values]  # old == logp: ratio 1
        _close(loss, sum(per_token) / 2 - coef * h, f"loss: {est}")
        _close(metrics["kl"], sum(values) / 2, f"metric: kl {est}")
    # low_var_kl clamps ref - logp to [-20, 20] and the estimate to [-10, 10]. Where a clamp is active the
    # gradient is 0 (not NaN: exp(1000) would overflow without the inner clamp).
    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[999.0, 24.0, -40.0, -1.5]], dtype=F64)
    est = R.kl_penalty(logp, ref, "low_var_kl")
    _close(est[0], [10.0, 10.0, 10.0, math.exp(-0.5) + 0.5 - 1], "metric")
    est.sum().backward()
    _close(logp.grad[0], [0.0, 0.0, 0.0, 1 - math.exp(-0.5)], "grad")


def test_hand_bias_corrected_kl_and_rollout_ratio():
    lp0, lp1 = _hand_logp(LOGITS[0], 1), _hand_logp(LOGITS[1], 2)
    old0, old1 = lp0 - 0.1, lp1 + 0.05
    ref0, ref1 = lp0 + 0.3, lp1 - 0.4
    a, beta = -1.0, 0.2
    r = [math.exp(0.1), math.exp(-0.05)]
    assert all(0.8 < x < 1.2 for x in r)
    k3 = [math.exp(x) - x - 1 for x in (0.3, -0.4)]
    rho = [0.5, 2.0]
    per_token = [rho[t] * -(r[t] * a) + beta * k3[t] * r[t] for t in range(2)]
    cfg = LossConfig(loss_type="grpo", beta=beta, use_bias_correction_kl=True)
    ratio = torch.tensor([rho], dtype=F64)
    loss, metrics, _ = _loss(cfg, [a], [old0, old1], ref=[ref0, ref1], importance_ratio=ratio)
    _close(loss, sum(per_token) / 2)
    _close(metrics["kl"], (k3[0] * r[0] + k3[1] * r[1]) / 2, "metric")


def test_hand_dr_grpo_and_luspo_gradient_on_policy():
    # On-policy, beta = 0, B = 1: loss = -A * sum_t r_t / N with r_t = exp(logp - sg(logp)) = 1, so
    # d loss / d z_{t,v} = -A / N * (1[v = id_t] - p_{t,v}). N = max_completion_length (dr_grpo) or 1 (luspo).
    a = 0.8
    for loss_type, n in (("dr_grpo", 4), ("luspo", 1), ("grpo", 2)):
        logits = torch.tensor([LOGITS], dtype=F64, requires_grad=True)
        cfg = LossConfig(loss_type=loss_type, beta=0.0, max_completion_length=4)
        loss, metrics, _ = R.grpo_loss(logits, torch.tensor([IDS]), torch.tensor([a], dtype=F64), config=cfg)
        _close(loss, -a * 2 / n)
        loss.backward()
        expected = []
        for t, row in enumerate(LOGITS):
            lse = math.log(sum(math.exp(z) for z in row))
            expected.append([-a / n * ((v == IDS[t]) - math.exp(z - lse)) for v, z in enumerate(row)])
        _close(logits.grad[0], expected, f"grad: {loss_type}")


def test_cispo_coefficient_is_detached():
    # Uncapped CISPO ratio: the gradient is -sg(r) A dlogp / N, no term from d r.
    lp = [_hand_logp(LOGITS[t], IDS[t]) for t in range(2)]
    old = [lp[0] - 0.2, lp[1] + 0.1]
    a = 1.3
    logits = torch.tensor([LOGITS], dtype=F64, requires_grad=True)
    cfg = LossConfig(loss_type="cispo", beta=0.0, epsilon_high=5.0)
    loss, _, _ = R.grpo_loss(logits, torch.tensor([IDS]), torch.tensor([a], dtype=F64),
                             old_logprobs=torch.tensor([old], dtype=F64), config=cfg)  # fmt: skip
    loss.backward()
    expected = []
    for t, row in enumerate(LOGITS):
        lse = math.log(sum(math.exp(z) for z in row))
        r = math.exp(lp[t] - old[t])
        expected.append([-r * a / 2 * ((v == IDS[t]) - math.exp(z - lse)) for v, z in enumerate(row)])
    _close(logits.grad[0], expected, "grad: cispo")


# ----------------------------------------------------------------------------- gradcheck


def _gradcheck_inputs(seed, b=2, t=3, v=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=F64)
    ids = torch.randint(0, v, (b, t), generator=g)
    adv = torch.tensor([0.9, -1.1], dtype=F64)[:b]
    mask = torch.ones(b, t, dtype=F64)
    mask[1, -1] = 0
    logp = R.token_logprobs(logits, ids, 0.7)
    # old_logprobs must be given: with old = sg(logp) a finite difference moves old with logp and
    # sees ratio 1 everywhere, which is not the (correct) analytic gradient of the surrogate.
    old = logp + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    ref = logp + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    ratio = 0.5 + torch.rand(b, t, generator=g, dtype=F64)
    return logits.requires_grad_(), ids, adv, mask, old, ref, ratio


def _vespo_constant_phi(logits, ids, mask, tau, cfg):
    """vespo's weight is detached by design, so a finite difference agrees with the analytic gradient only
    where phi is locally constant: old 12 nats above logp clamps log w at log 1e-8, and k = 0 leaves
    phi = exp(lambda (1 - 1e-8)) (the unclamped weight is checked by hand and against TRL)."""
    old = R.token_logprobs(logits.detach(), ids, tau) + 12.0
    assert bool(((R.token_logprobs(logits.detach(), ids, tau) - old) * mask).sum(-1).le(-20).all())
    return old, cfg.replace(vespo_k_pos=0.0, vespo_k_neg=0.0)


KL_OPTIONS = (("off", None), ("k1", False), ("k2", False), ("k3", False), ("low_var_kl", False), ("k3", True))
# delta is accepted (and, as in TRL, ignored) by cispo and sapo: those cases check it changes nothing.
GRADCHECK_CASES = list(itertools.product(LOSS_TYPES, ("token", "sequence"), (False, True), KL_OPTIONS))


@pytest.mark.parametrize("loss_type,level,delta,kl", GRADCHECK_CASES, ids=str)
def test_gradcheck_grpo_loss(loss_type, level, delta, kl):
    est, bias = kl
    logits, ids, adv, mask, old, ref, ratio = _gradcheck_inputs(seed=len(loss_type) + 7 * (level == "token"))
    cfg = LossConfig(
        loss_type=loss_type,
        importance_sampling_level=level,
        delta=1.5 if delta else None,
        # cispo's capped ratio is detached by design; with every ratio above the cap it is a constant,
        # so the finite-difference gradient equals the analytic one (the uncapped case is tested by hand).
        epsilon_high=0.3 if loss_type == "cispo" else None,
        beta=0.0 if est == "off" else 0.1,
        kl_estimator="k3" if est == "off" else est,
        use_bias_correction_kl=bool(bias),
        temperature=0.7,
        entropy_coef=0.05,
        max_completion_length=4,
    )
    if loss_type == "cispo":
        assert bool((torch.exp(R.token_logprobs(logits, ids, 0.7) - old) > 0.3).all())
    if loss_type == "vespo":
        old, cfg = _vespo_constant_phi(logits, ids, mask, 0.7, cfg)

    def f(x, c=cfg):
        return R.grpo_loss(x, ids, adv, mask, old, ref, c, importance_ratio=ratio, num_items_in_batch=9)[0]

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)
    if delta and loss_type not in PPO:
        assert f(logits.detach()) == f(logits.detach(), cfg.replace(delta=None))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_grpo_loss_defaults(loss_type):
    # temperature 1, no entropy bonus, no rollout ratio, (B, T) advantages.
    logits, ids, _, mask, old, ref, _ = _gradcheck_inputs(seed=3)
    adv = torch.randn(2, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    cfg = LossConfig(
        beta=0.04, loss_type=loss_type, max_completion_length=3, epsilon_high=0.3 if loss_type == "cispo" else None
    )
    if loss_type == "cispo":
        assert bool((torch.exp(R.token_logprobs(logits, ids) - old) > 0.3).all())
    if loss_type == "vespo":
        old, cfg = _vespo_constant_phi(logits, ids, mask, 1.0, cfg)

    def f(x):
        return R.grpo_loss(x, ids, adv, mask, old, ref, cfg)[0]

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("tau", (1.0, 0.7, 1.5))
def test_gradcheck_token_stats(tau):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 3, 7, generator=g, dtype=F64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda x: R.token_logprobs(x, ids, tau), (logits,))
    assert torch.autograd.gradcheck(lambda x: R.token_entropy(x, tau), (logits,))


# ----------------------------------------------------------------------------- invariants


def _rand(seed, b=3, t=4, v=11, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, t, v, generator=g, dtype=F64) * scale,
        torch.randint(0, v, (b, t), generator=g),
        g,
    )


def test_logprobs_invariant_to_row_constant_shift():
    logits, ids, g = _rand(0)
    shift = torch.randn(3, 4, 1, generator=g, dtype=F64) * 100
    for tau in (1.0, 0.7):
        assert_close(R.token_logprobs(logits + shift, ids, tau), R.token_logprobs(logits, ids, tau), F64, "logprob")
        assert_close(R.token_entropy(logits + shift, tau), R.token_entropy(logits, tau), F64, "entropy")


def test_logprobs_invariant_to_vocab_permutation():
    logits, ids, g = _rand(1)
    perm = torch.randperm(11, generator=g)
    inv = torch.argsort(perm)
    permuted = logits[..., perm]  # permuted[..., j] = logits[..., perm[j]]
    assert_close(R.token_logprobs(permuted, inv[ids]), R.token_logprobs(logits, ids), F64, "logprob")
    assert_close(R.token_entropy(permuted), R.token_entropy(logits), F64, "entropy")
    # The whole loss (and its gradient, permuted back) is invariant too.
    cfg = LossConfig(loss_type="grpo", beta=0.0, entropy_coef=0.1)
    adv = torch.randn(3, generator=g, dtype=F64)
    x1, x2 = logits.clone().requires_grad_(), permuted.clone().requires_grad_()
    l1 = R.grpo_loss(x1, ids, adv, config=cfg)[0]
    l2 = R.grpo_loss(x2, inv[ids], adv, config=cfg)[0]
    assert_close(l2, l1, F64, "loss")
    (l1 + l2).backward()
    assert_close(x2.grad, x1.grad[..., perm], F64, "grad")


def test_softmax_of_logprobs_sums_to_one_and_entropy_bounds():
    logits, _, _ = _rand(2, v=13)
    full = torch.stack([R.token_logprobs(logits, torch.full((3, 4), v)) for v in range(13)], -1)
    assert_close(full.exp().sum(-1), torch.ones(3, 4, dtype=F64), F64, "logprob")
    h = R.token_entropy(logits)
    assert bool((h >= 0).all()) and bool((h <= math.log(13) + 1e-12).all())


def test_on_policy_ratio_is_one_but_gradient_flows():
    logits, ids, g = _rand(3)
    x = logits.clone().requires_grad_()
    logp = R.token_logprobs(x, ids)
    mask = torch.ones_like(logp)
    log_w = R.log_importance_weights(logp, logp.detach(), mask, "token", 20.0)
    assert bool((torch.exp(log_w) == 1).all())  # exactly 1, not approximately
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    loss, metrics = R.grpo_objective(logp, None, adv, mask, config=LossConfig(loss_type="grpo", beta=0.0))
    assert metrics["clip_ratio/region_mean"] == 0
    _close(loss, -float(adv.mean()))
    loss.backward()
    assert float(x.grad.abs().max()) > 1e-3
    # It is the REINFORCE gradient: -A_i / T d logp.
    y = logits.clone().requires_grad_()
    (-(R.token_logprobs(y, ids) * adv[:, None]).sum() / (3 * 4)).backward()
    assert_close(x.grad, y.grad, F64, "grad")


def test_k3_is_nonnegative_and_zero_on_policy():
    g = torch.Generator().manual_seed(4)
    logp = torch.randn(1000, dtype=F64, generator=g) * 10
    ref = torch.randn(1000, dtype=F64, generator=g) * 10
    assert bool((R.kl_penalty(logp, ref, "k3") >= 0).all())
    assert bool((R.kl_penalty(logp, ref, "low_var_kl") >= 0).all())
    assert bool((R.kl_penalty(logp, ref, "k2") >= 0).all())
    assert bool((R.kl_penalty(logp, logp, "k3") == 0).all())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("num_items", (None, 23))
def test_aggregation_weights_match_aggregate(loss_type, num_items):
    g = torch.Generator().manual_seed(5)
    l = torch.randn(4, 6, generator=g, dtype=F64)
    mask = (torch.rand(4, 6, generator=g) > 0.4).to(F64)
    mask[2] = 0  # a fully masked row
    for ga, spg in ((1, None), (2, None), (2, 4)):
        cfg = LossConfig(beta=0.04, loss_type=loss_type, max_completion_length=7, gradient_accumulation_steps=ga)
        cfg = cfg.replace(steps_per_generation=spg)
        w = R.aggregation_weights(mask, cfg, num_items)
        assert_close((w * l).sum(), R.aggregate(l, mask, cfg, num_items), F64, f"loss: {loss_type} ga={ga}")
        assert bool((w[mask == 0] == 0).all())


# ----------------------------------------------------------------------------- advantages


REWARDS = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0]  # two groups of G = 4


def _hand_advantages(rewards, g, scale, estimator, eps=1e-4):
    out = []
    batch_std = statistics.stdev(rewards)
    for k in range(0, len(rewards), g):
        grp = rewards[k : k + g]
        mean = sum(grp) / g
        for r in grp:
            if estimator == "rloo":
                c = r - (sum(grp) - r) / (g - 1)  # leave-one-out baseline, from the definition
            else:
                c = r - mean
            if scale == "group":
                c /= statistics.stdev(grp) + eps
            elif scale == "batch":
                c /= batch_std + eps
            out.append(c)
    return out


@pytest.mark.parametrize("estimator", ("grpo", "rloo"))
@pytest.mark.parametrize("scale", ("group", "batch", "none"))
def test_group_advantages_by_hand(estimator, scale):
    rewards = torch.tensor(REWARDS, dtype=F64)
    expected = _hand_advantages(REWARDS, 4, scale, estimator)
    _close(R.group_advantages(rewards, 4, scale, estimator), expected, "metric")
    _close(grpo_fast.group_advantages(rewards, 4, scale, estimator), expected, "metric")
    # The public function keeps float32 rewards in float32.
    assert grpo_fast.group_advantages(rewards.float(), 4, scale, estimator).dtype == torch.float32


def test_group_advantages_special_cases():
    rewards = torch.tensor(REWARDS, dtype=F64)
    # RLOO identity: A = G / (G - 1) (r - mean).
    grpo = R.group_advantages(rewards, 4, "none", "grpo")
    assert_close(R.group_advantages(rewards, 4, "none", "rloo"), grpo * 4 / 3, F64, "metric")
    # A group of one has no baseline: advantage 0, for every estimator and scale.
    for est, scale in itertools.product(("grpo", "rloo"), ("group", "batch", "none")):
        assert bool((grpo_fast.group_advantages(rewards, 1, scale, est) == 0).all())
    # All-equal rewards in a group: 0, not NaN (std 0 + eps).
    same = grpo_fast.group_advantages(torch.tensor([3.0, 3.0, 3.0, 1.0, 0.0, 2.0]), 3)
    assert bool((same[:3] == 0).all()) and bool(torch.isfinite(same).all())
    # Group-mean centring: each group's advantages sum to 0.
    a = grpo_fast.group_advantages(rewards, 4, "group")
    assert_close(a.view(2, 4).sum(1), torch.zeros(2, dtype=F64), F64, "metric", scale=1.0)
    assert grpo_fast.group_advantages(torch.zeros(0), 4).shape == (0,)


def test_rollout_importance_ratio_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.0]], dtype=F64)
    samp = torch.tensor([[-1.5, -0.5, -0.5], [-2.0, -3.2, -9.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=F64)
    d = [[0.5, -1.5, 0.0], [1.9, 0.2, 0.0]]  # (old - sampling) * mask
    rho = [[math.exp(x) for x in row] for row in d]  # [[1.65, 0.22, 1], [6.69, 1.22, 1]]
    trunc = [[min(max(x, 0.0), 3.0) for x in row] for row in rho]
    _close(R.rollout_importance_ratio(old, samp, mask, "token", "truncate"), trunc, "metric")
    masked = [[x if 0.5 <= x <= 3.0 else 0.0 for x in row] for row in rho]
    _close(R.rollout_importance_ratio(old, samp, mask, "token", "mask", 0.5, 3.0), masked, "metric")
    seq = [math.exp(sum(row)) for row in d]  # exp(-1.0) = 0.37, exp(2.1) = 8.17
    _close(
        R.rollout_importance_ratio(old, samp, mask, "sequence", "truncate", 0.5, 3.0),
        [[0.5], [3.0]],
        "metric",
    )
    _close(
        R.rollout_importance_ratio(old, samp, mask, "sequence", "mask", 0.0, 10.0),
        [[s] for s in seq],
        "metric",
    )
    _close(R.rollout_importance_ratio(old, samp, mask, "sequence", "mask", 0.5, 3.0), [[0.0], [0.0]], "metric")
    # The correction is a constant weight: no gradient flows into it.
    assert not R.rollout_importance_ratio(old.requires_grad_(), samp, mask).requires_grad


def test_reference_masked_outputs_are_zero():
    logits, ids, g = _rand(6)
    mask = torch.ones(3, 4, dtype=F64)
    mask[0] = 0
    mask[1, 2:] = 0
    x = logits.clone().requires_grad_()
    cfg = LossConfig(loss_type="grpo", beta=0.04, entropy_coef=0.1)
    ref = R.token_logprobs(logits, ids) + 0.1
    loss, _, logp = R.grpo_loss(x, ids, torch.randn(3, generator=g, dtype=F64), mask, ref_logprobs=ref, config=cfg)
    loss.backward()
    assert bool((logp[mask == 0] == 0).all())
    assert bool((x.grad[mask == 0] == 0).all())
    assert bool((x.grad[mask == 1].abs().sum(-1) > 0).all())


def test_reference_entropy_gradient_finite_with_neg_inf_logits():
    # A -inf logit (a banned token) has p = 0 and contributes nothing to the entropy; the gradient with
    # respect to the other logits must equal the one computed without that vocabulary entry.
    logits, _, _ = _rand(7, v=6)
    x = torch.cat([logits, torch.full((3, 4, 1), float("-inf"), dtype=F64)], -1).requires_grad_()
    y = logits.clone().requires_grad_()
    R.token_entropy(x, 0.7).sum().backward()
    R.token_entropy(y, 0.7).sum().backward()
    assert_close(R.token_entropy(x.detach(), 0.7), R.token_entropy(logits, 0.7), F64, "entropy")
    assert_close(x.grad[..., :6], y.grad, F64, "grad: entropy with a -inf logit")
    assert bool((x.grad[..., 6] == 0).all())
