"""``grpo-fast pipeline``: the DeepSeek-R1 recipe (arXiv 2501.12948) end to end on the toy task, offline.

    grpo-fast pipeline                          the embedded default below, into runs/r1-toy-seed0
    grpo-fast pipeline --config r1.yaml         a stage list from YAML (see PipelineConfig)

Default stages (grpo_fast.r1_toy: 3-digit addition whose chain of thought names columns and carries in
English or Chinese; every stage's output is the next one's input):

    base                SFT of a fresh 0.53M Qwen2 on the mixed "pretraining" corpus (half the words
                        Chinese, a quarter of traces without reasoning) until greedy dev accuracy 0.5
    r1_zero             GRPO from base, rule rewards accuracy + format (R1-Zero)
    cold_start          SFT of base on a small set (256) of readable English traces from a solver
    reasoning_rl        GRPO from cold_start, rewards accuracy + format + language consistency
    rejection_sampling  4 samples per prompt (3000 prompts) from reasoning_rl; keep correct, well-formed,
                        English-only, ended; dedupe; 1 per prompt -> JSONL SFT set with statistics
    rs_sft              SFT of base (not of the RL model, as R1) on that set, 2 epochs (lr 3e-4, as every
                        fine-tuning stage; 1e-3 for pretraining)
    rl2                 GRPO from rs_sft again (temperature 0.7, as R1's second RL stage; 32 prompts per
                        step: the sharper policy leaves fewer groups with a signal, and with 16 the
                        noisy updates lowered accuracy)
    student_base        a 0.14M Qwen2 (half the width, a quarter of the parameters) pretrained on the
                        same corpus until greedy dev accuracy 0.85 (at 0.5 its temperature-1 samples
                        are almost never right: GRPO would get no signal)
    distill             SFT of student_base on the rejection-sampled set (R1's distillation)
    student_grpo        GRPO of student_base (R1-Zero rewards) with the compute distill used
    student_grpo_4x     the same with 4x that compute

After every stage the output model is scored on the 256 held-out prompts as the report does: pass@1
from 4 samples per prompt at temperature 0.6, top-p 0.95 (plus greedy accuracy), format rate,
language consistency of the reasoning, share without reasoning, mean length. RUN_DIR gets report.json
(a list of stages with their metrics), report.md (the table), report.png and rl_curves.png.

Resumable stage by stage: a stage's directory holds stage.json once it has finished; a rerun skips it
(the recorded stage config must match, else the run stops and says which stage to delete) and an
unfinished stage starts over. Compute is counted as 6 N flops per trained token and 2 N per sampled
token (N parameters; sampling a token is one forward pass, training one is forward + backward).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import r1_toy
from .language import language_consistency_reward
from .trainer import configio, tracking
from .trainer.checkpoint import latest_checkpoint
from .trainer.evaluation import completion_id_lists, decode_completions, prompt_text
from .trainer.rewards import accuracy_reward, format_reward, score_completions
from .trainer.rollout import encode_prompts, generate

REWARDS = {"accuracy": accuracy_reward, "format": format_reward, "language": language_consistency_reward}
STAGE_FILE = "stage.json"


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
    """Rejection sampling from ``model`` on the first ``num_prompts`` training prompts (grpo_fast.sampling)."""

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


STAGE_KINDS = {"sft": SFTStage, "grpo": GRPOStage, "rejection_sampling": SamplingStage}


@dataclass(frozen=True)
class EvalConfig:
    """Held-out scoring after every stage, as the R1 report: pass@1 = mean accuracy of ``samples``
    completions per prompt at ``temperature`` / ``top_p`` (R1: 0.6 / 0.95, k = 4 to 64)."""

    num_prompts: int = 256
    samples: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 48


DEFAULT_STAGES: tuple = (
    SFTStage("base", model="new:teacher", data="toy:pretrain", target_accuracy=0.5),
    GRPOStage("r1_zero", model="base", rewards=("accuracy", "format"), max_steps=100),
    SFTStage("cold_start", model="base", data="toy:cold_start", data_size=256, num_epochs=2, learning_rate=3e-4),
    GRPOStage("reasoning_rl", model="cold_start", rewards=("accuracy", "format", "language"), max_steps=100),
    SamplingStage("rejection_sampling", model="reasoning_rl"),
    SFTStage("rs_sft", model="base", data="rejection_sampling", num_epochs=2, learning_rate=3e-4),
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
    stage with ``name``, ``kind`` (sft / grpo / rejection_sampling) and its keys. report_to: experiment
    trackers (GRPOConfig.report_to); each stage is a run named after it in the group RUN_DIR's name, with
    its files in RUN_DIR/<stage>/runs (MLflow's default store: RUN_DIR/mlflow.db)."""

    output_dir: str | None = None
    seed: int = 0
    threads: int | None = None
    num_train: int = 20_000
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    stages: tuple = DEFAULT_STAGES
    report_to: tuple[str, ...] = ("none",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "report_to", tracking.check_report_to(self.report_to))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/r1-toy-seed{self.seed}")


def load_config(path: str | None = None, **overrides) -> PipelineConfig:
    """PipelineConfig from a YAML file (None = the embedded default) with top-level ``overrides``
    (output_dir, seed, threads, report_to). Unknown keys are ConfigErrors naming the closest known key."""
    data = configio.read_yaml(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    source = path or "the pipeline config"
    known = ("output_dir", "seed", "threads", "num_train", "evaluation", "stages", "report_to")
    for key in data:
        if key not in known:
            raise configio.unknown_key_error(key, known, source)
    top = {k: data[k] for k in ("output_dir", "seed", "threads", "num_train", "report_to") if k in data}
    top = {k: configio.coerce(v, configio.field_types(PipelineConfig)[k], k) for k, v in top.items()}
    evaluation = configio.from_dict(EvalConfig, data.get("evaluation") or {}, f"{source}: evaluation")
    stages = tuple(_stage(entry, source) for entry in data.get("stages", [s.name for s in DEFAULT_STAGES]))
    _check_stages(stages, source)
    try:
        return PipelineConfig(**top, evaluation=evaluation, stages=stages)
    except (TypeError, ValueError) as error:
        raise configio.ConfigError(f"{source}: {error}") from error


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
            ref = getattr(stage, key, None)
            if ref in names and names.index(ref) > names.index(stage.name):
                raise configio.ConfigError(f"{source}: stage {stage.name!r} uses {ref!r}, which runs after it")
        for reward in getattr(stage, "rewards", ()):
            if reward not in REWARDS:
                raise configio.ConfigError(f"{source}: stage {stage.name!r}: unknown reward {reward!r}; "
                                           f"rewards are {sorted(REWARDS)}")  # fmt: skip


# ----------------------------------------------------------------------------- running
class Pipeline:
    """Runs the stages of a PipelineConfig in order; ``run()`` returns the report (list of stage records)."""

    def __init__(self, config: PipelineConfig):
        from .demo import ThreadGovernor

        self.config = config
        self.run_dir = config.run_dir
        self.tokenizer = r1_toy.build_tokenizer()
        self.splits = r1_toy.make_splits(num_train=config.num_train, seed=config.seed)
        self.test = self.splits["test"].select(range(min(config.evaluation.num_prompts, len(self.splits["test"]))))
        self.governor = ThreadGovernor(torch.get_num_threads(), fixed=config.threads)
        self.records: dict[str, dict] = {}
        self.tracker = tracking.Trackers([])  # the running stage's trackers (none between stages)

    def run(self) -> list[dict]:
        start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        previous_threads = torch.get_num_threads()
        try:
            for stage in self.config.stages:
                self.records[stage.name] = self._run_stage(stage)
                self.write_report(time.perf_counter() - start, plots=False)
        finally:
            torch.set_num_threads(previous_threads)
        self.write_report(time.perf_counter() - start)
        print(f"[pipeline] done in {time.perf_counter() - start:.0f} s; report: {self.run_dir / 'report.md'}")
        return self.report()

    def _run_stage(self, stage) -> dict:
        stage_dir = self.run_dir / stage.name
        done = stage_dir / STAGE_FILE
        config = configio.to_dict(stage)
        settings = {"seed": self.config.seed, "num_train": self.config.num_train,
                    "evaluation": configio.to_dict(self.config.evaluation)}  # fmt: skip
        if done.exists():
            record = json.loads(done.read_text())
            if record["config"] != config or record.get("settings") != settings:
                raise configio.ConfigError(
                    f"stage {stage.name!r} already finished in {stage_dir} with another config (stage keys, "
                    "seed, num_train or evaluation); delete that directory (and those of the stages after it) "
                    "or use another output_dir"
                )
            print(f"[pipeline] {stage.name}: finished earlier, skipped ({done})")
            return record
        if stage_dir.exists():
            shutil.rmtree(stage_dir)  # an unfinished attempt: start the stage over
        stage_dir.mkdir(parents=True)
        print(f"[pipeline] {stage.name} ({stage.kind}) ...")
        self.governor.update(min_interval=0.0)
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        runner = {"sft": self._sft, "grpo": self._grpo, "rejection_sampling": self._sample}[stage.kind]
        record = {"name": stage.name, "kind": stage.kind, "config": config, "settings": settings}
        run = tracking.RunInfo(stage.name, stage_dir / "runs", config, group=self.run_dir.resolve().name,
                               store_dir=self.run_dir)  # fmt: skip
        with tracking.start_tracking(self.config.report_to, run) as self.tracker:
            record.update(runner(stage, stage_dir))
            record["seconds"], record["cpu_seconds"] = time.perf_counter() - start, _cpu_seconds() - cpu_start
            if "model_path" in record:
                start, cpu_start = time.perf_counter(), _cpu_seconds()
                record["metrics"], record["per_prompt"] = self.evaluate(self._load_model(record["model_path"]))
                record["eval_seconds"] = time.perf_counter() - start
                record["eval_cpu_seconds"] = _cpu_seconds() - cpu_start
            self.tracker.log_metrics(_stage_numbers(record), record["details"].get("steps") or 0)
        self.tracker = tracking.Trackers([])
        tmp = done.with_name(STAGE_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        tmp.replace(done)
        print(f"[pipeline] {stage.name}: {_summary(record)}")
        return record

    # -- stage kinds
    def _sft(self, stage: SFTStage, stage_dir: Path) -> dict:
        from .trainer.sft import SFTConfig, sft_train

        model = self._init_model(stage.model)
        data = self._sft_data(stage)
        config = SFTConfig(
            learning_rate=stage.learning_rate,
            batch_size=stage.batch_size,
            max_steps=stage.max_steps,
            num_epochs=stage.num_epochs,
            target_accuracy=stage.target_accuracy,
            eval_steps=stage.eval_steps,
            warmup_steps=stage.warmup_steps,
            lr_scheduler_type=stage.lr_scheduler_type,
            max_new_tokens=self.config.evaluation.max_new_tokens,
            seed=self.config.seed,
            output_dir=str(stage_dir),
        )
        dev = self.splits["dev"] if stage.target_accuracy is not None else None
        prompt_tokens = self._prompt_tokens(data)
        result = sft_train(model, self.tokenizer, data, config, dev, on_step=self._on_step)
        trained = result["tokens"] + prompt_tokens * result["steps"] * stage.batch_size
        return {
            "model_path": result["checkpoint"],
            "params": _params(model),
            "train_flops": 6 * _params(model) * trained,
            "details": {k: result[k] for k in ("steps", "loss", "dev_accuracy", "tokens")} | {"examples": len(data)},
        }

    def _grpo(self, stage: GRPOStage, stage_dir: Path) -> dict:
        from .trainer import GRPOConfig, GRPOTrainer, MetricsLog, format_metrics

        model = self._init_model(stage.model)
        batch = stage.prompts_per_step * stage.num_generations
        micro_batches = 2 if stage.prompts_per_step % 2 == 0 else 1  # two half-batches: less padding per update
        config = GRPOConfig(
            output_dir=str(stage_dir),
            seed=self.config.seed,
            max_steps=stage.max_steps,
            learning_rate=stage.learning_rate,
            warmup_steps=stage.warmup_steps,
            per_device_train_batch_size=batch // micro_batches,
            gradient_accumulation_steps=micro_batches,
            num_generations=stage.num_generations,
            max_completion_length=stage.max_completion_length,
            temperature=stage.temperature,
            epsilon=stage.epsilon,
            beta=stage.beta,
            loss_type=stage.loss_type,
            reward_weights=stage.reward_weights,
            logging_steps=stage.logging_steps,
        )
        rewards = [REWARDS[r] for r in stage.rewards]
        trainer = GRPOTrainer(model, rewards, config, self.splits["train"], tokenizer=self.tokenizer)
        budget = stage.compute_factor * self._record(stage.compute_of)["train_flops"] if stage.compute_of else None
        n, prompt_tokens = _params(model), self._prompt_tokens(self.splits["train"])
        log, flops, metrics = MetricsLog(stage_dir / "metrics.jsonl"), 0.0, {}
        while trainer.state.step < stage.max_steps and (budget is None or flops < budget):
            if trainer.state.step % 5 == 0:
                self.governor.update()
            metrics = trainer.step()
            tokens = config.generation_batch_size * (prompt_tokens + metrics["completions/mean_length"])
            flops += 8 * n * tokens  # sampling (2 N per token) + forward and backward of the update (6 N)
            metrics["train_flops"] = flops
            if trainer.state.step % stage.logging_steps == 0 or trainer.state.step == 1:
                log.write(metrics)
                print(format_metrics(metrics, stage.max_steps), flush=True)
                self.tracker.log_metrics(metrics, trainer.state.step)
                if self.tracker:
                    self.tracker.log_completions(trainer.completions_table(), trainer.state.step)
        log.write(metrics)
        self.tracker.log_metrics(metrics, trainer.state.step)
        path = trainer.save_checkpoint()
        reward_keys = [k for k in metrics if k.startswith("rewards/") and k.endswith("/mean")]
        return {
            "model_path": str(path),
            "params": n,
            "train_flops": flops,
            "details": {"steps": trainer.state.step, "compute_budget": budget} | {k: metrics[k] for k in reward_keys},
        }

    def _sample(self, stage: SamplingStage, stage_dir: Path) -> dict:
        from .sampling import RejectionSamplingConfig, rejection_sample, write_sft_set

        model = self._init_model(stage.model)
        fields = {f.name for f in dataclasses.fields(RejectionSamplingConfig)}
        config = RejectionSamplingConfig(
            **{k: v for k, v in configio.to_dict(stage).items() if k in fields}, seed=self.config.seed
        )
        prompts = self.splits["train"].select(range(min(stage.num_prompts, len(self.splits["train"]))))
        rows, stats = rejection_sample(model, self.tokenizer, prompts, config, on_batch=self.governor.update)
        path = write_sft_set(stage_dir / "sft_set.jsonl", rows, stats)
        sampled_tokens = stats["sampled"] * (self._prompt_tokens(prompts) + config.max_new_tokens)
        return {
            "data_path": str(path),
            "params": _params(model),
            "sampling_flops_upper_bound": 2 * _params(model) * sampled_tokens,
            "details": {k: v for k, v in stats.items() if k != "config"},
        }

    # -- helpers
    def _on_step(self, step: int) -> None:
        if step % 5 == 0:
            self.governor.update()

    def _record(self, name: str) -> dict:
        """The record of a finished stage: of this run, or one finished earlier in RUN_DIR (an input)."""
        if name in self.records:
            return self.records[name]
        done = self.run_dir / name / STAGE_FILE
        if not done.exists():
            raise configio.ConfigError(f"stage {name!r} is needed but has not run: add it to the stage list")
        return json.loads(done.read_text())

    def _init_model(self, ref: str):
        if ref.startswith("new:"):
            return r1_toy.build_model(self.tokenizer, ref.split(":", 1)[1], seed=self.config.seed)
        if Path(ref).is_dir() and latest_checkpoint(ref) is None and (Path(ref) / "config.json").exists():
            return self._load_model(ref)
        record = self._record(ref)
        if "model_path" not in record:
            raise configio.ConfigError(f"stage {ref!r} produces a dataset, not a model")
        return self._load_model(record["model_path"])

    def _load_model(self, path: str):
        from .trainer.modeling import load_model

        return load_model(path, "cpu")

    def _sft_data(self, stage: SFTStage):
        from .trainer.data import load_data_file

        if stage.data == "toy:pretrain":
            data = r1_toy.pretraining_corpus(self.splits["train"], seed=self.config.seed)
        elif stage.data == "toy:cold_start":
            data = r1_toy.cold_start_set(self.splits["train"], stage.data_size or 256, seed=self.config.seed)
        elif Path(stage.data).suffix in (".json", ".jsonl", ".csv", ".parquet"):
            data = load_data_file(stage.data)
        else:
            record = self._record(stage.data)
            if "data_path" not in record:
                raise configio.ConfigError(f"stage {stage.name!r}: data stage {stage.data!r} produces no dataset")
            data = load_data_file(record["data_path"])
        if len(data) == 0:
            raise configio.ConfigError(f"stage {stage.name!r}: its data ({stage.data}) is empty")
        if stage.data_size is not None and stage.data != "toy:cold_start":
            data = data.select(range(min(stage.data_size, len(data))))
        return data

    def _prompt_tokens(self, data) -> float:
        """Mean prompt length in tokens (of the first 256 rows)."""
        rows = data["prompt"][:256]
        ids = self.tokenizer([prompt_text(self.tokenizer, p) for p in rows], add_special_tokens=False)["input_ids"]
        return sum(map(len, ids)) / len(ids)

    # -- evaluation and report
    @torch.no_grad()
    def evaluate(self, model) -> tuple[dict, dict]:
        """Held-out metrics of ``model`` and their per-prompt values (see ``evaluate_r1``)."""
        return evaluate_r1(model, self.tokenizer, self.test, self.config.evaluation, self.config.seed, self.governor)

    def report(self) -> list[dict]:
        keep = ("name", "kind", "metrics", "params", "train_flops", "seconds", "cpu_seconds", "eval_seconds",
                "eval_cpu_seconds", "details")  # fmt: skip
        return [{k: r[k] for k in keep if k in r} | {"model": r["config"].get("model")} for r in self.records.values()]

    def write_report(self, wall_seconds: float, plots: bool = True) -> None:
        """report.json and report.md; with ``plots`` also report.png, rl_curves.png and each GRPO stage's
        curves.png (grpo_fast.plotting.plot_run)."""
        from .plotting import plot_run

        report = self.report()
        (self.run_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        total = sum(r.get("seconds", 0) + r.get("eval_seconds", 0) for r in report)
        cpu = sum(r.get("cpu_seconds", 0) + r.get("eval_cpu_seconds", 0) for r in report)
        header = (
            f"seed {self.config.seed}; stages {total:.0f} s wall clock, {cpu:.0f} s CPU (training + evaluation, "
            f"summed over the runs that made them); this invocation {wall_seconds:.0f} s"
        )
        effects = effect_table(list(self.records.values()))
        (self.run_dir / "report.md").write_text(stage_table(report, header) + "\n\n" + effects + "\n")
        if not plots:
            return
        plot_report(report, self.run_dir)
        for stage in self.config.stages:
            metrics_file = self.run_dir / stage.name / "metrics.jsonl"
            if stage.kind == "grpo" and stage.name in self.records and metrics_file.exists():
                plot_run(self.run_dir / stage.name)


def evaluate_r1(model, tokenizer, dataset, config: EvalConfig, seed: int = 0, governor=None) -> tuple[dict, dict]:
    """Held-out metrics: pass@1 accuracy over ``config.samples`` samples per prompt, greedy accuracy,
    format rate, language consistency (mean over samples whose reasoning has words), share of samples
    without reasoning words, mean length in tokens.

    Returns:
        (metrics {name: float}, per-prompt values {name: list of N floats, NaN where undefined}) for
        accuracy, format, language_consistency and no_reasoning: paired comparisons between stages.
    """
    funcs = [accuracy_reward, format_reward, language_consistency_reward]
    if governor is not None:
        governor.update()
    greedy, _ = _score(model, tokenizer, dataset, funcs, 1, {"temperature": 0.0}, config.max_new_tokens, seed)
    if governor is not None:
        governor.update()
    sampling = {"temperature": config.temperature, "top_p": config.top_p}
    scores, lengths = _score(model, tokenizer, dataset, funcs, config.samples, sampling, config.max_new_tokens, seed)
    by_prompt = scores.view(len(dataset), config.samples, len(funcs))  # (N, k, F)
    per_prompt = {
        "accuracy": by_prompt[:, :, 0].mean(1),
        "format": by_prompt[:, :, 1].mean(1),
        "language_consistency": by_prompt[:, :, 2].nanmean(1),
        "no_reasoning": by_prompt[:, :, 2].isnan().float().mean(1),
    }
    metrics = {
        "accuracy": float(scores[:, 0].mean()),
        "greedy_accuracy": float(greedy[:, 0].mean()),
        "format": float(scores[:, 1].mean()),
        "language_consistency": float(scores[:, 2].nanmean()),
        "no_reasoning": float(scores[:, 2].isnan().float().mean()),
        "mean_length": float(lengths.float().mean()),
    }
    return metrics, {k: v.tolist() for k, v in per_prompt.items()}


def _score(model, tokenizer, dataset, funcs, k, sampling, max_new_tokens, seed, batch_size=256):
    """((N * k, F) rewards, (N * k,) lengths) of k completions per prompt."""
    generator = torch.Generator().manual_seed(seed)
    scores, lengths = [], []
    prompts = [p for p in dataset["prompt"] for _ in range(k)]
    columns = {c: [v for v in dataset[c] for _ in range(k)] for c in dataset.column_names if c != "prompt"}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = encode_prompts(tokenizer, [prompt_text(tokenizer, p) for p in chunk], None, "cpu")
        rollout = generate(model, ids, mask, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                           generator=generator, **sampling)  # fmt: skip
        cols = {c: v[start : start + batch_size] for c, v in columns.items()}
        cols["completion_ids"] = completion_id_lists(rollout)
        completions = decode_completions(tokenizer, cols["completion_ids"], chunk)
        per_function, _ = score_completions(funcs, [1.0] * len(funcs), chunk, completions, cols)
        scores.append(per_function)
        lengths.append(rollout.lengths)
    return torch.cat(scores), torch.cat(lengths)


COLUMNS = (
    ("accuracy", "pass@1"),
    ("greedy_accuracy", "greedy acc"),
    ("format", "format"),
    ("language_consistency", "lang. consistency"),
    ("no_reasoning", "no reasoning"),
    ("mean_length", "mean length"),
)


def stage_table(report: list[dict], header: str = "") -> str:
    """The stage table as Markdown: one row per stage, held-out metrics after it, compute and time
    (wall and CPU seconds of training + evaluation)."""
    lines = [f"Held-out metrics after each stage ({header})", ""] if header else []
    titles = [c[1] for c in COLUMNS] + ["train TFLOP", "wall s", "CPU s"]
    lines.append("| stage | kind | from | params | " + " | ".join(titles) + " |")
    lines.append("|---" * (len(titles) + 4) + "|")
    for r in report:
        m = r.get("metrics", {})
        cells = [f"{m[k]:.1f}" if k == "mean_length" else f"{m[k]:.3f}" for k, _ in COLUMNS if k in m]
        if not m:
            d = r.get("details", {})
            cells = [f"kept {d.get('kept', 0)} / {d.get('sampled', 0)} sampled"] + [""] * (len(COLUMNS) - 1)
        cells.append(f"{r['train_flops'] / 1e12:.2f}" if r.get("train_flops") else "")
        cells.append(f"{r.get('seconds', 0) + r.get('eval_seconds', 0):.0f}")
        cells.append(f"{r.get('cpu_seconds', 0) + r.get('eval_cpu_seconds', 0):.0f}")
        params = f"{r['params'] / 1e6:.2f}M" if r.get("params") else ""
        lines.append(f"| {r['name']} | {r['kind']} | {r.get('model', '')} | {params} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# What the R1 report found, as (claim, stage, metric, expected direction, reference stage): checked on
# the held-out prompts of a run whose stage list has both stages.
EFFECTS = (
    ("RL with rule rewards raises accuracy (R1-Zero)", "r1_zero", "accuracy", "higher", "base"),
    ("R1-Zero learns to reason before answering", "r1_zero", "no_reasoning", "lower", "base"),
    ("R1-Zero's reasoning stays language-mixed (R1's does not)", "r1_zero", "language_consistency", "lower",
     "reasoning_rl"),
    ("cold-start SFT makes the reasoning readable", "cold_start", "language_consistency", "higher", "base"),
    ("the language-consistency reward raises consistency", "reasoning_rl", "language_consistency", "higher",
     "cold_start"),
    ("reasoning RL raises accuracy", "reasoning_rl", "accuracy", "higher", "cold_start"),
    ("cold start + RL beats R1-Zero (same RL steps)", "reasoning_rl", "accuracy", "higher", "r1_zero"),
    ("rejection-sampling SFT keeps the RL model's accuracy", "rs_sft", "accuracy", "not lower", "reasoning_rl"),
    ("rejection-sampling SFT keeps its readability", "rs_sft", "language_consistency", "not lower", "reasoning_rl"),
    ("rejection-sampling SFT is better formatted than the base", "rs_sft", "format", "higher", "base"),
    ("the second RL stage raises accuracy", "rl2", "accuracy", "higher", "rs_sft"),
    ("DeepSeek-R1 (every stage) beats R1-Zero", "rl2", "accuracy", "higher", "r1_zero"),
    ("distillation improves the small model", "distill", "accuracy", "higher", "student_base"),
    ("distillation beats GRPO alone on the small model at equal compute", "distill", "accuracy", "higher",
     "student_grpo"),
    ("... and at 4x the compute", "distill", "accuracy", "higher", "student_grpo_4x"),
)  # fmt: skip


def compare(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean of a - b, its standard error) over the prompts where both are defined (paired by prompt)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    if not pairs:
        return math.nan, math.nan
    diffs = torch.tensor([x - y for x, y in pairs], dtype=torch.float64)
    se = float(diffs.std() / math.sqrt(len(diffs))) if len(diffs) > 1 else math.nan
    return float(diffs.mean()), se


def effect_table(records: list[dict]) -> str:
    """Markdown table of EFFECTS: reproduced when the paired difference is beyond 2 standard errors in
    the expected direction ("not lower": not below -2 standard errors)."""
    by_name = {r["name"]: r for r in records if "per_prompt" in r}
    lines = ["Effects the R1 report describes, on this run (difference over the held-out prompts, paired, "
             "with its standard error):", "", "| claim | stage vs reference | metric | difference | reproduced |",
             "|---|---|---|---|---|"]  # fmt: skip
    for claim, stage, metric, direction, reference in EFFECTS:
        a, b = (by_name[n]["per_prompt"].get(metric) if n in by_name else None for n in (stage, reference))
        if a is None or b is None:
            continue
        diff, se = compare(a, b)
        sign = -1 if direction == "lower" else 1
        if direction == "not lower":
            verdict = "yes" if diff >= -2 * se else "no"
        else:
            verdict = (
                "yes" if sign * diff > 2 * se else ("no (opposite)" if sign * diff < -2 * se else "no (within noise)")
            )
        lines.append(f"| {claim} | {stage} vs {reference} | {metric} | {diff:+.3f} ± {se:.3f} | {verdict} |")
    return "\n".join(lines)


def plot_report(report: list[dict], run_dir: Path) -> Path:
    """run_dir/report.png: each held-out metric per stage (bars, students hatched) and
    run_dir/rl_curves.png: the training rewards of every GRPO stage against its step."""
    from matplotlib.figure import Figure

    rows = [r for r in report if r.get("metrics")]
    fig = Figure(figsize=(13, 7), layout="constrained")
    for ax, (key, title) in zip(fig.subplots(2, 3).flat, COLUMNS, strict=True):
        values = [r["metrics"][key] for r in rows]
        bars = ax.bar(range(len(rows)), values, color=["C1" if r["kind"] == "grpo" else "C0" for r in rows])
        for bar, r in zip(bars, rows, strict=True):
            if r.get("params", 1e9) < 0.3e6:
                bar.set_hatch("//")
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=45, ha="right", fontsize=8)
        ax.set_title(title + ("" if key == "mean_length" else " (0-1)"))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{run_dir}: held-out metrics after each stage (orange = GRPO, blue = SFT, hatched = student)")
    out = run_dir / "report.png"
    fig.savefig(out, dpi=90)
    _plot_rl_curves(report, run_dir)
    return out


def _plot_rl_curves(report: list[dict], run_dir: Path) -> None:
    from matplotlib.figure import Figure

    from .plotting import read_metrics

    keys = (
        ("rewards/accuracy_reward/mean", "accuracy reward (training samples)"),
        ("rewards/language_consistency_reward/mean", "language consistency (training samples)"),
        ("completions/mean_length", "completion length"),
    )
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    for i, r in enumerate(r for r in report if r["kind"] == "grpo"):
        records = read_metrics(run_dir / r["name"]) if (run_dir / r["name"] / "metrics.jsonl").exists() else []
        for ax, (key, _) in zip(axes, keys, strict=True):
            points = [(m["step"], m[key]) for m in records if key in m]
            if points:  # one colour per stage in every panel, whichever metrics it logged
                ax.plot(*zip(*points, strict=True), label=r["name"], color=f"C{i}")
    for ax, (_, title) in zip(axes, keys, strict=True):
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.savefig(run_dir / "rl_curves.png", dpi=90)


def _cpu_seconds() -> float:
    """User + system CPU time of this process (on a shared machine, closer to the idle-machine wall time)."""
    return sum(os.times()[:2])


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _summary(record: dict) -> str:
    m = record.get("metrics")
    if m:
        text = ", ".join(f"{k} {v:.3f}" for k, v in m.items())
    else:
        d = record.get("details", {})
        text = f"kept {d.get('kept')} of {d.get('sampled')} samples; rejected {d.get('rejected')}"
    return f"{text} ({record['seconds']:.0f} s)"


def _stage_numbers(record: dict) -> dict[str, float]:
    """What a stage's run logs when the stage ends: the held-out metrics (eval/...), its numeric details
    (stage/...), training compute and wall seconds."""
    out = {f"eval/{k}": v for k, v in (record.get("metrics") or {}).items()}
    numbers = {**record.get("details", {}), "train_flops": record.get("train_flops"), "seconds": record["seconds"]}
    out.update({f"stage/{k}": v for k, v in numbers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def run_pipeline(config: PipelineConfig) -> list[dict]:
    """Run every stage of ``config`` (skipping finished ones); returns report.json's content."""
    if not config.stages:
        print("[pipeline] no stages to run", file=sys.stderr)
    return Pipeline(config).run()
