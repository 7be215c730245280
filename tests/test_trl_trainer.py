"""``grpo_fast.integrations.trl.FusedGRPOTrainer`` against TRL 1.16's own ``GRPOTrainer``.

(1) Parity: two real trainers built from the same saved tiny Qwen2 (grpo_fast.r1.toy, float32) and the same
    GRPOConfig, one ``trl.GRPOTrainer``, one ``FusedGRPOTrainer``; ``compute_loss`` on the same hand-made
    batch (the dict TRL's ``_generate_and_score_completions`` produces: prompt/completion ids and masks,
    advantages, old/ref/sampling log-probs, the vLLM importance-sampling ratio, num_items_in_batch,
    tool_mask). Same loss (float32 row of tests/tolerances.py: rtol 2e-5), same gradient of every trainable
    parameter (rtol 2e-4), same logged metrics (names and values).
(2) End to end: ``FusedGRPOTrainer.train()`` for 2 steps on CPU (TRL's generation, rewards and logging).
(3) The options the fused loss cannot reproduce raise a ValueError naming them.
Run: pytest tests/test_trl_trainer.py   (importing trl takes a few seconds)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import subprocess
import sys
from collections import defaultdict

import pytest
import torch
from tolerances import assert_close
from transformers import AutoModelForCausalLM

pytest.importorskip("trl", reason="needs trl: pip install 'grpo-fast[trl]'")
pytest.importorskip("trl.trainer.grpo_trainer", exc_type=ImportError)  # TRL's trainer imports accelerate, datasets

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from grpo_fast.integrations.trl import FusedGRPOTrainer  # noqa: E402
from grpo_fast.r1 import toy  # noqa: E402

F32 = torch.float32
B, P, T = 4, 5, 6  # sequences (one group), prompt length, completion length
ADVANTAGES = (1.2, -0.7, 0.4, -1.5)

pytestmark = pytest.mark.usefixtures("one_thread")


def length_reward(completions, **kwargs) -> list[float]:
    """A reward with spread whatever the model samples, so advantages and gradients are non-zero."""
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer, model loaded from disk, train dataset, vocabulary size); trainers get copies of the model."""
    return _tiny(tmp_path_factory.mktemp("tiny"))


def _tiny(directory, **config):
    tok = toy.build_tokenizer()
    model = toy.build_model(tok, seed=0, hidden_size=32, layers=1, heads=2, ffn=64)
    for key, value in config.items():
        setattr(model.config, key, value)
    model.save_pretrained(directory / "model")
    model = AutoModelForCausalLM.from_pretrained(directory / "model")  # float32, _name_or_path set
    data = toy.make_splits(num_train=16, num_dev=2, num_test=2)["train"]
    return tok, model, data, len(tok)


# TrainingArguments' name for activation checkpointing (transformers 5.23 renamed gradient_checkpointing and
# warns on the old name, which TRL's GRPOConfig would otherwise set by default)
CHECKPOINTING = next((f.name for f in dataclasses.fields(GRPOConfig) if f.name == "activation_checkpointing"),
                     "gradient_checkpointing")  # fmt: skip


def _args(out, **overrides) -> GRPOConfig:
    overrides[CHECKPOINTING] = overrides.pop("gradient_checkpointing", False)
    kwargs = dict(
        output_dir=str(out),
        per_device_train_batch_size=B,
        num_generations=B,
        max_completion_length=8,  # dr_grpo's constant normaliser; deliberately != T
        temperature=0.7,
        beta=0.0,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def _trainers(tiny, out, peft_config=None, **overrides):
    """(TRL's trainer, ours), same weights, same options; both models in train mode.

    beta is set on the trainers after construction: TRL would otherwise load a reference model, which
    compute_loss never uses (the batch carries ref_per_token_logps); both trainers read self.beta per call.
    """
    tok, model, data, _ = tiny
    beta = overrides.pop("beta", 0.0)
    pair = []
    for cls in (GRPOTrainer, FusedGRPOTrainer):
        torch.manual_seed(0)  # the same LoRA initialisation for both
        trainer = cls(
            model=copy.deepcopy(model),
            reward_funcs=[length_reward],
            args=_args(out, **overrides),
            train_dataset=data,
            processing_class=tok,
            peft_config=peft_config,
        )
        trainer.beta = beta
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
        trainer.model.train()
        pair.append(trainer)
    assert next(pair[0].model.parameters()).dtype == torch.float32
    return pair


def _inputs(
    trainer,
    vocab,
    seed,
    *,
    on_policy=False,
    beta=False,
    vllm=None,
    sampling=False,
    tool_mask=False,
    token_advantages=False,
    num_items=None,
    completion_len=T,
):
    """The batch dict TRL's ``_compute_loss`` reads, with log-probs built around the model's own."""
    t = completion_len
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.int64)
    prompt_mask[1, :2] = 0  # a left-padded prompt
    completion_ids = torch.randint(3, vocab, (B, t), generator=g)
    completion_mask = torch.ones(B, t, dtype=torch.int64)
    completion_mask[0, max(1, t - 2) :] = 0  # a short completion
    completion_mask[2] = 0  # a fully masked one (e.g. truncated with mask_truncated_completions)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor(ADVANTAGES),
        "num_items_in_batch": torch.tensor(float(completion_mask.sum() if num_items is None else num_items)),
    }
    if token_advantages:
        inputs["advantages"] = torch.randn(B, t, generator=g)
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        attention = torch.cat([prompt_mask, completion_mask], 1)
        logp = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, t)[0]
    noisy = lambda scale: (logp + scale * torch.randn(B, t, generator=g)) * completion_mask  # noqa: E731
    if not on_policy:
        inputs["old_per_token_logps"] = noisy(0.35)  # ratios well away from 1: tokens in the clip region
    if beta:
        inputs["ref_per_token_logps"] = noisy(0.25)
    if sampling:  # sequence 1 (A < 0) drifts far from the sampler, sequence 3 (A < 0) does not
        offsets = torch.tensor([0.0, 0.5, 0.0, -0.5]).unsqueeze(1)
        inputs["sampling_per_token_logps"] = (logp + offsets) * completion_mask
    if tool_mask:
        tools = torch.ones(B, t, dtype=torch.int64)
        tools[1, 1:3] = 0  # tokens a tool wrote: attended to, not trained on
        inputs["tool_mask"] = tools
    if vllm == "token":  # 1 where the mask is 0, as TRL builds it (exp of a masked log-ratio difference)
        ratio = 0.5 + torch.rand(B, t, generator=g)
        inputs["importance_sampling_ratio"] = torch.where(completion_mask * inputs.get("tool_mask", 1) > 0, ratio, 1.0)
    elif vllm == "sequence":
        inputs["importance_sampling_ratio"] = 0.5 + torch.rand(B, 1, generator=g)
    return inputs


def _run(trainer, inputs, mode="train"):
    model = trainer.model
    model.train(mode == "train")
    model.zero_grad(set_to_none=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    loss = trainer.compute_loss(model, dict(inputs))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    return loss.detach(), grads, metrics


def _assert_same(name, ours, theirs):
    loss, grads, metrics = ours
    trl_loss, trl_grads, trl_metrics = theirs
    assert_close(loss, trl_loss, F32, f"loss: {name}")
    assert sorted(grads) == sorted(trl_grads), name
    for param, grad in trl_grads.items():
        assert_close(grads[param], grad, F32, f"grad: {name} {param}")
    assert sorted(metrics) == sorted(trl_metrics), f"{name}: metrics {sorted(metrics)} vs TRL {sorted(trl_metrics)}"
    for key, value in trl_metrics.items():
        # policy_loss is reconstructed as loss + entropy term (one rounding more): 1e-6 absolute on top
        assert math.isclose(metrics[key], value, rel_tol=2e-5, abs_tol=1e-6), f"{name}: {key} {metrics[key]} {value}"
    assert float(torch.stack([g.abs().sum() for g in trl_grads.values()]).sum()) > 0, f"{name}: vacuous"


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
KL = dict(beta=0.04)


def _cases():
    cases = []
    for lt in LOSS_TYPES:
        extra = {"epsilon_high": 1.3} if lt == "cispo" else {}
        cases.append((f"{lt}-token", dict(KL, loss_type=lt, **extra), {}))
        cases.append((f"{lt}-sequence", dict(KL, loss_type=lt, importance_sampling_level="sequence", **extra), {}))
    cases += [
        ("grpo-beta0", dict(), {}),
        ("grpo-on-policy", dict(KL), {"on_policy": True}),
        ("grpo-seq-on-policy-beta0", dict(importance_sampling_level="sequence"), {"on_policy": True}),
        ("dapo-clip-higher-delta", dict(KL, loss_type="dapo", epsilon_high=0.28, delta=1.5), {}),
        ("grpo-bias-kl", dict(KL, use_bias_correction_kl=True), {}),
        ("grpo-seq-bias-kl", dict(KL, importance_sampling_level="sequence", use_bias_correction_kl=True), {}),
        ("grpo-ga2", dict(KL, gradient_accumulation_steps=2), {}),
        (
            "dapo-ga2-spg4-num_items",
            dict(loss_type="dapo", gradient_accumulation_steps=2, steps_per_generation=4),
            {"num_items": 57},
        ),
        ("grpo-vllm-token", dict(KL), {"vllm": "token"}),
        (
            "dapo-seq-vllm-sequence",
            dict(loss_type="dapo", importance_sampling_level="sequence"),
            {"vllm": "sequence"},
        ),
        ("grpo-entropy-bonus", dict(KL, entropy_coef=0.05), {}),
        ("dapo-entropy-bonus-ga2", dict(loss_type="dapo", entropy_coef=0.05, gradient_accumulation_steps=2), {}),
        ("sapo-negative-entropy-coef", dict(loss_type="sapo", entropy_coef=-0.02), {}),
        ("grpo-top-entropy", dict(KL, top_entropy_quantile=0.5), {}),
        (
            "bnpo-seq-top-entropy",
            dict(loss_type="bnpo", importance_sampling_level="sequence", top_entropy_quantile=0.3),
            {},
        ),
        ("grpo-off-policy-mask", dict(KL, off_policy_mask_threshold=0.1), {"sampling": True}),
        ("dapo-off-policy-mask-from-old", dict(loss_type="dapo", off_policy_mask_threshold=0.0), {}),
        (
            "grpo-off-policy-mask-top-entropy-vllm",
            dict(KL, off_policy_mask_threshold=0.1, top_entropy_quantile=0.5),
            {"sampling": True, "vllm": "token"},
        ),
        ("grpo-tool-mask", dict(KL, entropy_coef=0.05), {"tool_mask": True}),
        ("dapo-token-advantages", dict(KL, loss_type="dapo"), {"token_advantages": True}),
        ("grpo-one-token", dict(KL), {"completion_len": 1}),
        ("grpo-cast-lm-head-fp32", dict(KL, cast_lm_head_to_fp32=True), {}),
        ("vespo-vllm-token-ratio-in-phi", dict(KL, loss_type="vespo"), {"vllm": "token"}),
        (
            "vespo-gamma-params-masks-vllm-tool-mask",
            dict(
                loss_type="vespo",
                vespo_k_pos=0.5,
                vespo_lambda_pos=1.7,
                vespo_k_neg=1.25,
                vespo_lambda_neg=0.6,
                off_policy_mask_threshold=0.1,
                top_entropy_quantile=0.5,
            ),
            {"sampling": True, "vllm": "token", "tool_mask": True},
        ),  # fmt: skip
        ("vespo-entropy-bonus-ga2", dict(loss_type="vespo", entropy_coef=0.05, gradient_accumulation_steps=2), {}),
        ("grpo-entropy-bonus-top-entropy", dict(KL, entropy_coef=0.05, top_entropy_quantile=0.5), {}),
        (
            "dapo-entropy-bonus-top-entropy-ga2-off-policy-mask",
            dict(
                loss_type="dapo",
                entropy_coef=0.05,
                top_entropy_quantile=0.3,
                gradient_accumulation_steps=2,
                off_policy_mask_threshold=0.1,
            ),
            {"sampling": True},
        ),  # fmt: skip
        (
            "sapo-negative-entropy-coef-top-entropy",
            dict(loss_type="sapo", entropy_coef=-0.02, top_entropy_quantile=0.6),
            {},
        ),
    ]
    return cases


CASES = _cases()


def _parity(tiny, out, name, overrides, extra, mode="train", peft_config=None, seed=None):
    trl_trainer, fused = _trainers(tiny, out, peft_config=peft_config, **overrides)
    vllm = extra.get("vllm")
    for trainer in (trl_trainer, fused):  # TRL's compute_loss reads these; vLLM itself is not started
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = vllm is not None
    opts = {k: v for k, v in extra.items() if k != "vllm"}
    inputs = _inputs(
        trl_trainer,
        tiny[3],
        len(name) if seed is None else seed,
        vllm=vllm,
        beta=overrides.get("beta", 0.0) != 0.0,
        **opts,
    )
    theirs = _run(trl_trainer, inputs, mode)
    ours = _run(fused, inputs, mode)
    _assert_same(name, ours, theirs)
    return ours, theirs


@pytest.mark.parametrize("name,overrides,extra", CASES, ids=[c[0] for c in CASES])
def test_compute_loss_matches_trl(tiny, tmp_path, name, overrides, extra):
    _, (_, _, metrics) = _parity(tiny, tmp_path, name, overrides, extra)
    lt = overrides.get("loss_type", "grpo")
    if not extra.get("on_policy") and lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        if overrides.get("importance_sampling_level", "token") == "token" and extra.get("completion_len", T) > 1:
            assert metrics["clip_ratio/region_mean"] > 0, metrics  # the clipped branch is exercised


@pytest.mark.parametrize("loss_type", ("grpo", "dapo"))
def test_eval_mode_matches_trl(tiny, tmp_path, loss_type):
    # eval: no accumulation normalisers, metrics under "eval"; prediction_step computes it under no_grad
    overrides = dict(KL, loss_type=loss_type, gradient_accumulation_steps=2, entropy_coef=0.05)
    (loss, _, _), _ = _parity(tiny, tmp_path, f"{loss_type}-eval", overrides, {}, mode="eval")
    trl_trainer, fused = _trainers(tiny, tmp_path, **overrides)
    inputs = _inputs(trl_trainer, tiny[3], 1, beta=True)
    for trainer in (trl_trainer, fused):
        trainer.model.eval()
    with torch.no_grad():
        expected, actual = (trainer.compute_loss(trainer.model, dict(inputs)) for trainer in (trl_trainer, fused))
    assert_close(actual, expected, F32, "loss: eval under no_grad")


@pytest.mark.parametrize("loss_type", ("grpo", "vespo"))
@pytest.mark.parametrize("backend", ("reference", "triton"))
def test_other_backends_match_trl(tiny, tmp_path, backend, loss_type):
    # loss_backend="triton" runs the Triton kernels (under TRITON_INTERPRET=1 on CPU, see conftest.py)
    overrides = dict(KL, loss_type=loss_type, importance_sampling_level="sequence", top_entropy_quantile=0.5)
    trl_trainer, fused = _trainers(tiny, tmp_path, **overrides)
    fused.loss_backend = backend
    inputs = _inputs(trl_trainer, tiny[3], 5, beta=True)
    _assert_same(f"backend {backend}", _run(fused, inputs), _run(trl_trainer, inputs))


def test_lora_matches_trl(tiny, tmp_path):
    LoraConfig = pytest.importorskip("peft", reason="needs peft: pip install 'grpo-fast[peft]'").LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    (_, grads, _), _ = _parity(tiny, tmp_path, "grpo-lora", dict(KL), {}, peft_config=lora)
    assert grads and all("lora_" in name for name in grads)


def test_logit_scale_matches_trl(tiny, tmp_path):
    # Models whose config scales the logits (Cohere's logit_scale, Granite's logits_scaling, ...): TRL's head
    # applies the scale, so must ours.
    _parity(_tiny(tmp_path, logit_scale=0.5), tmp_path, "grpo-logit-scale", dict(KL), {})


def _tiny_moe(directory):
    """A tiny Qwen2-MoE (4 experts, top 2, a shared expert) over the toy vocabulary, as ``tiny`` returns it."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    tok = toy.build_tokenizer()
    config = Qwen2MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02,
                            tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    Qwen2MoeForCausalLM(config).save_pretrained(directory / "moe")
    model = AutoModelForCausalLM.from_pretrained(directory / "moe")
    return tok, model, toy.make_splits(num_train=16, num_dev=2, num_test=2)["train"], len(tok)


@pytest.mark.parametrize(
    "name,overrides,mode",
    [
        ("moe-grpo-config-coef", dict(KL), "train"),  # router_aux_loss_coef from the model config (0.02)
        ("moe-dapo-ga2-coef", dict(loss_type="dapo", gradient_accumulation_steps=2, router_aux_loss_coef=0.5), "train"),
        ("moe-vespo-eval", dict(loss_type="vespo", router_aux_loss_coef=0.5), "eval"),
    ],
)
def test_moe_load_balancing_loss_matches_trl(tmp_path, name, overrides, mode):
    # TRL adds router_aux_loss_coef * aux_loss / GA (train) and logs aux_loss; the fused loss must too.
    (_, grads, metrics), _ = _parity(_tiny_moe(tmp_path), tmp_path, name, overrides, {}, mode=mode)
    assert metrics["aux_loss"] > 0
    assert any(".mlp.gate." in param for param in grads)  # the router is trained (by the aux loss)


def test_bf16_autocast_close_to_trl(tiny, tmp_path):
    # bf16 mixed precision (GRPOConfig's default; CPU autocast here): the head GEMMs run in the autocast dtype, as
    # TRL's do. The loss agrees; gradients agree to bf16 rounding propagated through the backbone (~1% of the
    # largest entry measured), so this is a loose check of the autocast path, not a float32-grade parity.
    trl_trainer, fused = _trainers(tiny, tmp_path, bf16=True, **KL)
    assert fused.accelerator.mixed_precision == "bf16"
    inputs = _inputs(trl_trainer, tiny[3], 3, beta=True)
    (trl_loss, trl_grads, trl_metrics), (loss, grads, metrics) = _run(trl_trainer, inputs), _run(fused, inputs)
    assert_close(loss, trl_loss, torch.bfloat16, "loss: bf16 autocast")
    for param, grad in trl_grads.items():
        error = float((grads[param] - grad).abs().max() / grad.abs().max())
        assert error < 5e-2, f"{param}: max error {error:.3g} of max |grad|"
    assert metrics.keys() == trl_metrics.keys()


@pytest.mark.parametrize("quantile", (1.0, 0.5))
def test_adaptive_entropy_matches_trl(tiny, tmp_path, quantile):
    # The controller: the bonus is gated on the previous step's entropy, and entropy_coef moves by
    # entropy_coef_delta at each optimizer step; three micro-batches, GA 1, both trainers step in lockstep.
    # With top_entropy_quantile < 1 the bonus and the controller's statistics use the high-entropy tokens only.
    overrides = dict(use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=2.0, entropy_coef_delta=0.004)
    overrides["top_entropy_quantile"] = quantile
    trl_trainer, fused = _trainers(tiny, tmp_path, **overrides)
    for step, target in enumerate((10.0, 10.0, 0.5)):  # entropy below target, below, then above
        for trainer in (trl_trainer, fused):
            trainer.args.entropy_target = target
        inputs = _inputs(trl_trainer, tiny[3], step)
        theirs = _run(trl_trainer, inputs)
        ours = _run(fused, inputs)
        _assert_same(f"adaptive-step{step}", ours, theirs)
        assert fused.entropy_coef == pytest.approx(trl_trainer.entropy_coef, rel=1e-12)
        assert fused._last_world_entropy == pytest.approx(trl_trainer._last_world_entropy, rel=2e-5)
    assert fused.entropy_coef != 0.01  # the controller moved


def test_masks_change_the_loss(tiny, tmp_path):
    # The off-policy and high-entropy masks are not no-ops on these batches (the parity cases are not vacuous).
    _, fused = _trainers(tiny, tmp_path, **KL)
    inputs = _inputs(fused, tiny[3], 0, beta=True, sampling=True)
    base = _run(fused, inputs)[0]
    fused.off_policy_mask_threshold = 0.1
    masked = _run(fused, inputs)[0]
    fused.off_policy_mask_threshold, fused.top_entropy_quantile = None, 0.5
    quantile = _run(fused, inputs)[0]
    assert abs(float(masked - base)) > 1e-4 and abs(float(quantile - base)) > 1e-4


def test_train_two_steps(tiny, tmp_path):
    tok, model, data, _ = tiny
    args = _args(
        tmp_path,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        max_completion_length=6,
        beta=0.04,
        loss_type="dapo",
        gradient_checkpointing=True,
        bf16=True,
    )
    trainer = FusedGRPOTrainer(  # with beta > 0, TRL builds the reference model from model.config._name_or_path
        model=copy.deepcopy(model), reward_funcs=[length_reward], args=args, train_dataset=data, processing_class=tok
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["entropy"]) and math.isfinite(entry["kl"])
        assert "clip_ratio/region_mean" in entry
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "model.embed_tokens.weight" in changed  # the tied LM head
    assert len(changed) > len(before) // 2, changed


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (dict(delta=1.1), "delta"),  # TRL accepts a two-sided clip below 1 + epsilon_high; LossConfig does not
        (dict(loss_type="vespo", vespo_lambda_neg=-1.0), "vespo_lambda_neg"),  # TRL clamps it to 1e-4 silently
    ],
    ids=["delta", "vespo-negative-lambda"],
)
def test_unsupported_options_raise(tiny, tmp_path, overrides, needle):
    tok, model, data, _ = tiny
    with pytest.raises(ValueError, match="FusedGRPOTrainer") as info:
        FusedGRPOTrainer(
            model=copy.deepcopy(model),
            reward_funcs=[length_reward],
            args=_args(tmp_path, **overrides),
            train_dataset=data,
            processing_class=tok,
        )
    assert needle in str(info.value)


def test_unsupported_model_and_late_changes_raise(tiny, tmp_path):
    tok, model, data, vocab = tiny
    capped = _tiny(tmp_path, final_logit_softcapping=30.0)[1]
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        FusedGRPOTrainer(
            model=capped, reward_funcs=[length_reward], args=_args(tmp_path), train_dataset=data, processing_class=tok
        )
    with pytest.raises(ValueError, match="loss_backend"):
        FusedGRPOTrainer(
            model=copy.deepcopy(model),
            reward_funcs=[length_reward],
            args=_args(tmp_path),
            train_dataset=data,
            processing_class=tok,
            loss_backend="cuda",
        )
    # an option switched on after construction is refused at the next loss, not silently ignored
    trainer = FusedGRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=[length_reward],
        args=_args(tmp_path),
        train_dataset=data,
        processing_class=tok,
    )
    trainer.current_gradient_accumulation_steps = 1
    trainer.loss_type = "not_a_loss"
    with pytest.raises(ValueError, match="not_a_loss"):
        trainer.compute_loss(trainer.model, _inputs(trainer, vocab, 0))


def test_importing_grpo_fast_does_not_import_trl():
    code = "import sys, grpo_fast, grpo_fast.integrations; assert 'trl' not in sys.modules, 'trl imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_refuses_a_trl_outside_the_supported_range(monkeypatch):
    """The drop-in overrides TRL internals: a TRL release outside the tested range (a stand-in version here)
    fails at import with both versions named, before anything of TRL is used."""
    import importlib
    import importlib.metadata

    from grpo_fast.integrations import trl as integration

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.17.0" if name == "trl" else real(name))
    monkeypatch.delitem(sys.modules, "grpo_fast.integrations.trl")
    with pytest.raises(ImportError, match=r"supports trl>=1\.15,<1\.17 .*the installed trl is 1\.17\.0"):
        importlib.import_module("grpo_fast.integrations.trl")
    for version in ("1.14.2", "1.17.0.dev0", "2.0.0"):
        with pytest.raises(ImportError, match=version):
            integration.check_trl_version(version)
    for version in ("1.15.0", "1.16.0", "1.16.3"):
        integration.check_trl_version(version)


def test_our_trainer_builds_the_drop_ins_loss_config(tiny, tmp_path):
    """grpo_fast's own GRPOTrainer and the drop-in turn the same TRL options into the same LossConfig."""
    from grpo_fast.trainer import GRPOConfig as OurConfig

    tok, model, data, _ = tiny
    options = dict(loss_type="vespo", epsilon=0.15, epsilon_high=0.3, vespo_k_pos=1.5, vespo_lambda_pos=2.5,
                   vespo_k_neg=0.5, vespo_lambda_neg=4.0, sapo_temperature_pos=0.5, sapo_temperature_neg=3.0,
                   use_bias_correction_kl=True, entropy_coef=0.02, importance_sampling_level="sequence",
                   gradient_accumulation_steps=2, max_completion_length=8, temperature=0.7)  # fmt: skip
    fused = FusedGRPOTrainer(model=copy.deepcopy(model), reward_funcs=[length_reward], args=_args(tmp_path, **options),
                             train_dataset=data, processing_class=tok)  # fmt: skip
    fused.current_gradient_accumulation_steps = 2
    theirs = fused._fused_loss_config("train", fused._entropy_coef_now())
    ours = OurConfig(
        output_dir=str(tmp_path), num_generations=B, per_device_train_batch_size=B, **options
    ).loss_config()
    assert ours == theirs
    assert ours.replace(vespo_k_neg=0.6) != theirs  # the comparison sees every field
