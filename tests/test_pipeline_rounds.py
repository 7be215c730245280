"""The R1 pipeline's rounds (rejection sampling -> SFT -> RL repeated), the mixed rejection-sampled set
with its reasoning-only control, the evaluation on both task families and the report's new rows, on
tiny models (seconds)."""

import json

import pytest
import yaml

pytest.importorskip("datasets", reason="needs the datasets package (the R1 recipe's data): pip install datasets")

from grpo_fast.cli import main  # noqa: E402
from grpo_fast.r1.config import DEFAULT_STAGES, SFTStage, default_stages, expand_rounds  # noqa: E402
from grpo_fast.r1.pipeline import load_config  # noqa: E402
from grpo_fast.r1.rejection import read_sft_set  # noqa: E402
from grpo_fast.r1.report import effect_table, round_table, verdict  # noqa: E402
from grpo_fast.trainer import configio  # noqa: E402

TINY = {
    "seed": 0,
    "threads": 1,
    "num_train": 300,
    "evaluation": {"num_prompts": 4, "samples": 2, "max_new_tokens": 12, "simple_prompts": 6},
    "stages": [
        {"name": "base", "max_steps": 6, "target_accuracy": None, "batch_size": 8},
        {"name": "rejection_sampling", "model": "base", "num_prompts": 16, "samples_per_prompt": 2,
         "max_new_tokens": 12, "require_correct": False, "require_format": False, "min_language_consistency": None},
        {"name": "rs_sft", "batch_size": 4},
        {"name": "rs_sft_reasoning_only", "batch_size": 4},
        {"name": "rl2", "max_steps": 2, "prompts_per_step": 2, "num_generations": 4, "max_completion_length": 12},
    ],
}  # fmt: skip
ROUND_2 = ["rejection_sampling_r2", "rs_sft_r2", "rl2_r2"]
NAMES = [s["name"] for s in TINY["stages"]] + ROUND_2


def test_default_pipeline_runs_two_rounds_with_the_control():
    names = [s.name for s in load_config().stages]
    assert names == ["base", "r1_zero", "cold_start", "reasoning_rl", "rejection_sampling", "rs_sft",
                     "rs_sft_reasoning_only", "rl2", *ROUND_2, "student_base", "distill", "student_grpo",
                     "student_grpo_4x"]  # fmt: skip
    assert names == [s.name for s in default_stages()] and len(default_stages(1)) == len(DEFAULT_STAGES)
    stages = {s.name: s for s in load_config().stages}
    assert stages["rejection_sampling"].non_reasoning_ratio == 3.0
    assert stages["rs_sft_reasoning_only"].data == "rejection_sampling:reasoning_only"
    assert stages["rejection_sampling_r2"].model == "rl2" and stages["rs_sft_r2"].data == "rejection_sampling_r2"
    assert stages["rs_sft_r2"].model == "base" and stages["rl2_r2"].model == "rs_sft_r2"
    assert stages["distill"].data == "rejection_sampling"
    rl2, rl2_r2 = stages["rl2"], stages["rl2_r2"]
    assert (rl2.max_steps, rl2.temperature, rl2.prompts_per_step) == (rl2_r2.max_steps, rl2_r2.temperature, 32)


def test_rounds_config_and_its_errors(tmp_path):
    path = tmp_path / "c.yaml"

    def load(data):
        path.write_text(yaml.safe_dump(data))
        return load_config(str(path))

    def error(data):
        with pytest.raises(configio.ConfigError) as info:
            load(data)
        return str(info.value)

    three = {s.name: s for s in load({**TINY, "rounds": 3}).stages}
    assert list(three) == NAMES + ["rejection_sampling_r3", "rs_sft_r3", "rl2_r3"]
    assert three["rejection_sampling_r3"].model == "rl2_r2" and three["rl2_r3"].model == "rs_sft_r3"
    assert [s.name for s in load({**TINY, "rounds": 1}).stages] == NAMES[:5]
    assert [s.name for s in load({"stages": ["base", "r1_zero"]}).stages] == ["base", "r1_zero"]  # no round stage
    # a round of other stages: the first samples from the previous round's last one
    custom = load({"stages": ["base", "r1_zero", "cold_start"], "rounds": 2, "round_stages": ["r1_zero", "cold_start"]})
    assert [s.name for s in custom.stages] == ["base", "r1_zero", "cold_start", "r1_zero_r2", "cold_start_r2"]
    assert custom.stages[3].model == "cold_start" and custom.round_stages == ("r1_zero", "cold_start")
    assert "rounds must be an int >= 1" in error({**TINY, "rounds": 0})
    assert "none of which is listed" in error({"stages": ["base"], "rounds": 2})
    assert "did you mean 'rounds'" in error({"round": 2})
    assert "non_reasoning_ratio must be > 0" in error({"stages": [{"name": "rejection_sampling",
                                                                   "non_reasoning_ratio": 0}]})  # fmt: skip
    assert "simple_prompts must be >= 0" in error({"evaluation": {"simple_prompts": -1}})
    assert "unique" in error(
        {"stages": ["rejection_sampling", {"name": "rejection_sampling_r2", "kind": "sft"}], "rounds": 2}
    )
    stages = expand_rounds((SFTStage("a", data="b:reasoning_only"), SFTStage("b")), 2, ("a", "b"))
    assert [(s.name, s.data) for s in stages][2:] == [("a_r2", "b_r2:reasoning_only"), ("b_r2", "toy:pretrain")]


def _run(tmp_path, run_dir, *args):
    config = tmp_path / f"{run_dir.name}.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(run_dir)}))
    assert main(["pipeline", "--config", str(config), *args]) == 0
    return json.loads((run_dir / "report.json").read_text())


def _outcome(run_dir):
    """What each stage produced (its metrics, per-prompt values, details), without its timings."""
    out = {}
    for name in NAMES:
        record = json.loads((run_dir / name / "stage.json").read_text())
        out[name] = {k: record.get(k) for k in ("metrics", "per_prompt", "details", "train_flops")}
    return out


@pytest.mark.filterwarnings("ignore:reward function 'language_consistency_reward' returned None")  # untrained
def test_two_rounds_resumed_after_round_one_sft_equal_an_uninterrupted_run(tmp_path, capsys):
    report = _run(tmp_path, tmp_path / "whole")
    assert [r["name"] for r in report] == NAMES
    for r in report:
        if r["kind"] != "rejection_sampling":
            assert {"simple_accuracy", "simple_thinks", "simple_reasoning_length", "reasoning_length"} <= set(
                r["metrics"]
            )
    by_name = {r["name"]: r for r in report}
    for name in ("rejection_sampling", "rejection_sampling_r2"):  # the mix: 3 reasoning rows per non-reasoning one
        mix, kept = by_name[name]["details"]["mix"], by_name[name]["details"]["kept"]
        assert mix["size"] == kept and mix["non_reasoning"] == round(kept / 4) and mix["target_ratio"] == 3.0
        rows = read_sft_set(tmp_path / "whole" / name / "sft_set.jsonl")
        simple = [r for r in rows if "+" not in r["prompt"]]
        assert len(rows) == kept and len(simple) == mix["non_reasoning"]
        assert {r["completion"][:15] for r in simple} == {"<think></think>"}
        control = read_sft_set(tmp_path / "whole" / name / "reasoning_only.jsonl")
        assert len(control) == kept and all("+" in r["prompt"] for r in control)
        assert by_name[name]["details"]["non_reasoning"]["kept"] >= mix["non_reasoning"]
    assert by_name["rs_sft"]["details"]["examples"] == by_name["rs_sft_reasoning_only"]["details"]["examples"]
    table = (tmp_path / "whole" / "report.md").read_text()
    assert "| 2 | rl2_r2 | grpo |" in table and "| 1 | rejection_sampling | rejection_sampling |" in table
    assert "round 2 keeps or improves round 1 (pass@1) | rl2_r2 vs rl2 |" in table
    assert "| rs_sft vs rs_sft_reasoning_only | simple_thinks |" in table

    # the same run stopped after round 1's SFT, an RL stage interrupted, resumed over the round boundary
    resumed = tmp_path / "resumed"
    _run(tmp_path, resumed, "--stages", "base,rejection_sampling,rs_sft")
    (resumed / "rs_sft_reasoning_only").mkdir()
    (resumed / "rs_sft_reasoning_only" / "partial.bin").write_text("an interrupted stage, no stage.json")
    capsys.readouterr()
    report = _run(tmp_path, resumed, "--stages", "rs_sft,rs_sft_reasoning_only,rl2,rejection_sampling_r2")
    assert [r["name"] for r in report] == ["rs_sft", "rs_sft_reasoning_only", "rl2", "rejection_sampling_r2"]
    assert capsys.readouterr().out.count("finished earlier, skipped") == 1
    assert not (resumed / "rs_sft_r2").exists()
    _run(tmp_path, resumed)
    assert _outcome(resumed) == _outcome(tmp_path / "whole")
    for name in ("rejection_sampling", "rejection_sampling_r2"):
        assert (resumed / name / "sft_set.jsonl").read_text() == (
            tmp_path / "whole" / name / "sft_set.jsonl"
        ).read_text()


@pytest.mark.filterwarnings("ignore:reward function 'language_consistency_reward' returned None")  # untrained
def test_without_non_reasoning_data_there_is_no_control_set(tmp_path, capsys):
    stages = [TINY["stages"][0], {**TINY["stages"][1], "non_reasoning_ratio": None}, TINY["stages"][3]]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "run"), "stages": stages}))
    assert main(["pipeline", "--config", str(config)]) == 2
    assert "produces no 'reasoning_only' set" in capsys.readouterr().err
    assert "mix" not in json.loads((tmp_path / "run" / "rejection_sampling" / "stage.json").read_text())["details"]


def test_round_table_and_the_new_effects():
    def record(name, kind="grpo", **per_prompt):
        metrics = {"accuracy": 0.5, "no_reasoning": 0.0, "language_consistency": 1.0, "simple_accuracy": 0.9,
                   "simple_thinks": 0.1}  # fmt: skip
        return {"name": name, "kind": kind, "metrics": metrics, "per_prompt": per_prompt}

    ones, zeros, half = [1.0] * 16, [0.0] * 16, [float(i % 2) for i in range(16)]
    records = [
        {"name": "rejection_sampling", "kind": "rejection_sampling", "details": {"kept": 8, "mix": {
            "reasoning": 6, "non_reasoning": 2}}},
        record("rs_sft", "sft", simple_thinks=zeros, simple_accuracy=half, no_reasoning=zeros, accuracy=half),
        record("rs_sft_reasoning_only", "sft", simple_thinks=ones, simple_accuracy=half, no_reasoning=zeros,
               accuracy=half),
        record("rl2", accuracy=half, language_consistency=ones, format=ones),
        record("rl2_r2", accuracy=ones, language_consistency=ones, format=zeros),
    ]  # fmt: skip
    table = round_table(records, [("rejection_sampling", "rs_sft", "rl2"), ("rl2_r2",)]).splitlines()
    assert table[4] == "| 1 | rejection_sampling | rejection_sampling | 6 + 2 |  |  |  |  |  |"
    assert table[5] == "| 1 | rs_sft | sft |  | 0.500 | 0.000 | 1.000 | 0.900 | 0.100 |" and table[7].startswith(
        "| 2 | rl2_r2"
    )
    effects = effect_table(records, ["rl2", "rl2_r2"])
    rows = {line.split(" | ")[0][2:]: line for line in effects.splitlines() if " vs " in line}
    assert rows["SFT with non-reasoning data answers simple queries without reasoning"].endswith(
        "-1.000 ± 0.000 | yes |"
    )
    assert rows["... while keeping reasoning on hard ones"].endswith("| yes |")
    assert rows["round 2 keeps or improves round 1 (pass@1)"].endswith("| +0.500 ± 0.129 | yes |")
    assert rows["round 2 keeps or improves round 1 (readability: format)"].endswith("| no |")
    assert verdict(0.3, 0.1, "not higher") == "no" and verdict(0.1, 0.1, "not higher") == "yes"
    assert verdict(-0.3, 0.1, "lower") == "yes" and verdict(0.3, 0.1, "lower") == "no (opposite)"
