"""Nothing lost, nothing silent (round 2): reward functions always see the sampled text, metrics.jsonl
survives crashes and kills at every point, SIGTERM/SIGUSR1 save like Ctrl-C, every write names its file
and cause, truncation is counted, every prompt is checked at construction, metrics.jsonl is strict JSON,
and the config/data-file edge cases of the CLI (duplicate YAML keys, ``~`` and ``$VAR`` in paths, broken
data files, TRL keys we lack).

Run: pytest tests/test_durability.py   (tiny 1-layer models; killed children are forks of this process)
"""

from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
import pathlib
import re
import resource
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from grpo_fast.cli import load_train_config, main
from grpo_fast.r1 import toy
from grpo_fast.trainer import GRPOConfig, GRPOTrainer, MetricsLog, evaluation, metrics, run_dir
from grpo_fast.trainer.checkpoint import latest_checkpoint
from grpo_fast.trainer.configio import ConfigError
from grpo_fast.trainer.data import load_data_file
from grpo_fast.trainer.plotting import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, 1 thread


@pytest.fixture(scope="module")
def rows():
    return toy.make_splits(num_train=32, num_dev=4, num_test=4)


def tiny(seed: int = 0):
    tok = toy.build_tokenizer()
    return tok, toy.build_model(tok, seed=seed, hidden_size=32, layers=1, heads=2, ffn=64)


def digit_share(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def config(tmp_path, **changes) -> GRPOConfig:
    base = dict(output_dir=str(tmp_path), seed=3, max_steps=2, learning_rate=1e-2, per_device_train_batch_size=8,
                num_generations=4, max_completion_length=6)  # fmt: skip
    return GRPOConfig(**{**base, **changes})


def trainer(tmp_path, rows, reward=digit_share, eval_dataset=None, train_dataset=None, **changes) -> GRPOTrainer:
    tok, model = tiny()
    data = rows["train"] if train_dataset is None else train_dataset
    return GRPOTrainer(model, reward, config(tmp_path, **changes), data, eval_dataset, tok)


def logged_steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def hidden_leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock")


# ----------------------------------------------------------------------------- reserved reward arguments
@pytest.mark.parametrize("column", ["prompts", "completions", "completion_ids", "trainer_state"])
def test_dataset_column_with_a_reserved_reward_argument_name_is_refused(tmp_path, rows, column):
    data = [{"prompt": "1+2=", column: "3"}, {"prompt": "2+2=", column: "4"}]
    with pytest.raises(ValueError, match=rf"train_dataset has a column {column!r}.*rename it.*rename_column"):
        trainer(tmp_path, rows, train_dataset=data)


def test_eval_dataset_with_a_completions_column_is_refused(tmp_path, rows):
    data = [{"prompt": "1+2=", "completions": "<answer>3</answer>"}]
    with pytest.raises(ValueError, match=r"eval_dataset has a column 'completions'"):
        trainer(tmp_path, rows, eval_dataset=data)


def test_evaluate_refuses_a_reserved_column_rather_than_scoring_the_reference_text(rows):
    tok, model = tiny()
    data = rows["test"].add_column("completions", ["reference"] * len(rows["test"]))
    with pytest.raises(ValueError, match=r"dataset has a column 'completions'"):
        evaluation.evaluate(model, tok, data, [digit_share], max_new_tokens=2)


def test_reward_functions_receive_the_sampled_prompts_and_completions(tmp_path, rows):
    seen = {}

    def recorder(prompts, completions, reference, **kwargs):
        seen.update(prompts=prompts, completions=completions, reference=reference, ids=kwargs["completion_ids"])
        return [0.0] * len(completions)

    data = rows["train"].add_column("reference", ["REF"] * len(rows["train"]))
    t = trainer(tmp_path, rows, recorder, train_dataset=data)
    t.step()
    assert set(seen["prompts"]) <= set(rows["train"]["prompt"]) and seen["reference"] == ["REF"] * 8
    assert seen["completions"] == t.tokenizer.batch_decode(seen["ids"], skip_special_tokens=True)


# ----------------------------------------------------------------------------- metrics durability
def eval_fails(prompts, completions, **kwargs):
    if len(completions) != 8:  # the evaluation set (4 prompts), not a training batch
        raise RuntimeError("evaluation broke")
    return digit_share(prompts, completions)


def test_failed_final_evaluation_keeps_the_steps_metrics_line(tmp_path, rows):
    t = trainer(tmp_path, rows, eval_fails, rows["test"])
    with pytest.raises(Exception, match="evaluation broke"):
        t.train()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2" and logged_steps(tmp_path) == [1, 2]


def test_metrics_line_is_fsynced_before_its_checkpoint_is_published(tmp_path, rows, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    trainer(tmp_path, rows, save_steps=1).train()
    for step in (1, 2):
        published = events.index(("replace", str(tmp_path / f"checkpoint-{step}")))
        synced = [e for e in events[:published] if e == ("fsync", str(tmp_path / "metrics.jsonl"))]
        assert len(synced) >= step, (step, events)


def _block(marker: Path, where: str = "") -> None:
    marker.write_text(where)
    time.sleep(600)  # killed here


def _child_train(run: Path, marker: Path, point: str) -> None:
    """Body of a killed child: a 2-step run (checkpoint every step, evaluation at the end) blocked at ``point``."""
    data = toy.make_splits(num_train=32, num_dev=4, num_test=4)
    if point == "before_checkpoint":  # step 2's line written, checkpoint-2 not yet
        real = run_dir.save_checkpoint

        def save(root, step, *args, **kwargs):
            if step == 2:
                _block(marker)
            return real(root, step, *args, **kwargs)

        run_dir.save_checkpoint = save  # this process only: a fork of the test process

    def reward(prompts, completions, **kwargs):
        if len(completions) != 8 and point == "in_evaluation":  # after checkpoint-2
            _block(marker)
        return digit_share(prompts, completions)

    torch.set_num_threads(1)
    trainer(run, data, reward, data["test"], save_steps=1).train()
    os._exit(3)  # not blocked: the parent fails the test


def _child_truncate(path: Path, marker: Path) -> None:
    """Body of a killed child: a resume's truncation of metrics.jsonl, blocked just before its rename."""
    real = os.replace

    def replace(src, dst):
        if Path(dst) == path:
            _block(marker)
        real(src, dst)

    os.replace = replace
    MetricsLog(path, keep_up_to_step=1)
    os._exit(3)


def fork_and_kill(target, *args) -> int:
    """Fork a child running ``target(*args, marker)``, wait until it writes ``marker``, SIGKILL it; its pid."""
    marker = Path(args[0]).parent / f"blocked-{target.__name__}"
    child = multiprocessing.get_context("fork").Process(target=target, args=(*args[:1], marker, *args[1:]))
    child.start()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.is_alive(), f"the child exited with {child.exitcode} before blocking"
            assert time.monotonic() < deadline, "the child did not block within 120 s"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.join(60)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == -signal.SIGKILL
    return child.pid


@pytest.mark.parametrize("point,latest,history", [("before_checkpoint", 1, [1, 2]), ("in_evaluation", 2, [1, 2])])
def test_kill_leaves_a_valid_history_up_to_the_checkpoint_resume_uses(tmp_path, rows, point, latest, history):
    run = tmp_path / "run"
    fork_and_kill(_child_train, run, point)
    assert latest_checkpoint(run) == run / f"checkpoint-{latest}" and logged_steps(run) == history
    trainer(run, rows, max_steps=3).train(resume_from_checkpoint=True)
    assert logged_steps(run) == [1, 2, 3] and hidden_leftovers(run) == []


def _history(path: Path, steps=range(1, 6)) -> str:
    text = "".join(json.dumps({"step": s, "reward": s / 10, "pad": "x" * 200}) + "\n" for s in steps)
    path.write_text(text)
    return text


def test_kill_during_the_resume_rename_keeps_the_old_history(tmp_path):
    path = tmp_path / "metrics.jsonl"
    before = _history(path)
    fork_and_kill(_child_truncate, path)
    assert path.read_text() == before  # the old file, whole: the new one was never renamed over it
    MetricsLog(path, keep_up_to_step=1)  # the next resume
    assert logged_steps(tmp_path) == [1] and hidden_leftovers(tmp_path) == []


def _child_truncate_on_a_full_disk(path: Path, pipe) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (300, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        MetricsLog(path, keep_up_to_step=3)
        pipe.send("no error")
    except OSError as error:
        pipe.send(str(error))
    os._exit(0)


def test_resume_truncation_on_a_full_disk_never_tears_the_history(tmp_path):
    path = tmp_path / "metrics.jsonl"
    before = _history(path)
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_child_truncate_on_a_full_disk, args=(path, send))
    child.start()
    message = receive.recv() if receive.poll(120) else "no answer"
    child.join(60)
    assert str(path) in message and "File too large" in message, message
    assert path.read_text() == before and hidden_leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- SIGTERM / SIGUSR1
def _child_cli_train(config_file: Path, marker: Path, err: Path) -> None:
    """Body of a signalled child: ``grpo-fast train`` that blocks before its second step."""
    sys.stderr = open(err, "w", buffering=1)  # (pytest captures the test process' sys.stderr)
    real, calls = GRPOTrainer.step, []

    def step(self):
        calls.append(1)
        if len(calls) == 2:
            marker.write_text("")
            time.sleep(600)  # the signal arrives here
        return real(self)

    GRPOTrainer.step = step
    torch.set_num_threads(1)
    code = main(["train", "--config", str(config_file)])
    sys.stderr.flush()
    os._exit(code)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_saves_the_last_finished_step_and_exits_128_plus_the_signal(tmp_path, signum):
    path = cli_config(tmp_path, max_steps=3, model_name_or_path="toy")
    marker, err = tmp_path / "blocked", tmp_path / "stderr"
    child = multiprocessing.get_context("fork").Process(target=_child_cli_train, args=(Path(path), marker, err))
    child.start()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(child.pid, signum)
        child.join(120)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    name = signal.Signals(signum).name
    text = err.read_text()
    assert child.exitcode == 128 + signum, (child.exitcode, text)
    assert f"{name}: saved" in text and f"grpo-fast train: stopped by {name}" in text, text
    assert latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint-1"


def _child_rank(rank: int, port: int, config_file: Path, out: Path) -> None:
    """One of two processes with torchrun's environment running ``grpo-fast train``; rank 0 waits before
    its second step until the test has sent it a stop signal (``out/go``)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")  # fmt: skip
    sys.stderr = open(out / f"stderr-{rank}", "w", buffering=1)
    real, calls = GRPOTrainer.step, []

    def step(self):
        calls.append(1)
        if rank == 0 and len(calls) == 2:
            (out / "blocked").write_text("")
            deadline = time.monotonic() + 120
            while not (out / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return real(self)

    GRPOTrainer.step = step
    torch.set_num_threads(1)
    code = main(["train", "--config", str(config_file)])
    sys.stderr.flush()
    os._exit(code)


def test_stop_signal_to_one_rank_stops_every_rank_after_a_collective_save(tmp_path):
    import socket

    path = Path(cli_config(tmp_path, max_steps=4))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=_child_rank, args=(r, port, path, tmp_path)) for r in (0, 1)]
    for p in ranks:
        p.start()
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "blocked").exists() and all(p.is_alive() for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(ranks[0].pid, signal.SIGTERM)  # rank 0 only: rank 1 learns of it at the step boundary
        (tmp_path / "go").write_text("")
        for p in ranks:
            p.join(120)
    finally:
        for p in ranks:
            if p.is_alive():  # hung in a collective the other rank never joined
                p.kill()
                p.join()
    err = [(tmp_path / f"stderr-{r}").read_text() for r in (0, 1)]
    assert [p.exitcode for p in ranks] == [143, 143], err
    assert "SIGTERM: saved" in err[0] and all("grpo-fast train: stopped by SIGTERM" in e for e in err), err
    run = tmp_path / "run"
    assert latest_checkpoint(run) == run / "checkpoint-2" and logged_steps(run) == [1, 2]


def test_signal_handlers_are_restored_after_training(tmp_path, rows):
    def mine(signum, frame):
        pass

    previous, usr1 = signal.signal(signal.SIGTERM, mine), signal.getsignal(signal.SIGUSR1)
    try:
        trainer(tmp_path, rows, max_steps=1).train()
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGUSR1) == usr1
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_training_in_a_thread_installs_no_handlers(tmp_path, rows):
    errors = []

    def run():
        try:
            trainer(tmp_path, rows, max_steps=1).train()
        except Exception as error:  # signal.signal outside the main thread raises ValueError
            errors.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(120)
    assert errors == [] and (tmp_path / "checkpoint-1").is_dir()


# ----------------------------------------------------------------------------- failed writes
DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_writes(monkeypatch, name: str) -> None:
    """Make the write of ``name`` into checkpoint-2 (or into the run directory) fail as on a full disk."""
    from safetensors import SafetensorError
    from transformers import modeling_utils

    def target(path) -> bool:
        return Path(path).name == name and ".checkpoint-2." in str(path)

    real_torch, real_text, real_safe = torch.save, pathlib.Path.write_text, modeling_utils.safe_save_file

    def torch_save(obj, f, *args, **kwargs):
        if target(f):
            Path(f).write_bytes(b"\0" * 64)  # part of it reached the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_torch(obj, f, *args, **kwargs)

    def write_text(self, *args, **kwargs):
        in_run_dir = self.name == "grpo_config.yaml" and ".checkpoint" not in str(self)
        if target(self) or (name == "run grpo_config.yaml" and in_run_dir):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_text(self, *args, **kwargs)

    def safe_save_file(tensors, filename, *args, **kwargs):
        if target(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_safe(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    monkeypatch.setattr(modeling_utils, "safe_save_file", safe_save_file)


@pytest.mark.parametrize(
    "name", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "grpo_config.yaml"]
)
def test_disk_full_on_any_checkpoint_file_names_it_and_keeps_the_previous_checkpoint(tmp_path, rows, monkeypatch, name):
    t = trainer(tmp_path, rows, save_steps=1)
    fail_writes(monkeypatch, name)
    with pytest.raises(OSError) as info:
        t.train()
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "disk full" in message and name in message, message
    assert "checkpoint-2" in message and "untouched" in message
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1" and hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("free_blocks,cause", [(0, "No space left on device"), (10, "Input/output error")])
def test_torch_save_runtime_error_is_an_os_error_naming_the_file(tmp_path, rows, monkeypatch, free_blocks, cause):
    t = trainer(tmp_path, rows, max_steps=1)
    real_statvfs = os.statvfs

    def torch_save(obj, f, *args, **kwargs):  # what torch's own file writer raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    class Stats:
        def __init__(self, path):
            self.real = real_statvfs(path)

        def __getattr__(self, name):
            return free_blocks if name == "f_bavail" else getattr(self.real, name)

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(os, "statvfs", Stats)
    with pytest.raises(OSError, match=r"could not save checkpoint .*checkpoint-1: .*optimizer.pt") as info:
        t.train()
    assert cause == os.strerror(info.value.errno)
    assert ("disk full" in str(info.value)) == (free_blocks == 0) and hidden_leftovers(tmp_path) == []


def test_disk_full_on_the_runs_config_names_it(tmp_path, rows, monkeypatch):
    t = trainer(tmp_path, rows)
    fail_writes(monkeypatch, "run grpo_config.yaml")
    file = re.escape(str(tmp_path / "grpo_config.yaml"))
    with pytest.raises(OSError, match=rf"could not write {file}: No space left on device \(disk full\)"):
        t.train()


class FullFile:
    """A file whose writes fail as on a full disk."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_disk_full_on_metrics_names_the_file_and_publishes_no_checkpoint_after_it(tmp_path, rows, monkeypatch):
    lines = []

    def full_on_second_line(file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)
        if Path(file).name == "metrics.jsonl" and "a" in mode:
            lines.append(1)
            return FullFile(handle) if len(lines) == 2 else handle
        return handle

    t = trainer(tmp_path, rows, save_steps=1)
    monkeypatch.setattr(metrics, "open", full_on_second_line, raising=False)
    file = re.escape(str(tmp_path / "metrics.jsonl"))
    with pytest.raises(OSError, match=rf"could not write {file}: No space left on device \(disk full\)"):
        t.train()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1" and logged_steps(tmp_path) == [1]


def test_disk_full_on_the_plot_is_one_cli_line(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    _history(tmp_path / "metrics.jsonl")

    def savefig(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", savefig)
    line = one_error_line(capsys, 1, ["plot", str(tmp_path)], "disk full")
    assert str(tmp_path / "curves.png") in line


# ----------------------------------------------------------------------------- truncation and positions
def test_truncated_prompts_are_warned_once_with_the_count_and_logged(tmp_path, rows):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(tmp_path, rows, max_prompt_length=5)
        t.train()
    said = [str(w.message) for w in caught if "max_prompt_length" in str(w.message)]
    assert len(said) == 1 and re.search(r"32 of 32 train_dataset prompts .*longer than max_prompt_length = 5", said[0])
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["prompts/truncated"] for r in logged] == [2, 2]  # 8 completions / 4 per prompt, all cut


def test_no_truncation_logs_zero_and_says_nothing(tmp_path, rows):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics_ = trainer(tmp_path, rows, max_steps=1).train()
    assert metrics_["prompts/truncated"] == 0 and not [w for w in caught if "max_prompt_length" in str(w.message)]


@pytest.mark.parametrize(
    "changes,match",
    [({"max_completion_length": 125}, r"train_dataset prompt .* 8 tokens\) \+ max_completion_length 125 = 133"),
     ({"eval_max_new_tokens": 124}, r"eval_dataset prompt .* 8 tokens\) \+ eval_max_new_tokens 124 = 132")],
)  # fmt: skip
def test_prompt_plus_completion_past_the_models_positions_is_refused(tmp_path, rows, changes, match):
    with pytest.raises(ValueError, match=match + r".*max_position_embeddings = 128"):
        trainer(tmp_path, rows, eval_dataset=rows["test"], **changes)


# ----------------------------------------------------------------------------- prompts checked at construction
@pytest.mark.parametrize("which", ["train_dataset", "eval_dataset"])
def test_prompt_the_tokenizer_cannot_encode_is_refused_at_construction(tmp_path, rows, which):
    data = [{"prompt": "1+2="}, {"prompt": "12+ab="}]
    kwargs = {"train_dataset": data} if which == "train_dataset" else {"eval_dataset": data}
    with pytest.raises(ValueError, match=rf"{which} row 1: .*'12\+ab=' has text the tokenizer does not know"):
        trainer(tmp_path, rows, **kwargs)


def test_chat_prompt_without_a_chat_template_is_refused_at_construction(tmp_path, rows):
    data = [{"prompt": [{"role": "user", "content": "1+2="}]}]
    with pytest.raises(ValueError, match=r"train_dataset row 0: the tokenizer cannot encode the prompt: the 'prompt' "
                                         r"column holds chat messages but the tokenizer has no chat template; .*"
                                         r"grpo-fast tiny-model DIR --chat-template qwen"):  # fmt: skip
        trainer(tmp_path, rows, train_dataset=data)


# ----------------------------------------------------------------------------- strict JSON, live plots
def test_metrics_jsonl_is_strict_json_with_null_for_non_finite(tmp_path, rows):
    def never(prompts, completions, **kwargs):
        return [None] * len(completions)

    with pytest.warns(RuntimeWarning, match="returned None for every completion"):
        trainer(tmp_path, rows, [digit_share, never], max_steps=1).train()
    text = (tmp_path / "metrics.jsonl").read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl: not JSON"))
    assert record["rewards/never/mean"] is None and math.isfinite(record["reward"])


def test_plot_reads_a_live_run_skipping_the_torn_last_line(tmp_path, capsys):
    _history(tmp_path / "metrics.jsonl", [1, 2])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward": null}\n{"step": 4, "rew')  # a null value, then a line being written
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert main(["plot", str(tmp_path)]) == 0 and (tmp_path / "curves.png").stat().st_size > 10_000


def test_plot_names_a_corrupt_line_in_the_middle(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    one_error_line(capsys, 2, ["plot", str(tmp_path)], r"metrics.jsonl, line 2: not a JSON object")


# ----------------------------------------------------------------------------- config files and paths
def cli_config(tmp_path, **keys) -> str:
    path = tmp_path / "c.yaml"
    base = {"output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": 8, "num_generations": 4,
            "max_completion_length": 4, "learning_rate": 1e-3, "reward_funcs": ["accuracy"]}  # fmt: skip
    path.write_text(yaml.safe_dump({**base, **keys}))
    return str(path)


def one_error_line(capsys, code: int, argv: list[str], match: str) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(match, errors[0]), err
    return errors[0]


@pytest.mark.parametrize("text,lines", [("max_steps: 2\nseed: 1\nmax_steps: 5\n", (1, 3)),
                                        ("seed: 1\n\nseed: 2\n", (1, 3))])  # fmt: skip
def test_yaml_key_given_twice_is_refused_with_both_lines(tmp_path, text, lines):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"key '\w+' is given twice .*lines {lines[0]} and {lines[1]}"):
        load_train_config(str(path), [])


def test_cli_duplicate_key_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(f"learning_rate: 1.0e-3\noutput_dir: {tmp_path / 'run'}\nlearning_rate: 1.0e-2\nmax_steps: 0\n")
    one_error_line(capsys, 2, ["train", "--config", str(path)], r"'learning_rate' is given twice .*lines 1 and 3")


def test_tilde_and_variables_in_output_dir_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GRPO_RUNS", str(tmp_path / "runs"))
    assert GRPOConfig(output_dir="~/x").output_dir == str(tmp_path / "x")
    assert GRPOConfig(output_dir="$GRPO_RUNS/y").output_dir == str(tmp_path / "runs" / "y")
    assert GRPOConfig(logging_dir="${GRPO_RUNS}/tb").logging_dir == str(tmp_path / "runs" / "tb")


def test_unset_variable_in_a_path_is_refused(monkeypatch):
    monkeypatch.delenv("GRPO_NO_SUCH_VAR", raising=False)
    with pytest.raises(ValueError, match=r"output_dir .*\$GRPO_NO_SUCH_VAR.* is not set"):
        GRPOConfig(output_dir="$GRPO_NO_SUCH_VAR/x")


def test_tilde_in_a_data_file_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+2=", "answer": "3"}\n')
    assert load_data_file("~/d.jsonl")["prompt"] == ["1+2="]


def test_cli_train_expands_tilde_in_output_dir_and_data_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text("".join(f'{{"prompt": "{a}+{a}=", "answer": "{2 * a}"}}\n' for a in range(1, 5)))
    path = cli_config(tmp_path, output_dir="~/run", dataset="~/d.jsonl", eval_dataset="$HOME/d.jsonl")
    assert main(["train", "--config", path]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "run_arguments.yaml").read_text())
    assert saved["dataset"] == saved["eval_dataset"] == str(tmp_path / "d.jsonl")
    assert (tmp_path / "run" / "checkpoint-1").is_dir() and not (tmp_path / "~").exists()


def _bad_data(tmp_path, kind: str) -> Path:
    names = {"missing": "d.jsonl", "empty": "d.jsonl", "not_json": "d.json", "not_parquet": "d.parquet",
             "no_prompt_jsonl": "d.jsonl", "no_prompt_csv": "d.csv"}  # fmt: skip
    path = tmp_path / names[kind]
    content = {"empty": "", "not_json": "this is { not json\n", "not_parquet": "PAR? no\n",
               "no_prompt_jsonl": '{"query": "1+2=", "answer": "3"}\n',
               "no_prompt_csv": "query,answer\n1+2=,3\n"}  # fmt: skip
    if kind in content:
        path.write_text(content[kind])
    return path


@pytest.mark.parametrize("kind", ["missing", "empty", "not_json", "not_parquet", "no_prompt_jsonl", "no_prompt_csv"])
def test_cli_bad_data_file_is_one_line_naming_it_exit_2(tmp_path, capsys, kind):
    path = _bad_data(tmp_path, kind)
    one_error_line(capsys, 2, ["train", "--config", cli_config(tmp_path, dataset=str(path))], re.escape(str(path)))


@pytest.mark.parametrize("key", ["num_train_epochs", "save_total_limit", "per_device_eval_batch_size", "optim"])
def test_trl_key_we_lack_is_refused_as_such_not_matched_to_another_key(tmp_path, key):
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: 3\n")
    with pytest.raises(ConfigError) as info:
        load_train_config(str(path), [])
    assert f"{key!r} is a TRL option grpo_fast does not have" in str(info.value)
    assert "did you mean" not in str(info.value)


def test_trl_key_on_the_command_line_is_refused_as_such():
    with pytest.raises(ConfigError, match="'num_train_epochs' is a TRL option grpo_fast does not have"):
        load_train_config(None, ["--num_train_epochs", "3"])


def test_a_typo_still_gets_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        GRPOConfig.from_dict({"learning_rat": 1e-3})
