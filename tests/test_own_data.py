"""The "Train on your own data" section of docs/trainer.md, run as written.

The section's shell blocks are taken from docs/trainer.md and run by bash in an empty directory, after a tiny
Qwen2 with a character tokenizer over printable ASCII is saved to ``my-model`` (the directory the
section's YAML names; a user puts a real model there). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def section_commands(title: str = "## Train on your own data") -> list[str]:
    """The ```bash blocks of one section of docs/trainer.md."""
    text = (ROOT / "docs" / "trainer.md").read_text()
    start = text.index(f"\n{title}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```bash\n(.*?)```", text[start : end if end >= 0 else None], flags=re.S)


def save_tiny_model(path: Path) -> None:
    """A 2-layer Qwen2 and a character tokenizer over printable ASCII, saved with save_pretrained."""
    chars = sorted(set(string.printable) - set(string.whitespace) | {" "})
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *chars])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", padding_side="left")  # fmt: skip
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=1)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_readme_own_data_commands_run_as_written(tmp_path):
    blocks = section_commands()
    assert blocks and "grpo-fast train --config my_run.yaml" in blocks[-1]
    save_tiny_model(tmp_path / "my-model")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    printed = []
    for block in blocks:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=900)  # fmt: skip
        assert result.returncode == 0, f"{block}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        printed.append(result.stdout)
    run = tmp_path / "runs" / "my-run"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert yaml.safe_load((run / "grpo_config.yaml").read_text())["learning_rate"] == 2e-6  # the override
    assert {"checkpoint-2", "checkpoint-4"} <= {p.name for p in run.iterdir()}
    evaluated = json.loads(printed[-1][printed[-1].rindex("{\n") :])  # the eval command's JSON, printed last
    assert evaluated["dataset"] == str(tmp_path / "data" / "eval.jsonl") and evaluated["prompts"] == 4


def test_train_help_lists_every_key_with_its_default(capsys):
    import dataclasses

    from grpo_fast.cli import RunArguments, main
    from grpo_fast.trainer import GRPOConfig

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "run keys" in text and "GRPOConfig keys" in text
    for cls in (RunArguments, GRPOConfig):
        for f in dataclasses.fields(cls):
            assert f"--{f.name} " in text, f.name
            assert f.metadata["help"].split()[0] in text, f.name
    assert "(default: 1e-06)" in text and "(default: accuracy)" in text
    # dashes work as underscores; a given key reaches the config's own validation
    assert main(["train", "--max-steps=0"]) == 2
    assert "max_steps" in capsys.readouterr().err


def test_eval_of_a_run_trained_on_a_file_without_eval_dataset_asks_for_one(tmp_path, capsys):
    from grpo_fast.cli import RUN_ARGUMENTS_FILE, main

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / RUN_ARGUMENTS_FILE).write_text("dataset: /data/train.jsonl\n")
    assert main(["eval", "--model", str(tmp_path / "checkpoint-2")]) == 2
    assert "without an eval_dataset; pass --dataset FILE" in capsys.readouterr().err
