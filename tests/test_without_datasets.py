"""The core imports and trains on in-memory data without the ``datasets`` package (a bare CUDA image has none):
only reading data files or building the R1 recipe's datasets needs it, and then says so in one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from grpo_fast.trainer.rows import Rows

ROOT = Path(__file__).resolve().parent.parent

WITHOUT_DATASETS = textwrap.dedent(
    """
    import sys
    sys.modules["datasets"] = None  # `import datasets` now raises ImportError, as where it is not installed
    import torch
    import grpo_fast.trainer, grpo_fast.r1.toy
    from grpo_fast.r1 import toy
    from grpo_fast.trainer import GRPOConfig, GRPOTrainer, data

    torch.set_num_threads(1)
    tok = toy.build_tokenizer()
    model = toy.build_model(tok, seed=0, hidden_size=32, layers=1, heads=2, ffn=64)
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(100, 108)]
    cfg = GRPOConfig(output_dir=sys.argv[1], max_steps=1, per_device_train_batch_size=8, num_generations=4,
                     max_completion_length=6, logging_steps=1)
    trainer = GRPOTrainer(model, "accuracy", cfg, rows, tokenizer=tok)
    print(type(trainer.train_dataset).__name__, len(trainer.train_dataset), "loss" in trainer.step())
    for call in (lambda: data.load_data_file("x.jsonl"), lambda: toy.addition_dataset([(1, 2)])):
        try:
            call()
        except ImportError as err:
            print(err)
    print("datasets" in sys.modules and sys.modules["datasets"] is None)
    """
)


def test_trainer_and_toy_import_and_train_on_a_list_of_dicts_without_datasets(tmp_path):
    out = subprocess.run([sys.executable, "-c", WITHOUT_DATASETS, str(tmp_path / "run")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "Rows 8 True"
    assert lines[1] == "reading the data file x.jsonl needs the datasets package: pip install datasets"
    assert lines[2].startswith("the addition task's datasets (grpo_fast.r1.toy.addition_dataset) needs the datasets")
    assert lines[3] == "True"  # nothing imported the real package behind the blocker's back


def test_rows_read_like_dataset_from_list():
    datasets = pytest.importorskip("datasets", reason="compares with datasets.Dataset.from_list")
    data = [{"prompt": "a", "answer": "1"}, {"prompt": "b"}, {"prompt": "c", "answer": "3", "extra": 0}]
    ours, theirs = Rows(data), datasets.Dataset.from_list(data)
    assert ours.column_names == theirs.column_names and len(ours) == len(theirs)
    for key in ("prompt", "answer", 1, [2, 0], slice(1, 3), slice(0, 10)):
        assert ours[key] == theirs[key], key
