"""The trainer's output directory: ownership (a lock), checkpoints, resuming, saving on Ctrl-C."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from torch import nn

from . import configio
from .batch import TrainerState
from .checkpoint import checkpoint_dirs, latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import is_fsdp
from .schedule import lr_lambda
from .update import NonFiniteError, first_nonfinite

LOCK_FILE = ".lock"  # in output_dir while a run writes there


FIXED_ON_RESUME = ("seed", "num_generations", "num_iterations")  # the rest may change on resume (and is applied)


class OutputDirInUseError(RuntimeError):
    """output_dir's lock is held by another run."""


STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # preemption (Slurm, Kubernetes, spot instances); Slurm's --signal


class StopSignal(KeyboardInterrupt):
    """A stop signal (``STOP_SIGNALS``) during ``train``: handled as Ctrl-C; the CLI exits with 128 + signum."""

    def __init__(self, signum: int):
        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")


@contextlib.contextmanager
def stop_signals(raise_at_once: bool = True):
    """Within the block, catch the first stop signal (a repeat, e.g. while the checkpoint is saved, is
    ignored) and yield the list that records it. ``raise_at_once``: StopSignal is raised in the main thread
    right away (one process, as Ctrl-C); else it is only recorded, for the trainer to act on at the next
    step boundary together with the other ranks. The previous handlers are restored after. Outside the
    main thread (where Python cannot install handlers) nothing is installed."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if not received:
            received.append(signum)
            if raise_at_once:
                raise StopSignal(signum)

    signums = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield received
    finally:
        for s, old in previous.items():
            signal.signal(s, signal.SIG_DFL if old is None else old)


def _read_trainer_state(path: Path) -> TrainerState:
    """The checkpoint's trainer_state.json as a TrainerState; ValueError naming the file if it is not one."""
    from .checkpoint import STATE_FILE

    file = Path(path) / STATE_FILE
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} is missing: {path} is not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: not readable JSON ({error})") from error
    names = [f.name for f in dataclasses.fields(TrainerState)]
    if not isinstance(data, dict) or sorted(data) != sorted(names):
        raise ValueError(f"{file}: expected an object with the keys {names}, got {data!r:.200}")
    bad = {k: v for k, v in data.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
    if bad:
        raise ValueError(f"{file}: {', '.join(bad)} must be ints >= 0, got {bad}")
    return TrainerState(**data)


def _fsdp_full_state(model: nn.Module, optimizer: torch.optim.Optimizer):
    """(model, optimizer) stand-ins whose save_pretrained / state_dict give the full, unsharded state of an
    FSDP2-sharded model (gathered here, on every rank, to CPU)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)

    class FullModel:
        def save_pretrained(self, path):
            model.save_pretrained(path, state_dict=model_state)

    class FullOptimizer:
        def state_dict(self):
            return optimizer_state

    return FullModel(), FullOptimizer()


def _fsdp_load(path: Path, model, optimizer, scheduler, ref_model) -> dict:
    """load_checkpoint for an FSDP2-sharded model: every rank reads the full state and keeps its shards."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from .checkpoint import STATE_FILE, check_files, set_rng_state

    adapters = hasattr(model, "peft_config") and (path / "adapter_model.safetensors").exists()
    weights = "adapter_model.safetensors" if adapters else "model.safetensors"
    reference = ["ref_model.safetensors"] if ref_model is not None else []
    check_files(path, [weights, "optimizer.pt", "scheduler.pt", "rng.pt", STATE_FILE, *reference])
    options = StateDictOptions(full_state_dict=True, strict=False)
    if adapters:
        # the file's names lack the adapter name that the model's parameter names carry
        saved = load_file(str(path / "adapter_model.safetensors"))
        adapter = f".{model.active_adapter}"
        names = {k.replace(adapter, ""): k for k in get_model_state_dict(model) if "lora_" in k}
        if set(saved) != set(names):
            raise ValueError(f"{path}: adapters do not match the model ({sorted(set(saved) ^ set(names))})")
        set_model_state_dict(model, {names[k]: v for k, v in saved.items()}, options=options)
    else:
        set_model_state_dict(model, load_file(str(path / "model.safetensors")), options=options)
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if ref_model is not None:
        from safetensors.torch import load_model

        load_model(ref_model, str(path / "ref_model.safetensors"), device=str(next(ref_model.parameters()).device))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / STATE_FILE).read_text())


class RunDirectory:
    """GRPOTrainer's output directory: its ownership (a lock), checkpoints, resuming, saving on Ctrl-C."""

    def save_checkpoint(self) -> Path:
        """Atomically write output_dir/checkpoint-<step> (model, tokenizer, optimizer, scheduler, RNG, state).

        With peft the model part is the adapters (adapter_model.safetensors + adapter_config.json, loadable
        with ``PeftModel.from_pretrained`` on the base model). Rank 0 writes; every rank waits for it.
        """
        bad = first_nonfinite(self.model)
        if self.dist.sum_int(int(bad is not None)):  # never a checkpoint with NaN/inf weights
            raise NonFiniteError(
                f"refusing to save checkpoint-{self.state.step}: {bad or 'a parameter on another rank'} holds NaN/inf; "
                f"the checkpoints already in {self.run_dir} are untouched"
            )
        model, optimizer = self.model, self.optimizer
        if is_fsdp(self._policy):  # gather full (unsharded) state dicts: collective, on every rank
            model, optimizer = _fsdp_full_state(self.model, self.optimizer)
        path = self.run_dir / f"checkpoint-{self.state.step}"
        if self.dist.is_main:
            path = save_checkpoint(
                self.run_dir,
                self.state.step,
                model,
                optimizer,
                self.scheduler,
                dataclasses.asdict(self.state),
                self.tokenizer,
                {**self.run_files, "grpo_config.yaml": self.config.to_yaml()},
                self.ref_model,
            )
        self.dist.barrier()
        self._saved_step = self.state.step
        return path

    @contextlib.contextmanager
    def _own_output_dir(self, resuming: bool):
        """Hold output_dir's lock file for the run (rank 0); a fresh run there must not mix with another run's
        checkpoints: refused, or (overwrite_output_dir) those are deleted first."""
        if not self.dist.is_main:
            yield
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.run_dir / LOCK_FILE, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise OutputDirInUseError(
                f"output_dir {self.run_dir} is in use by another run (it holds {self.run_dir / LOCK_FILE}); wait for "
                "that run to end or choose another output_dir"
            ) from None
        try:
            if not resuming and self.state.step == 0:  # (a trainer that already trained continues its own run)
                self._claim_output_dir()
            yield
        finally:
            lock.release()

    def _claim_output_dir(self) -> None:
        old = checkpoint_dirs(self.run_dir)
        if old and not self.config.overwrite_output_dir:
            raise ValueError(
                f"output_dir {self.run_dir} holds another run's checkpoints ({', '.join(p.name for p in old)}); "
                "resume it (--resume, or train(resume_from_checkpoint=True)), set overwrite_output_dir: true to "
                "delete them and start over, or choose another output_dir"
            )
        for path in old:
            shutil.rmtree(path)
        if old:
            print(f"overwrite_output_dir: deleted {len(old)} checkpoint(s) of an earlier run in {self.run_dir}",
                  file=sys.stderr)  # fmt: skip

    def _save_on_interrupt(self, why: str = "interrupted") -> None:
        """After Ctrl-C (or a stop signal, ``why`` its name): save the last finished step (unless saved
        already); one process only (with several, a save is collective and the ranks may be anywhere)."""
        if self.dist.enabled or not self.dist.is_main:
            return
        if self._step_start is not None:  # interrupted mid-step
            if self._weights_changed:
                last = "none" if self._saved_step is None else f"checkpoint-{self._saved_step}"
                print(f"{why} during the update of step {self._step_start.step + 1}: the weights are between "
                      f"two steps, so no checkpoint was saved (the last one: {last})", file=sys.stderr)  # fmt: skip
                return
            self.state, self._step_start = self._step_start, None  # (sampling had moved the data cursor)
        if self.state.step > 0 and self.state.step != self._saved_step:
            path = self.save_checkpoint()
            print(f"{why}: saved {path} (step {self.state.step}); continue with --resume", file=sys.stderr)

    def _stop_if_signalled(self, received: list[int]) -> None:
        """Several processes: a stop signal that any rank received (``received``: this rank's) is acted on
        here, at a step boundary, by every rank together: save the step (a collective), then raise
        StopSignal on every rank."""
        if not self.dist.enabled:
            return  # one process: the handler raised at once
        signum = self.dist.max_int(received[0] if received else 0)
        if not signum:
            return
        stop = StopSignal(signum)
        if self.state.step != self._saved_step:
            path = self.save_checkpoint()
            if self.dist.is_main:
                print(f"{stop.name}: saved {path} (step {self.state.step}); continue with --resume", file=sys.stderr)
        raise stop

    def _resume(self, resume_from_checkpoint) -> None:
        if not resume_from_checkpoint:
            return
        path = latest_checkpoint(self.run_dir) if resume_from_checkpoint is True else Path(resume_from_checkpoint)
        if path is None:
            if self.dist.is_main:
                print(f"no checkpoint in {self.run_dir}; starting from step 0", file=sys.stderr)
            return
        state = _read_trainer_state(path)  # checked before anything is loaded
        if state.step > self.config.max_steps:
            raise ValueError(f"cannot resume {path}: it is at step {state.step}, past max_steps = "
                             f"{self.config.max_steps}; set max_steps >= {state.step}")  # fmt: skip
        changed = self._compare_saved_config(path)
        if is_fsdp(self._policy):
            _fsdp_load(path, self.model, self.optimizer, self.scheduler, self.ref_model)
        else:
            load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.ref_model)
        self._apply_optimizer_settings()
        self.state, self._saved_step = state, state.step
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.state.step}", file=sys.stderr)
            if changed:
                print(f"settings changed since {path.name}, applied: {changed}", file=sys.stderr)

    def _compare_saved_config(self, path: Path) -> str:
        """The settings that differ from the checkpoint's grpo_config.yaml, as "name old -> new, ...".

        Raises:
            ValueError naming the settings fixed for a whole run (``FIXED_ON_RESUME``) that differ.
        """
        file = path / "grpo_config.yaml"
        if not file.is_file():
            return ""  # saved without a config (save_checkpoint called directly): nothing to compare
        saved, now = configio.read_yaml(file), self.config.to_dict()
        diff = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k] and k != "output_dir"}
        fixed = [f"{k} ({a!r} -> {b!r})" for k, (a, b) in diff.items() if k in FIXED_ON_RESUME]
        if fixed:
            raise ValueError(
                f"cannot resume {path} with a different {', '.join(fixed)}: fixed for the whole run; keep the "
                "checkpoint's value, or start a new run in another output_dir"
            )
        return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())

    def _apply_optimizer_settings(self) -> None:
        """The config's AdamW settings and LR schedule (a checkpoint restores the saved ones), at the restored
        optimizer step: a resume with a new learning_rate or max_steps uses them."""
        cfg = self.config
        for group in self.optimizer.param_groups:
            group.update(initial_lr=cfg.learning_rate, weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon,
                         betas=(cfg.adam_beta1, cfg.adam_beta2))  # fmt: skip
        # LambdaLR(last_epoch=n - 1) takes one step to n: the restored optimizer step, with the new schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg), last_epoch=self.scheduler.last_epoch - 1
        )
