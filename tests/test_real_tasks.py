"""The real path, offline: TRL's dataset names (a save_to_disk directory, Parquet and JSONL files; a Hub id's
failure), column mapping, system prompts and chat templates, ``grpo-fast tiny-model``, train then eval."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("datasets", reason="needs the datasets package (data files, saved and Hub datasets)")

from datasets import Dataset, DatasetDict  # noqa: E402

from grpo_fast.cli import RunArguments, _datasets, load_train_config, main  # noqa: E402
from grpo_fast.trainer.configio import ConfigError  # noqa: E402
from grpo_fast.trainer.data import load_named_dataset, prepare_prompts  # noqa: E402
from grpo_fast.trainer.evaluation import prompt_text  # noqa: E402
from grpo_fast.trainer.rewards import answer_matcher  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, 1 thread
HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None
SYSTEM = "Think in <think></think>, then answer in <answer></answer>."


def gsm8k_rows(n: int, offset: int = 0) -> list[dict]:
    """GSM8K's shape: a ``question`` and an ``answer`` that is a worked solution ending in ``#### x``."""
    return [{"question": f"Tom has {a} apples and buys {a + 3} more. How many apples does he have?",
             "answer": f"He has {a} + {a + 3} = {2 * a + 3} apples.\n#### {2 * a + 3}"}
            for a in range(offset, offset + n)]  # fmt: skip


@pytest.fixture(scope="module")
def gsm8k_disk(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "gsm8k"
    DatasetDict({"train": Dataset.from_list(gsm8k_rows(8)), "test": Dataset.from_list(gsm8k_rows(4, 100))}
                ).save_to_disk(str(path))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-qwen"
    assert main(["tiny-model", str(path), "--chat-template", "qwen"]) == 0
    return path


# ----------------------------------------------------------------------------- datasets
def test_dataset_name_reads_a_save_to_disk_directory_and_its_splits(gsm8k_disk, tmp_path, monkeypatch):
    train, test = load_named_dataset(str(gsm8k_disk))
    assert (len(train), len(test)) == (8, 4) and train.column_names == ["question", "answer"]
    saved = sorted(p.name for p in gsm8k_disk.rglob("*"))
    prepare_prompts(train, "d", apply_chat_template=True, system_prompt="s")
    assert sorted(p.name for p in gsm8k_disk.rglob("*")) == saved  # preparing writes no cache file into it
    train, none = load_named_dataset(str(gsm8k_disk), train_split="test", test_split="train")
    assert (len(train), len(none)) == (4, 8)
    with pytest.raises(ConfigError, match=r"dataset_test_split 'validation': dataset .* has the splits train, test"):
        load_named_dataset(str(gsm8k_disk), test_split="validation")
    Dataset.from_list(gsm8k_rows(3)).save_to_disk(str(tmp_path / "one"))  # a Dataset alone: the train split
    train, test = load_named_dataset(str(tmp_path / "one"))
    assert len(train) == 3 and test is None
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="not a dataset saved with save_to_disk"):
        load_named_dataset(str(tmp_path / "plain"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for typo in (str(tmp_path / "gsm8k-tiny"), "data/gsm8k", "gsm8k"):  # never looked up on the Hub
        with pytest.raises(FileNotFoundError, match=f"dataset_name {typo} does not exist here"):
            load_named_dataset(typo)


def test_dataset_name_reads_data_files(tmp_path):
    Dataset.from_list(gsm8k_rows(5)).to_parquet(str(tmp_path / "d.parquet"))
    Dataset.from_list(gsm8k_rows(6)).to_json(str(tmp_path / "d.jsonl"))
    assert len(load_named_dataset(str(tmp_path / "d.parquet"))[0]) == 5
    train, test = load_named_dataset(str(tmp_path / "d.jsonl"))
    assert len(train) == 6 and test is None
    with pytest.raises(ConfigError, match="is a data file, which has one split"):
        load_named_dataset(str(tmp_path / "d.jsonl"), test_split="test")


def test_a_hub_dataset_that_cannot_be_loaded_is_one_line_naming_it_and_hf_hub_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = "from grpo_fast.cli import main; raise SystemExit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", f"import sys; {code}", "train", "--dataset_name",
                             "nobody-here/no-such-dataset", "--dataset_config", "main", "--output_dir",
                             str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "dataset_name nobody-here/no-such-dataset (config main)" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_question_column_is_taken_with_a_message_and_columns_map(caplog):
    rows = Dataset.from_list(gsm8k_rows(2))
    with caplog.at_level(logging.WARNING, logger="grpo_fast.trainer.data"):
        data = prepare_prompts(rows, "d.jsonl")
    assert data.column_names == ["prompt", "answer"] and data[0]["prompt"].startswith("Tom has 0 apples")
    assert "d.jsonl has no 'prompt' column: its 'question' column is the prompt" in caplog.text
    renamed = Dataset.from_list([{"problem": "1+1?", "solution_text": "\\boxed{2}"}])
    data = prepare_prompts(renamed, "d", prompt_column="problem", answer_column="solution_text")
    assert data[0] == {"prompt": "1+1?", "answer": "\\boxed{2}"}
    with pytest.raises(ConfigError, match=r"d has no 'query' column \(prompt_column; its columns: question, answer"):
        prepare_prompts(rows, "d", prompt_column="query")
    with pytest.raises(ConfigError, match=r"d has no 'gold' column \(answer_column"):
        prepare_prompts(rows, "d", answer_column="gold")


def test_system_prompt_and_chat_template():
    plain, chat = Dataset.from_list(gsm8k_rows(1)), Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}])
    data = prepare_prompts(plain, "d", system_prompt=SYSTEM, apply_chat_template=True)
    assert data[0]["prompt"] == [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": gsm8k_rows(1)[0]["question"]}]  # fmt: skip
    assert prepare_prompts(chat, "d", system_prompt="s")[0]["prompt"][0] == {"role": "system", "content": "s"}
    assert prepare_prompts(chat, "d")[0]["prompt"] == [{"role": "user", "content": "hi"}]
    with pytest.raises(ConfigError, match="system_prompt needs chat prompts.*set apply_chat_template: true"):
        prepare_prompts(plain, "d", system_prompt=SYSTEM)
    with pytest.raises(ConfigError, match=r"d: column 'prompt' holds chat messages, but the tokenizer has no chat "
                                          r"template.*grpo-fast tiny-model DIR --chat-template qwen"):  # fmt: skip
        prepare_prompts(chat, "d", chat_template=False)
    with pytest.raises(ConfigError, match="'question' is to go through the chat template.*no chat template"):
        prepare_prompts(plain, "d", prompt_column="question", apply_chat_template=True, chat_template=False)
    with pytest.raises(ConfigError, match="d has no rows"):
        prepare_prompts(plain.select([]), "d")
    twice = Dataset.from_list([{"prompt": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}])
    with pytest.raises(ConfigError, match="d row 0 already starts with a system message"):
        prepare_prompts(twice, "d", system_prompt="s")


def test_run_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="format_style must be one of think_answer, think, boxed"):
        load_train_config(None, ["--format_style", "xml"])
    with pytest.raises(ConfigError, match="dataset must be left out when dataset_name is given"):
        load_train_config(None, ["--dataset", "a.jsonl", "--dataset_name", "b"])
    with pytest.raises(ConfigError, match="dataset_test_split must be left out when eval_dataset is given"):
        load_train_config(None, ["--dataset_name", "b", "--eval_dataset", "e.jsonl", "--dataset_test_split", "test"])
    with pytest.raises(ConfigError, match="dataset_config must be left out without dataset_name"):
        load_train_config(None, ["--dataset", "a.jsonl", "--dataset_config", "main"])
    for key, value in (("system_prompt", "s"), ("prompt_column", "q"), ("apply_chat_template", "true")):
        with pytest.raises(ConfigError, match=f"{key} must be left out for the toy task"):
            load_train_config(None, [f"--{key}", value])
    assert load_train_config(None, ["--dataset", "a.jsonl", "--system_prompt", "s"])[1].system_prompt == "s"
    (tmp_path / "d.jsonl").write_text('{"prompt": "p"}\n')
    with pytest.raises(ConfigError, match="dataset_config 'main' applies to Hub datasets; .* is a local file"):
        load_named_dataset(str(tmp_path / "d.jsonl"), "main")


# ----------------------------------------------------------------------------- tiny-model
@pytest.mark.parametrize("template, family, eos", [("qwen", "Qwen2ForCausalLM", "<|im_end|>"),
                                                   ("llama", "LlamaForCausalLM", "<|eot_id|>"),
                                                   ("none", "Qwen2ForCausalLM", "<|endoftext|>")])  # fmt: skip
def test_tiny_model_loads_with_the_auto_classes(tmp_path, capsys, template, family, eos):
    assert main(["tiny-model", str(tmp_path / "m"), "--chat-template", template]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == family and tokenizer.eos_token == eos and tokenizer.pad_token_id is not None
    text = "Größe: 2½ + 3 = ?"  # any bytes: byte-level, no unknown token
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    if template == "none":
        assert tokenizer.chat_template is None
    else:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompt.endswith({"qwen": "<|im_start|>assistant\n", "llama": "assistant<|end_header_id|>\n\n"}[template])
    assert main(["tiny-model", str(tmp_path / "m")]) == 2  # not over a model already there
    assert "exists and is not an empty directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real path
def _write_files(tmp_path: Path, kind: str) -> dict:
    """The run keys naming the data of one variant: the save_to_disk directory is given by the fixture."""
    train, test = Dataset.from_list(gsm8k_rows(8)), Dataset.from_list(gsm8k_rows(4, 100))
    if kind == "parquet":
        train.to_parquet(str(tmp_path / "train.parquet"))
        test.to_parquet(str(tmp_path / "test.parquet"))
        return {"dataset_name": str(tmp_path / "train.parquet"), "eval_dataset": str(tmp_path / "test.parquet"),
                "apply_chat_template": True}  # fmt: skip
    chat = [{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in gsm8k_rows(12)]
    Dataset.from_list(chat[:8]).to_json(str(tmp_path / "train.jsonl"))  # conversational rows
    Dataset.from_list(chat[8:]).to_json(str(tmp_path / "test.jsonl"))
    return {"dataset_name": str(tmp_path / "train.jsonl"), "eval_dataset": str(tmp_path / "test.jsonl")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["save_to_disk", "parquet", "jsonl"])
def test_real_path_offline_train_then_eval_pass_at_k(tmp_path, capsys, caplog, gsm8k_disk, tiny_qwen, kind):
    data = ({"dataset_name": str(gsm8k_disk), "apply_chat_template": True} if kind == "save_to_disk"
            else _write_files(tmp_path, kind))  # fmt: skip
    run = tmp_path / "run"
    keys = {"model_name_or_path": str(tiny_qwen), **data, "system_prompt": SYSTEM,
            "reward_funcs": ["accuracy", "format"], "output_dir": str(run), "max_steps": 4, "save_steps": 2,
            "num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 12,
            "learning_rate": 1e-4, "device": "cpu"}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(keys))
    answer_matcher.cache_clear()  # the run says which matcher accuracy uses
    with caplog.at_level(logging.WARNING, logger="grpo_fast.trainer.rewards"):
        assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 0, capsys.readouterr().err
    verifier = "verified mathematically with math-verify" if HAS_MATH_VERIFY else "the plain normaliser"
    assert verifier in caplog.text
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3, 4]
    assert {"rewards/accuracy_reward/mean", "rewards/format_reward/mean"} <= set(steps[0])
    capsys.readouterr()
    assert main(["eval", "--model", str(run / "checkpoint-4"), "--k", "2", "--max-new-tokens", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompts"] == 4 and 0 <= out["rewards/accuracy_reward/pass@2"] <= 1
    assert out["dataset"] == data.get("eval_dataset", str(gsm8k_disk))
    # the prompts the run trained on, rebuilt from its saved run keys: system prompt first, through ChatML
    saved = RunArguments(**yaml.safe_load((run / "run_arguments.yaml").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(run / "checkpoint-4")
    train, held_out = _datasets(saved, tokenizer, seed=0)
    text = prompt_text(tokenizer, train[0]["prompt"])
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nTom has 0 apples")
    assert text.endswith("<|im_start|>assistant\n") and len(held_out) == 4 and "#### " in train[0]["answer"]


# ----------------------------------------------------------------------------- recipes
RECIPES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
# the model path and the lengths; the data, since the recipes name Hub datasets, which a test may not download;
# bf16, which the trainer allows on CUDA only
SWAPPED = {"model_name_or_path", "max_prompt_length", "max_completion_length", "eval_max_new_tokens", "max_steps",
           "dataset_name", "dataset_config", "bf16"}  # fmt: skip


def test_the_three_recipes_are_there():
    assert [p.name for p in RECIPES] == ["gsm8k_qwen2.5-0.5b.yaml", "gsm8k_qwen3-0.6b.yaml", "math_qwen2.5-1.5b.yaml"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_validates_and_runs_two_steps_on_the_tiny_model(
    tmp_path, monkeypatch, gsm8k_disk, tiny_qwen, recipe
):
    text = recipe.read_text()
    assert "PROJECTIONS, not measurements" in text and "Peak memory ~" in text and "Step time ~" in text
    config, run = load_train_config(str(recipe), [])  # as written: every key known and valid
    assert config.bf16 and run.dataset_name and run.system_prompt and "accuracy" in run.reward_funcs
    if run.prompt_column == "problem":  # MATH's shape: problem, solution with the answer in \boxed{}
        data = tmp_path / "math"
        rows = [{"problem": f"What is ${a} + \\frac{{1}}{{2}}$?", "solution": f"It is $\\boxed{{{a}.5}}$."}
                for a in range(8)]  # fmt: skip
        DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:4])}).save_to_disk(str(data))
    else:
        data = gsm8k_disk
    swap = {"model_name_or_path": str(tiny_qwen), "dataset_name": str(data), "dataset_config": "none",
            "max_prompt_length": "640", "max_completion_length": "8", "eval_max_new_tokens": "8", "max_steps": "2",
            "bf16": "false"}  # fmt: skip
    assert set(swap) == SWAPPED
    monkeypatch.chdir(tmp_path)  # the recipe's output_dir (runs/...) is written under the test's folder
    assert main(["train", "--config", str(recipe.resolve()), *[f"--{k}={v}" for k, v in swap.items()]]) == 0
    run_dir = tmp_path / config.output_dir
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]


# ----------------------------------------------------------------------------- docs/real_tasks.md
ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "real_tasks.md"


def page_blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", PAGE.read_text(), flags=re.S)


@pytest.mark.slow
def test_real_tasks_page_commands_run_as_written(tmp_path):
    blocks = page_blocks("bash")
    assert len(blocks) == 1 and "grpo-fast tiny-model" in blocks[0] and "save_to_disk" in blocks[0]
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the page runs from a checkout
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", blocks[0]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    run = tmp_path / "runs" / "tiny-gsm8k"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert {"checkpoint-2", "checkpoint-4"} <= {p.name for p in run.iterdir()}
    evaluated = json.loads(result.stdout[result.stdout.rindex("{\n") :])  # the eval command's JSON, printed last
    assert evaluated["prompts"] == 4 and "rewards/accuracy_reward/pass@4" in evaluated


def test_real_tasks_page_names_only_commands_and_keys_that_exist():
    from grpo_fast.cli import _parser

    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject[pyproject.index("[project.optional-dependencies]") :].split("\n[", 1)[0]
    extras = set(re.findall(r"^(\w+) = \[", section, flags=re.M))
    assert {"math", "dev"} <= extras
    commands = [line.split("#")[0].strip() for block in page_blocks("shell") for line in block.splitlines()]
    assert len(commands) == 5
    for command in commands:
        words = shlex.split(command)
        if words[:2] == ["grpo-fast", "train"]:  # its config and keys load and validate
            assert words[2] == "--config"
            load_train_config(str(ROOT / words[3]), words[4:])
        elif words[0] == "grpo-fast":
            _parser().parse_args(words[1:])
        elif words[:2] == ["hf", "download"]:
            hf = shutil.which("hf", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
            assert hf and subprocess.run([hf, "download", "--help"], capture_output=True, timeout=120).returncode == 0
        else:
            assert words[:2] == ["pip", "install"], command
            assert re.fullmatch(r"grpo-fast\[(\w+)\]", words[2]).group(1) in extras
    keys = set(re.findall(r"^\| `(\w+)` \|", PAGE.read_text(), flags=re.M)) - {"accuracy", "format"}
    assert len(keys) == 8 and keys <= set(dataclasses.asdict(RunArguments()))
    assert "(docs/real_tasks.md)" in (ROOT / "README.md").read_text()
