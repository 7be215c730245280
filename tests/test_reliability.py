"""The trainer and the CLI under bad settings and faults: every GRPOConfig field range- and type-checked,
trainer preconditions (tokenizer, vocabulary, prompts), evaluation under the reward guarantees of
training, non-finite updates, one run per output directory (lock, ownership, torn metrics), resume with
a changed config, checkpoint files checked before loading, Ctrl-C, and the CLI's one-line errors.

Run: pytest tests/test_reliability.py   (tiny 1-layer models; about a minute on 2 CPU cores)
"""

from __future__ import annotations

import json
import math
import re
import threading

import numpy as np
import pytest
import torch
import yaml
from filelock import FileLock

from grpo_fast.cli import load_train_config, main
from grpo_fast.r1 import toy
from grpo_fast.trainer import GRPOConfig, GRPOTrainer, NonFiniteError, OutputDirInUseError, checkpoint
from grpo_fast.trainer.checkpoint import latest_checkpoint, load_checkpoint
from grpo_fast.trainer.configio import ConfigError
from grpo_fast.trainer.rewards import RewardFunctionError, RewardTimeoutError, call_reward_function

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, 1 thread


@pytest.fixture(scope="module")
def rows():
    return toy.make_splits(num_train=32, num_dev=4, num_test=4)


@pytest.fixture
def release():
    """An event the hanging reward functions wait on; set at teardown so their threads end."""
    event = threading.Event()
    yield event
    event.set()


def tiny(seed: int = 0, **kwargs):
    tok = toy.build_tokenizer()
    return tok, toy.build_model(tok, seed=seed, hidden_size=32, layers=1, heads=2, ffn=64, **kwargs)


def digit_share(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def config(tmp_path, **changes) -> GRPOConfig:
    base = dict(output_dir=str(tmp_path), seed=3, max_steps=2, learning_rate=1e-2, per_device_train_batch_size=8,
                num_generations=4, max_completion_length=6)  # fmt: skip
    return GRPOConfig(**{**base, **changes})


def trainer(tmp_path, rows, reward=digit_share, eval_dataset=None, model=None, **changes) -> GRPOTrainer:
    tok, fresh = tiny()
    return GRPOTrainer(model or fresh, reward, config(tmp_path, **changes), rows["train"], eval_dataset, tok)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- GRPOConfig
@pytest.mark.parametrize(
    "changes,match",
    [
        ({"num_generations": 1}, "num_generations must be an int >= 2"),
        ({"max_prompt_length": -3}, "max_prompt_length must be None or an int >= 1, got -3"),
        ({"max_prompt_length": 0}, "max_prompt_length must be None or an int >= 1"),
        ({"reward_weights": (1.0, math.nan)}, "reward_weights must be a finite number, got nan"),
        ({"max_grad_norm": -1.0}, r"max_grad_norm must be >= 0 \(0 = no clipping\), got -1"),
        ({"adam_beta1": 1.5}, r"adam_beta1 must be in \[0, 1\), got 1.5"),
        ({"adam_beta2": 1.0}, r"adam_beta2 must be in \[0, 1\)"),
        ({"learning_rate": math.inf}, "learning_rate must be a finite number, got inf"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"adam_epsilon": -1e-8}, "adam_epsilon must be >= 0"),
        ({"eval_max_new_tokens": -1}, "eval_max_new_tokens must be None or an int >= 1"),
        ({"vllm_max_model_length": 0}, "vllm_max_model_length must be None or an int >= 1"),
        ({"vllm_importance_sampling_clip_max": -1.0}, "vllm_importance_sampling_clip_max must be None or > 0"),
        ({"on_nonfinite": "ignore"}, r"on_nonfinite must be one of \('raise', 'skip_step'\)"),
        ({"output_dir": ""}, "output_dir must be a directory path"),
        ({"reward_timeout": math.nan}, "reward_timeout must be a finite number"),
    ],
)
def test_out_of_range_config_value_names_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**changes)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"learning_rate": [1e-5]}, r"learning_rate must be float, got list \[1e-05\]"),
        ({"max_steps": 2.5}, "max_steps must be int, got float 2.5"),
        ({"seed": "3"}, "seed must be int, got str '3'"),
        ({"bf16": "yes"}, "bf16 must be bool, got str 'yes'"),
        ({"gradient_checkpointing": 1}, "gradient_checkpointing must be bool"),
        ({"reward_weights": ("a",)}, "reward_weights must be float, got str 'a'"),
        ({"num_generations": True}, "num_generations must be int, got bool"),
    ],
)
def test_wrongly_typed_config_value_names_the_field(changes, match):
    with pytest.raises(TypeError, match=match):
        GRPOConfig(**changes)


@pytest.mark.parametrize(
    "text,match",
    [
        ("learning_rate: [1.0e-5]\n", r"learning_rate must be float, got list \[1e-05\]"),
        ("reward_weights: [[1.0]]\n", r"reward_weights must be float, got list \[1.0\]"),
        ("max_steps: {a: 1}\n", "max_steps must be int, got dict"),
        ("max_grad_norm: -1\n", "max_grad_norm must be >= 0"),
        ("learning_rate: .nan\n", "learning_rate must be a finite number"),
        ("lora_r: 0\n", "lora_r must be an int >= 1, got 0"),
        ("lora_dropout: 1.0\n", r"lora_dropout must be in \[0, 1\)"),
        ("reward_funcs: []\n", "reward_funcs must be at least one reward name"),
        ("use_peft: 2\n", "use_peft must be true or false, got 2"),
    ],
)
def test_config_file_values_are_type_checked_with_the_key(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_train_config(str(path), [])


# ----------------------------------------------------------------------------- trainer preconditions
def test_missing_pad_token_falls_back_to_eos_and_says_so(tmp_path, rows):
    tok, model = tiny()
    tok.pad_token = None
    with pytest.warns(UserWarning, match="no pad token: padding with its EOS token '<eos>'"):
        t = GRPOTrainer(model, digit_share, config(tmp_path), rows["train"], tokenizer=tok)
    assert tok.pad_token_id == tok.eos_token_id
    assert math.isfinite(t.step()["loss"])


def test_missing_eos_token_is_refused_at_construction(tmp_path, rows):
    tok, model = tiny()
    tok.eos_token = None
    with pytest.raises(ValueError, match="the tokenizer has no eos_token"):
        GRPOTrainer(model, digit_share, config(tmp_path), rows["train"], tokenizer=tok)


def test_vocabulary_larger_than_the_model_is_refused(tmp_path, rows):
    tok = toy.build_tokenizer()
    small = toy.build_model(tok, hidden_size=32, layers=1, heads=2, ffn=64)
    small.resize_token_embeddings(len(tok) - 3)
    with pytest.raises(ValueError, match=f"the tokenizer has {len(tok)} tokens but the model's input embedding has"):
        GRPOTrainer(small, digit_share, config(tmp_path), rows["train"], tokenizer=tok)


@pytest.mark.parametrize(
    "prompt,error,match",
    [
        (123, TypeError, "train_dataset row 1: the prompt must be a non-empty string .* got int 123"),
        ("", ValueError, "train_dataset row 1: the prompt must be a non-empty string"),
        ("   ", ValueError, "train_dataset row 1: the prompt must be"),
        ([], ValueError, "train_dataset row 1: the prompt must be"),
        ([{"role": "user"}], ValueError, "train_dataset row 1: the prompt must be"),
    ],
)
def test_bad_prompt_is_refused_naming_its_row(tmp_path, prompt, error, match):
    tok, model = tiny()
    data = [{"prompt": "1+2=", "answer": "3"}, {"prompt": prompt, "answer": "4"}]
    with pytest.raises(error, match=match):
        GRPOTrainer(model, digit_share, config(tmp_path), data, tokenizer=tok)


def test_bad_eval_prompt_is_refused_naming_the_dataset(tmp_path, rows):
    tok, model = tiny()
    with pytest.raises(ValueError, match="eval_dataset row 0: the prompt must be"):
        GRPOTrainer(model, digit_share, config(tmp_path), rows["train"], [{"prompt": ""}], tok)


# ----------------------------------------------------------------------------- evaluation faults
def eval_only_failure(kind: str, release=None):
    """A reward function that works on training batches (8 completions) and fails on the evaluation set."""

    def digit_share(prompts, completions, **kwargs):
        if len(completions) != 8:
            if kind == "hang":
                release.wait(20)
            else:
                raise RuntimeError("eval set broke me")
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    return digit_share


def test_reward_error_in_the_final_evaluation_keeps_the_final_checkpoint(tmp_path, rows):
    t = trainer(tmp_path, rows, eval_only_failure("raise"), rows["test"])
    with pytest.raises(RewardFunctionError, match="eval set broke me"):
        t.train()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_evaluation_skips_a_faulty_reward_when_training_does(tmp_path, rows):
    t = trainer(tmp_path, rows, eval_only_failure("raise"), rows["test"], on_reward_error="skip")
    metrics = t.train()
    assert math.isnan(metrics["eval/rewards/digit_share/mean"]) and (tmp_path / "checkpoint-2").is_dir()


def test_evaluation_obeys_the_reward_timeout(tmp_path, rows, release):
    t = trainer(tmp_path, rows, eval_only_failure("hang", release), rows["test"], reward_timeout=0.5)
    with pytest.raises(RewardTimeoutError, match="did not return within the 0.5 s"):
        t.train()
    assert (tmp_path / "checkpoint-2").is_dir()


# ----------------------------------------------------------------------------- non-finite updates
def poison(model) -> None:
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = math.nan


def test_nan_weights_stop_the_run_naming_step_and_parameter(tmp_path, rows):
    t = trainer(tmp_path, rows, max_steps=3, save_steps=1)
    t.step()
    t.save_checkpoint()
    poison(t.model)
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite loss .*parameter model.layers.0.mlp.up_proj.weight"):
        t.step()
    with pytest.raises(NonFiniteError, match="refusing to save checkpoint-1: parameter model.layers.0.mlp.up_proj"):
        t.save_checkpoint()  # (over the finite checkpoint-1, which stays)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["checkpoint-1"]
    _, model = tiny(seed=1)
    load_checkpoint(tmp_path / "checkpoint-1", model)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_non_finite_update_is_not_applied(tmp_path, rows):
    t = trainer(tmp_path, rows)
    t.step()
    poison(t.model)
    before = params(t.model)
    with pytest.raises(NonFiniteError):
        t.step()
    after = params(t.model)
    assert all(torch.equal(v, after[k]) for k, v in before.items() if k != "model.layers.0.mlp.up_proj.weight")


def test_diverging_run_never_saves_non_finite_weights(tmp_path, rows):
    t = trainer(tmp_path, rows, learning_rate=1e38, save_steps=1, max_steps=3, max_grad_norm=0.0)
    with pytest.raises(NonFiniteError, match="refusing to save checkpoint-1: parameter .* holds NaN/inf"):
        t.train()  # step 1's update overflows the weights (its gradients were finite)
    assert checkpoint.checkpoint_dirs(tmp_path) == [] and latest_checkpoint(tmp_path) is None


def test_skip_step_drops_a_nan_gradient_and_continues(tmp_path, rows):
    t = trainer(tmp_path, rows, max_steps=2, on_nonfinite="skip_step")
    weight = t.model.model.layers[0].mlp.down_proj.weight
    hook = weight.register_hook(lambda g: g * math.nan)
    before = params(t.model)
    with pytest.warns(RuntimeWarning, match=r"step 1: .*first non-finite tensor: the gradient of .*skip_step"):
        first = t.step()
    assert first["updates_skipped"] == 1.0 and all(torch.equal(v, before[k]) for k, v in params(t.model).items())
    hook.remove()
    second = t.step()
    assert second["updates_skipped"] == 0.0 and any(not torch.equal(v, before[k]) for k, v in params(t.model).items())


# ----------------------------------------------------------------------------- one run per output directory
def test_fresh_run_into_another_runs_directory_is_refused(tmp_path, rows):
    trainer(tmp_path, rows).train()
    saved = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"holds another run's checkpoints \(checkpoint-2\); resume it"):
        trainer(tmp_path, rows, max_steps=1, seed=4).train()
    assert (tmp_path / "metrics.jsonl").read_text() == saved and (tmp_path / "checkpoint-2").is_dir()


def test_a_trainer_may_call_train_again_on_its_own_run(tmp_path, rows):
    t = trainer(tmp_path, rows, max_steps=1)
    t.train()
    assert t.train() == {} and t.state.step == 1  # max_steps reached: nothing to do, and no refusal


def test_overwrite_output_dir_deletes_the_earlier_runs_checkpoints(tmp_path, rows, capsys):
    trainer(tmp_path, rows, max_steps=2, save_steps=1).train()
    trainer(tmp_path, rows, max_steps=1, overwrite_output_dir=True).train()
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["checkpoint-1"]
    assert "deleted 2 checkpoint(s) of an earlier run" in capsys.readouterr().err
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_second_concurrent_run_is_refused_by_the_lock(tmp_path, rows, release):
    started = threading.Event()

    def slow(prompts, completions, **kwargs):
        started.set()
        release.wait(30)
        return [0.0] * len(completions)

    first = trainer(tmp_path, rows, slow, max_steps=1)
    worker = threading.Thread(target=first.train)
    worker.start()
    try:
        assert started.wait(60)
        with pytest.raises(OutputDirInUseError, match=f"output_dir {tmp_path} is in use by another run"):
            trainer(tmp_path, rows, max_steps=1).train(resume_from_checkpoint=True)
    finally:
        release.set()
        worker.join(60)
    assert (tmp_path / "checkpoint-1").is_dir()


def test_lock_held_by_another_process_is_refused(tmp_path, rows):
    with FileLock(tmp_path / ".lock"):
        with pytest.raises(OutputDirInUseError, match=re.escape(str(tmp_path / ".lock"))):
            trainer(tmp_path, rows).train()
    assert not list(tmp_path.glob("checkpoint-*"))


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, rows, capsys):
    trainer(tmp_path, rows, max_steps=1).train()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 0.')  # a run killed mid-write
    trainer(tmp_path, rows, max_steps=2).train(resume_from_checkpoint=True)
    assert "dropped its torn last line 2" in capsys.readouterr().err
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_corrupt_metrics_line_in_the_middle_names_the_line(tmp_path, rows):
    trainer(tmp_path, rows, max_steps=1).train()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON object"):
        trainer(tmp_path, rows, max_steps=2).train(resume_from_checkpoint=True)


# ----------------------------------------------------------------------------- resume with another config
def test_resume_applies_and_lists_a_new_learning_rate(tmp_path, rows, capsys):
    trainer(tmp_path, rows, max_steps=1).train()
    t = trainer(tmp_path, rows, max_steps=2, learning_rate=1e-3)
    t.train(resume_from_checkpoint=True)
    assert t.optimizer.param_groups[0]["initial_lr"] == 1e-3
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["learning_rate"] for r in logged] == [1e-2, 1e-3]
    err = capsys.readouterr().err
    assert "settings changed since checkpoint-1, applied: max_steps 1 -> 2, learning_rate 0.01 -> 0.001" in err


@pytest.mark.parametrize("changes,name", [({"num_generations": 2}, "num_generations"), ({"seed": 4}, "seed")])
def test_resume_refuses_a_setting_fixed_for_the_run(tmp_path, rows, changes, name):
    trainer(tmp_path, rows, max_steps=1).train()
    t = trainer(tmp_path, rows, max_steps=2, **changes)
    before = params(t.model)
    with pytest.raises(ValueError, match=f"cannot resume .*checkpoint-1 with a different {name} "):
        t.train(resume_from_checkpoint=True)
    assert all(torch.equal(v, before[k]) for k, v in params(t.model).items())  # nothing loaded


def test_resume_past_max_steps_is_refused(tmp_path, rows):
    trainer(tmp_path, rows, max_steps=2).train()
    with pytest.raises(ValueError, match=r"it is at step 2, past max_steps = 1; set max_steps >= 2"):
        trainer(tmp_path, rows, max_steps=1).train(resume_from_checkpoint=True)


def test_resume_into_another_model_names_it(tmp_path, rows):
    trainer(tmp_path, rows, max_steps=1).train()
    tok = toy.build_tokenizer()
    other = toy.build_model(tok, hidden_size=48, layers=1, heads=2, ffn=64)
    t = GRPOTrainer(other, digit_share, config(tmp_path), rows["train"], tokenizer=tok)
    with pytest.raises(ValueError, match=r"model.safetensors: checkpoint does not match the model \(another model\?\)"):
        t.train(resume_from_checkpoint=True)


# ----------------------------------------------------------------------------- checkpoint files
@pytest.fixture
def saved_run(tmp_path, rows):
    trainer(tmp_path / "run", rows, max_steps=1).train()
    return tmp_path / "run" / "checkpoint-1"


def test_truncated_optimizer_state_names_the_file(saved_run, rows):
    file = saved_run / "optimizer.pt"
    file.write_bytes(file.read_bytes()[:200])
    t = trainer(saved_run.parent, rows)
    with pytest.raises(ValueError, match=re.escape(f"{file}: not a readable torch file (truncated or corrupt?)")):
        t.train(resume_from_checkpoint=True)


@pytest.mark.parametrize(
    "text,match",
    [
        ('{"step": "1", "data_cursor": 2, "seed": 3}', "step must be ints >= 0"),
        ('{"step": 1, "seed": 3}', r"expected an object with the keys \['step', 'data_cursor', 'seed'\]"),
        ("[1, 2]", "expected an object with the keys"),
        ('{"step": 1,', "not readable JSON"),
    ],
)
def test_bad_trainer_state_names_the_file(saved_run, rows, text, match):
    (saved_run / "trainer_state.json").write_text(text)
    t = trainer(saved_run.parent, rows)
    before = params(t.model)
    with pytest.raises(ValueError, match=re.escape(str(saved_run / "trainer_state.json")) + ": " + match):
        t.train(resume_from_checkpoint=True)
    assert all(torch.equal(v, before[k]) for k, v in params(t.model).items())


@pytest.mark.parametrize("name", ["rng.pt", "optimizer.pt", "scheduler.pt"])
def test_missing_checkpoint_file_is_found_before_loading_anything(saved_run, name):
    (saved_run / name).unlink()
    tok, model = tiny(seed=1)
    before = params(model)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{saved_run / name} is missing")):
        load_checkpoint(saved_run, model, optimizer, scheduler)
    assert all(torch.equal(v, before[k]) for k, v in params(model).items())


# ----------------------------------------------------------------------------- reward return values
@pytest.mark.parametrize(
    "values",
    [torch.tensor([0.5, 1.0]), np.array([0.5, 1.0]), [np.float32(0.5), np.int64(1)], (0.5, 1.0)],
    ids=["tensor", "ndarray", "numpy-scalars", "tuple"],
)
def test_reward_functions_may_return_tensors_arrays_and_numpy_numbers(values):
    def fn(prompts, completions, **kwargs):
        return values

    assert call_reward_function(fn, ["p", "q"], ["a", "b"], {}) == [0.5, 1.0]


def test_wrong_shaped_reward_is_described_without_contradiction():
    def fn(prompts, completions, **kwargs):
        return torch.ones(2, 1)

    with pytest.raises(RewardFunctionError, match=r"a list of 2 values .*1-d tensor .*got a Tensor of shape \(2, 1\)$"):
        call_reward_function(fn, ["p", "q"], ["a", "b"], {})


# ----------------------------------------------------------------------------- Ctrl-C
def interrupting(at_call: int | None):
    calls = 0

    def digit_share(prompts, completions, **kwargs):  # same name: same metric keys as the plain run
        nonlocal calls
        calls += 1
        if calls == at_call:
            raise KeyboardInterrupt
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    return digit_share


def test_ctrl_c_saves_the_last_finished_step_and_resume_is_exact(tmp_path, rows, capsys):
    plain = trainer(tmp_path / "a", rows, interrupting(None), max_steps=3)
    plain.train()
    t = trainer(tmp_path / "b", rows, interrupting(3), max_steps=3)  # Ctrl-C while sampling step 3
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert "interrupted: saved" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "b").iterdir() if "checkpoint" in p.name] == ["checkpoint-2"]  # no .tmp
    resumed = trainer(tmp_path / "b", rows, interrupting(None), max_steps=3)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state == plain.state
    assert all(torch.equal(v, params(plain.model)[k]) for k, v in params(resumed.model).items())


def test_ctrl_c_during_the_save_leaves_no_partial_directory(tmp_path, rows, monkeypatch):
    t = trainer(tmp_path, rows, max_steps=1)

    def interrupted_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == []


# ----------------------------------------------------------------------------- the CLI
def cli_config(tmp_path, **keys) -> str:
    path = tmp_path / "c.yaml"
    base = {"output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": 8, "num_generations": 4,
            "max_completion_length": 4, "learning_rate": 1e-3, "reward_funcs": ["accuracy"]}  # fmt: skip
    path.write_text(yaml.safe_dump({**base, **keys}))
    return str(path)


def one_error_line(capsys, code: int, argv: list[str], match: str) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error:" in ln]  # (progress bars also write to stderr)
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(match, errors[0]), err
    return errors[0]


def test_cli_config_path_that_is_a_directory(tmp_path, capsys):
    one_error_line(capsys, 2, ["train", "--config", str(tmp_path)], "error: config file .* is a directory")


def test_cli_list_for_a_number(tmp_path, capsys):
    path = cli_config(tmp_path, learning_rate=[1e-5])
    one_error_line(capsys, 2, ["train", "--config", path], "error: .*learning_rate must be float, got list")


def test_cli_dataset_without_prompt_column_keeps_the_runs_config(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"query": "1+2=", "answer": "3"}\n')  # (a "question" column would be taken as the prompt)
    run = tmp_path / "run"
    run.mkdir()
    (run / "grpo_config.yaml").write_text("the earlier run's config\n")
    one_error_line(capsys, 2, ["train", "--config", cli_config(tmp_path, dataset=str(data))],
                   rf"{re.escape(str(data))} has no 'prompt' column \(prompt_column; its columns: query")  # fmt: skip
    assert (run / "grpo_config.yaml").read_text() == "the earlier run's config\n"


def test_cli_cuda_device_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_error_line(capsys, 2, ["train", "--config", cli_config(tmp_path, device="cuda")], "no CUDA device")
    one_error_line(capsys, 2, ["train", "--config", cli_config(tmp_path, device="gpu0")], "not a device name")


@pytest.mark.parametrize("model", ["no/such/model/dir", "./missing-model"])
def test_cli_missing_local_model_says_so_without_the_network(tmp_path, capsys, model):
    one_error_line(capsys, 2, ["eval", "--model", str(tmp_path / model)], "model directory .* does not exist")
    one_error_line(capsys, 2, ["train", "--config", cli_config(tmp_path, model_name_or_path=model)], "does not exist")


def test_cli_model_directory_without_config(tmp_path, capsys):
    one_error_line(capsys, 2, ["eval", "--model", str(tmp_path)], "has no config.json: not a saved model")


@pytest.mark.parametrize("flag", ["--num-prompts", "--k", "--max-new-tokens"])
def test_cli_eval_counts_must_be_positive(tmp_path, capsys, flag):
    tok, model = tiny()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", str(tmp_path), "--max-new-tokens", "2", "--num-prompts", "2", flag, "0"])
    assert info.value.code == 2 and "expected an int >= 1, got 0" in capsys.readouterr().err


def test_cli_failed_run_exits_1_with_one_line(tmp_path, capsys):
    path = cli_config(tmp_path, learning_rate=1e38, max_grad_norm=0.0, max_steps=3, save_steps=1)
    one_error_line(capsys, 1, ["train", "--config", path], "error: (step \\d+: non-finite|refusing to save)")


def test_cli_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        main(["train", "--config", str(tmp_path), "--debug"])


def test_cli_ctrl_c_exits_130(tmp_path, capsys, monkeypatch):
    def interrupted(self, resume_from_checkpoint=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(GRPOTrainer, "train", interrupted)
    assert main(["train", "--config", cli_config(tmp_path)]) == 130
    assert capsys.readouterr().err.strip().endswith("grpo-fast train: interrupted")
