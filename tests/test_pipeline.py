"""The DeepSeek-R1 pipeline at toy scale: the toy world (r1_toy), SFT (fused loss, epochs, checkpoints,
metrics), the stage config, and every stage end to end on tiny models (seconds), resumable."""

import json
import math

import pytest
import torch
import yaml
from transformers import AutoTokenizer

pytest.importorskip("datasets", reason="needs the datasets package (the R1 recipe's data): pip install datasets")

from grpo_fast.cli import main  # noqa: E402
from grpo_fast.r1 import toy  # noqa: E402
from grpo_fast.r1 import world as r1_toy  # noqa: E402
from grpo_fast.r1.language import language_consistency, reasoning_text  # noqa: E402
from grpo_fast.r1.pipeline import DEFAULT_STAGES, GRPOStage, SFTStage, compare, effect_table, load_config, stage_table  # noqa: E402
from grpo_fast.trainer import configio  # noqa: E402
from grpo_fast.trainer.modeling import backbone_and_head, load_model  # noqa: E402
from grpo_fast.trainer.rewards import accuracy_reward, format_reward  # noqa: E402
from grpo_fast.trainer.rollout import encode_prompts  # noqa: E402
from grpo_fast.trainer.sft import SFTConfig, encode_completions, sft_loss, sft_train  # noqa: E402


# ----------------------------------------------------------------------------- the toy world
def test_r1_tokenizer_words_are_single_tokens_and_text_round_trips(tmp_path):
    tok = r1_toy.build_tokenizer()
    text = "<think>个 4+4=8,tens 6+9=15 进,hundreds 8+3+1=12 carry</think><answer>1258</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[:3] == ["<think>", "个", " "] and "hundreds" in tokens and "carry" in tokens and "进" in tokens
    assert tok.decode(ids) == text and tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(tok("tank", add_special_tokens=False)["input_ids"]) == list("tank")  # letters
    assert r1_toy.VOCAB[: len(toy.VOCAB)] == toy.VOCAB
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == tok(text)["input_ids"]
    # one token per word in either language: the language of a trace does not change its length
    en, zh = r1_toy.trace(999, 999), r1_toy.trace(999, 999, languages=["zh"] * 6)
    assert len(tok(en)["input_ids"]) == len(tok(zh)["input_ids"])


def test_r1_models_teacher_and_smaller_student():
    tok = r1_toy.build_tokenizer()
    teacher, student = r1_toy.build_model(tok, "teacher"), r1_toy.build_model(tok, "student")
    n_teacher, n_student = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    assert 0.5e6 < n_teacher < 0.56e6 and n_student < n_teacher / 3
    with pytest.raises(ValueError, match="size"):
        r1_toy.build_model(tok, "huge")


def test_traces_and_corpus_mix():
    assert r1_toy.readable_trace(864, 394) == (
        "<think>ones 4+4=8,tens 6+9=15 carry,hundreds 8+3+1=12 carry</think><answer>1258</answer>"
    )
    assert r1_toy.trace(999, 1, reasoning=False, tagged=False) == "<think></think>1000"
    splits = r1_toy.make_splits(num_train=2000, num_dev=8, num_test=16)
    assert splits["test"]["prompt"] == toy.make_splits(num_train=10, num_dev=8, num_test=16)["test"]["prompt"]
    assert set(splits["train"]["language"]) == {"en"}
    corpus = r1_toy.pretraining_corpus(splits["train"], seed=0)
    assert corpus["prompt"] == splits["train"]["prompt"]
    texts = corpus["completion"]
    answers = {"answer": corpus["answer"]}
    assert accuracy_reward(corpus["prompt"], texts, **answers) == [1.0] * len(texts)  # always the right answer
    no_reasoning = sum(t.startswith("<think></think>") for t in texts) / len(texts)
    untagged = 1 - sum(format_reward(None, texts)) / len(texts)
    consistency = [language_consistency(reasoning_text(t)) for t in texts]
    mean_consistency = sum(c for c in consistency if c is not None) / sum(c is not None for c in consistency)
    assert abs(no_reasoning - 0.25) < 0.04 and abs(untagged - 0.3) < 0.04 and abs(mean_consistency - 0.5) < 0.03
    cold = r1_toy.cold_start_set(splits["train"], 32, seed=0)
    assert len(cold) == 32 and sum(format_reward(None, cold["completion"])) == 32
    assert {language_consistency(reasoning_text(t)) for t in cold["completion"]} == {1.0}
    with pytest.raises(ValueError, match="cold-start size"):
        r1_toy.cold_start_set(splits["dev"], 9)


# ----------------------------------------------------------------------------- SFT
def _batch(tok, rows):
    prompt_ids, prompt_mask = encode_prompts(tok, rows["prompt"], None, "cpu")
    completion_ids, completion_mask = encode_completions(tok, rows["completion"], "cpu")
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def test_fused_sft_loss_has_the_cross_entropy_gradient(one_thread):
    tok = r1_toy.build_tokenizer()
    model = r1_toy.build_model(tok, "student", seed=1)
    rows = r1_toy.pretraining_corpus(r1_toy.make_splits(num_train=8, num_dev=1, num_test=1)["train"])[:]
    batch = _batch(tok, rows)  # mixed lengths: padding on both sides
    backbone, head = backbone_and_head(model)
    grads, nlls = {}, {}
    for kind in ("fused", "logits"):
        model.zero_grad()
        loss, nlls[kind] = sft_loss(backbone, head, *batch, loss=kind)
        loss.backward()
        grads[kind] = [p.grad.clone() for p in model.parameters()]
    assert nlls["fused"] == pytest.approx(nlls["logits"], rel=1e-5) and nlls["logits"] > 1.0
    for fused, plain in zip(grads["fused"], grads["logits"], strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-6)  # fp32, differently chunked sums


def test_sft_epochs_checkpoint_and_metrics(tmp_path, one_thread):
    tok = r1_toy.build_tokenizer()
    model = r1_toy.build_model(tok, "student", seed=0)
    data = r1_toy.make_splits(num_train=10, num_dev=4, num_test=1)
    cfg = SFTConfig(batch_size=4, num_epochs=2, target_accuracy=None, logging_steps=1, eval_steps=2,
                    output_dir=str(tmp_path), max_new_tokens=4, warmup_steps=2, lr_scheduler_type="cosine")  # fmt: skip
    assert cfg.total_steps(10) == 5
    out = sft_train(model, tok, data["train"], cfg, dev_examples=data["dev"])
    assert out["steps"] == 5 and out["tokens"] > 0 and math.isfinite(out["loss"])
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert "eval/rewards/accuracy_reward/mean" in records[1] and records[-1]["tokens"] == out["tokens"]
    assert [r["learning_rate"] for r in records[:2]] == pytest.approx([5e-4, 1e-3])  # 2 warm-up steps, then cosine
    assert records[4]["learning_rate"] < records[3]["learning_rate"] < records[2]["learning_rate"] == 1e-3
    loaded = load_model(out["checkpoint"])
    for a, b in zip(loaded.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (tmp_path / "checkpoint-5" / "sft_config.yaml").exists()
    assert json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())["step"] == 5


def test_sft_epoch_order_visits_every_row_once_per_epoch():
    from grpo_fast.trainer.sft import RowOrder

    order = RowOrder(7, SFTConfig(num_epochs=2, batch_size=3))
    rows = sum((order.next(3) for _ in range(4)), [])  # 12 rows: epoch 1 (7) + 5 of epoch 2
    assert sorted(rows[:7]) == list(range(7)) and len(set(rows[7:])) == 5


def test_sft_stops_early_on_dev_accuracy(one_thread):
    tok = r1_toy.build_tokenizer()
    model = r1_toy.build_model(tok, "student", seed=0)
    data = r1_toy.make_splits(num_train=8, num_dev=2, num_test=1)
    cfg = SFTConfig(batch_size=2, max_steps=50, eval_steps=3, target_accuracy=0.0, max_new_tokens=2)
    assert sft_train(model, tok, data["train"], cfg, dev_examples=data["dev"])["steps"] == 3
    with pytest.raises(ValueError, match="loss"):
        SFTConfig(loss="mse")


# ----------------------------------------------------------------------------- config
def test_default_config_is_the_r1_recipe():
    config = load_config()
    names = [s.name for s in config.stages]
    assert names == ["base", "r1_zero", "cold_start", "reasoning_rl", "rejection_sampling", "rs_sft",
                     "rs_sft_reasoning_only", "rl2", "rejection_sampling_r2", "rs_sft_r2", "rl2_r2", "student_base",
                     "distill", "student_grpo", "student_grpo_4x"]  # fmt: skip
    assert [s.name for s in load_config(rounds=1).stages] == [s.name for s in DEFAULT_STAGES]
    stages = {s.name: s for s in config.stages}
    assert "language" not in stages["r1_zero"].rewards and "language" in stages["reasoning_rl"].rewards
    assert stages["rs_sft"].model == "base" and stages["rs_sft"].data == "rejection_sampling"
    assert stages["distill"].model == "student_base" and stages["student_grpo"].compute_of == "distill"
    assert stages["student_grpo_4x"].compute_factor == 4 and stages["student_grpo"].compute_factor == 1
    assert str(config.run_dir) == "runs/r1-toy-seed0" and str(load_config(seed=3).run_dir) == "runs/r1-toy-seed3"


def test_config_overrides_new_stages_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    extra = {"name": "extra", "kind": "grpo", "model": "r1_zero", "rewards": ["accuracy", "language"]}
    path.write_text(yaml.safe_dump({"seed": 1, "stages": ["base", {"name": "r1_zero", "max_steps": 7}, extra]}))
    config = load_config(str(path))
    assert config.seed == 1 and [s.name for s in config.stages] == ["base", "r1_zero", "extra"]
    assert config.stages[1] == GRPOStage("r1_zero", model="base", rewards=("accuracy", "format"), max_steps=7)
    assert config.stages[0] == next(s for s in DEFAULT_STAGES if s.name == "base")
    assert isinstance(config.stages[0], SFTStage) and config.stages[2].rewards == ("accuracy", "language")

    def error(data):
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(configio.ConfigError) as info:
            load_config(str(path))
        return str(info.value)

    assert "did you mean 'max_steps'" in error({"stages": [{"name": "r1_zero", "max_step": 3}]})
    assert "did you mean 'stages'" in error({"stage": ["base"]})
    assert "did you mean 'r1_zero'" in error({"stages": ["r1_zeroo"]})
    assert "needs a kind" in error({"stages": [{"name": "mine"}]})
    assert "runs after it" in error({"stages": ["r1_zero", "base"]})
    assert "unknown reward" in error({"stages": [{"name": "r1_zero", "rewards": ["accuracy", "lenght"]}]})
    assert "unique" in error({"stages": ["base", "base"]})
    assert "did you mean 'num_prompts'" in error({"evaluation": {"num_prompt": 3}})


# ----------------------------------------------------------------------------- every stage end to end
TINY = {
    "seed": 0,
    "threads": 1,
    "rounds": 1,
    "num_train": 300,
    "evaluation": {"num_prompts": 4, "samples": 2, "max_new_tokens": 12, "simple_prompts": 4},
    "stages": [
        {"name": "base", "max_steps": 4, "target_accuracy": None, "batch_size": 8},
        {"name": "r1_zero", "max_steps": 2, "prompts_per_step": 2, "num_generations": 4, "max_completion_length": 12},
        {"name": "cold_start", "data_size": 8, "num_epochs": 1, "batch_size": 4},
        {"name": "reasoning_rl", "max_steps": 2, "prompts_per_step": 2, "num_generations": 4,
         "max_completion_length": 12, "logging_steps": 1},
        {"name": "rejection_sampling", "num_prompts": 6, "samples_per_prompt": 2, "max_new_tokens": 12,
         "require_correct": False, "require_format": False, "min_language_consistency": None},
        {"name": "rs_sft", "batch_size": 4},
        {"name": "rl2", "max_steps": 1, "prompts_per_step": 2, "num_generations": 4, "max_completion_length": 12},
        {"name": "student_base", "max_steps": 4, "target_accuracy": None, "batch_size": 8},
        {"name": "distill", "batch_size": 4, "num_epochs": 3},
        {"name": "student_grpo", "prompts_per_step": 1, "num_generations": 4, "max_completion_length": 12},
    ],
}  # fmt: skip


@pytest.mark.filterwarnings("ignore:reward function 'language_consistency_reward' returned None")  # untrained
def test_every_stage_end_to_end_then_resume(tmp_path, capsys):
    config = tmp_path / "r1.yaml"
    run_dir = tmp_path / "run"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(run_dir)}))
    assert main(["pipeline", "--config", str(config)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["name"] for r in report] == [s["name"] for s in TINY["stages"]]
    metric_keys = {"accuracy", "greedy_accuracy", "format", "language_consistency", "no_reasoning", "mean_length",
                   "reasoning_length", "simple_accuracy", "simple_thinks", "simple_reasoning_length"}  # fmt: skip
    for r in report:
        if r["kind"] == "rejection_sampling":
            assert r["details"]["sampled"] == 12 and 1 <= r["details"]["kept"] <= 6 and "metrics" not in r
        else:
            assert set(r["metrics"]) == metric_keys and r["train_flops"] > 0 and r["params"] > 0
    by_name = {r["name"]: r for r in report}
    assert by_name["distill"]["params"] == by_name["student_base"]["params"] < by_name["base"]["params"] / 3
    # student_grpo ran until its compute reached distill's: at most one GRPO step past it
    budget, spent = by_name["distill"]["train_flops"], by_name["student_grpo"]["train_flops"]
    per_step = spent / by_name["student_grpo"]["details"]["steps"]
    assert budget <= spent < budget + 2 * per_step
    rs_rows = (run_dir / "rejection_sampling" / "sft_set.jsonl").read_text().splitlines()
    assert len(rs_rows) == by_name["rejection_sampling"]["details"]["kept"]
    assert by_name["rs_sft"]["details"]["examples"] == len(rs_rows)
    rl_log = [json.loads(x) for x in (run_dir / "reasoning_rl" / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/language_consistency_reward/mean" in rl_log[0]
    for name in ("report.md", "report.png", "rl_curves.png", "r1_zero/curves.png", "base/metrics.jsonl"):
        assert (run_dir / name).stat().st_size > 0, name
    table = (run_dir / "report.md").read_text()
    assert "| r1_zero | grpo | base |" in table and "kept" in table

    # a rerun skips every finished stage; --stages runs a subset; a changed stage config is refused
    capsys.readouterr()
    stamp = (run_dir / "distill" / "stage.json").stat().st_mtime_ns
    assert main(["pipeline", "--config", str(config), "--stages", "distill,student_grpo"]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    assert (run_dir / "distill" / "stage.json").stat().st_mtime_ns == stamp
    assert [r["name"] for r in json.loads((run_dir / "report.json").read_text())] == ["distill", "student_grpo"]
    changed = {**TINY, "output_dir": str(run_dir), "stages": TINY["stages"][:1]}
    changed["stages"] = [{**TINY["stages"][0], "max_steps": 5}]
    config.write_text(yaml.safe_dump(changed))
    assert main(["pipeline", "--config", str(config)]) == 2
    assert "another config" in capsys.readouterr().err
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(run_dir)}))
    assert main(["pipeline", "--config", str(config), "--stages", "base", "--seed", "1"]) == 2  # made with seed 0
    # an unfinished stage (no stage.json) is run again from scratch
    (run_dir / "rl2" / "stage.json").unlink()
    assert main(["pipeline", "--config", str(config), "--stages", "rl2"]) == 0
    assert (run_dir / "rl2" / "stage.json").exists()
    assert main(["pipeline", "--config", str(config), "--stages", "nope"]) == 2


def test_missing_input_stage_is_an_error(tmp_path, capsys):
    config = tmp_path / "r1.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "run"), "stages": [TINY["stages"][1]]}))
    assert main(["pipeline", "--config", str(config)]) == 2
    assert "'base' is needed but has not run" in capsys.readouterr().err


def test_stage_table_formats_rows():
    report = [
        {"name": "base", "kind": "sft", "model": "new:teacher", "params": 532736, "train_flops": 2.5e12,
         "seconds": 40.2, "cpu_seconds": 35.6, "eval_seconds": 2.0, "metrics": {"accuracy": 0.25,
         "greedy_accuracy": 0.3, "format": 0.9, "language_consistency": 0.5, "no_reasoning": 0.2,
         "mean_length": 33.25}},
        {"name": "rs", "kind": "rejection_sampling", "model": "base", "seconds": 3,
         "details": {"kept": 10, "sampled": 40}},
    ]  # fmt: skip
    table = stage_table(report, "seed 0").splitlines()
    assert table[2].startswith("| stage | kind |") and len(table) == 6
    metrics = "0.250 | 0.300 | 0.900 | 0.500 | 0.200 | 33.2 |  |  |  |  "  # no reasoning length, no simple queries
    assert table[4] == f"| base | sft | new:teacher | 0.53M | {metrics}| 2.50 | 42 | 36 |"
    assert "kept 10 / 40 sampled" in table[5]


def test_effects_are_paired_differences_with_their_noise():
    ones, zeros = [1.0] * 64, [0.0] * 64
    noisy = [float(i % 2) for i in range(64)]  # mean 0.5
    noisy_shifted = [float(i % 2) if i % 8 else 1.0 for i in range(64)]  # +1/16 on 1 prompt in 8
    assert compare(ones, zeros) == (1.0, 0.0)
    diff, se = compare([1.0, math.nan, 0.0], [0.0, 1.0, 0.0])  # NaN pairs are left out
    assert diff == 0.5 and se == pytest.approx(0.5)

    def record(name, accuracy, language=None):
        return {"name": name, "per_prompt": {"accuracy": accuracy, "language_consistency": language or accuracy}}

    runs = {"base": noisy, "r1_zero": ones, "rs_sft": noisy_shifted, "reasoning_rl": noisy, "distill": zeros}
    table = effect_table([record(name, values) for name, values in {**runs, "student_grpo": noisy}.items()])
    rows = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| ") and " vs " in line}
    assert rows["r1_zero vs base"].endswith("| accuracy | +0.500 ± 0.063 | yes |")
    assert rows["rs_sft vs reasoning_rl"].endswith("yes |")  # "not lower": a small gain or loss is fine
    assert rows["distill vs student_grpo"].endswith("| no (opposite) |")
    assert "cold_start" not in table  # claims whose stages did not run are left out
