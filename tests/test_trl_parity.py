"""Parity with TRL's own loss code: ``trl.GRPOTrainer._compute_loss`` run on a stand-in trainer.

TRL 1.16 gets per-token log-probs and entropies from the model (a fused lm-head forward); the stand-in's
``_get_per_token_logps_and_entropies`` supplies them instead, from one float32 logits tensor through
TRL's own ``selective_log_softmax_and_entropy`` (logits / temperature, differentiable entropy). Everything
after that -- ratios, clipping, KL, the loss-type normalisers, the entropy bonus, the metrics -- is TRL's
code, unmodified. Compared with ``grpo_fast.grpo_loss`` (backends "reference" and "torch"): the loss, the
gradient with respect to the logits and the logged metrics, within the float32 rows of tests/tolerances.py.

Config mapping: TRL epsilon_low = our ``epsilon``; TRL epsilon_high = our ``eps_high`` (epsilon_high or
epsilon); TRL args.steps_per_generation = our steps_per_generation or gradient_accumulation_steps; TRL's
vLLM importance-sampling correction (use_vllm + vllm_importance_sampling_correction) = our
``importance_ratio``. TRL's KL is always k3.
Run: pytest tests/test_trl_parity.py   (importing trl takes a few seconds)
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch
from tolerances import assert_close

pytest.importorskip("trl", reason="needs trl: pip install 'grpo-fast[trl]'")
pytest.importorskip("trl.trainer.grpo_trainer", exc_type=ImportError)  # TRL's trainer imports accelerate, datasets

from trl import GRPOTrainer  # noqa: E402
from trl.trainer.utils import selective_log_softmax_and_entropy  # noqa: E402

import grpo_fast  # noqa: E402
from grpo_fast import LossConfig  # noqa: E402

F32 = torch.float32
B, T, V = 4, 6, 33
MEAN_METRICS = (
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "vespo/phi_seq_mean",
)


pytestmark = pytest.mark.usefixtures("one_thread")


class _OneProcessAccelerator:
    """accelerate's collective ops on a single process: identities."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def _stand_in(cfg: LossConfig, logits: torch.Tensor, use_vllm: bool):
    """An object carrying every attribute ``GRPOTrainer._compute_loss`` reads, with the method bound to it."""
    args = types.SimpleNamespace(
        delta=cfg.delta,
        use_bias_correction_kl=cfg.use_bias_correction_kl,
        sapo_temperature_pos=cfg.sapo_temperature_pos,
        sapo_temperature_neg=cfg.sapo_temperature_neg,
        vespo_k_pos=cfg.vespo_k_pos,
        vespo_lambda_pos=cfg.vespo_lambda_pos,
        vespo_k_neg=cfg.vespo_k_neg,
        vespo_lambda_neg=cfg.vespo_lambda_neg,
        steps_per_generation=cfg.steps_per_generation or cfg.gradient_accumulation_steps,
    )
    trainer = types.SimpleNamespace(
        args=args,
        loss_type=cfg.loss_type,
        importance_sampling_level=cfg.importance_sampling_level,
        epsilon_low=cfg.epsilon,
        epsilon_high=cfg.eps_high,
        beta=cfg.beta,
        temperature=cfg.temperature,
        max_completion_length=cfg.max_completion_length,
        current_gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        accelerator=_OneProcessAccelerator(),
        model=types.SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=use_vllm,
        vllm_importance_sampling_correction=use_vllm,
        aux_loss_enabled=False,
        entropy_coef=cfg.entropy_coef,
        _entropy_bonus_enabled=cfg.entropy_coef != 0.0,
        use_adaptive_entropy=False,
    )

    def per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        ids = input_ids[:, -logits_to_keep:]
        logps, entropies = selective_log_softmax_and_entropy(logits, ids, temperature=self.temperature)
        return logps, entropies, None

    trainer._get_per_token_logps_and_entropies = types.MethodType(per_token_logps_and_entropies, trainer)
    trainer.get_gamma_weights = GRPOTrainer.get_gamma_weights  # a staticmethod: TRL's vespo weights
    trainer.compute_loss = types.MethodType(GRPOTrainer._compute_loss, trainer)
    return trainer


def _inputs(seed: int, temperature: float, off_policy: bool = True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2.0  # (B, T, V) float32
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.int64)  # TRL's completion mask is an int tensor
    mask[0, 4:] = 0  # a partially masked row (a short completion)
    mask[2] = 0  # a fully masked row (e.g. an overlong completion filtered out)
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5])
    logp = selective_log_softmax_and_entropy(logits, ids, temperature=temperature)[0]
    old = logp + 0.35 * torch.randn(B, T, generator=g) if off_policy else None  # ratios well away from 1
    ref = logp + 0.25 * torch.randn(B, T, generator=g)
    ratio = torch.where(mask > 0, 0.5 + torch.rand(B, T, generator=g), 1.0)  # 1 at padding, as TRL builds it
    return logits, ids, mask, adv, old, ref, ratio


def _run_trl(cfg, logits, ids, mask, adv, old, ref, ratio, num_items):
    x = logits.clone().requires_grad_()
    trainer = _stand_in(cfg, x, use_vllm=ratio is not None)
    inputs = {
        "prompt_ids": torch.zeros(B, 0, dtype=torch.int64),
        "prompt_mask": torch.zeros(B, 0, dtype=torch.int64),
        "completion_ids": ids,
        "completion_mask": mask,
        "advantages": adv,
        "num_items_in_batch": torch.tensor(float(mask.sum()) if num_items is None else float(num_items)),
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    if cfg.beta != 0.0:
        inputs["ref_per_token_logps"] = ref
    if ratio is not None:
        inputs["importance_sampling_ratio"] = ratio
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), x.grad, metrics


def _run_ours(cfg, backend, logits, ids, mask, adv, old, ref, ratio, num_items):
    x = logits.clone().requires_grad_()
    out = grpo_fast.grpo_loss(
        x,
        ids,
        adv,
        mask,
        old,
        ref if cfg.beta != 0.0 else None,
        config=cfg,
        importance_ratio=ratio,
        num_items_in_batch=num_items,
        backend=backend,
    )
    out.loss.backward()
    return out.loss.detach(), x.grad, {k: float(v) for k, v in out.metrics.items()}


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")


def _cases():
    base = dict(loss_type="grpo", beta=0.04, temperature=0.7, max_completion_length=8)
    cases = []
    for lt in LOSS_TYPES:
        for level in ("token", "sequence"):
            extra = {"epsilon_high": 5.0} if lt == "cispo" else {}
            cases.append((f"{lt}-{level}", dict(base, loss_type=lt, importance_sampling_level=level, **extra), {}))
    cases += [
        ("grpo-delta", dict(base, delta=1.3), {}),
        (
            "dapo-seq-delta-clip_higher",
            dict(base, loss_type="dapo", importance_sampling_level="sequence", delta=1.5, epsilon_high=0.28),
            {},
        ),
        ("grpo-bias-kl", dict(base, use_bias_correction_kl=True), {}),
        (
            "luspo-seq-bias-kl",
            dict(base, loss_type="luspo", importance_sampling_level="sequence", use_bias_correction_kl=True),
            {},
        ),  # fmt: skip
        ("grpo-entropy", dict(base, entropy_coef=0.05), {}),
        (
            "dapo-entropy-ga2",
            dict(base, loss_type="dapo", entropy_coef=0.05, gradient_accumulation_steps=2),
            {},
        ),
        ("bnpo-ga2", dict(base, loss_type="bnpo", gradient_accumulation_steps=2), {}),
        ("dr_grpo-ga2", dict(base, loss_type="dr_grpo", gradient_accumulation_steps=2), {}),
        (
            "sapo-ga2-entropy",
            dict(base, loss_type="sapo", gradient_accumulation_steps=2, entropy_coef=-0.02),
            {},
        ),
        ("dapo-num_items", dict(base, loss_type="dapo"), {"num_items": 57}),
        (
            "dapo-num_items-ga2-spg4",
            dict(base, loss_type="dapo", gradient_accumulation_steps=2, steps_per_generation=4),
            {"num_items": 57},
        ),  # fmt: skip
        (
            "cispo-num_items-ga2",
            dict(base, loss_type="cispo", epsilon_high=1.1, gradient_accumulation_steps=2),
            {"num_items": 40},
        ),  # fmt: skip
        ("grpo-beta0", dict(base, beta=0.0), {}),
        ("grpo-temp1", dict(base, temperature=1.0), {}),
        ("grpo-on-policy", dict(base), {"on_policy": True}),
        (
            "luspo-seq-on-policy",
            dict(base, loss_type="luspo", importance_sampling_level="sequence"),
            {"on_policy": True},
        ),  # fmt: skip
        ("grpo-rollout-ratio", dict(base), {"ratio": True}),
        ("vespo-rollout-ratio-in-phi", dict(base, loss_type="vespo"), {"ratio": True}),
        (
            "vespo-bias-kl-ga2",
            dict(base, loss_type="vespo", use_bias_correction_kl=True, gradient_accumulation_steps=2),
            {"num_items": 31},
        ),
        (
            "vespo-gamma-params-entropy",
            dict(
                base,
                loss_type="vespo",
                vespo_k_pos=0.5,
                vespo_lambda_pos=1.7,
                vespo_k_neg=1.25,
                vespo_lambda_neg=0.6,
                entropy_coef=0.05,
            ),
            {},
        ),
        ("vespo-on-policy", dict(base, loss_type="vespo"), {"on_policy": True}),
        (
            "dapo-seq-rollout-ratio",
            dict(base, loss_type="dapo", importance_sampling_level="sequence"),
            {"ratio": True},
        ),  # fmt: skip
    ]
    return cases


CASES = _cases()


def _compare(name, kwargs, extra, backend):
    cfg = LossConfig(**kwargs)
    logits, ids, mask, adv, old, ref, ratio = _inputs(
        extra.get("seed", len(name)), cfg.temperature, not extra.get("on_policy")
    )
    ratio = ratio if extra.get("ratio") else None
    num_items = extra.get("num_items")
    trl_loss, trl_grad, trl_metrics = _run_trl(cfg, logits, ids, mask, adv, old, ref, ratio, num_items)
    loss, grad, metrics = _run_ours(cfg, backend, logits, ids, mask, adv, old, ref, ratio, num_items)
    assert_close(loss, trl_loss, F32, f"loss: {name} {backend}")
    assert_close(grad, trl_grad, F32, f"grad: {name} {backend}")
    for key in MEAN_METRICS:
        assert (key in metrics) == (key in trl_metrics), f"{name}: metric {key!r} reported by only one side"
        if key in trl_metrics:
            assert_close(torch.tensor(metrics[key]), torch.tensor(trl_metrics[key]), F32, f"metric: {key} {name}")
    return trl_grad, trl_metrics, mask


@pytest.mark.parametrize("backend", ("reference", "torch"))
@pytest.mark.parametrize("name,kwargs,extra", CASES, ids=[c[0] for c in CASES])
def test_matches_trl(name, kwargs, extra, backend):
    trl_grad, trl_metrics, mask = _compare(name, kwargs, extra, backend)
    # The comparison is not vacuous: a non-zero gradient (on every active token row when the KL term
    # reaches all of them), none on masked rows.
    row_norm = trl_grad.abs().sum(-1)  # (B, T)
    assert bool((row_norm[mask == 0] == 0).all())
    assert float(row_norm.sum()) > 0
    if kwargs["beta"] > 0:
        assert bool((row_norm[mask == 1] > 0).all())
    if not extra.get("on_policy") and kwargs.get("loss_type", "grpo") in (
        "grpo",
        "bnpo",
        "dr_grpo",
        "dapo",
        "luspo",
    ):
        if kwargs.get("importance_sampling_level", "token") == "token":
            # Off-policy ratios (|log r| ~ 0.35) put tokens in the clip region.
            assert trl_metrics["clip_ratio/region_mean"] > 0, trl_metrics


def test_clip_metrics_both_sides_active():
    # One case with tokens clipped on both sides, so a swapped low/high mapping cannot pass.
    name, kwargs, extra = CASES[0]
    assert name == "grpo-token"
    _, metrics, _ = _compare(name, kwargs, {"seed": 0}, "torch")
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0, metrics


def test_trl_stand_in_is_sensitive():
    # The harness must be able to fail: a wrong epsilon mapping changes TRL's loss and clip metrics.
    name, kwargs, extra = CASES[0]
    cfg = LossConfig(**kwargs)
    logits, ids, mask, adv, old, ref, _ = _inputs(len(name), cfg.temperature)
    trl_loss, _, trl_metrics = _run_trl(cfg, logits, ids, mask, adv, old, ref, None, None)
    wrong = cfg.replace(epsilon=0.1)
    loss, _, metrics = _run_ours(wrong, "reference", logits, ids, mask, adv, old, ref, None, None)
    assert abs(float(loss) - float(trl_loss)) > 1e-4
    assert metrics["clip_ratio/region_mean"] != pytest.approx(trl_metrics["clip_ratio/region_mean"])


@pytest.mark.parametrize("backend", ("reference", "torch"))
def test_cispo_clip_ratio_metric(backend):
    # TRL logs cispo_clip_ratio = masked mean of (r > epsilon_high) & (A > 0); grpo_fast promises TRL's names.
    cfg = LossConfig(loss_type="cispo", epsilon_high=1.1, beta=0.0, temperature=0.7)
    logits, ids, mask, adv, old, ref, _ = _inputs(1, cfg.temperature)
    _, _, trl_metrics = _run_trl(cfg, logits, ids, mask, adv, old, ref, None, None)
    _, _, metrics = _run_ours(cfg, backend, logits, ids, mask, adv, old, ref, None, None)
    assert trl_metrics["cispo_clip_ratio"] > 0
    assert "cispo_clip_ratio" in metrics, f"grpo_fast reports {sorted(metrics)}, TRL also logs cispo_clip_ratio"
    assert_close(
        torch.tensor(metrics["cispo_clip_ratio"]),
        torch.tensor(trl_metrics["cispo_clip_ratio"]),
        F32,
        "metric",
    )


def test_token_masks_match_trl():
    """grpo_fast.objective's high-entropy and off-policy masks (our trainer's) equal TRL's on one process."""
    from grpo_fast.objective import high_entropy_mask, off_policy_mask

    accelerator = types.SimpleNamespace(pad_across_processes=lambda x, dim, pad_index: x, gather=lambda x: x)
    trainer = types.SimpleNamespace(accelerator=accelerator)
    logits, ids, mask, adv, old, _, _ = _inputs(3, 1.0)
    logp, entropy = selective_log_softmax_and_entropy(logits, ids)
    mask = mask.float()
    for q in (0.2, 0.5, 0.9):
        theirs = GRPOTrainer.get_high_entropy_mask(trainer, entropy, mask, 1.0 - q)
        ours = high_entropy_mask(entropy, mask, q)
        assert torch.equal(ours, theirs.float()), q
        assert 0 < float(ours.sum()) < float(mask.sum())
    for threshold in (-0.1, 0.0, 0.1):
        theirs = GRPOTrainer.get_off_policy_mask(adv.unsqueeze(1), logp, old, mask, threshold)
        ours = off_policy_mask(adv, logp, old, mask, threshold)
        assert torch.equal(ours, theirs), threshold
    assert float(off_policy_mask(adv, logp, old, mask, -1.0).sum()) == float((adv >= 0).sum())
    assert torch.equal(high_entropy_mask(entropy, torch.zeros_like(mask), 0.5), torch.zeros_like(mask))
