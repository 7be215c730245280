"""Benchmark: one GRPO step of grpo_fast's GRPOTrainer vs TRL's GRPOTrainer, same model and batch shape.

    python -m pytest bench/bench_trainer.py --benchmark-only [--bench-profile cpu]

Both trainers get the demo's 0.53M-parameter Qwen2 and character tokenizer (grpo_fast.toy, freshly
initialised: step time depends on the batch shape, not on what the model knows), P prompts x G
completions of at most T new tokens at temperature 1.0, the dapo loss, beta 0, one optimizer step per
generation batch with per_device_train_batch_size ``micro`` (TRL splits the update by rows; grpo_fast
balances its passes by tokens), and the accuracy reward. A step = sampling
+ rewards + advantages + the update. grpo_fast is timed by pytest-benchmark around ``trainer.step()``;
TRL's loop cannot be entered one step at a time, so its steps are timed by a callback from
on_step_begin to on_step_end (generation happens inside, in TRL's ``_prepare_inputs``) and handed to
pytest-benchmark afterwards. Peak memory: the RSS high-water mark during the timed steps above the
RSS when they start (model, optimizer state and data already exist).
"""

from __future__ import annotations

import time

import pytest
import torch

from bench import harness
from bench.conftest import profile, selected

# "_gc": with gradient checkpointing (TRL's GRPOConfig default); the plain names without it (grpo_fast's)
TRAINERS = ("grpo_fast", "trl", "grpo_fast_gc", "trl_gc")
LEARNING_RATE = 1e-4


def pytest_generate_tests(metafunc):
    if "trainer_case" not in metafunc.fixturenames:
        return
    cases = [
        (name, s) for s in profile(metafunc.config).trainer for name in TRAINERS if selected(metafunc.config, name)
    ]
    metafunc.parametrize("trainer_case", cases, ids=[f"{name}-{s.id}" for name, s in cases])


def _model_and_data(device):
    from grpo_fast import toy

    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, seed=0).to(device)
    data = toy.make_splits(num_train=2000, seed=0)["train"].remove_columns("completion")  # prompt, answer
    return tokenizer, model, data


def _info(name: str, shape) -> dict:
    gc = " + gradient checkpointing" if name.endswith("_gc") else ""
    return {
        "suite": "trainer",
        "method": name,
        "mode": "step",
        "shape": shape.id,
        "prompts": shape.prompts,
        "group": shape.group,
        "max_new": shape.max_new,
        "micro": shape.micro,
        "completions": shape.prompts * shape.group,
        "label": f"{name.removesuffix('_gc')} GRPOTrainer.step{gc}",
    }


def test_trainer(benchmark, trainer_case, device, tmp_path):
    name, shape = trainer_case
    bench = _bench_grpo_fast if name.startswith("grpo_fast") else _bench_trl
    bench(benchmark, shape, device, tmp_path, name)


def _bench_grpo_fast(benchmark, shape, device, out, name):
    from grpo_fast.rewards import accuracy_reward
    from grpo_fast.trainer import GRPOConfig, GRPOTrainer

    tokenizer, model, data = _model_and_data(device)
    config = GRPOConfig(
        output_dir=str(out),
        max_steps=shape.warmup + shape.rounds,
        learning_rate=LEARNING_RATE,
        per_device_train_batch_size=shape.micro,
        gradient_accumulation_steps=shape.prompts * shape.group // shape.micro,
        num_generations=shape.group,
        max_completion_length=shape.max_new,
        temperature=1.0,
        loss_type="dapo",
        beta=0.0,
        logging_steps=10**6,
        seed=0,
        bf16=False,  # fp32 on both sides (TRL is given bf16=False too)
        gradient_checkpointing=name.endswith("_gc"),
    )
    trainer = GRPOTrainer(model, [accuracy_reward], config, data, tokenizer=tokenizer)

    def warmup():
        for _ in range(shape.warmup):
            trainer.step()

    case = harness.Case(run=trainer.step, warmup=warmup, extra_info=_info(name, shape))
    harness.measure(benchmark, case, shape.rounds, device)


def _bench_trl(benchmark, shape, device, out, name):
    try:
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as err:
        pytest.skip(f"TRL is not installed ({err})")
    from grpo_fast.rewards import accuracy_reward

    tokenizer, model, data = _model_and_data(device)
    args = GRPOConfig(
        output_dir=str(out),
        max_steps=shape.warmup + shape.rounds,
        learning_rate=LEARNING_RATE,
        per_device_train_batch_size=shape.micro,
        gradient_accumulation_steps=shape.prompts * shape.group // shape.micro,
        num_generations=shape.group,
        max_completion_length=shape.max_new,
        temperature=1.0,
        loss_type="dapo",
        beta=0.0,
        use_cpu=device.type == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        bf16=False,
        gradient_checkpointing=name.endswith("_gc"),
    )
    peak = harness.PeakMemory(device)
    starts: list[float] = []
    times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            if len(starts) == shape.warmup:
                peak.start()
            harness.synchronize(device)
            starts.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            harness.synchronize(device)
            times.append(time.perf_counter() - starts[-1])

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[accuracy_reward],
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    t0 = time.perf_counter()
    trainer.train()
    used = peak.stop()
    assert len(times) == shape.warmup + shape.rounds, (
        f"TRL ran {len(times)} steps, expected {shape.warmup + shape.rounds}"
    )
    harness.record_external(benchmark, times[shape.warmup :])
    benchmark.extra_info.update(
        _info(name, shape),
        warmup_s=round(sum(times[: shape.warmup]), 4),
        peak_bytes=used,
        peak_extra_bytes=max(used, 0),
        grad_bytes=0,
        memory_kind=peak.kind,
        peak_reset=peak.reset_ok,
        threads=torch.get_num_threads(),
        train_wall_s=round(time.perf_counter() - t0, 3),
        loadavg=harness.loadavg(),
    )
