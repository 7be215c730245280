"""Experiment tracking (grpo_fast.trainer.tracking): what a 3-step CPU run logged, read back from each backend's local
files (TensorBoard event files, W&B offline run files, trackio's and MLflow's local stores), compared with
metrics.jsonl. Nothing reaches the network: W&B runs offline, trackio and MLflow write local files."""

import json
import math
import os
import struct
import time
from pathlib import Path

import pytest
import yaml

from grpo_fast.cli import main
from grpo_fast.r1 import toy
from grpo_fast.trainer import GRPOConfig, GRPOTrainer, tracking
from grpo_fast.trainer.configio import ConfigError
from grpo_fast.trainer.rewards import accuracy_reward

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, 1 thread

INSTALLED = tracking.resolve_report_to("all")
# the fields of a logged wandb.Table in a history record (beside TRL's completions/* metrics)
WANDB_TABLE_FIELDS = ("_type", "path", "sha256", "size", "nrows", "ncols", "artifact_path", "_latest_artifact_path",
                      "log_mode")  # fmt: skip
TABLE_COLUMNS = ["step", "prompt", "completion", "reward", "accuracy_reward", "digits"]


def digits(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Environment for the backends: W&B offline, trackio's store and MLflow's file store in tmp dirs."""
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("stores")
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("HF_HUB_OFFLINE", "1")
    # MLflow's file store: its default SQLite store takes ~10 s to create its tables
    mp.setenv("MLFLOW_TRACKING_URI", (base / "mlruns").as_uri())
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name in ("WANDB_PROJECT", "TRACKIO_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        mp.delenv(name, raising=False)
    if "trackio" in INSTALLED:  # its store: set by tests/conftest.py before anything imported trackio
        from trackio import utils

        assert utils.TRACKIO_DIR == Path(os.environ["TRACKIO_DIR"])
    yield base
    mp.undo()


@pytest.fixture(scope="module")
def run(offline, tmp_path_factory):
    """A 3-step run logging to every installed backend, then resumed from its checkpoint-2 (as after a crash
    that came after step 3 was logged): step 3 again. Returns (output_dir, metrics.jsonl rows)."""
    out = tmp_path_factory.mktemp("run")
    tok = toy.build_tokenizer()
    data = toy.make_splits(num_train=64, num_dev=4, num_test=8)["train"]
    cfg = GRPOConfig(output_dir=str(out), seed=3, max_steps=3, save_steps=2, learning_rate=1e-2,
                     per_device_train_batch_size=8, num_generations=4, max_completion_length=8, logging_steps=1,
                     report_to=INSTALLED, run_name="tiny", log_completions_steps=2)  # fmt: skip

    def trainer(config):
        model = toy.build_model(tok, seed=0, hidden_size=32, layers=1, heads=2, ffn=64)
        return GRPOTrainer(model, [accuracy_reward, digits], config, data, tokenizer=tok)

    trainer(cfg).train()
    time.sleep(1.1)  # W&B names an offline run's directory by the second it started
    trainer(cfg.replace(log_completions_steps=3)).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    return out, rows


def expected(rows) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} of metrics.jsonl, the step itself left out (it is the axis)."""
    return {k: {r["step"]: r[k] for r in rows} for k in rows[0] if k != "step"}


def assert_same(logged: dict[str, dict[int, float]], rows, rel=0.0) -> None:
    want = expected(rows)
    assert set(logged) == set(want)
    for name, values in want.items():
        assert set(logged[name]) == set(values), name
        for step, value in values.items():
            assert logged[name][step] == pytest.approx(value, rel=rel, abs=1e-12, nan_ok=True), (name, step)


def need(backend: str) -> None:
    if backend not in INSTALLED:
        pytest.skip(f"{tracking.BACKENDS[backend][1]} is not installed here")


# ----------------------------------------------------------------------------- the four backends
def test_tensorboard_event_files_hold_metrics_config_completions_and_the_resumed_step(run):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rows = run
    events = EventAccumulator(str(out / "runs"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for tag in events.Tags()["scalars"]:  # the first attempt's step 3 is purged: each step once
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3], tag
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert_same(logged, rows, rel=2**-23)  # TensorBoard stores float32: one rounding
    text = {tag: {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)}
            for tag in events.Tags()["tensors"]}  # fmt: skip
    assert sorted(text["completions/text_summary"]) == [2, 3]  # step 2 from the first attempt, 3 after resuming
    table = text["completions/text_summary"][3].splitlines()
    assert table[0] == "| " + " | ".join(TABLE_COLUMNS) + " |" and len(table) == 2 + 8  # header, rule, 8 rows
    assert "| learning_rate | 0.01 |" in text["config/text_summary"][0]
    assert "_hparams_/session_start_info" in events.summary_metadata


def wandb_records(path: Path):
    """The records of a W&B run file (.wandb: a 7-byte header, then LevelDB-log framed protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk = path.read_bytes(), 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def test_wandb_offline_run_files_hold_metrics_config_completions_and_the_resumed_step(run):
    need("wandb")
    out, rows = run
    files = sorted((out / "runs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the first run and its resumption
    run_id = json.loads((out / "runs" / tracking.IDS_FILE).read_text())["wandb"]
    assert all(f.name == f"run-{run_id}.wandb" for f in files)  # the same W&B run, continued
    logged, config, table = {}, {}, None
    for record in (r for f in files for r in wandb_records(f)):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            assert (record.run.display_name, record.run.project) == ("tiny", tracking.DEFAULT_PROJECT)
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            step = items.pop("_step", record.history.step.num)
            if "completions/_type" in items:
                table = (step, items["completions/path"])
            for name, value in items.items():
                if not name.startswith("_") and name.removeprefix("completions/") not in WANDB_TABLE_FIELDS:
                    logged.setdefault(name, {})[step] = value
    assert_same(logged, rows)
    assert config["learning_rate"] == 0.01 and config["report_to"] == list(INSTALLED)
    step, path = table
    content = json.loads(next(files[1].parent.glob(f"files/{path}")).read_text())
    assert step == 3 and content["columns"] == TABLE_COLUMNS and len(content["data"]) == 8


def test_trackio_local_store_holds_metrics_config_completions_and_the_resumed_step(run, offline):
    need("trackio")
    from trackio import SQLiteStorage

    out, rows = run
    project = tracking.DEFAULT_PROJECT
    assert [r for r in SQLiteStorage.get_runs(project)] == ["tiny"]  # resumed: the same run
    logs = SQLiteStorage.get_logs(project, "tiny")
    logged = {}
    for entry in logs:
        for name, value in entry.items():
            if name not in ("step", "timestamp", "completions") and not name.startswith("_"):
                logged.setdefault(name, {})[entry["step"]] = value
    assert_same(logged, rows)
    tables = [e for e in logs if "completions" in e]
    assert [e["step"] for e in tables] == [2, 3]
    assert SQLiteStorage.get_run_config(project, "tiny")["learning_rate"] == 0.01


def test_mlflow_file_store_holds_metrics_params_completions_and_the_resumed_step(run, offline):
    need("mlflow")
    from mlflow.tracking import MlflowClient

    out, rows = run
    client = MlflowClient((offline / "mlruns").as_uri())
    experiment = client.get_experiment_by_name(tracking.DEFAULT_PROJECT)
    (found,) = client.search_runs([experiment.experiment_id])  # resumed: the same run
    assert found.info.run_name == "tiny" and found.data.params["learning_rate"] == "0.01"
    logged = {k: {m.step: m.value for m in client.get_metric_history(found.info.run_id, k)} for k in found.data.metrics}
    assert_same(logged, rows)
    artifacts = [a.path for a in client.list_artifacts(found.info.run_id, "completions")]
    assert artifacts == ["completions/step_000002.json", "completions/step_000003.json"]
    table = json.loads(Path(client.download_artifacts(found.info.run_id, artifacts[1])).read_text())
    assert table["columns"] == TABLE_COLUMNS and len(table["data"]) == 8


def test_tensorboard_table_cells_stay_in_their_cell_and_an_empty_table_logs_nothing(tmp_path):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tracking.start_tracking("tensorboard", tracking.RunInfo("r", tmp_path)) as tracker:  # no config
        tracker.log_completions([{"prompt": "1|2", "completion": "<think>a\nb</think>", "reward": 0.5}], step=1)
        tracker.log_completions([], step=2)
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0}).Reload()
    (table,) = events.Tensors("completions/text_summary")
    assert table.step == 1 and table.tensor_proto.string_val[0].decode().splitlines()[2] == (
        "| 1\\|2 | &lt;think&gt;a<br>b&lt;/think&gt; | 0.5 |"
    )


def test_a_run_that_raises_is_marked_failed(tmp_path, offline):
    need("mlflow")
    from mlflow.tracking import MlflowClient

    with pytest.raises(RuntimeError, match="boom"):
        with tracking.start_tracking("mlflow", tracking.RunInfo("crashes", tmp_path, project="crash")) as tracker:
            tracker.log_metrics({"reward": 1.0}, step=1)
            raise RuntimeError("boom")
    client = MlflowClient((offline / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("crash").experiment_id])
    assert run.info.status == "FAILED" and run.data.metrics == {"reward": 1.0}


# ----------------------------------------------------------------------------- config, errors, CLI
def test_report_to_takes_trl_values_and_rejects_others_naming_the_field(tmp_path):
    assert GRPOConfig(output_dir=str(tmp_path)).report_to == ("none",)
    assert GRPOConfig(report_to="tensorboard").report_to == ("tensorboard",)
    assert GRPOConfig(report_to=["wandb", "mlflow"]).report_to == ("wandb", "mlflow")
    assert tracking.resolve_report_to("none") == ()
    with pytest.raises(ValueError, match="report_to must name backends .* got 'tensorbord'"):
        GRPOConfig(report_to="tensorbord")
    with pytest.raises(ValueError, match="report_to 'all' and 'none' stand alone"):
        GRPOConfig(report_to=("all", "wandb"))
    with pytest.raises(TypeError, match="report_to must be a string or a list"):
        GRPOConfig(report_to=3)
    with pytest.raises(ValueError, match="log_completions_steps must be an int >= 0"):
        GRPOConfig(log_completions_steps=-1)
    with pytest.raises(TypeError, match="run_name must be str, got int 5"):
        GRPOConfig(run_name=5)


def test_a_backend_that_is_not_installed_is_a_one_line_error_with_the_pip_command(tmp_path, monkeypatch, capsys):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(ConfigError, match=r"report_to='mlflow' needs the mlflow package: pip install mlflow"):
        tracking.resolve_report_to(["mlflow"])
    assert "mlflow" not in tracking.resolve_report_to("all")
    code = main(["train", "--output_dir", str(tmp_path), "--max_steps", "1", "--report_to", "mlflow"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        "grpo-fast train: error: report_to='mlflow' needs the mlflow package: pip install mlflow"
    )


def test_mlflow_default_sqlite_store_without_sqlalchemy_is_a_one_line_error(tmp_path, monkeypatch):
    need("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "sqlalchemy" else real(name))
    with pytest.raises(ConfigError, match="needs SQLAlchemy .*: pip install mlflow, or set MLFLOW_TRACKING_URI"):
        tracking.start_tracking("mlflow", tracking.RunInfo("r", tmp_path))


def test_cli_train_report_to_tensorboard_writes_event_files(tmp_path, offline):
    need("tensorboard")
    out = tmp_path / "run"
    args = ["train", "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "8",
            "--num_generations", "4", "--max_completion_length", "6", "--report_to", "tensorboard",
            "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    assert list((out / "runs").glob("events.out.tfevents.*"))
    assert not math.isnan(json.loads((out / "metrics.jsonl").read_text())["reward"])


# ----------------------------------------------------------------------------- the R1 pipeline
PIPELINE = {
    "seed": 0,
    "threads": 1,
    "num_train": 300,
    "evaluation": {"num_prompts": 4, "samples": 2, "max_new_tokens": 12},
    "stages": [
        {"name": "base", "max_steps": 3, "target_accuracy": None, "batch_size": 8},
        {"name": "r1_zero", "max_steps": 2, "prompts_per_step": 2, "num_generations": 4, "max_completion_length": 12,
         "logging_steps": 1},
    ],
}  # fmt: skip


def test_pipeline_stages_are_runs_named_after_them_in_one_group(tmp_path, offline):
    need("tensorboard")
    need("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "r1-run"
    (tmp_path / "r1.yaml").write_text(yaml.safe_dump({**PIPELINE, "output_dir": str(run_dir)}))
    assert main(["pipeline", "--config", str(tmp_path / "r1.yaml"), "--report_to", "tensorboard,wandb"]) == 0
    report = {r["name"]: r for r in json.loads((run_dir / "report.json").read_text())}
    for name in ("base", "r1_zero"):
        events = EventAccumulator(str(run_dir / name / "runs"), size_guidance={"scalars": 0}).Reload()
        accuracy = events.Scalars("eval/accuracy")
        steps = report[name]["details"]["steps"]
        assert [(e.step, e.value) for e in accuracy] == [(steps, pytest.approx(report[name]["metrics"]["accuracy"]))]
        (file,) = (run_dir / name / "runs" / "wandb").glob("offline-run-*/run-*.wandb")
        (run,) = [r.run for r in wandb_records(file) if r.WhichOneof("record_type") == "run"]
        assert (run.display_name, run.run_group) == (name, "r1-run")
    rows = [json.loads(x) for x in (run_dir / "r1_zero" / "metrics.jsonl").read_text().splitlines()]
    rewards = {e.step: e.value for e in events.Scalars("reward")}  # r1_zero's
    assert rewards == {r["step"]: pytest.approx(r["reward"], rel=2**-23) for r in rows}
    assert "completions/text_summary" in events.Tags()["tensors"]
