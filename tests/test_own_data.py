"""The "Train on your own data" section of docs/trainer.md, run as written.

The section's shell blocks are taken from docs/trainer.md and run by bash in an empty directory; their first
command, ``grpo-fast tiny-model my-model``, writes the random tiny model the section's YAML names (a user
puts a real model there). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def section_commands(title: str = "## Train on your own data") -> list[str]:
    """The ```bash blocks of one section of docs/trainer.md."""
    text = (ROOT / "docs" / "trainer.md").read_text()
    start = text.index(f"\n{title}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```bash\n(.*?)```", text[start : end if end >= 0 else None], flags=re.S)


def test_readme_own_data_commands_run_as_written(tmp_path):
    blocks = section_commands()
    assert blocks and "grpo-fast train --config my_run.yaml" in blocks[-1]
    assert blocks[0].startswith("grpo-fast tiny-model my-model")
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
