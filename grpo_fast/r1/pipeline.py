"""``grpo-fast pipeline``: the DeepSeek-R1 recipe (arXiv 2501.12948) end to end on the toy task, offline.

    grpo-fast pipeline                          the embedded default below, into runs/r1-toy-seed0
    grpo-fast pipeline --config r1.yaml         a stage list from YAML (grpo_fast.r1.config)

Default stages (grpo_fast.r1.world: 3-digit addition whose chain of thought names columns and carries in
English or Chinese, and grpo_fast.r1.simple: simple queries answered without reasoning; every stage's
output is the next one's input):

    base                SFT of a fresh 0.53M Qwen2 on the mixed "pretraining" corpus (half the words
                        Chinese, a quarter of traces without reasoning, plus the simple training queries
                        answered half with a needless chain of thought) until greedy dev accuracy 0.5
    r1_zero             GRPO from base, rule rewards accuracy + format (R1-Zero)
    cold_start          SFT of base on a small set (256) of readable English traces from a solver
    reasoning_rl        GRPO from cold_start, rewards accuracy + format + language consistency
    rejection_sampling  4 samples per prompt (3000 prompts) from reasoning_rl; keep correct, well-formed,
                        English-only, ended; dedupe; 1 per prompt; then mixed 3:1 with non-reasoning rows
                        (simple queries from a curated source, kept when well-formed, right and without
                        reasoning) at the same size -> JSONL SFT set with statistics, and a
                        reasoning-only set of that size
    rs_sft              SFT of base (not of the RL model, as R1) on the mixed set, 2 epochs (lr 3e-4, as
                        every fine-tuning stage; 1e-3 for pretraining)
    rs_sft_reasoning_only  the same SFT on the reasoning-only set (the control of the mix)
    rl2                 GRPO from rs_sft again (temperature 0.7, as R1's second RL stage; 32 prompts per
                        step: the sharper policy leaves fewer groups with a signal, and with 16 the
                        noisy updates lowered accuracy)
    rejection_sampling_r2, rs_sft_r2, rl2_r2   round 2: the same three stages, sampling from rl2
    student_base        a 0.14M Qwen2 (half the width, a quarter of the parameters) pretrained on the
                        same corpus until greedy dev accuracy 0.85 (at 0.5 its temperature-1 samples
                        are almost never right: GRPO would get no signal)
    distill             SFT of student_base on round 1's rejection-sampled set (R1's distillation)
    student_grpo        GRPO of student_base (R1-Zero rewards) with the compute distill used
    student_grpo_4x     the same with 4x that compute

After every stage the output model is scored on the 256 held-out prompts as the report does: pass@1
from 4 samples per prompt at temperature 0.6, top-p 0.95 (plus greedy accuracy), format rate,
language consistency of the reasoning, share without reasoning, mean length and reasoning length; and
on 256 held-out simple queries: pass@1, share of answers that think, reasoning length. RUN_DIR gets
report.json (a list of stages with their metrics), report.md (the stage table, the table per round and
the effects), report.png and rl_curves.png.

Resumable stage by stage: a stage's directory holds stage.json once it has finished; a rerun skips it
(the recorded stage config must match, else the run stops and says which stage to delete) and an
unfinished stage starts over. Compute is counted as 6 N flops per trained token and 2 N per sampled
token (N parameters; sampling a token is one forward pass, training one is forward + backward).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ..trainer import configio, tracking
from ..trainer.checkpoint import latest_checkpoint
from ..trainer.data import DATA_FORMATS
from ..trainer.evaluation import prompt_text, sample_and_score
from ..trainer.rewards import accuracy_reward, format_reward
from . import simple as r1_simple
from . import world as r1_toy
from .config import (  # noqa: F401  (re-exported: the pipeline's public names)
    DEFAULT_STAGES,
    REWARDS,
    EvalConfig,
    GRPOStage,
    PipelineConfig,
    SamplingStage,
    SFTStage,
    default_stages,
    load_config,
    stage_ref,
)
from .language import language_consistency_reward, reasoning_text
from .report import compare, effect_table, plot_report, round_table, stage_table  # noqa: F401

STAGE_FILE = "stage.json"


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
        self.simple = r1_simple.make_splits(seed=config.seed)
        simple_prompts = min(config.evaluation.simple_prompts, len(self.simple["test"]))
        self.simple_test = self.simple["test"].select(range(simple_prompts))
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
        from ..trainer.sft import SFTConfig, sft_train

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
        from ..trainer import GRPOConfig, GRPOTrainer, MetricsLog, format_metrics

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
        from .rejection import RejectionSamplingConfig, rejection_sample, write_sft_set

        model = self._init_model(stage.model)
        fields = {f.name for f in dataclasses.fields(RejectionSamplingConfig)}
        config = RejectionSamplingConfig(
            **{k: v for k, v in configio.to_dict(stage).items() if k in fields}, seed=self.config.seed
        )
        prompts = self.splits["train"].select(range(min(stage.num_prompts, len(self.splits["train"]))))
        rows, stats = rejection_sample(model, self.tokenizer, prompts, config, on_batch=self.governor.update)
        record = {"params": _params(model)}
        if stage.non_reasoning_ratio is not None:
            rows, control, stats["mix"], stats["non_reasoning"] = self._mix(stage, rows)
            record["reasoning_only_path"] = str(write_sft_set(stage_dir / "reasoning_only.jsonl", control, stats))
        record["data_path"] = str(write_sft_set(stage_dir / "sft_set.jsonl", rows, stats))
        sampled_tokens = stats["sampled"] * (self._prompt_tokens(prompts) + config.max_new_tokens)
        record["sampling_flops_upper_bound"] = 2 * _params(model) * sampled_tokens
        return record | {"details": {k: v for k, v in stats.items() if k != "config"}}

    def _mix(self, stage: SamplingStage, reasoning: list[dict]) -> tuple[list, list, dict, dict]:
        """(mixed rows, reasoning-only rows, mix statistics, non-reasoning filter statistics)."""
        from .rejection import filter_non_reasoning, mix_sets

        if stage.non_reasoning_data == "toy:simple":
            source = r1_simple.source_answer_set(self.simple["train"], len(self.simple["train"]), self.config.seed)
        elif Path(stage.non_reasoning_data).suffix in DATA_FORMATS:
            source = self._load_data(stage.non_reasoning_data)
        else:
            raise configio.ConfigError(f"stage {stage.name!r}: non_reasoning_data is 'toy:simple' or a data file "
                                       f"({', '.join(DATA_FORMATS)}), got {stage.non_reasoning_data!r}")  # fmt: skip
        columns = [c for c in ("prompt", "completion", "answer") if c in source.column_names]
        if columns[:2] != ["prompt", "completion"]:
            raise configio.ConfigError(f"stage {stage.name!r}: non_reasoning_data needs prompt and completion columns")
        kept, filter_stats = filter_non_reasoning(source.select_columns(columns).to_list())
        extra = {c: "en" if c == "language" else None for c in (reasoning[0] if reasoning else {}) if c not in columns}
        mixed, control, mix = mix_sets(reasoning, [row | extra for row in kept], stage.non_reasoning_ratio)
        return mixed, control, mix, filter_stats

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
        from ..trainer.modeling import load_model

        return load_model(path, "cpu")

    def _load_data(self, path: str):
        from ..trainer.data import load_data_file

        return load_data_file(path)

    def _sft_data(self, stage: SFTStage):
        if stage.data == "toy:pretrain":
            data = r1_toy.pretraining_corpus(self.splits["train"], seed=self.config.seed, simple=self.simple["train"])
        elif stage.data == "toy:cold_start":
            data = r1_toy.cold_start_set(self.splits["train"], stage.data_size or 256, seed=self.config.seed)
        elif Path(stage.data).suffix in DATA_FORMATS:
            data = self._load_data(stage.data)
        else:
            name, _, part = stage.data.partition(":")
            key = {"": "data_path", "reasoning_only": "reasoning_only_path"}.get(part)
            record = self._record(name)
            if key is None or key not in record:
                what = "no dataset" if key == "data_path" else f"no {part or 'dataset'!r} set"
                raise configio.ConfigError(f"stage {stage.name!r}: data stage {name!r} produces {what}")
            data = self._load_data(record[key])
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
        return evaluate_r1(model, self.tokenizer, self.test, self.config.evaluation, self.config.seed, self.governor,
                           simple=self.simple_test)  # fmt: skip

    def report(self) -> list[dict]:
        keep = ("name", "kind", "metrics", "params", "train_flops", "seconds", "cpu_seconds", "eval_seconds",
                "eval_cpu_seconds", "details")  # fmt: skip
        return [{k: r[k] for k in keep if k in r} | {"model": r["config"].get("model")} for r in self.records.values()]

    def rounds(self) -> list[tuple[str, ...]]:
        """The stage names of each round (rejection sampling -> SFT -> RL) in the stage list, in order."""
        names = {s.name for s in self.config.stages}
        out, r = [], 1
        while True:
            suffix = "" if r == 1 else f"_r{r}"
            found = tuple(n + suffix for n in self.config.round_stages if n + suffix in names)
            if not found:
                return out
            out.append(found)
            r += 1

    def write_report(self, wall_seconds: float, plots: bool = True) -> None:
        """report.json and report.md; with ``plots`` also report.png, rl_curves.png and each GRPO stage's
        curves.png (grpo_fast.trainer.plotting.plot_run)."""
        from ..trainer.plotting import plot_run

        report = self.report()
        (self.run_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        total = sum(r.get("seconds", 0) + r.get("eval_seconds", 0) for r in report)
        cpu = sum(r.get("cpu_seconds", 0) + r.get("eval_cpu_seconds", 0) for r in report)
        header = (
            f"seed {self.config.seed}; stages {total:.0f} s wall clock, {cpu:.0f} s CPU (training + evaluation, "
            f"summed over the runs that made them); this invocation {wall_seconds:.0f} s"
        )
        rounds = self.rounds()
        effects = effect_table(list(self.records.values()), [names[-1] for names in rounds])
        tables = [stage_table(report, header), round_table(report, rounds), effects]
        (self.run_dir / "report.md").write_text("\n\n".join(tables) + "\n")
        if not plots:
            return
        plot_report(report, self.run_dir)
        for stage in self.config.stages:
            metrics_file = self.run_dir / stage.name / "metrics.jsonl"
            if stage.kind == "grpo" and stage.name in self.records and metrics_file.exists():
                plot_run(self.run_dir / stage.name)


def evaluate_r1(model, tokenizer, dataset, config: EvalConfig, seed: int = 0, governor=None,
                simple=None) -> tuple[dict, dict]:  # fmt: skip
    """Held-out metrics: pass@1 accuracy over ``config.samples`` samples per prompt, greedy accuracy,
    format rate, language consistency (mean over samples whose reasoning has words), share of samples
    without reasoning words, mean length and mean reasoning length (the ``<think>`` text) in tokens;
    with ``simple`` (held-out non-reasoning queries) also their pass@1, share of answers that think
    (whose reasoning has words) and reasoning length, prefixed ``simple_``.

    Returns:
        (metrics {name: float}, per-prompt values {name: list of N floats, NaN where undefined}) for
        accuracy, format, language_consistency, no_reasoning, simple_accuracy and simple_thinks: paired
        comparisons between stages.
    """
    if governor is not None:
        governor.update()
    greedy = _score(model, tokenizer, dataset, 1, {"temperature": 0.0}, config.max_new_tokens, seed)
    if governor is not None:
        governor.update()
    metrics, per_prompt = _sampled_metrics(model, tokenizer, dataset, config, seed)
    metrics = {"accuracy": metrics["accuracy"], "greedy_accuracy": float(greedy["scores"][:, 0].mean())} | metrics
    if simple is not None and len(simple) > 0:
        simple_metrics, simple_per_prompt = _sampled_metrics(model, tokenizer, simple, config, seed)
        metrics |= {f"simple_{k}": simple_metrics[k] for k in ("accuracy", "reasoning_length")}
        metrics["simple_thinks"] = 1 - simple_metrics["no_reasoning"]
        per_prompt["simple_accuracy"] = simple_per_prompt["accuracy"]
        per_prompt["simple_thinks"] = [1 - x for x in simple_per_prompt["no_reasoning"]]
    return metrics, per_prompt


def _sampled_metrics(model, tokenizer, dataset, config: EvalConfig, seed: int) -> tuple[dict, dict]:
    """evaluate_r1's metrics of ``config.samples`` sampled completions per prompt (all but greedy accuracy)."""
    sampling = {"temperature": config.temperature, "top_p": config.top_p}
    out = _score(model, tokenizer, dataset, config.samples, sampling, config.max_new_tokens, seed)
    scores = out["scores"]
    by_prompt = scores.view(len(dataset), config.samples, scores.shape[1])  # (N, k, F)
    per_prompt = {
        "accuracy": by_prompt[:, :, 0].mean(1),
        "format": by_prompt[:, :, 1].mean(1),
        "language_consistency": by_prompt[:, :, 2].nanmean(1),
        "no_reasoning": by_prompt[:, :, 2].isnan().float().mean(1),
    }
    metrics = {
        "accuracy": float(scores[:, 0].mean()),
        "format": float(scores[:, 1].mean()),
        "language_consistency": float(scores[:, 2].nanmean()),
        "no_reasoning": float(scores[:, 2].isnan().float().mean()),
        "mean_length": float(out["lengths"].float().mean()),
        "reasoning_length": float(out["reasoning_lengths"].float().mean()),
    }
    return metrics, {k: v.tolist() for k, v in per_prompt.items()}


def _score(model, tokenizer, dataset, k, sampling, max_new_tokens, seed, batch_size=256) -> dict:
    """k completions per prompt scored by accuracy, format and language consistency: {"scores" (N * k, 3),
    "lengths" (N * k,) completion tokens, "reasoning_lengths" (N * k,) tokens of their reasoning}."""
    funcs = [accuracy_reward, format_reward, language_consistency_reward]
    generator = torch.Generator().manual_seed(seed)
    scores, lengths, reasoning = [], [], []
    rows_per_batch = max(1, batch_size // k)  # batch_size completions per generate call
    for start in range(0, len(dataset), rows_per_batch):
        rows = dataset[start : start + rows_per_batch]
        rollout, completions, per_function, _ = sample_and_score(
            model, tokenizer, rows, k, funcs, max_new_tokens=max_new_tokens, generator=generator, **sampling
        )
        scores.append(per_function)
        lengths.append(rollout.lengths)
        thoughts = [reasoning_text(c) for c in completions]
        reasoning.append(torch.tensor([len(x) for x in tokenizer(thoughts, add_special_tokens=False)["input_ids"]]))
    return {"scores": torch.cat(scores), "lengths": torch.cat(lengths), "reasoning_lengths": torch.cat(reasoning)}


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
