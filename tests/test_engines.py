"""Rollout engines and the trainer's rollout importance correction (TRL's vllm_importance_sampling_*).

A fake engine samples with the HF engine and reports sampling log-probs = the policy's own log-probs
minus a known perturbation delta, so the ratio the loss must get is rho = exp(delta) (per token, or
exp(sum delta) per sequence), truncated or masked to [clip_min, clip_max].
"""

import importlib.util

import pytest
import torch

import grpo_fast.trainer.update as trainer_module  # where the update calls the loss
from grpo_fast import rollout_importance_ratio
from grpo_fast.r1 import toy
from grpo_fast.trainer import GRPOConfig, GRPOTrainer
from grpo_fast.trainer.engines import Generation, HFEngine, group_uniforms, rollout_from_token_lists
from grpo_fast.trainer.modeling import position_ids_from_mask

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, 1 thread

G = 4


def tiny():
    tok = toy.build_tokenizer()
    return tok, toy.build_model(tok, seed=0, hidden_size=32, layers=1, heads=2, ffn=64)


def digit_share(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def config(out, **changes) -> GRPOConfig:
    base = dict(output_dir=str(out), seed=3, max_steps=1, learning_rate=1e-2, per_device_train_batch_size=8,
                gradient_accumulation_steps=2, num_generations=G, max_completion_length=10,
                vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=3.0)  # fmt: skip
    return GRPOConfig(**{**base, **changes})


class PerturbedEngine:
    """The engine interface with sampling log-probs: the HF sampler's tokens, and log-probs that are the
    model's own (full forward, tempered log-softmax) minus delta = 0.6 * k, k in {-2, ..., 2} per token."""

    returns_logprobs = True

    def __init__(self, model):
        self.model, self.sampler, self.synced, self.last = model, HFEngine(model), 0, None

    def sync_weights(self, model):
        self.synced += 1

    @torch.no_grad()
    def generate(self, prompt_ids, prompt_mask, group_seeds, group_size, settings):
        rollout = self.sampler.generate(prompt_ids, prompt_mask, group_seeds, group_size, settings).rollout
        ids = torch.cat([prompt_ids, rollout.completion_ids], 1)
        attention = torch.cat([prompt_mask, torch.ones_like(rollout.completion_ids)], 1)
        logits = self.model(ids, attention_mask=attention, position_ids=position_ids_from_mask(attention)).logits
        p, t = prompt_ids.shape[1], rollout.completion_ids.shape[1]
        logp = (logits[:, p - 1 : p + t - 1].float() / settings.temperature).log_softmax(-1)
        logp = logp.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)  # (B, T)
        b = torch.arange(len(logp))[:, None]
        delta = 0.6 * ((b + torch.arange(t)[None]) % 5 - 2).float()  # (B, T)
        mask = rollout.completion_mask.float()
        self.last = (rollout, logp * mask, delta * mask)
        return Generation(rollout, (logp - delta) * mask)


def run_step(tmp_path, data, **changes):
    """One trainer step with the fake engine; returns (engine, full ratio given to optimizer_step, the
    ratio given to each loss call, the rows of each update pass, metrics)."""
    tok, model = tiny()
    engine = PerturbedEngine(model)
    trainer = GRPOTrainer(model, digit_share, config(tmp_path, **changes), data["train"], tokenizer=tok, engine=engine)
    seen = {"loss_ratios": [], "micro_batches": [], "ratio": None}
    optimizer_step, micro_batches, loss = (
        trainer.optimizer_step,
        trainer.update_passes,
        trainer_module.linear_grpo_loss,
    )

    def recording_optimizer_step(batch, old, ref, ratio=None):
        seen["ratio"] = ratio
        return optimizer_step(batch, old, ref, ratio)

    def recording_passes(batch, shared):
        out = micro_batches(batch, shared)
        seen["micro_batches"] = out
        return out

    def recording_loss(*args, **kwargs):
        seen["loss_ratios"].append(kwargs["importance_ratio"])
        return loss(*args, **kwargs)

    trainer.optimizer_step, trainer.update_passes = recording_optimizer_step, recording_passes
    trainer_module.linear_grpo_loss = recording_loss
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        metrics = trainer.step()
    finally:
        trainer_module.linear_grpo_loss = loss
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the step trained
    return engine, seen, metrics


@pytest.fixture(scope="module")
def data():
    return toy.make_splits(num_train=200, num_dev=8, num_test=16)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_importance_ratio_reaching_the_loss(tmp_path, data, mode):
    engine, seen, metrics = run_step(tmp_path, data, vllm_importance_sampling_mode=mode)
    rollout, logp, delta = engine.last
    level, how = mode.split("_")
    mask = rollout.completion_mask.float()
    expected = rollout_importance_ratio(logp, logp - delta, mask, level, how, 0.5, 3.0)
    # the bounds bite: some ratios were cut to / zeroed outside [0.5, 3]
    raw = torch.exp(delta.sum(-1, keepdim=True) if level == "sequence" else delta)
    outside = ((raw < 0.5) | (raw > 3.0)) & (mask.bool() if level == "token" else True)
    assert outside.any() and ((raw >= 0.5) & (raw <= 3.0)).any()
    assert expected.shape == ((len(mask), 1) if level == "sequence" else mask.shape)
    torch.testing.assert_close(seen["ratio"], expected, rtol=2e-5, atol=1e-6)
    assert len(seen["loss_ratios"]) == len(seen["micro_batches"]) >= 2
    for rows, ratio in zip(seen["micro_batches"], seen["loss_ratios"]):
        width = ratio.shape[1]
        part = expected[rows] if level == "sequence" else expected[rows, :width]
        torch.testing.assert_close(ratio, part, rtol=2e-5, atol=1e-6)
    assert engine.synced == 1  # weights pushed to the engine before the step's sampling
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    values = expected.reshape(-1) if level == "sequence" else expected[mask.bool()]
    assert metrics["sampling/importance_sampling_ratio/mean"] == pytest.approx(float(values.mean()), rel=1e-4)
    assert metrics["sampling/importance_sampling_ratio/max"] == pytest.approx(float(values.max()), rel=1e-4)
    assert metrics["sampling/sampling_logp_difference/max"] == pytest.approx(1.2, rel=1e-4)


def test_no_correction_when_switched_off(tmp_path, data):
    _, seen, metrics = run_step(tmp_path, data, vllm_importance_sampling_correction=False)
    assert seen["ratio"] is None and all(r is None for r in seen["loss_ratios"])
    assert not any(k.startswith("sampling/") for k in metrics)


def test_hf_engine_draws_depend_only_on_the_group_seed():
    """A group samples the same completions alone or next to other groups (and in any position)."""
    tok, model = tiny()
    from grpo_fast.trainer.engines import SamplingSettings
    from grpo_fast.trainer.rollout import encode_prompts

    settings = SamplingSettings(8, tok.eos_token_id, tok.pad_token_id, temperature=1.0)
    engine = HFEngine(model)
    ids, mask = encode_prompts(tok, ["123+456="] * G + ["789+111="] * G, None, "cpu")
    both = engine.generate(ids, mask, [11, 22], G, settings).rollout
    alone = engine.generate(ids[G:], mask[G:], [22], G, settings).rollout
    swapped = engine.generate(torch.cat([ids[G:], ids[:G]]), torch.cat([mask[G:], mask[:G]]), [22, 11], G, settings)
    t = alone.completion_ids.shape[1]
    assert torch.equal(both.completion_ids[G:, :t], alone.completion_ids)
    assert torch.equal(swapped.rollout.completion_ids[:G, :t], alone.completion_ids)
    u = group_uniforms([5, 6], G, 3, "cpu")
    assert u.shape == (2 * G, 3) and (u > 0).all() and (u <= 1).all()
    assert torch.equal(u[G:], group_uniforms([6], G, 3, "cpu"))


def test_rollout_from_token_lists():
    ids, mask = torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long)
    out = rollout_from_token_lists(ids, mask, [[5, 1, 7], [5, 6, 6], [1]], eos_token_id=1, pad_token_id=0,
                                   logprobs=[[-0.1, -0.2, -0.3], [-1.0, -2.0, -3.0], [-0.5]])  # fmt: skip
    assert out.rollout.completion_ids.tolist() == [[5, 1, 0], [5, 6, 6], [1, 0, 0]]
    assert out.rollout.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert out.rollout.truncated.tolist() == [False, True, False]
    torch.testing.assert_close(out.sampling_logprobs, torch.tensor([[-0.1, -0.2, 0], [-1.0, -2.0, -3.0], [-0.5, 0, 0]]))


def test_config_names_and_checks():
    cfg = GRPOConfig(vllm_importance_sampling_cap=2.0)  # TRL's deprecated name still works
    assert cfg.vllm_importance_sampling_clip_max == 2.0
    assert GRPOConfig.from_dict(cfg.to_dict()) == cfg
    defaults = GRPOConfig()
    assert (defaults.use_vllm, defaults.vllm_importance_sampling_correction, defaults.vllm_importance_sampling_mode,
            defaults.vllm_importance_sampling_clip_max) == (False, True, "sequence_mask", 3.0)  # fmt: skip
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode must be one of"):
        GRPOConfig(vllm_importance_sampling_mode="tis")
    with pytest.raises(ValueError, match="vllm_importance_sampling_clip_min"):
        GRPOConfig(vllm_importance_sampling_clip_min=4.0)
    with pytest.raises(ValueError, match="parallelism must be one of"):
        GRPOConfig(parallelism="zero3")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_use_vllm_without_vllm_says_how_to_install(tmp_path, data):
    tok, model = tiny()
    with pytest.raises(ImportError, match=r"grpo-fast\[vllm\]"):
        GRPOTrainer(model, digit_share, config(tmp_path, use_vllm=True), data["train"], tokenizer=tok)
