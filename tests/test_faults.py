"""Trainer faults and safe loading: reward functions that raise, hang, or return NaN/None; a process
killed with SIGKILL in the middle of a checkpoint write; a full disk and a read-only directory on save;
files that would run code when loaded (a pickle planted as optimizer state, a YAML python tag).

Run: pytest tests/test_faults.py   (~10 s on 2 CPU cores)
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import errno
import io
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from grpo_fast.r1 import toy
from grpo_fast.trainer import GRPOConfig, GRPOTrainer, checkpoint
from grpo_fast.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from grpo_fast.trainer.configio import ConfigError
from grpo_fast.trainer.rewards import RewardFunctionError, RewardTimeoutError, call_reward_function, score_completions

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, 1 thread


@pytest.fixture
def release():
    """An event the hanging reward functions wait on; set at teardown so their threads end."""
    event = threading.Event()
    yield event
    event.set()


def tiny(seed: int = 0):
    tok = toy.build_tokenizer()
    return tok, toy.build_model(tok, seed=seed, hidden_size=32, layers=1, heads=2, ffn=64)


# ----------------------------------------------------------------------------- reward functions
def digit_share(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def hanging_reward(release):
    def hanging_reward(prompts, completions, **kwargs):
        release.wait(60)  # hangs until the test ends
        return [0.0] * len(completions)

    return hanging_reward


def raising_reward(prompts, completions, **kwargs):
    return [1.0 / (len(c) - len(c)) for c in completions]  # ZeroDivisionError on every sample


def nan_reward(prompts, completions, **kwargs):
    return [float("nan") if i == 1 else 0.5 for i in range(len(completions))]


def test_hanging_reward_function_times_out_with_its_name(release):
    start = time.monotonic()
    with pytest.raises(RewardTimeoutError, match=r"'hanging_reward' did not return within the 0.2 s per-call timeout"):
        call_reward_function(hanging_reward(release), ["p"] * 3, ["c"] * 3, {}, timeout=0.2)
    assert time.monotonic() - start < 5  # the deadline, not the 60 s hang
    assert call_reward_function(digit_share, ["p"], ["a1"], {}, timeout=5.0) == [0.5]  # a quick one passes


def test_reward_error_in_the_worker_thread_is_chained_and_localised():
    def picky(prompts, completions, **kwargs):
        return [1.0 / (len(c) - 3) for c in completions]

    with pytest.raises(RewardFunctionError, match=r"'picky' raised ZeroDivisionError.*on sample 1") as info:
        call_reward_function(picky, ["p0", "p1"], ["long one", "abc"], {}, timeout=5.0)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_locating_the_failing_sample_stays_within_the_timeout(release):
    def fails_on_batches_hangs_on_one(prompts, completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("batch failed")
        release.wait(60)
        return [0.0]

    start = time.monotonic()
    with pytest.raises(RewardFunctionError, match="raised RuntimeError: batch failed$"):  # no sample: not found
        call_reward_function(fails_on_batches_hangs_on_one, ["p"] * 4, ["c"] * 4, {}, timeout=0.3)
    assert time.monotonic() - start < 5


def test_nan_reward_is_an_error_naming_the_sample():
    with pytest.raises(RewardFunctionError, match=r"'nan_reward' returned nan for sample 1 .*completion='c1'"):
        call_reward_function(nan_reward, ["p0", "p1"], ["c0", "c1"], {})


def test_none_for_every_sample_warns_once_with_the_name():
    def never_applies(prompts, completions, **kwargs):
        return [None] * len(completions)

    with pytest.warns(RuntimeWarning, match="'never_applies' returned None for every completion"):
        per_function, total = score_completions([never_applies, digit_share], [1.0, 1.0], ["p"] * 2, ["1", "x"], {})
    assert per_function[:, 0].isnan().all() and total.tolist() == [1.0, 0.0]


def test_skip_logs_each_faulty_function_and_keeps_the_others(release, caplog):
    funcs = [digit_share, hanging_reward(release), raising_reward, nan_reward]
    with caplog.at_level(logging.WARNING, logger="grpo_fast.trainer.rewards"):
        per_function, total = score_completions(funcs, [1.0] * 4, ["p"] * 2, ["12", "ab"], {}, 0.3, "skip")
    assert per_function[:, 0].tolist() == [1.0, 0.0] and per_function[:, 1:].isnan().all()
    assert total.tolist() == [1.0, 0.0]  # the skipped functions are left out of the sum, as None is
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "grpo_fast.trainer.rewards")
    for expected in ("'hanging_reward' did not return", "'raising_reward' raised ZeroDivisionError",
                     "'nan_reward' returned nan for sample 1"):  # fmt: skip
        assert re.search(f"{expected}.*-> skipped: its rewards for this batch are None", logged), expected
    with pytest.raises(RewardFunctionError, match="'raising_reward'"):
        score_completions(funcs[2:3], [1.0], ["p"], ["c"], {}, None, "raise")


@pytest.mark.parametrize(
    "kwargs,match",
    [({"timeout": 0}, "timeout must be None or a finite number"), ({"timeout": math.inf}, "timeout"),
     ({"timeout": True}, "timeout"), ({"on_error": "ignore"}, r"on_error must be one of \('raise', 'skip'\)")],
)  # fmt: skip
def test_bad_reward_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        score_completions([digit_share], [1.0], ["p"], ["c"], {}, **kwargs)


def test_grpo_config_reward_fault_options(tmp_path):
    with pytest.raises(ValueError, match="reward_timeout must be None or > 0"):
        GRPOConfig(reward_timeout=0.0)
    with pytest.raises(ValueError, match=r"on_reward_error must be one of \('raise', 'skip'\)"):
        GRPOConfig(on_reward_error="warn")
    cfg = GRPOConfig.from_dict({"reward_timeout": "2.5", "on_reward_error": "skip"})  # command-line strings
    assert (cfg.reward_timeout, cfg.on_reward_error) == (2.5, "skip")
    cfg.to_yaml(tmp_path / "c.yaml")
    assert GRPOConfig.from_yaml(tmp_path / "c.yaml") == cfg


@pytest.fixture(scope="module")
def train_rows():
    return toy.make_splits(num_train=32, num_dev=4, num_test=4)["train"]


def _trainer(tmp_path, reward_funcs, train_rows, **changes):
    tok, model = tiny()
    cfg = GRPOConfig(output_dir=str(tmp_path), seed=3, max_steps=2, learning_rate=1e-2, per_device_train_batch_size=8,
                     num_generations=4, max_completion_length=8, **changes)  # fmt: skip
    return GRPOTrainer(model, reward_funcs, cfg, train_rows, tokenizer=tok)


def test_trainer_skips_faulty_reward_functions_and_keeps_training(tmp_path, train_rows, release, caplog):
    funcs = [digit_share, hanging_reward(release), raising_reward, nan_reward]
    trainer = _trainer(tmp_path, funcs, train_rows, reward_timeout=0.3, on_reward_error="skip")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="grpo_fast.trainer.rewards"):
        metrics = trainer.train()
    assert trainer.state.step == 2 and (tmp_path / "checkpoint-2").is_dir()
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())  # it learned
    assert math.isfinite(metrics["rewards/digit_share/mean"]) and math.isfinite(metrics["loss"])
    for name in ("hanging_reward", "raising_reward", "nan_reward"):
        assert math.isnan(metrics[f"rewards/{name}/mean"])  # visible in the metrics, not a made-up 0
        hits = [r for r in caplog.records if f"'{name}'" in r.getMessage() and "skipped" in r.getMessage()]
        assert len(hits) == 2, f"{name}: one logged skip per step, got {len(hits)}"


def test_trainer_stops_on_a_hanging_reward_function_by_default(tmp_path, train_rows, release):
    trainer = _trainer(tmp_path, [digit_share, hanging_reward(release)], train_rows, reward_timeout=0.3)
    start = time.monotonic()
    with pytest.raises(RewardTimeoutError, match="'hanging_reward' did not return within the 0.3 s"):
        trainer.train()
    assert time.monotonic() - start < 30 and trainer.state.step == 0


# ----------------------------------------------------------------------------- checkpoints under faults
def _saved_checkpoint(run_dir: Path):
    """A model, optimizer and scheduler after one update, saved as run_dir/checkpoint-1; returns
    (tokenizer, model, optimizer, scheduler, what was saved)."""
    tok, model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    scheduler.step()
    save_checkpoint(run_dir, 1, model, optimizer, scheduler, {"step": 1}, tok)
    saved = {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
    }
    return tok, model, optimizer, scheduler, saved


def _assert_checkpoint_1_equals(run_dir: Path, saved: dict) -> None:
    """latest_checkpoint(run_dir) is checkpoint-1 and loads, into a differently initialised model, to
    exactly what was saved."""
    path = latest_checkpoint(run_dir)
    assert path == run_dir / "checkpoint-1", path
    _, model = tiny(seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
    assert load_checkpoint(path, model, optimizer, scheduler) == {"step": 1}
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved["params"][k]), k
    state = optimizer.state_dict()
    assert state["param_groups"] == saved["optimizer"]["param_groups"]
    for i, s in saved["optimizer"]["state"].items():
        assert all(torch.equal(state["state"][i][k], v) for k, v in s.items()), i
    assert scheduler.state_dict() == saved["scheduler"]


def _child_save(run_dir: Path, marker: Path, mode: str) -> None:
    """Body of the killed child: save a different model (seed 7) into ``run_dir`` and block at a chosen
    point of the save (deterministic: no race with the kill), having written ``marker``."""

    def block_here(where: str):
        marker.write_text(where)
        time.sleep(600)  # killed here

    tok, model = tiny(seed=7)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    if mode == "mid_file":  # a new step 2: dies with optimizer.pt half written (model.safetensors complete)
        real_save = torch.save

        def half_save(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            block_here(str(f))

        torch.save = half_save  # this process only: a fork of the test process
        step = 2
    else:  # "mid_rename": re-saving step 1, dies after the old checkpoint-1 was moved aside
        real_replace = os.replace

        def replace(src, dst):
            real_replace(src, dst)
            if ".old-" in Path(dst).name:
                block_here(str(dst))

        os.replace = replace
        step = 1
    save_checkpoint(run_dir, step, model, optimizer, scheduler, {"step": step}, tok)
    os._exit(3)  # the save completed: the parent should have killed this process first


def _run_child_and_kill(run_dir: Path, mode: str) -> tuple[int, str]:
    """Fork a child that saves into ``run_dir``, wait until it blocks mid-save, SIGKILL it.

    A fork of the test process (torch, transformers already imported) starts in milliseconds; a fresh
    interpreter would spend 10-30 s importing them. Returns (the child's pid, where it blocked).
    """
    marker = run_dir.parent / f"blocked-{mode}"
    child = multiprocessing.get_context("fork").Process(target=_child_save, args=(run_dir, marker, mode))
    child.start()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if not child.is_alive():
                pytest.fail(f"the child exited with {child.exitcode} before blocking mid-save")
            if time.monotonic() > deadline:
                pytest.fail("the child did not reach the blocking point within 120 s")
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.join(60)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == -signal.SIGKILL
    return child.pid, marker.read_text()


def test_kill_mid_file_write_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    saved = _saved_checkpoint(run_dir)[-1]
    pid, where = _run_child_and_kill(run_dir, "mid_file")
    partial = Path(where)
    assert partial.name == "optimizer.pt" and partial.parent.name.startswith(f".checkpoint-2.tmp-{pid}-")
    assert partial.exists() and (partial.parent / "model.safetensors").exists()  # killed mid-save
    assert not (run_dir / "checkpoint-2").exists()
    _assert_checkpoint_1_equals(run_dir, saved)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-1"]  # the dead child's temp dir is gone


def test_kill_between_the_renames_of_a_re_save_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    saved = _saved_checkpoint(run_dir)[-1]
    pid, where = _run_child_and_kill(run_dir, "mid_rename")
    assert Path(where).name == f".checkpoint-1.old-{pid}" and Path(where).is_dir()
    assert not (run_dir / "checkpoint-1").exists()  # the window: the old one moved aside, the new one not in
    _assert_checkpoint_1_equals(run_dir, saved)  # latest_checkpoint moved it back
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-1"]


def test_disk_full_on_save_is_reported_and_the_previous_checkpoint_kept(tmp_path, monkeypatch):
    tok, model, optimizer, scheduler, saved = _saved_checkpoint(tmp_path)

    def disk_full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"\0" * 64)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    for step in (2, 1):  # a new checkpoint, then over the existing one
        with pytest.raises(OSError) as info:
            save_checkpoint(tmp_path, step, model, optimizer, scheduler, {"step": step}, tok)
        message = str(info.value)
        assert info.value.errno == errno.ENOSPC
        assert f"could not save checkpoint {tmp_path / f'checkpoint-{step}'}: No space left on device: " in message
        assert "optimizer.pt" in message and "untouched" in message and "free disk space" in message
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    _assert_checkpoint_1_equals(tmp_path, saved)


def test_failed_final_rename_of_a_re_save_restores_the_old_checkpoint(tmp_path, monkeypatch):
    tok, model, optimizer, scheduler, saved = _saved_checkpoint(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "checkpoint-1" and ".tmp-" in Path(src).name:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError, match=r"could not save checkpoint .*checkpoint-1: Input/output error"):
        save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"step": 1}, tok)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    _assert_checkpoint_1_equals(tmp_path, saved)


@contextlib.contextmanager
def _cannot_write(directory: Path):
    """``directory`` read-only for this process. Root ignores file modes, so as root the effective uid
    drops to nobody (65534) for the block; without CAP_SETUID that is impossible and the test skips."""
    directory.chmod(0o555)
    dropped = False
    try:
        if os.geteuid() == 0:
            try:
                os.seteuid(65534)
            except PermissionError:
                pytest.skip("running as root without CAP_SETUID: no way to make a directory unwritable")
            dropped = True
        yield
    finally:
        if dropped:
            os.seteuid(0)
        directory.chmod(0o755)


def test_permission_denied_on_save_is_reported(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="grpo-fast-ro-"))  # under /tmp, traversable by the dropped uid
    try:
        base.chmod(0o755)
        run_dir = base / "run"
        tok, model, optimizer, scheduler, saved = _saved_checkpoint(run_dir)
        run_dir.chmod(0o755)
        with _cannot_write(run_dir), pytest.raises(PermissionError) as info:
            save_checkpoint(run_dir, 2, model, optimizer, scheduler, {"step": 2}, tok)
        message = str(info.value)
        assert info.value.errno == errno.EACCES
        assert f"could not save checkpoint {run_dir / 'checkpoint-2'}: Permission denied" in message
        assert f"make {run_dir} writable" in message
        assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-1"]
        _assert_checkpoint_1_equals(run_dir, saved)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ----------------------------------------------------------------------------- safe loading
class _Payload:
    """Unpickling this object calls open(marker, "w"): code run by merely loading a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_planted_pickle_is_refused_not_executed(tmp_path, name):
    tok, model, optimizer, scheduler, _ = _saved_checkpoint(tmp_path / "run")
    file = tmp_path / "run" / "checkpoint-1" / name
    marker = tmp_path / "payload-ran"
    torch.save({"state": {0: _Payload(marker)}, "param_groups": []}, file)
    with pytest.raises(ValueError, match=re.escape(f"{file}: refused to load") + ".*Unsupported global"):
        load_checkpoint(file.parent, model, optimizer, scheduler)
    assert not marker.exists()
    torch.load(file, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


def test_corrupt_safetensors_is_named(tmp_path):
    tok, model, optimizer, scheduler, _ = _saved_checkpoint(tmp_path)
    weights = tmp_path / "checkpoint-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=re.escape(f"{weights}: not a readable safetensors file")):
        load_checkpoint(tmp_path / "checkpoint-1", model, optimizer, scheduler)


def test_yaml_config_cannot_run_code(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "c.yaml"
    path.write_text(f'learning_rate: 1.0e-5\nseed: !!python/object/apply:builtins.open ["{marker}", "w"]\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not a plain YAML config") + ".*python/object/apply"):
        GRPOConfig.from_yaml(path)
    assert not marker.exists()
    yaml.unsafe_load(path.read_text())  # the payload is live: an unsafe loader runs it
    assert marker.exists()
    path.write_text("learning_rate: [1e-5\n")
    with pytest.raises(ConfigError, match="not a plain YAML config"):
        GRPOConfig.from_yaml(path)
