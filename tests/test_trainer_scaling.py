"""``python -m bench.trainer_scaling`` end to end on a tiny grid: both trainers, steps alternating, with beta > 0
(TRL loads its reference model from the policy's weights on disk), the JSON rows, the table with the memory
model's prediction for the larger vocabulary, and the plot."""

from __future__ import annotations

import json

import pytest

from bench import trainer_scaling

pytestmark = pytest.mark.slow

KEYS = {"trainer", "vocab", "hidden", "layers", "beta", "median_s", "peak_extra_mib", "sampling_s", "update_s"}


def test_tiny_grid_writes_rows_table_and_plot(tmp_path, capsys):
    trainer_scaling.main(["--vocabs", "200,20", "--hiddens", "64", "--betas", "0.04", "--prompts", "1", "--group",
                          "4", "--max-new", "4", "--micro", "4", "--steps", "2", "--warmup", "1",
                          "--out", str(tmp_path)])  # fmt: skip
    rows = json.loads((tmp_path / "trainer_scaling.json").read_text())["rows"]
    assert [(r["trainer"], r["vocab"]) for r in rows] == [("grpo_fast", 20), ("trl", 20), ("grpo_fast", 200),
                                                         ("trl", 200)]  # fmt: skip
    for r in rows:
        assert KEYS <= r.keys() and r["median_s"] > 0 and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["sampling_s"] > 0 and r["update_s"] > 0 and r["peak_extra_mib"] >= 0
        assert (r["predicted_peak_extra_mib"] is None) == (r["vocab"] == 20)  # the smallest vocabulary is the base
    table = (tmp_path / "trainer_scaling.md").read_text().splitlines()
    assert len(table) == 4 and table[3].startswith("| 200 | 64 | 2 | 0.04 |") and "(" in table[3].split("|")[-2]
    assert (tmp_path / "trainer_scaling.png").stat().st_size > 10_000
    assert "predicted peak extra MiB" in capsys.readouterr().out


def test_bad_grid_arguments_are_refused():
    with pytest.raises(SystemExit):
        trainer_scaling.main(["--vocabs", "20,x"])
    with pytest.raises(SystemExit):
        trainer_scaling.main(["--prompts", "3", "--group", "3", "--micro", "2"])
