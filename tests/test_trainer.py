"""GRPOTrainer, rollout, checkpoints, config files and the CLI, on tiny models built in code."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_fast.cli import load_train_config, main
from grpo_fast.r1 import toy
from grpo_fast.trainer import GRPOConfig, GRPOTrainer, lr_lambda
from grpo_fast.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from grpo_fast.trainer.modeling import completion_hidden, position_ids_from_mask
from grpo_fast.trainer.rewards import RewardFunctionError
from grpo_fast.trainer.rollout import encode_prompts, generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, 1 thread


def tiny(seed: int = 0):
    """(tokenizer, a 1-layer hidden-32 Qwen2 over the toy vocabulary)."""
    tok = toy.build_tokenizer()
    return tok, toy.build_model(tok, seed=seed, hidden_size=32, layers=1, heads=2, ffn=64)


def digit_share(prompts, completions, **kwargs):
    """A dense reward an untrained model already varies on: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def config(tmp_path, **changes) -> GRPOConfig:
    base = dict(output_dir=str(tmp_path), seed=3, max_steps=2, learning_rate=1e-2, per_device_train_batch_size=8,
                num_generations=4, max_completion_length=10, logging_steps=1)  # fmt: skip
    return GRPOConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def data():
    return toy.make_splits(num_train=200, num_dev=8, num_test=16)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- rollout
def test_kv_cached_greedy_decoding_matches_full_forward_with_left_padding():
    tok, model = tiny()
    ids, mask = encode_prompts(tok, ["1+2=", "123+456=", "9="], None, "cpu")
    assert mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    out = generate(model, ids, mask, 7, eos_token_id=-1, pad_token_id=tok.pad_token_id, temperature=0.0)
    assert out.completion_ids.shape == (3, 7) and out.truncated.all()
    full = torch.cat([mask, torch.ones_like(out.completion_ids)], 1)
    with torch.no_grad():
        logits = model(torch.cat([ids, out.completion_ids], 1), attention_mask=full,
                       position_ids=position_ids_from_mask(full)).logits  # fmt: skip
    assert torch.equal(logits[:, ids.shape[1] - 1 : -1].argmax(-1), out.completion_ids)


def test_completion_mask_stops_after_eos_and_flags_truncation():
    tok, model = tiny()
    ids, mask = encode_prompts(tok, ["12+34="] * 64, None, "cpu")
    eos = tok.convert_tokens_to_ids("5")  # a frequent token, so many rows stop early
    gen = torch.Generator().manual_seed(0)
    out = generate(
        model, ids, mask, 12, eos_token_id=eos, pad_token_id=tok.pad_token_id, temperature=2.0, generator=gen
    )
    for row, m, truncated in zip(out.completion_ids.tolist(), out.completion_mask.tolist(), out.truncated.tolist()):
        n = row.index(eos) + 1 if eos in row else len(row)
        assert m == [1] * n + [0] * (len(row) - n)
        assert all(t == tok.pad_token_id for t in row[n:])
        assert truncated == (eos not in row)
    assert 0 < out.truncated.sum() < 64


def test_top_k_one_and_tiny_top_p_are_greedy():
    tok, model = tiny()
    ids, mask = encode_prompts(tok, ["12+34=", "5+6="], None, "cpu")
    greedy = generate(model, ids, mask, 6, -1, tok.pad_token_id, temperature=0.0).completion_ids
    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}):
        out = generate(
            model, ids, mask, 6, -1, tok.pad_token_id, temperature=1.5, generator=torch.Generator(), **kwargs
        )
        assert torch.equal(out.completion_ids, greedy)


def test_completion_hidden_predicts_completion_tokens():
    tok, model = tiny()
    ids, mask = encode_prompts(tok, ["1+2=", "123+456="], None, "cpu")
    completion = torch.tensor([[3, 8, 9], [3, 10, 1]])
    hidden = completion_hidden(model.model, ids, mask, completion)  # (B, T, H)
    full = torch.cat([mask, torch.ones_like(completion)], 1)
    logits = model(
        torch.cat([ids, completion], 1), attention_mask=full, position_ids=position_ids_from_mask(full)
    ).logits
    torch.testing.assert_close(model.lm_head(hidden), logits[:, ids.shape[1] - 1 : -1])


# ----------------------------------------------------------------------------- training
def test_two_steps_change_parameters_and_log_finite_metrics(tmp_path, data):
    tok, model = tiny()
    before = params(model)
    trainer = GRPOTrainer(model, [digit_share, "format"], config(tmp_path), data["train"], data["test"], tok)
    metrics = trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in params(model).items())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    names = ["reward", "reward_std", "rewards/digit_share/mean", "rewards/format_reward/mean", "frac_reward_zero_std",
             "entropy", "clip_ratio/region_mean", "completions/mean_length", "tokens_per_second", "step_time",
             "peak_memory_mib", "grad_norm", "loss", "learning_rate"]  # fmt: skip
    for name in names:
        assert all(torch.isfinite(torch.tensor(r[name])) for r in lines), name
    assert "eval/rewards/digit_share/mean" in metrics and lines[-1]["peak_memory_mib"] > 0
    assert (tmp_path / "checkpoint-2" / "model.safetensors").exists()
    assert trainer.optimizer.defaults["fused"]  # AdamW's fused kernel on CPU, as transformers' Trainer


def test_kl_and_old_logprobs_paths(tmp_path, data):
    """beta > 0 needs reference log-probs; num_iterations > 1 needs old log-probs (ratio != 1 on the 2nd pass)."""
    tok, model = tiny()
    cfg = config(tmp_path, beta=0.04, num_iterations=2, sync_ref_model=True, ref_model_sync_steps=2, epsilon=0.01)
    trainer = GRPOTrainer(model, digit_share, cfg, data["train"], tokenizer=tok)
    ref_before = params(trainer.ref_model)
    metrics = trainer.step()
    assert metrics["kl"] > 0 and metrics["clip_ratio/region_mean"] > 0
    # 2 optimizer steps happened: the reference was mixed towards the policy once
    assert any(not torch.equal(ref_before[k], v) for k, v in params(trainer.ref_model).items())


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_gradient_accumulation_matches_one_micro_batch(tmp_path, data, loss_type):
    """Same generation batch, one micro-batch of 16 or four of 4: the same update. adam_epsilon = 1 makes
    the first AdamW step ~ lr * g instead of ~ lr * sign(g), so gradient rounding is not amplified."""
    results = []
    for per_device, accumulation in ((16, 1), (4, 4)):
        tok, model = tiny()
        cfg = config(tmp_path / str(per_device), per_device_train_batch_size=per_device, adam_epsilon=1.0,
                     gradient_accumulation_steps=accumulation, loss_type=loss_type, max_grad_norm=0.0)  # fmt: skip
        GRPOTrainer(model, digit_share, cfg, data["train"], tokenizer=tok).step()
        results.append(params(model))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_token_balanced_passes_give_the_micro_batch_update(tmp_path, data, loss_type, monkeypatch):
    """The update's passes are balanced by tokens (no pass above the biggest equal-row micro-batch); the
    update equals the one over equal-row micro-batches (TRL's split), and bnpo keeps TRL's split."""
    results = []
    for split in ("tokens", "rows"):
        tok, model = tiny()
        cfg = config(tmp_path / split, per_device_train_batch_size=4, gradient_accumulation_steps=4, adam_epsilon=1.0,
                     loss_type=loss_type, max_grad_norm=0.0, max_completion_length=16)  # fmt: skip
        trainer = GRPOTrainer(model, digit_share, cfg, data["train"], tokenizer=tok)
        if split == "rows":
            monkeypatch.setattr(trainer, "update_passes", lambda batch, shared, t=trainer: t.micro_batches(batch))
        else:
            trainer.seed_step()
            batch, _ = trainer.sample_batch()
            passes, micro = trainer.update_passes(batch, False), trainer.micro_batches(batch)
            assert sorted(torch.cat(passes).tolist()) == list(range(len(batch)))  # every row once
            width = batch.rollout.prompt_ids.shape[1] + batch.rollout.lengths
            cost = [len(r) * int(width[r].max()) for r in passes]
            assert max(cost) <= max(len(r) * int(width[r].max()) for r in micro)
            assert len(set(map(len, passes))) > 1  # really another split than equal rows
            trainer = GRPOTrainer(model, digit_share, cfg, data["train"], tokenizer=tok)  # the same step again
        trainer.step()
        results.append(params(model))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-7)
    tok, model = tiny()
    bnpo = GRPOTrainer(model, digit_share, config(tmp_path / "bnpo", loss_type="bnpo"), data["train"], tokenizer=tok)
    bnpo.seed_step()
    batch, _ = bnpo.sample_batch()
    assert [r.tolist() for r in bnpo.update_passes(batch, True)] == [r.tolist() for r in bnpo.micro_batches(batch)]


def test_dynamic_sampling_trains_only_on_groups_with_spread(tmp_path, data):
    def odd_prompts_only(prompts, completions, **kwargs):
        return [float(len(c) % 2) if int(p[0]) % 2 else 0.0 for p, c in zip(prompts, completions)]

    tok, model = tiny()
    cfg = config(tmp_path, dynamic_sampling=True, max_dynamic_sampling_tries=4, per_device_train_batch_size=16)
    trainer = GRPOTrainer(model, odd_prompts_only, cfg, data["train"], tokenizer=tok)
    trainer.seed_step()
    batch, sampled = trainer.sample_batch()
    assert len(batch.rewards) <= cfg.generation_batch_size and len(sampled.rewards) > len(batch.rewards)
    assert (batch.group_std(cfg.num_generations) > 0).all()
    assert trainer.step()["num_groups_trained"] >= 1


def test_gradient_checkpointing_gives_the_same_update(tmp_path, data):
    results = []
    for checkpointing in (False, True):
        tok, model = tiny()
        cfg = config(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing)
        GRPOTrainer(model, digit_share, cfg, data["train"], tokenizer=tok).step()
        results.append(params(model))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=0, atol=1e-6)


def test_truncated_completions_can_be_left_out_of_the_loss(tmp_path, data):
    """DAPO's overlong filter: completions without EOS get no loss tokens; the others keep theirs."""
    tok, model = tiny()
    cfg = config(tmp_path, max_completion_length=3, mask_truncated_completions=True, per_device_train_batch_size=32)
    trainer = GRPOTrainer(model, digit_share, cfg, data["train"], tokenizer=tok)
    trainer.seed_step()
    rollout = trainer.sample_batch()[0].rollout
    assert 0 < rollout.truncated.sum() < len(rollout.truncated)
    mask = trainer.loss_mask(rollout)
    assert mask[rollout.truncated].sum() == 0
    assert torch.equal(mask[~rollout.truncated], rollout.completion_mask[~rollout.truncated].float())


def test_chat_prompts_get_chat_completions(tmp_path, data):
    tok, model = tiny()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    seen = []

    def chat_reward(prompts, completions, **kwargs):
        seen.extend(completions)
        return [float(len(c[0]["content"]) % 2) for c in completions]

    chat = [
        {"prompt": [{"role": "user", "content": p}], "answer": a}
        for p, a in zip(data["train"]["prompt"], data["train"]["answer"])
    ]
    GRPOTrainer(model, chat_reward, config(tmp_path), chat, tokenizer=tok).step()
    assert len(seen) == 8 and all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in seen)


def test_raising_reward_function_names_itself(tmp_path, data):
    def broken_reward(prompts, completions, answer, **kwargs):
        return [float(int(a) > 1000) / 0 for a in answer]

    tok, model = tiny()
    trainer = GRPOTrainer(model, [digit_share, broken_reward], config(tmp_path), data["train"], tokenizer=tok)
    with pytest.raises(RewardFunctionError, match=r"'broken_reward' raised ZeroDivisionError.*sample 0: prompt="):
        trainer.step()


def make_interruptible(fail_on_call: int | None):
    calls = 0

    def digit_share(prompts, completions, **kwargs):  # same name: same metric keys as the plain run
        nonlocal calls
        calls += 1
        if calls == fail_on_call:
            raise RuntimeError("simulated crash")
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    return digit_share


def test_resume_after_interruption_is_bit_exact(tmp_path, data):
    cfg = dict(max_steps=4, save_steps=2, beta=0.04, num_iterations=2, lr_scheduler_type="cosine", warmup_steps=2,
               sync_ref_model=True, ref_model_sync_steps=3)  # fmt: skip
    tok, model = tiny()
    GRPOTrainer(model, make_interruptible(None), config(tmp_path / "a", **cfg), data["train"], tokenizer=tok).train()
    uninterrupted = params(model)

    _, model = tiny()
    crashing = GRPOTrainer(model, make_interruptible(3), config(tmp_path / "b", **cfg), data["train"], tokenizer=tok)
    with pytest.raises(RewardFunctionError, match="simulated crash"):
        crashing.train()
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-2"

    _, model = tiny(seed=1)  # a different init: everything must come from the checkpoint
    resumed = GRPOTrainer(model, make_interruptible(None), config(tmp_path / "b", **cfg), data["train"], tokenizer=tok)
    resumed.train(resume_from_checkpoint=True)
    for k, v in params(model).items():
        assert torch.equal(v, uninterrupted[k]), k
    logged = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["step"] for r in logged[1]] == [1, 2, 3, 4]
    assert [r["loss"] for r in logged[0]] == [r["loss"] for r in logged[1]]


def test_saved_model_loads_with_auto_classes(tmp_path, data):
    tok, model = tiny()
    trainer = GRPOTrainer(model, digit_share, config(tmp_path, max_steps=1), data["train"], tokenizer=tok)
    trainer.train()
    path = tmp_path / "checkpoint-1"
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert AutoTokenizer.from_pretrained(path)("12+3=")["input_ids"] == tok("12+3=")["input_ids"]
    assert GRPOConfig.from_yaml(path / "grpo_config.yaml") == trainer.config


def test_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    tok, model = tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"step": 1}, tok)
    good = params(model)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)

    def disk_full(obj, path, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("grpo_fast.trainer.checkpoint.torch.save", disk_full)
    for step in (2, 1):  # a new checkpoint, then overwriting the existing one
        with pytest.raises(OSError, match="No space"):
            save_checkpoint(tmp_path, step, model, optimizer, scheduler, {"step": step}, tok)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no partial or temporary dirs
    state = load_checkpoint(latest_checkpoint(tmp_path), model, optimizer, scheduler)
    assert state == {"step": 1} and all(torch.equal(v, good[k]) for k, v in params(model).items())


def test_warmup_then_cosine_schedule():
    lam = lr_lambda(GRPOConfig(max_steps=12, warmup_steps=2, lr_scheduler_type="cosine"))
    assert [lam(0), lam(1), lam(2)] == [0.5, 1.0, 1.0]
    assert lam(7) == pytest.approx(0.5) and lam(12) == pytest.approx(0.0)
    constant = lr_lambda(GRPOConfig(max_steps=10, warmup_ratio=0.2))
    assert [constant(s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------- config files and CLI
def test_yaml_round_trip_and_coercion(tmp_path):
    cfg = GRPOConfig(learning_rate=3e-6, reward_weights=(1.0, 0.5), epsilon_high=0.28, bf16=False)
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert GRPOConfig.from_yaml(path) == cfg
    path.write_text("learning_rate: 1e-4\nreward_weights: [1, 0]\nepsilon_high: null\n")  # YAML 1.1: 1e-4 is a str
    loaded = GRPOConfig.from_yaml(path, max_steps=7)
    assert (loaded.learning_rate, loaded.reward_weights, loaded.epsilon_high) == (1e-4, (1.0, 0.0), None)
    assert loaded.max_steps == 7


def test_unknown_and_invalid_keys_are_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 0.1\n")
    with pytest.raises(
        ValueError, match=r"unknown config key 'learning_rat' in .*c.yaml; did you mean 'learning_rate'"
    ):
        GRPOConfig.from_yaml(path)
    with pytest.raises(ValueError, match="a multiple of num_generations=8"):
        GRPOConfig(per_device_train_batch_size=6)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="decode_graphs must be one of auto, on, off"):
        GRPOConfig(decode_graphs="yes")
    with pytest.raises(ValueError, match="max_steps must be int"):
        GRPOConfig.from_dict({"max_steps": "ten"})


def test_cli_overrides_and_run_arguments(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"max_steps": 5, "reward_funcs": ["accuracy", "format"], "bf16": True}))
    grpo, run = load_train_config(str(path), ["--max_steps", "9", "--learning-rate=2e-5", "--bf16", "false",
                                              "--reward_weights", "1,0.5", "--dataset", "toy"])  # fmt: skip
    assert (grpo.max_steps, grpo.learning_rate, grpo.bf16, grpo.reward_weights) == (9, 2e-5, False, (1.0, 0.5))
    assert run.reward_funcs == ("accuracy", "format") and run.dataset == "toy"
    with pytest.raises(ValueError, match="did you mean 'num_generations'"):
        load_train_config(str(path), ["--num_generation", "4"])


def test_cli_train_eval_plot(tmp_path, capsys):
    run_dir = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(run_dir), "max_steps": 2, "per_device_train_batch_size": 8,
                                    "num_generations": 4, "max_completion_length": 8, "learning_rate": 1e-3,
                                    "reward_funcs": ["accuracy", "format"], "eval_steps": 1}))  # fmt: skip
    assert main(["train", "--config", str(path), "--max_steps", "1"]) == 0
    assert main(["train", "--config", str(path), "--resume"]) == 0  # continues to max_steps = 2
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    capsys.readouterr()
    assert main(["eval", "--model", str(run_dir / "checkpoint-2"), "--num-prompts", "4", "--k", "2",
                 "--max-new-tokens", "8"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 4 and 0 <= result["rewards/accuracy_reward/pass@2"] <= 1
    assert main(["plot", str(run_dir)]) == 0 and (run_dir / "curves.png").stat().st_size > 10_000
    assert main(["train", "--config", str(path), "--max_step", "1"]) == 2  # unknown key: an error, not ignored


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "grpo_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "demo" in out.stdout and "train" in out.stdout


def test_demo_writes_summary_and_curves(tmp_path, monkeypatch):
    """The demo pipeline end to end at toy scale (the real run is timed in the report, not here)."""
    from grpo_fast.r1 import demo

    make_splits = toy.make_splits
    monkeypatch.setattr(demo.toy, "make_splits", lambda seed: make_splits(num_train=300, num_dev=8, num_test=8))
    original = demo.demo_configs

    def quick(seed, out, steps):
        sft, grpo = original(seed, out, steps)
        return sft.__class__(**{**sft.__dict__, "max_steps": 3, "eval_steps": 3}), grpo.replace(
            per_device_train_batch_size=16, eval_steps=1, logging_steps=1)  # fmt: skip

    monkeypatch.setattr(demo, "demo_configs", quick)
    summary = demo.run_demo(seed=0, out=tmp_path, steps=2)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == summary and {"accuracy_before", "accuracy_after", "steps", "wall_seconds", "seed"} <= set(saved)
    assert (tmp_path / "curves.png").exists() and Path(tmp_path / "checkpoint-2").is_dir()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]


# ----------------------------------------------------------------------------- TRL 1.16 loss options (issue 35)


def _two_steps(tmp_path, data, **changes) -> list[dict]:
    """metrics.jsonl of a 2-step run with these GRPOConfig changes (num_iterations 2: off-policy second pass)."""
    tok, model = tiny()
    cfg = config(tmp_path, num_iterations=2, **changes)
    GRPOTrainer(model, digit_share, cfg, data["train"], tokenizer=tok).train()
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "changes,check",
    [
        (  # vespo's weight leaves 1 once the batch is reused; the bias-corrected KL is logged
            dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5, beta=0.04, use_bias_correction_kl=True),
            lambda r: r["vespo/phi_seq_mean"] != 1.0 and 0 < r["vespo/phi_seq_mean"] and r["kl"] >= 0,
        ),
        (  # the entropy bonus over the top half of the tokens by entropy
            dict(entropy_coef=0.01, top_entropy_quantile=0.5),
            lambda r: r["entropy_coef"] == 0.01 and 0.3 < r["top_entropy_mask/kept_fraction"] < 0.7,
        ),
        (  # a negative threshold drops every sequence with A < 0 (mean KL estimate ~ 0 > -1); sapo, fp32 head
            dict(off_policy_mask_threshold=-1.0, loss_type="sapo", sapo_temperature_neg=2.0, cast_lm_head_to_fp32=True),
            lambda r: 0 < r["off_policy_mask/kept_fraction"] < 1,
        ),
    ],
    ids=["vespo-bias-kl", "entropy-bonus-top-entropy", "off-policy-mask-sapo-fp32-head"],
)
def test_trl_loss_options_train_and_log_their_metric(tmp_path, data, changes, check):
    lines = _two_steps(tmp_path, data, **changes)
    assert [r["step"] for r in lines] == [1, 2]
    for record in lines:
        assert torch.isfinite(torch.tensor(record["loss"])) and check(record), record


def test_trl_loss_options_reach_the_loss_config():
    cfg = GRPOConfig(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=0.5, vespo_lambda_neg=4.0,
                     sapo_temperature_pos=0.5, sapo_temperature_neg=3.0, use_bias_correction_kl=True,
                     entropy_coef=-0.01, gradient_accumulation_steps=2)  # fmt: skip
    loss = cfg.loss_config()
    for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "sapo_temperature_pos",
                 "sapo_temperature_neg", "use_bias_correction_kl", "entropy_coef"):  # fmt: skip
        assert getattr(loss, name) == getattr(cfg, name), name
    with pytest.raises(ValueError, match="vespo_lambda_neg"):
        GRPOConfig(vespo_lambda_neg=0.0)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        GRPOConfig(top_entropy_quantile=0.0)


def test_trl_only_keys_are_not_our_fields():
    """A key in trl_keys.TRL_ONLY_KEYS is refused as TRL's: none may be one of our GRPOConfig fields."""
    import dataclasses

    from grpo_fast.trainer.trl_keys import TRL_ONLY_KEYS

    ours = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert not ours & TRL_ONLY_KEYS, sorted(ours & TRL_ONLY_KEYS)
    assert {"top_entropy_quantile", "off_policy_mask_threshold", "vespo_k_pos", "cast_lm_head_to_fp32"} <= ours


def test_train_help_lists_the_trl_loss_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for key in ("use_bias_correction_kl", "sapo_temperature_pos", "vespo_lambda_neg", "entropy_coef",
                "top_entropy_quantile", "off_policy_mask_threshold", "cast_lm_head_to_fp32"):  # fmt: skip
        assert f"--{key}" in text, key
