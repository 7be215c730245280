"""Every bad input the public API must reject, as a ValueError / TypeError whose message names the argument.

BAD_INPUTS below is the full list (one row per kind of bad input; test_bad_input_count checks there are
at least 25). Each row: id, the call, the expected exception type, a regex the message must match (the
argument's name). Plus: inputs that look odd but are valid are accepted, and backend="triton" on CPU
without TRITON_INTERPRET is refused (in a subprocess, since tests/conftest.py sets the variable).
Run: pytest tests/test_validation.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import grpo_fast
from grpo_fast import GRPOLoss, LossConfig

B, T, V = 2, 3, 5
_G = torch.Generator().manual_seed(0)
LOGITS = torch.randn(B, T, V, generator=_G)
IDS = torch.randint(0, V, (B, T), generator=_G)
ADV = torch.randn(B, generator=_G)
MASK = torch.ones(B, T)
LOGP = torch.zeros(B, T)
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.5])


pytestmark = pytest.mark.usefixtures("one_thread")


def loss(**changes):
    """grpo_loss on valid inputs, with some arguments replaced."""
    kw = dict(
        logits=LOGITS,
        completion_ids=IDS,
        advantages=ADV,
        completion_mask=MASK,
        old_logprobs=LOGP,
        ref_logprobs=LOGP,
        config=LossConfig(loss_type="grpo", beta=0.04),
        backend="torch",
    )
    kw.update(changes)
    return lambda: grpo_fast.grpo_loss(**kw)


def logprobs(**changes):
    kw = dict(logits=LOGITS, ids=IDS, temperature=1.0, return_entropy=True, backend="torch", mask=None)
    kw.update(changes)
    return lambda: grpo_fast.token_logprobs(**kw)


def config(**kw):
    return lambda: LossConfig(**kw)


def advantages(rewards=REWARDS, group_size=2, **kw):
    return lambda: grpo_fast.group_advantages(rewards, group_size, **kw)


def rollout_ratio(**kw):
    return lambda: grpo_fast.rollout_importance_ratio(LOGP, LOGP - 0.1, MASK, **kw)


def _ids(value, where=(0, 0)):
    ids = IDS.clone()
    ids[where] = value
    return ids


def _mask(value, dtype=torch.float32):
    mask = torch.ones(B, T, dtype=dtype)
    mask[0, 1] = value
    return mask


VE, TE = ValueError, TypeError

BAD_INPUTS = [
    # --- grpo_loss: tensor ranks, shapes, dtypes
    ("logits rank 2", loss(logits=LOGITS[0]), VE, "logits"),
    ("logits rank 4", loss(logits=LOGITS[None]), VE, "logits"),
    ("logits int dtype", loss(logits=LOGITS.long()), TE, "logits"),
    ("logits not a tensor", loss(logits=LOGITS.tolist()), TE, "logits"),
    ("completion_ids rank 1", loss(completion_ids=IDS[0]), VE, "completion_ids"),
    ("completion_ids batch mismatch", loss(completion_ids=IDS[:1]), VE, "completion_ids"),
    ("completion_ids length mismatch", loss(completion_ids=IDS[:, :2]), VE, "completion_ids"),
    ("completion_ids float dtype", loss(completion_ids=IDS.float()), TE, "completion_ids"),
    ("completion_ids negative", loss(completion_ids=_ids(-1)), VE, "completion_ids"),
    ("completion_ids == V", loss(completion_ids=_ids(V)), VE, "completion_ids"),
    ("completion_ids >> V", loss(completion_ids=_ids(10**6, (1, 2))), VE, "completion_ids"),
    ("advantages wrong batch", loss(advantages=torch.randn(B + 1)), VE, "advantages"),
    ("advantages (B, T + 1)", loss(advantages=torch.randn(B, T + 1)), VE, "advantages"),
    ("advantages rank 3", loss(advantages=torch.randn(B, T, 1)), VE, "advantages"),
    ("advantages rank 0", loss(advantages=torch.tensor(1.0)), VE, "advantages"),
    ("advantages int dtype", loss(advantages=torch.ones(B, dtype=torch.long)), TE, "advantages"),
    ("completion_mask wrong shape", loss(completion_mask=MASK[:, :2]), VE, "completion_mask"),
    ("completion_mask rank 3", loss(completion_mask=MASK[..., None]), VE, "completion_mask"),
    ("completion_mask value 0.5", loss(completion_mask=_mask(0.5)), VE, "completion_mask"),
    ("completion_mask value -1", loss(completion_mask=_mask(-1.0)), VE, "completion_mask"),
    ("completion_mask int value 2", loss(completion_mask=_mask(2, torch.int64)), VE, "completion_mask"),
    ("completion_mask NaN", loss(completion_mask=_mask(float("nan"))), VE, "completion_mask"),
    ("old_logprobs wrong shape", loss(old_logprobs=LOGP[:, :2]), VE, "old_logprobs"),
    ("old_logprobs rank 1", loss(old_logprobs=LOGP[0]), VE, "old_logprobs"),
    ("old_logprobs int dtype", loss(old_logprobs=LOGP.long()), TE, "old_logprobs"),
    ("ref_logprobs wrong shape", loss(ref_logprobs=torch.zeros(B, T + 1)), VE, "ref_logprobs"),
    ("ref_logprobs batch mismatch", loss(ref_logprobs=torch.zeros(B + 1, T)), VE, "ref_logprobs"),
    ("importance_ratio wrong shape", loss(importance_ratio=torch.ones(B, 2)), VE, "importance_ratio"),
    (
        "importance_ratio int dtype",
        loss(importance_ratio=torch.ones(B, T, dtype=torch.long)),
        TE,
        "importance_ratio",
    ),
    (
        "num_items_in_batch negative",
        loss(config=LossConfig(beta=0.04, loss_type="dapo"), num_items_in_batch=-1),
        VE,
        "num_items_in_batch",
    ),  # fmt: skip
    (
        "num_items_in_batch NaN",
        loss(config=LossConfig(beta=0.04, loss_type="dapo"), num_items_in_batch=float("nan")),
        VE,
        "num_items_in_batch",
    ),  # fmt: skip
    # --- grpo_loss: config-dependent requirements
    (
        "beta > 0 without ref_logprobs",
        loss(ref_logprobs=None, config=LossConfig(loss_type="grpo", beta=0.04)),
        VE,
        "ref_logprobs",
    ),
    ("config not a LossConfig", loss(config={"loss_type": "grpo"}), TE, "config"),
    ("unknown backend", loss(backend="cuda"), VE, "backend"),
    ("GRPOLoss config not a LossConfig", lambda: GRPOLoss({"beta": 0.0}), TE, "config"),
    # --- LossConfig
    ("dr_grpo without max_completion_length", config(loss_type="dr_grpo"), VE, "max_completion_length"),
    (
        "max_completion_length 0",
        config(loss_type="dr_grpo", max_completion_length=0),
        VE,
        "max_completion_length",
    ),
    ("unknown loss_type", config(loss_type="ppo"), VE, "loss_type"),
    (
        "unknown importance_sampling_level",
        config(importance_sampling_level="sentence"),
        VE,
        "importance_sampling_level",
    ),  # fmt: skip
    ("unknown kl_estimator", config(kl_estimator="k4"), VE, "kl_estimator"),
    ("temperature 0", config(temperature=0.0), VE, "temperature"),
    ("temperature negative", config(temperature=-0.7), VE, "temperature"),
    ("temperature NaN", config(temperature=float("nan")), VE, "temperature"),
    ("temperature a string", config(temperature="0.7"), TE, "temperature"),
    ("epsilon negative", config(epsilon=-0.1), VE, "epsilon"),
    ("epsilon_high negative", config(epsilon_high=-0.1), VE, "epsilon_high"),
    ("delta <= 1 + epsilon", config(delta=1.1), VE, "delta"),
    ("delta <= 1 + epsilon_high", config(epsilon_high=0.28, delta=1.25), VE, "delta"),
    ("beta negative", config(beta=-0.01), VE, "beta"),
    (
        "gradient_accumulation_steps 0",
        config(gradient_accumulation_steps=0),
        VE,
        "gradient_accumulation_steps",
    ),
    (
        "gradient_accumulation_steps float",
        config(gradient_accumulation_steps=2.0),
        TE,
        "gradient_accumulation_steps",
    ),
    ("sapo_temperature_neg 0", config(sapo_temperature_neg=0.0), VE, "sapo_temperature_neg"),
    ("vespo_lambda_pos 0", config(vespo_lambda_pos=0.0), VE, "vespo_lambda_pos"),
    ("vespo_k_neg negative", config(vespo_k_neg=-1.0), VE, "vespo_k_neg"),
    ("vespo_k_pos inf", config(vespo_k_pos=float("inf")), VE, "vespo_k_pos"),
    ("policy_mask wrong shape", loss(policy_mask=torch.ones(B, 2)), VE, "policy_mask"),
    ("policy_mask int dtype", loss(policy_mask=torch.ones(B, T, dtype=torch.long)), TE, "policy_mask"),
    ("entropy_mask per sequence", loss(entropy_mask=torch.ones(B, 1)), VE, "entropy_mask"),
    # --- token_logprobs
    ("token_logprobs temperature 0", logprobs(temperature=0.0), VE, "temperature"),
    ("token_logprobs temperature negative", logprobs(temperature=-1.0), VE, "temperature"),
    ("token_logprobs temperature inf", logprobs(temperature=float("inf")), VE, "temperature"),
    ("token_logprobs logits rank 2", logprobs(logits=LOGITS[0]), VE, "logits"),
    ("token_logprobs logits int dtype", logprobs(logits=LOGITS.long()), TE, "logits"),
    ("token_logprobs ids shape mismatch", logprobs(ids=IDS[:, :2]), VE, "ids"),
    ("token_logprobs ids negative", logprobs(ids=_ids(-3)), VE, "ids"),
    ("token_logprobs ids >= V", logprobs(ids=_ids(V)), VE, "ids"),
    ("token_logprobs ids float", logprobs(ids=IDS.double()), TE, "ids"),
    ("token_logprobs mask value 0.5", logprobs(mask=_mask(0.5)), VE, "mask"),
    ("token_logprobs mask wrong shape", logprobs(mask=MASK[:1]), VE, "mask"),
    ("token_logprobs unknown backend", logprobs(backend="numpy"), VE, "backend"),
    # --- group_advantages
    ("group_size 0", advantages(group_size=0), VE, "group_size"),
    ("group_size negative", advantages(group_size=-2), VE, "group_size"),
    ("group_size float", advantages(group_size=2.0), (VE, TE), "group_size"),
    ("group_size bool", advantages(group_size=True), (VE, TE), "group_size"),
    ("rewards not a multiple of group_size", advantages(group_size=3), VE, "group_size"),
    ("rewards NaN", advantages(rewards=torch.tensor([1.0, float("nan"), 0.0, 1.0])), VE, "rewards"),
    ("rewards inf", advantages(rewards=torch.tensor([1.0, float("inf"), 0.0, 1.0])), VE, "rewards"),
    ("rewards rank 2", advantages(rewards=REWARDS.view(2, 2)), VE, "rewards"),
    ("rewards int dtype", advantages(rewards=torch.tensor([1, 0, 1, 1])), TE, "rewards"),
    ("unknown scale", advantages(scale="std"), VE, "scale"),
    ("unknown estimator", advantages(estimator="ppo"), VE, "estimator"),
    # --- rollout_importance_ratio (public, exported from grpo_fast)
    ("rollout ratio unknown mode", rollout_ratio(mode="clip"), VE, "mode"),
    ("rollout ratio unknown level", rollout_ratio(level="sentence"), VE, "level"),
]


def test_bad_input_count():
    ids = [row[0] for row in BAD_INPUTS]
    assert len(set(ids)) == len(ids)
    assert len(ids) >= 25, len(ids)


@pytest.mark.parametrize("name,call,exc,match", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_rejected(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# Odd-looking but legal inputs (and the table's base inputs, so each BAD_INPUTS row fails for its one change).
ACCEPTED = [
    ("base inputs", {}),
    ("int32 ids", dict(completion_ids=IDS.int())),
    ("bool mask", dict(completion_mask=MASK.bool())),
    ("int mask", dict(completion_mask=MASK.long())),
    ("(B, 1) importance_ratio", dict(importance_ratio=torch.ones(B, 1))),
    ("(B, T) advantages", dict(advantages=torch.randn(B, T))),
    ("beta 0 without ref_logprobs", dict(ref_logprobs=None, config=LossConfig(loss_type="grpo", beta=0.0))),
    ("int temperature", dict(config=LossConfig(loss_type="grpo", beta=0.04, temperature=2))),
    (
        "num_items_in_batch tensor",
        dict(config=LossConfig(beta=0.04, loss_type="dapo"), num_items_in_batch=torch.tensor(12)),
    ),
    # check_ids validates ids only where the mask is 1: padding ids at masked positions are legal.
    ("id >= V at a masked position", dict(completion_ids=_ids(V + 7, (0, 1)), completion_mask=_mask(0.0))),
    ("id -100 at a masked position", dict(completion_ids=_ids(-100, (0, 1)), completion_mask=_mask(0.0))),
]


@pytest.mark.parametrize("backend", ("torch", "reference"))
@pytest.mark.parametrize("name,changes", ACCEPTED, ids=[row[0] for row in ACCEPTED])
def test_legal_inputs_accepted(name, changes, backend):
    out = loss(backend=backend, **changes)()
    assert bool(torch.isfinite(out.loss)) and bool(torch.isfinite(out.logprobs).all())


@pytest.mark.parametrize("backend", ("torch", "reference"))
def test_legal_token_logprobs_inputs_accepted(backend):
    assert bool(torch.isfinite(logprobs(backend=backend, temperature=1)().logprobs).all())
    out = logprobs(backend=backend, ids=_ids(-100, (0, 1)), mask=_mask(0.0))()
    assert bool(torch.isfinite(out.logprobs).all()) and float(out.logprobs[0, 1]) == 0.0


def test_triton_backend_on_cpu_without_interpreter():
    # tests/conftest.py sets TRITON_INTERPRET=1 for this process; the check must be seen without it.
    code = textwrap.dedent(
        """
        import torch, grpo_fast
        x = torch.randn(2, 3, 5)
        ids = torch.zeros(2, 3, dtype=torch.long)
        try:
            grpo_fast.grpo_loss(x, ids, torch.zeros(2), config=grpo_fast.LossConfig(beta=0.0), backend="triton")
        except ValueError as e:
            print("ValueError:", e)
        try:
            grpo_fast.token_logprobs(x, ids, backend="triton")
        except ValueError as e:
            print("ValueError:", e)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("ValueError:")]
    assert len(lines) == 2, run.stdout + run.stderr
    assert all("backend" in line for line in lines), lines
