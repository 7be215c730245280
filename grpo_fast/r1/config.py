"""The stage list of ``grpo-fast pipeline`` (grpo_fast.r1.pipeline): the stage kinds, the default DeepSeek-R1
stages, rounds, and the YAML loader with its checks.

Rounds: R1 iterates rejection sampling -> SFT -> RL. ``rounds: N`` repeats the stages named in
``round_stages`` (default rejection_sampling, rs_sft, rl2) N times; round r >= 2's copies are named
``<stage>_r<r>`` (rejection_sampling_r2, rs_sft_r2, rl2_r2, ...), come right after the previous round's
last stage, read each other's outputs, and the round's first stage starts from the previous round's
last model (rejection_sampling_r2 samples from rl2). Everything else stays as in round 1 (rs_sft_r2
fine-tunes ``base`` again, as R1 does). ``rounds`` defaults to 2 for a stage list that has every
round stage (the default list), else to 1:

    rounds: 3
    round_stages: [rejection_sampling, rs_sft, rl2]
    stages: [base, cold_start, reasoning_rl, rejection_sampling, rs_sft, rl2]
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from ..trainer import configio, tracking
from ..trainer.rewards import accuracy_reward, format_reward
from .language import language_consistency_reward

REWARDS = {"accuracy": accuracy_reward, "format": format_reward, "language": language_consistency_reward}
ROUND_STAGES = ("rejection_sampling", "rs_sft", "rl2")
DEFAULT_ROUNDS = 2


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SFTStage:
    """SFT on (prompt, completion) pairs; the loss is on the completion only (grpo_fast.trainer.sft).

    model: "new:teacher" / "new:student" (fresh r1_toy model), a stage name, or a model directory.
    data: "toy:pretrain" (mixed corpus), "toy:cold_start" (readable solver traces, ``data_size`` rows),
        a rejection-sampling stage name, or a json/jsonl/csv/parquet file with prompt and completion.
    num_epochs: passes over the data (None = max_steps steps with rows drawn with replacement).
    target_accuracy: stop once greedy dev accuracy reaches it (checked every eval_steps)."""

    name: str
    kind: str = "sft"
    model: str = "new:teacher"
    data: str = "toy:pretrain"
    data_size: int | None = None
    learning_rate: float = 1e-3
    batch_size: int = 64
    max_steps: int = 1000
    num_epochs: float | None = None
    target_accuracy: float | None = None
    eval_steps: int = 10
    warmup_steps: int = 0
    lr_scheduler_type: str = "constant"


@dataclass(frozen=True)
class GRPOStage:
    """GRPO with rule rewards (grpo_fast.trainer.GRPOTrainer) on the toy training prompts.

    rewards: names from {accuracy, format, language}; reward_weights: one per reward (None = all 1,
        R1's equal weights). compute_of: a finished stage whose training compute (times compute_factor)
        this stage matches: it then runs until its own compute reaches that, max_steps being only a cap."""

    name: str
    kind: str = "grpo"
    model: str = "base"
    rewards: tuple[str, ...] = ("accuracy", "format")
    reward_weights: tuple[float, ...] | None = None
    max_steps: int = 100
    compute_of: str | None = None
    compute_factor: float = 1.0
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    prompts_per_step: int = 16
    num_generations: int = 8
    temperature: float = 1.0
    beta: float = 0.0
    epsilon: float = 0.2
    loss_type: str = "dapo"
    max_completion_length: int = 48
    logging_steps: int = 5


@dataclass(frozen=True)
class SamplingStage:
    """Rejection sampling from ``model`` on the first ``num_prompts`` training prompts (grpo_fast.r1.rejection).

    non_reasoning_ratio: reasoning rows per non-reasoning row in the SFT set (R1: 3); the non-reasoning
        rows come from ``non_reasoning_data`` ("toy:simple": grpo_fast.r1.simple's curated source, or a
        json/jsonl/csv/parquet file with prompt, completion and answer) through the non-reasoning
        filters. The set keeps its size (the kept reasoning rows); a reasoning-only set of the same size
        is written beside it (data ``<this stage>:reasoning_only``). None = reasoning rows only."""

    name: str
    kind: str = "rejection_sampling"
    model: str = "reasoning_rl"
    num_prompts: int = 3000
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    max_tokens: int | None = None
    require_correct: bool = True
    require_format: bool = True
    min_language_consistency: float | None = 1.0
    max_per_prompt: int = 1
    non_reasoning_ratio: float | None = 3.0
    non_reasoning_data: str = "toy:simple"

    def __post_init__(self) -> None:
        if self.non_reasoning_ratio is not None and not self.non_reasoning_ratio > 0:
            raise ValueError(f"non_reasoning_ratio must be > 0 or None, got {self.non_reasoning_ratio!r}")


STAGE_KINDS = {"sft": SFTStage, "grpo": GRPOStage, "rejection_sampling": SamplingStage}


@dataclass(frozen=True)
class EvalConfig:
    """Held-out scoring after every stage, as the R1 report: pass@1 = mean accuracy of ``samples``
    completions per prompt at ``temperature`` / ``top_p`` (R1: 0.6 / 0.95, k = 4 to 64).
    simple_prompts: held-out queries of the non-reasoning family (grpo_fast.r1.simple) scored the same
    way (0 = none)."""

    num_prompts: int = 256
    samples: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 48
    simple_prompts: int = 256

    def __post_init__(self) -> None:
        for name in ("num_prompts", "samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.simple_prompts < 0:
            raise ValueError(f"simple_prompts must be >= 0, got {self.simple_prompts!r}")


DEFAULT_STAGES: tuple = (
    SFTStage("base", model="new:teacher", data="toy:pretrain", target_accuracy=0.5),
    GRPOStage("r1_zero", model="base", rewards=("accuracy", "format"), max_steps=100),
    SFTStage("cold_start", model="base", data="toy:cold_start", data_size=256, num_epochs=2, learning_rate=3e-4),
    GRPOStage("reasoning_rl", model="cold_start", rewards=("accuracy", "format", "language"), max_steps=100),
    SamplingStage("rejection_sampling", model="reasoning_rl"),
    SFTStage("rs_sft", model="base", data="rejection_sampling", num_epochs=2, learning_rate=3e-4),
    SFTStage("rs_sft_reasoning_only", model="base", data="rejection_sampling:reasoning_only", num_epochs=2,
             learning_rate=3e-4),
    GRPOStage("rl2", model="rs_sft", rewards=("accuracy", "format", "language"), max_steps=80, temperature=0.7,
              prompts_per_step=32),
    SFTStage("student_base", model="new:student", data="toy:pretrain", target_accuracy=0.85),
    SFTStage("distill", model="student_base", data="rejection_sampling", num_epochs=2, learning_rate=3e-4),
    GRPOStage("student_grpo", model="student_base", rewards=("accuracy", "format"), compute_of="distill",
              max_steps=10_000),
    GRPOStage("student_grpo_4x", model="student_base", rewards=("accuracy", "format"), compute_of="distill",
              compute_factor=4.0, max_steps=10_000),
)  # fmt: skip


@dataclass(frozen=True)
class PipelineConfig:
    """output_dir: RUN_DIR (None = runs/r1-toy-seed<seed>). seed: every stage's seed (model init, data
    order, sampling). threads: torch threads (None = one per idle core, re-picked as the load changes).
    num_train: training prompts of the toy task (the pretraining corpus, RL and sampling prompts).
    evaluation: EvalConfig keys. stages: the stage list, in order; each entry is a default stage's name
    (see DEFAULT_STAGES), or a mapping with ``name`` and keys that override that default's, or a new
    stage with ``name``, ``kind`` (sft / grpo / rejection_sampling) and its keys; load_config expands
    them over ``rounds`` (see the module docstring), default_stages() is the default list so expanded.
    round_stages: round 1's stages of a round (the report's table per round). report_to: experiment
    trackers (GRPOConfig.report_to); each stage is a run named after it in the group RUN_DIR's name, with
    its files in RUN_DIR/<stage>/runs (MLflow's default store: RUN_DIR/mlflow.db)."""

    output_dir: str | None = None
    seed: int = 0
    threads: int | None = None
    num_train: int = 20_000
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    stages: tuple = field(default_factory=lambda: default_stages())
    report_to: tuple[str, ...] = ("none",)
    round_stages: tuple[str, ...] = ROUND_STAGES

    def __post_init__(self) -> None:
        object.__setattr__(self, "report_to", tracking.check_report_to(self.report_to))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/r1-toy-seed{self.seed}")


def load_config(path: str | None = None, **overrides) -> PipelineConfig:
    """PipelineConfig from a YAML file (None = the embedded default) with top-level ``overrides``
    (output_dir, seed, threads, report_to). Unknown keys are ConfigErrors naming the closest known key.
    ``rounds`` (default 2 when the list has a round stage) and ``round_stages`` expand the stage list."""
    data = configio.read_yaml(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    source = path or "the pipeline config"
    known = ("output_dir", "seed", "threads", "num_train", "evaluation", "stages", "report_to", "rounds",
             "round_stages")  # fmt: skip
    for key in data:
        if key not in known:
            raise configio.unknown_key_error(key, known, source)
    top = {k: data[k] for k in ("output_dir", "seed", "threads", "num_train", "report_to") if k in data}
    top = {k: configio.coerce(v, configio.field_types(PipelineConfig)[k], k) for k, v in top.items()}
    try:
        evaluation = configio.from_dict(EvalConfig, data.get("evaluation") or {}, f"{source}: evaluation")
        stages = tuple(_stage(entry, source) for entry in data.get("stages", [s.name for s in DEFAULT_STAGES]))
        rounds = configio.coerce(data.get("rounds", DEFAULT_ROUNDS), int, "rounds")
        round_stages = configio.coerce(data.get("round_stages", ROUND_STAGES), tuple[str, ...], "round_stages")
        stages = expand_rounds(stages, rounds, round_stages, explicit="rounds" in data)
        _check_stages(stages, source)
        return PipelineConfig(**top, evaluation=evaluation, stages=stages, round_stages=round_stages)
    except configio.ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise configio.ConfigError(f"{source}: {error}") from error


def default_stages(rounds: int = DEFAULT_ROUNDS) -> tuple:
    """DEFAULT_STAGES over ``rounds`` rounds of ROUND_STAGES."""
    return expand_rounds(DEFAULT_STAGES, rounds, ROUND_STAGES)


def expand_rounds(stages: tuple, rounds: int, round_stages=ROUND_STAGES, explicit: bool = True) -> tuple:
    """``stages`` with the stages named in ``round_stages`` repeated ``rounds`` times (module docstring);
    ``explicit`` False (rounds not given by the user): only when the list has every round stage.

    Raises:
        ValueError: rounds < 1, or rounds > 1 given (``explicit``) while the list has none of round_stages.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    members = [s for s in stages if s.name in round_stages]
    if not members and rounds > 1 and explicit:
        raise ValueError(f"rounds: {rounds} repeats the stages {list(round_stages)}, none of which is listed")
    if not members or (not explicit and len(members) < len(round_stages)):
        return tuple(stages)  # the default number of rounds applies to a list with the whole round
    names = [s.name for s in stages]
    position = names.index(members[-1].name) + 1
    models = [m.name for m in members if m.kind != "rejection_sampling"]
    copies, previous_last = [], models[-1] if models else None
    for r in range(2, rounds + 1):
        rename = {m.name: f"{m.name}_r{r}" for m in members}
        for i, member in enumerate(members):
            changes = {"name": rename[member.name]}
            for key in ("model", "data", "compute_of"):
                ref = getattr(member, key, None)
                head, sep, tail = (ref or "").partition(":")
                if head in rename:
                    changes[key] = rename[head] + sep + tail
                elif i == 0 and key == "model" and previous_last is not None:
                    changes[key] = previous_last  # the round starts from the previous round's last model
            copies.append(dataclasses.replace(member, **changes))
        previous_last = rename[models[-1]] if models else None
    return tuple(stages[:position]) + tuple(copies) + tuple(stages[position:])


def stage_ref(ref: str | None) -> str | None:
    """The stage a model / data / compute_of reference names ("rejection_sampling:reasoning_only" ->
    "rejection_sampling"); other references (toy:..., paths) come back whole."""
    if ref is None or ref.startswith("toy:") or ref.startswith("new:"):
        return ref
    return ref.split(":", 1)[0] if ":" in ref and not Path(ref).exists() else ref


def _stage(entry, source: str):
    defaults = {s.name: s for s in DEFAULT_STAGES}
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise configio.ConfigError(
            f"{source}: a stage is a default stage's name or a mapping with a name, got {entry!r}"
        )
    name = str(entry["name"])
    base = defaults.get(name)
    if base is None and "kind" not in entry:
        close = difflib.get_close_matches(name, list(defaults), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise configio.ConfigError(
            f"{source}: {name!r} is not a default stage; {hint}a new stage needs a kind ({', '.join(STAGE_KINDS)})"
        )
    kind = entry.get("kind", base.kind if base else None)
    if kind not in STAGE_KINDS:
        raise configio.ConfigError(f"{source}: stage {name!r} has kind {kind!r}; kinds are {sorted(STAGE_KINDS)}")
    values = configio.to_dict(base) if base is not None and base.kind == kind else {"name": name}
    values.update(entry)
    return configio.from_dict(STAGE_KINDS[kind], values, f"{source}: stage {name!r}")


def _check_stages(stages: tuple, source: str) -> None:
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise configio.ConfigError(f"{source}: stage names must be unique, got {names}")
    for stage in stages:
        for key in ("model", "data", "compute_of"):
            ref = stage_ref(getattr(stage, key, None))
            if ref in names and names.index(ref) > names.index(stage.name):
                raise configio.ConfigError(f"{source}: stage {stage.name!r} uses {ref!r}, which runs after it")
        for reward in getattr(stage, "rewards", ()):
            if reward not in REWARDS:
                raise configio.ConfigError(f"{source}: stage {stage.name!r}: unknown reward {reward!r}; "
                                           f"rewards are {sorted(REWARDS)}")  # fmt: skip
