"""Benchmark: one GRPO step of grpo_fast's GRPOTrainer vs TRL's GRPOTrainer, same model and batch shape.

    python -m pytest bench/bench_trainer.py --benchmark-only [--bench-profile cpu]

The two trainers run side by side, steps alternating, each in its own process (``bench.trainer_steps``,
which says what both are given): this machine's speed drifts within minutes, and alternating steps
gives both trainers the same phase. One benchmark per setting (without / with gradient checkpointing):
its record holds grpo_fast's steps, and TRL's steps and peak memory go into its ``extra_info["paired"]``,
from which ``bench.report`` makes TRL's row. Without TRL installed, grpo_fast runs alone.
"""

from __future__ import annotations

from bench import harness
from bench.conftest import profile, selected
from bench.trainer_steps import run_paired, trl_available

# "_gc": with gradient checkpointing (TRL's GRPOConfig default); the plain name without it (grpo_fast's)
SETTINGS = ("grpo_fast", "grpo_fast_gc")


def pytest_generate_tests(metafunc):
    if "trainer_case" not in metafunc.fixturenames:
        return
    cases = [
        (name, s) for s in profile(metafunc.config).trainer for name in SETTINGS if selected(metafunc.config, name)
    ]
    metafunc.parametrize("trainer_case", cases, ids=[f"{name}-{s.id}" for name, s in cases])


def _info(name: str, shape) -> dict:
    gc = " + gradient checkpointing" if name.endswith("_gc") else ""
    trainer = name.removesuffix("_gc")
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
        "label": f"{trainer} GRPOTrainer.step{gc}",
    }


def test_trainer(benchmark, trainer_case, device):
    name, shape = trainer_case
    gc = name.endswith("_gc")
    trainers = ("grpo_fast", "trl") if trl_available() else ("grpo_fast",)
    result = run_paired(shape, gc, trainers)
    ours = result["grpo_fast"]
    harness.record_external(benchmark, ours["times"])
    info = {
        **_info(name, shape),
        **{k: ours[k] for k in ("warmup_s", "peak_extra_bytes", "peak_reset", "memory_kind", "threads")},
        "times": ours["times"],
        "sampling_times": ours["sampling_times"],
        "peak_bytes": ours["peak_extra_bytes"],
        "grad_bytes": 0,
        "loadavg": harness.loadavg(),
        "steps_alternating": len(trainers) > 1,
    }
    if "trl" in result:
        trl = result["trl"]
        info["paired"] = {
            **_info(name.replace("grpo_fast", "trl"), shape),
            **trl,
            "peak_bytes": trl["peak_extra_bytes"],
        }
    benchmark.extra_info.update(info)
