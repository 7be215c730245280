"""The ``grpo-fast`` command (also ``python -m grpo_fast``).

    grpo-fast demo [--seed N] [--out RUN_DIR]                  SFT warm-start + GRPO on the toy task, offline
    grpo-fast train --config FILE [--key value ...] [--resume [CHECKPOINT]]
    grpo-fast train|demo ... --report_to tensorboard           also log to trackers (wandb, trackio, mlflow, all)
    grpo-fast eval --model DIR [--dataset toy|FILE] [--k K]    greedy accuracy (and pass@k) on held-out prompts
    grpo-fast plot RUN_DIR                                     RUN_DIR/curves.png from RUN_DIR/metrics.jsonl
    grpo-fast tiny-model DIR [--chat-template qwen|llama|none] a random tiny Qwen2/Llama to try the real path offline
    grpo-fast pipeline [--config FILE] [--stages a,b]          the DeepSeek-R1 recipe, stage by stage (toy task)

A training config file is YAML with GRPOConfig keys (see grpo_fast.trainer) plus the run keys of
``RunArguments`` below (model, data, rewards, device, LoRA); ``--key value`` overrides any of them.
Unknown keys are errors.

Errors are one line, ``grpo-fast <command>: error: <what>; <remedy>``, with exit code 2 for bad usage
(a config value, a path, a dataset) and 1 for a run that failed (a reward function, a full disk, a NaN
loss); ``--debug`` (anywhere on the line) shows the traceback instead. Ctrl-C during ``train`` saves a
checkpoint of the last finished step and exits with 130; SIGTERM and SIGUSR1 (preemption) do the same and
exit with 128 + the signal number (143, 138 on Linux).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .trainer import configio, tracking
from .trainer.data import load_data_file, load_named_dataset, prepare_prompts
from .trainer.rewards import FORMAT_STYLES, get_reward_function

RUN_ARGUMENTS_FILE = "run_arguments.yaml"
REPORT_TO_HELP = "experiment trackers, comma-separated: tensorboard, wandb, trackio, mlflow; all; none (default)"


def _key(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RunArguments:
    """What to train and on what (the part of a config that is not GRPO hyper-parameters)."""

    model_name_or_path: str = _key(
        "toy",
        'a local model directory (from_pretrained), or "toy" for a fresh tiny Qwen2 (untrained: GRPO alone has '
        "no signal on it; start from a demo checkpoint instead)",
    )
    dataset: str = _key(
        "toy",
        '"toy" (synthetic addition) or a local json/jsonl/csv/parquet file with a "prompt" column (text, or a '
        'list of chat messages); the accuracy reward reads an "answer" (or "solution") column',
    )
    eval_dataset: str | None = _key(
        None, 'a local file like dataset, scored greedily at eval_steps and at the end; with dataset "toy", '
        "None = the toy held-out split",
    )  # fmt: skip
    # real tasks: TRL's script-argument names
    dataset_name: str | None = _key(
        None, "a Hub dataset id (datasets.load_dataset, through its cache), a directory saved with save_to_disk, or "
        "a json/jsonl/csv/parquet file; used instead of dataset",
    )  # fmt: skip
    dataset_config: str | None = _key(None, "the Hub dataset's configuration (GSM8K: main)")
    dataset_train_split: str = _key("train", "the split of dataset_name trained on")
    dataset_test_split: str | None = _key(
        None, "the split of dataset_name scored as eval_dataset; None = test when the dataset has one"
    )
    prompt_column: str = _key("prompt", "the prompt column (text or chat messages); without one, question is taken")
    answer_column: str = _key("answer", "the gold-answer column the accuracy reward reads (GSM8K's #### x allowed)")
    system_prompt: str | None = _key(None, "a system message put before every chat prompt")
    apply_chat_template: bool = _key(False, "send plain-text prompts through the tokenizer's chat template too")
    format_style: str = _key(
        "think_answer", "what the format reward asks for: think_answer (<think>...</think><answer>...</answer>), "
        "think (<think>...</think> then the answer, Qwen3), boxed (the answer in \\boxed{})",
    )  # fmt: skip
    reward_funcs: tuple[str, ...] = _key(
        ("accuracy",),
        "built-in reward names, comma-separated: accuracy (the final answer against the answer or solution "
        "column; math-verify when installed), format (see format_style)",
    )
    device: str | None = _key(None, '"cpu", "cuda", "cuda:1", ...; None = cuda when available')
    use_peft: bool = _key(False, "train LoRA adapters only (peft.LoraConfig; TRL's ModelConfig names)")
    lora_r: int = _key(16, "LoRA rank")
    lora_alpha: int = _key(32, "LoRA alpha")
    lora_dropout: float = _key(0.05, "LoRA dropout")
    lora_target_modules: tuple[str, ...] | None = _key(
        None, "module names to adapt, comma-separated; None = peft's default for the architecture (never the LM head)"
    )

    def __post_init__(self):
        configio.check_field_types(self)
        checks = (("lora_r", self.lora_r >= 1, "an int >= 1"), ("lora_alpha", self.lora_alpha > 0, "> 0"),
                  ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"),
                  ("reward_funcs", len(self.reward_funcs) > 0, "at least one reward name"),
                  ("format_style", self.format_style in FORMAT_STYLES, f"one of {', '.join(FORMAT_STYLES)}"),
                  ("dataset", self.dataset_name is None or self.dataset == "toy",
                   "left out when dataset_name is given (one of them names the data)"),
                  ("dataset_test_split", self.dataset_test_split is None or self.eval_dataset is None,
                   "left out when eval_dataset is given (one of them names the eval set)"))  # fmt: skip
        checks += self._data_key_checks()
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

    def _data_key_checks(self) -> tuple:
        """The data keys that only mean something with dataset_name, or with data other than the toy task."""
        named = self.dataset_name is not None
        toy = self.dataset == "toy" and not named
        default = RunArguments.__dataclass_fields__
        checks = [(k, named or getattr(self, k) == default[k].default, "left out without dataset_name")
                  for k in ("dataset_config", "dataset_train_split", "dataset_test_split")]  # fmt: skip
        checks += [(k, not toy or getattr(self, k) == default[k].default,
                    "left out for the toy task (it applies to dataset_name or a dataset file)")
                   for k in ("prompt_column", "answer_column", "system_prompt", "apply_chat_template")]  # fmt: skip
        return tuple(checks)

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
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] == ["train"]:  # config keys take dashes or underscores: --max-steps is --max_steps
        argv = [_underscored(a) for a in argv]
    parser = _parser(train_keys=argv[:1] == ["train"])
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's per-shard bar would interleave with ours
    try:
        commands = {"train": _train, "eval": _eval, "plot": _plot, "demo": _demo, "pipeline": _pipeline,
                    "tiny-model": _tiny_model}  # fmt: skip
        return commands[args.command](args, rest)
    except KeyboardInterrupt as stop:  # Ctrl-C, or a StopSignal (SIGTERM, SIGUSR1) during training
        signum = getattr(stop, "signum", None)
        if signum is None:
            print(f"grpo-fast {args.command}: interrupted", file=sys.stderr)
            return 130
        print(f"grpo-fast {args.command}: {stop} (exit code {128 + signum})", file=sys.stderr)
        return 128 + signum
    except Exception as error:
        if debug:
            raise
        print(f"grpo-fast {args.command}: error: {error_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, USAGE_ERRORS) else 1


# what a user fixes in the command, the config or the files it names (exit code 2); anything else is a run
# that failed (exit code 1)
USAGE_ERRORS = (configio.ConfigError, ValueError, TypeError, FileNotFoundError, IsADirectoryError)


def error_line(error: BaseException) -> str:
    """``<what>; <remedy>`` on one line: the project's messages carry their remedy; other errors get one."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, USAGE_ERRORS) or type(error).__module__.startswith("grpo_fast"):
        return text
    return f"{type(error).__name__}: {text}; rerun with --debug for the traceback"


def _parser(train_keys: bool = False) -> argparse.ArgumentParser:
    """The command's parser; ``train_keys`` adds every config key to ``train`` (for its --help and parsing;
    it imports the trainer, so only when the command is train)."""
    parser = argparse.ArgumentParser(prog="grpo-fast", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="GRPO training from a YAML config; --key value overrides any config key",
        usage="grpo-fast train [--config FILE] [--resume [CHECKPOINT]] [--KEY VALUE ...]",
        description="GRPO training. A config is a YAML file of the keys below; --KEY VALUE (or --KEY=VALUE) on the "
        "command line overrides the file. Unknown keys are errors.",
        allow_abbrev=False,
    )
    train.add_argument("--config", help="YAML file of GRPOConfig + RunArguments keys")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="continue from the latest checkpoint in output_dir (or from the one given)",
    )
    if train_keys:
        _add_config_keys(train)
    ev = sub.add_parser("eval", help="greedy accuracy and pass@k of a model on held-out prompts")
    ev.add_argument("--model", required=True, help="model directory (e.g. RUN_DIR/checkpoint-N)")
    ev.add_argument(
        "--dataset",
        default=None,
        help='"toy" (its held-out split) or a json/jsonl/csv/parquet file; default: the eval_dataset of the run '
        "the model was saved by (RUN_DIR/run_arguments.yaml), else toy",
    )
    ev.add_argument("--k", type=_positive_int, default=1, help="also report pass@k from k samples per prompt")
    ev.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the pass@k samples")
    ev.add_argument("--max-new-tokens", type=_positive_int, default=40)
    ev.add_argument("--num-prompts", type=_positive_int, default=None, help="evaluate on the first N prompts only")
    ev.add_argument("--seed", type=int, default=0)
    plot = sub.add_parser("plot", help="write RUN_DIR/curves.png (reward, accuracy, kl, length)")
    plot.add_argument("run_dir")
    tiny = sub.add_parser(
        "tiny-model",
        help="write a random tiny Qwen2 (or Llama) with a byte-level tokenizer and a chat template to DIR, built in "
        "code: the real path (chat prompts, datasets, train, eval) offline; it is untrained",
    )
    tiny.add_argument("dir", help="the directory to write (AutoModelForCausalLM / AutoTokenizer load it)")
    tiny.add_argument("--chat-template", choices=("qwen", "llama", "none"), default="qwen",
                      help="qwen: a Qwen2 with ChatML; llama: a Llama with Llama-3 headers; none: a Qwen2 without "
                      "one")  # fmt: skip
    tiny.add_argument("--seed", type=int, default=0)
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
    pipe.add_argument(
        "--config", default=None, help="YAML stage list (default: the embedded one, grpo_fast.r1.pipeline)"
    )
    pipe.add_argument("--stages", default=None, help="run only these stages of the config (comma-separated names)")
    pipe.add_argument("--output-dir", default=None, help="RUN_DIR (default: the config's, else runs/r1-toy-seed<N>)")
    pipe.add_argument("--seed", type=int, default=None)
    pipe.add_argument("--threads", type=int, default=None, help="torch threads (default: one per idle core)")
    pipe.add_argument("--report_to", default=None, help=REPORT_TO_HELP.replace("none (default)", "none"))
    return parser


def _add_config_keys(parser: argparse.ArgumentParser) -> None:
    """One option per RunArguments and GRPOConfig field, grouped, with its help text and default. Values
    stay strings here (``configio`` coerces them with the file's values), and an option not given is
    absent from the namespace, so the YAML file's value stands."""
    from .trainer import GRPOConfig

    groups = (
        ("run keys (what to train, on what data)", RunArguments),
        ("GRPOConfig keys (hyper-parameters; TRL names)", GRPOConfig),
    )
    for title, cls in groups:
        group = parser.add_argument_group(title)
        types_ = configio.field_types(cls)
        for f in fields(cls):
            shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            group.add_argument(f"--{f.name}", dest=f"key_{f.name}", default=argparse.SUPPRESS,
                               metavar=_metavar(types_[f.name]),
                               help=f"{f.metadata.get('help', '')} (default: {shown})".replace("%", "%%"))  # fmt: skip


def _metavar(annotation) -> str:
    """INT, FLOAT, STR, {true,false}; STR,... for a list; ``X | None`` shows X (none/null give None)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return f"{_metavar(args[0])},..."
    if args:
        return _metavar(args[0])
    return "{true,false}" if annotation is bool else annotation.__name__.upper()


def _underscored(arg: str) -> str:
    if not arg.startswith("--"):
        return arg
    key, eq, value = arg.partition("=")
    return key.replace("-", "_").replace("__", "--", 1) + eq + value


def _given_keys(args: argparse.Namespace) -> list[str]:
    """The config keys given as options (``_add_config_keys``), as ``--key=value`` overrides."""
    return [f"--{k[len('key_') :]}={v}" for k, v in vars(args).items() if k.startswith("key_")]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


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
    from .r1 import toy
    from .trainer import GRPOTrainer
    from .trainer.modeling import load_model

    config, run = load_train_config(args.config, [*_given_keys(args), *rest])
    device = _device(run.device)
    tracking.resolve_report_to(config.report_to)  # a tracker that is not installed: say so before loading anything
    if run.model_name_or_path == "toy":
        tokenizer = toy.build_tokenizer()
        model = toy.build_model(tokenizer, seed=config.seed).to(device)
    else:
        from transformers import AutoTokenizer

        model = load_model(run.model_name_or_path, device)
        tokenizer = AutoTokenizer.from_pretrained(run.model_name_or_path)
    train, evaluation = _datasets(run, tokenizer, config.seed)
    files = {RUN_ARGUMENTS_FILE: _run_arguments_yaml(run)}
    rewards = [get_reward_function(name, run.format_style) for name in run.reward_funcs]
    trainer = GRPOTrainer(model, rewards, config, train, eval_dataset=evaluation, tokenizer=tokenizer,
                          peft_config=run.peft_config(), run_files=files)  # fmt: skip
    metrics = trainer.train(resume_from_checkpoint=args.resume)
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith(("eval/", "reward", "step"))}, indent=2))
    return 0


def _run_arguments_yaml(run: RunArguments) -> str:
    """The run keys as saved next to grpo_config.yaml, data files as absolute paths (``grpo-fast eval``
    reads eval_dataset from there when given the run's directory or one of its checkpoints)."""
    given = {k: getattr(run, k) for k in ("dataset", "eval_dataset", "dataset_name")}
    paths = {k: Path(configio.expand_path(v, k)) for k, v in given.items() if v not in (None, "toy")}
    files = {k: str(v.resolve()) for k, v in paths.items() if k != "dataset_name" or v.exists()}  # not a Hub id
    return yaml.safe_dump(configio.to_dict(dataclasses.replace(run, **files)), sort_keys=False)


def _run_arguments(model_dir: str) -> RunArguments | None:
    """The run keys of the run a model directory belongs to (its run_arguments.yaml, in the directory or its
    parent, as for RUN_DIR/checkpoint-N); None when there is none."""
    for folder in (Path(model_dir), Path(model_dir).parent):
        if (folder / RUN_ARGUMENTS_FILE).is_file():
            return configio.from_dict(RunArguments, configio.read_yaml(folder / RUN_ARGUMENTS_FILE),
                                      str(folder / RUN_ARGUMENTS_FILE))  # fmt: skip
    return None


def _eval_source(model_dir: str, name: str | None) -> tuple[RunArguments | None, str | None]:
    """(the run's keys or None, what ``grpo-fast eval`` scores): ``name`` ("toy" or a file) when given, else
    the run's eval_dataset, else None for its dataset_name's test split, else toy. Checked before any load."""
    run = _run_arguments(model_dir)
    if name is not None or run is None:
        return run, name or "toy"
    if run.eval_dataset is None and run.dataset_name is None and run.dataset != "toy":
        raise configio.ConfigError(
            f"the run of {model_dir} trained on {run.dataset} without an eval_dataset; pass --dataset FILE"
        )
    return run, run.eval_dataset or (None if run.dataset_name else "toy")


def _eval_dataset(run: RunArguments | None, name: str | None, tokenizer):
    """(name, dataset) of ``_eval_source``'s answer, prompts prepared as the run prepared them."""
    from .r1 import toy

    if name == "toy":
        return name, toy.make_splits()["test"]
    if name is not None:
        return name, _prepared(load_data_file(name), run or RunArguments(), tokenizer, name)
    _, test = load_named_dataset(run.dataset_name, run.dataset_config, run.dataset_train_split, run.dataset_test_split)
    if test is None:
        raise configio.ConfigError(f"the run trained on {run.dataset_name}, which has no test split; pass --dataset "
                                   "FILE")  # fmt: skip
    return run.dataset_name, _prepared(test, run, tokenizer, f"{run.dataset_name} test split")


def _device(name: str | None) -> str:
    """The run's device: ``name`` when this machine has it, None = cuda when available, else cpu."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise configio.ConfigError(f"device {name!r} is not a device name ({error}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise configio.ConfigError(f"device {name!r}: this machine has no CUDA device; set device: cpu or leave it out")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise configio.ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return name


def _datasets(run: RunArguments, tokenizer, seed: int):
    """(train, eval or None) of a run: the toy splits, a dataset_name's splits or data files, with prompts
    prepared (columns, system prompt, chat template) for ``tokenizer``."""
    from .r1 import toy

    if run.dataset == "toy" and run.dataset_name is None:
        splits = toy.make_splits(seed=seed)
        train, held_out = splits["train"], splits["test"]
    elif run.dataset_name is not None:
        train, held_out = load_named_dataset(run.dataset_name, run.dataset_config, run.dataset_train_split,
                                             run.dataset_test_split)  # fmt: skip
        train = _prepared(train, run, tokenizer, run.dataset_name)
        held_out = None if held_out is None else _prepared(held_out, run, tokenizer, f"{run.dataset_name} test split")
    else:
        train, held_out = _prepared(load_data_file(run.dataset), run, tokenizer, run.dataset), None
    if run.eval_dataset is not None:
        held_out = _prepared(load_data_file(run.eval_dataset), run, tokenizer, run.eval_dataset)
    return train, held_out


def _prepared(dataset, run: RunArguments, tokenizer, name: str):
    return prepare_prompts(dataset, name, prompt_column=run.prompt_column, answer_column=run.answer_column,
                           system_prompt=run.system_prompt, apply_chat_template=run.apply_chat_template,
                           chat_template=bool(getattr(tokenizer, "chat_template", None)))  # fmt: skip


def _eval(args, rest) -> int:
    import torch
    from transformers import AutoTokenizer

    from .trainer.evaluation import evaluate
    from .trainer.modeling import load_model

    run, name = _eval_source(args.model, args.dataset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    name, dataset = _eval_dataset(run, name, tokenizer)
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
    print(json.dumps({"model": args.model, "dataset": name, "prompts": len(dataset), **out}, indent=2))
    return 0


def _plot(args, rest) -> int:
    from .trainer.plotting import plot_run

    print(plot_run(args.run_dir))
    return 0


def _tiny_model(args, rest) -> int:
    from .trainer.tiny_model import save_tiny_model

    if Path(args.dir).exists() and (not Path(args.dir).is_dir() or any(Path(args.dir).iterdir())):
        raise configio.ConfigError(f"{args.dir} exists and is not an empty directory; give a new directory")
    path = save_tiny_model(args.dir, args.chat_template, seed=args.seed)
    print(json.dumps({"model": str(path), "chat_template": args.chat_template}))
    return 0


def _demo(args, rest) -> int:
    from .r1.demo import run_demo

    kwargs = {} if args.steps is None else {"steps": args.steps}
    report_to = tuple(args.report_to.split(","))
    try:
        tracking.check_report_to(report_to)
    except (TypeError, ValueError) as error:
        raise configio.ConfigError(str(error)) from error
    run_demo(seed=args.seed, out=args.out, threads=args.threads, report_to=report_to, **kwargs)
    return 0


def _pipeline(args, rest) -> int:
    from .r1.pipeline import load_config, run_pipeline

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
