"""The ``grpo-fast`` command (also ``python -m grpo_fast``).

    grpo-fast demo [--seed N] [--out RUN_DIR]                  SFT warm-start + GRPO on the toy task, offline
    grpo-fast train --config FILE [--key value ...] [--resume [CHECKPOINT]]
    grpo-fast train|demo ... --report_to tensorboard           also log to trackers (wandb, trackio, mlflow, all)
    grpo-fast eval --model DIR [--dataset toy|FILE] [--k K]    greedy accuracy (and pass@k) on held-out prompts
    grpo-fast plot RUN_DIR                                     RUN_DIR/curves.png from RUN_DIR/metrics.jsonl
    grpo-fast pipeline [--config FILE] [--stages a,b]          the DeepSeek-R1 recipe, stage by stage (toy task)

A training config file is YAML with GRPOConfig keys (see grpo_fast.trainer) plus the run keys of
``RunArguments`` below (model, data, rewards, device, LoRA); ``--key value`` overrides any of them.
Unknown keys are errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from . import configio, tracking

REPORT_TO_HELP = "experiment trackers, comma-separated: tensorboard, wandb, trackio, mlflow; all; none (default)"
DATA_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class RunArguments:
    """What to train and on what (the part of a config that is not GRPO hyper-parameters).

    model_name_or_path: a local model directory (from_pretrained), or "toy" for a fresh tiny Qwen2
        (grpo_fast.toy; untrained, so GRPO alone has no signal — start from a demo checkpoint instead).
    dataset: "toy" (synthetic addition, grpo_fast.toy) or a local json/jsonl/csv/parquet file with a
        "prompt" column. eval_dataset: a local file; with dataset "toy", None = the toy held-out split.
    reward_funcs: built-in reward names (grpo_fast.rewards.REWARD_FUNCTIONS).
    device: "cpu", "cuda", ...; None = cuda when available.
    use_peft, lora_*: train LoRA adapters only (``peft.LoraConfig``; TRL's ModelConfig names).
        lora_target_modules None = peft's default modules for the architecture; never the LM head.
    """

    model_name_or_path: str = "toy"
    dataset: str = "toy"
    eval_dataset: str | None = None
    reward_funcs: tuple[str, ...] = ("accuracy",)
    device: str | None = None
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] | None = None

    def peft_config(self):
        """The ``peft.LoraConfig`` of these arguments, or None without ``use_peft``."""
        if not self.use_peft:
            return None
        try:
            from peft import LoraConfig
        except ImportError as error:
            raise configio.ConfigError("use_peft needs the peft package: pip install 'grpo-fast[peft]'") from error
        targets = None if self.lora_target_modules is None else list(self.lora_target_modules)
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's per-shard bar would interleave with ours
    try:
        commands = {"train": _train, "eval": _eval, "plot": _plot, "demo": _demo, "pipeline": _pipeline}
        return commands[args.command](args, rest)
    except (configio.ConfigError, FileNotFoundError) as error:
        print(f"grpo-fast {args.command}: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="GRPO training from a YAML config; --key value overrides any config key", allow_abbrev=False
    )
    train.add_argument("--config", help="YAML file of GRPOConfig + RunArguments keys")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="continue from the latest checkpoint in output_dir (or from the one given)",
    )
    ev = sub.add_parser("eval", help="greedy accuracy and pass@k of a model on held-out prompts")
    ev.add_argument("--model", required=True, help="model directory (e.g. RUN_DIR/checkpoint-N)")
    ev.add_argument("--dataset", default="toy", help='"toy" (its held-out split) or a json/jsonl/csv/parquet file')
    ev.add_argument("--k", type=int, default=1, help="also report pass@k from k samples per prompt")
    ev.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the pass@k samples")
    ev.add_argument("--max-new-tokens", type=int, default=40)
    ev.add_argument("--num-prompts", type=int, default=None, help="evaluate on the first N prompts only")
    ev.add_argument("--seed", type=int, default=0)
    plot = sub.add_parser("plot", help="write RUN_DIR/curves.png (reward, accuracy, kl, length)")
    plot.add_argument("run_dir")
    demo = sub.add_parser("demo", help="offline demo: tiny model, SFT warm-start, GRPO, before/after accuracy")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default=None, help="run directory (default runs/demo-seed<N>)")
    demo.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the demo's tuned value)")
    demo.add_argument("--threads", type=int, default=None, help="torch threads (default: one per idle core)")
    demo.add_argument("--report_to", default="none", help=REPORT_TO_HELP)
    pipe = sub.add_parser(
        "pipeline",
        help="DeepSeek-R1 recipe on the toy task: R1-Zero, cold start, RL, rejection sampling, SFT, RL, "
        "distillation; resumable; writes RUN_DIR/report.{json,md,png}",
    )
    pipe.add_argument("--config", default=None, help="YAML stage list (default: the embedded one, grpo_fast.pipeline)")
    pipe.add_argument("--stages", default=None, help="run only these stages of the config (comma-separated names)")
    pipe.add_argument("--output-dir", default=None, help="RUN_DIR (default: the config's, else runs/r1-toy-seed<N>)")
    pipe.add_argument("--seed", type=int, default=None)
    pipe.add_argument("--threads", type=int, default=None, help="torch threads (default: one per idle core)")
    pipe.add_argument("--report_to", default=None, help=REPORT_TO_HELP.replace("none (default)", "none"))
    return parser


def load_train_config(path: str | None, overrides: list[str]):
    """(GRPOConfig, RunArguments) from a YAML file and ``--key value`` overrides."""
    from .trainer import GRPOConfig

    grpo_keys, run_keys = configio.field_types(GRPOConfig), configio.field_types(RunArguments)
    data = configio.read_yaml(path) if path else {}
    data.update(configio.parse_overrides(overrides, [*grpo_keys, *run_keys]))
    for key in data:
        if key not in grpo_keys and key not in run_keys:
            raise configio.unknown_key_error(key, [*grpo_keys, *run_keys], path or "the command line")
    grpo = configio.from_dict(GRPOConfig, {k: v for k, v in data.items() if k in grpo_keys}, path or "the command line")
    run = configio.from_dict(RunArguments, {k: v for k, v in data.items() if k in run_keys}, path or "the command line")
    return grpo, run


def _train(args, rest) -> int:
    import torch

    from . import toy
    from .modeling import load_model
    from .trainer import GRPOTrainer

    config, run = load_train_config(args.config, rest)
    tracking.resolve_report_to(config.report_to)  # a tracker that is not installed: say so before loading anything
    device = run.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if run.model_name_or_path == "toy":
        tokenizer = toy.build_tokenizer()
        model = toy.build_model(tokenizer, seed=config.seed).to(device)
    else:
        from transformers import AutoTokenizer

        model = load_model(run.model_name_or_path, device)
        tokenizer = AutoTokenizer.from_pretrained(run.model_name_or_path)
    train, evaluation = _datasets(run.dataset, run.eval_dataset, config.seed)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    config.to_yaml(Path(config.output_dir) / "grpo_config.yaml")
    trainer = GRPOTrainer(model, list(run.reward_funcs), config, train, eval_dataset=evaluation, tokenizer=tokenizer,
                          peft_config=run.peft_config())  # fmt: skip
    metrics = trainer.train(resume_from_checkpoint=args.resume)
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith(("eval/", "reward", "step"))}, indent=2))
    return 0


def _datasets(dataset: str, eval_dataset: str | None, seed: int):
    from . import toy

    if dataset == "toy":
        splits = toy.make_splits(seed=seed)
        return splits["train"], (splits["test"] if eval_dataset is None else load_data_file(eval_dataset))
    return load_data_file(dataset), (None if eval_dataset is None else load_data_file(eval_dataset))


def load_data_file(path: str):
    """A local json/jsonl/csv/parquet file as a ``datasets.Dataset`` (no network)."""
    from datasets import load_dataset

    suffix = Path(path).suffix.lower()
    if suffix not in DATA_FORMATS:
        raise configio.ConfigError(f"dataset file must end in one of {sorted(DATA_FORMATS)}, got {path!r}")
    if not Path(path).exists():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    return load_dataset(DATA_FORMATS[suffix], data_files=path, split="train")


def _eval(args, rest) -> int:
    import torch
    from transformers import AutoTokenizer

    from . import toy
    from .evaluation import evaluate
    from .modeling import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = toy.make_splits()["test"] if args.dataset == "toy" else load_data_file(args.dataset)
    if args.num_prompts is not None:
        dataset = dataset.select(range(min(args.num_prompts, len(dataset))))
    out = evaluate(
        model,
        tokenizer,
        dataset,
        max_new_tokens=args.max_new_tokens,
        k=args.k,
        temperature=args.temperature,
        seed=args.seed,
    )
    print(json.dumps({"model": args.model, "prompts": len(dataset), **out}, indent=2))
    return 0


def _plot(args, rest) -> int:
    from .plotting import plot_run

    print(plot_run(args.run_dir))
    return 0


def _demo(args, rest) -> int:
    from .demo import run_demo

    kwargs = {} if args.steps is None else {"steps": args.steps}
    report_to = tuple(args.report_to.split(","))
    try:
        tracking.check_report_to(report_to)
    except (TypeError, ValueError) as error:
        raise configio.ConfigError(str(error)) from error
    run_demo(seed=args.seed, out=args.out, threads=args.threads, report_to=report_to, **kwargs)
    return 0


def _pipeline(args, rest) -> int:
    import dataclasses

    from .pipeline import load_config, run_pipeline

    config = load_config(args.config, output_dir=args.output_dir, seed=args.seed, threads=args.threads,
                         report_to=args.report_to)  # fmt: skip
    tracking.resolve_report_to(config.report_to)  # a tracker that is not installed: say so before any stage
    if args.stages:
        wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
        names = [s.name for s in config.stages]
        for name in wanted:
            if name not in names:
                raise configio.unknown_key_error(name, names, "--stages")
        config = dataclasses.replace(config, stages=tuple(s for s in config.stages if s.name in wanted))
    run_pipeline(config)
    return 0
