"""Training checkpoints: the model as ``save_pretrained`` (safetensors) plus everything needed to
continue bit-exactly (optimizer, LR scheduler, RNG states, trainer counters).

Layout of ``RUN_DIR/checkpoint-<step>/``::

    config.json, model.safetensors, generation_config.json   save_pretrained: loads with from_pretrained
    adapter_config.json, adapter_model.safetensors           instead, for a peft model: the adapters only
    tokenizer.json, tokenizer_config.json                    when a tokenizer is given
    optimizer.pt, scheduler.pt, rng.pt                       torch.save of tensors/dicts only
    ref_model.safetensors                                    the KL reference model, when there is one
    trainer_state.json                                       step, data cursor, seed, ...

Writes are atomic: everything goes to a hidden temporary directory that is renamed into place with
``os.replace`` only when complete, so a crash mid-save leaves the previous checkpoints untouched and
never a half-written ``checkpoint-<step>`` (tests/test_faults.py kills a saving process with SIGKILL).
Re-saving an existing step moves the old directory aside first; if the process dies between the two
renames, ``latest_checkpoint`` puts it back (and deletes what dead processes left half-written).
A failed write (disk full, permission denied, read-only file system; safetensors' own ``SafetensorError``
included) is an OSError with the original errno that names the checkpoint, the file and the cause ("disk
full"); the temporary directory is removed.

Loading never runs code from a file: weights are safetensors, the rest ``torch.load(weights_only=True)``
(tensors and plain containers only); anything else in a ``.pt`` file is refused with a ValueError.
Every file is checked for presence and read before anything is loaded into the model, and every error
(missing, unreadable, truncated, another model's) names its file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from . import writes

_NAME = re.compile(r"^checkpoint-(\d+)$")
_MOVED_ASIDE = re.compile(r"^\.(checkpoint-\d+)\.old-(\d+)$")  # by _replace_dir of process <pid>
_TEMPORARY = re.compile(r"^\.checkpoint-\d+\.tmp-(\d+)-")  # being written by process <pid>
STATE_FILE = "trainer_state.json"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict,
    tokenizer=None,
    extra_files: dict[str, str] | None = None,
    ref_model: nn.Module | None = None,
) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically and return its path.

    Args:
        trainer_state: JSON-serialisable counters (step, data cursor, ...).
        extra_files: {file name: text} written alongside (e.g. the run's config.yaml).
        ref_model: the frozen reference model (saved because ref-model syncs change it during training).
    """
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.tmp-{os.getpid()}-", dir=run_dir))
    except OSError as error:
        raise _save_error(error, final) from error
    try:
        with _safetensors_write(tmp / _weights_name(model)):
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        _torch_save(rng_state(), tmp / "rng.pt")
        if ref_model is not None:
            with _safetensors_write(tmp / "ref_model.safetensors"):
                save_model(ref_model, str(tmp / "ref_model.safetensors"))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            raise _save_error(error, final) from error
        raise
    return final


def _save_error(error: OSError, final: Path) -> OSError:
    """The OSError of a failed save: same errno, a message naming the checkpoint, the file, the cause and a
    remedy."""
    remedy = writes.hint(error, final.parent, "output_dir")
    message = (
        f"could not save checkpoint {final}: {writes.detail(error)}; the checkpoints already in {final.parent} are "
        "untouched" + (f"; {remedy}" if remedy else "")
    )
    return OSError(error.errno, message) if error.errno is not None else OSError(message)


@contextlib.contextmanager
def _safetensors_write(file: Path):
    """A SafetensorError of a failed write (it names no file) as the OSError it wraps, naming ``file``."""
    try:
        yield
    except SafetensorError as error:
        wrapped = writes.as_os_error(error)
        raise OSError(wrapped.errno, wrapped.strerror, str(file)) from error


def _torch_save(obj, file: Path) -> None:
    """``torch.save``; its file writer's RuntimeError (no errno) as an OSError naming ``file``: ENOSPC when
    the file system has no free block left, else EIO."""
    try:
        torch.save(obj, file)
    except RuntimeError as error:
        full = hasattr(os, "statvfs") and os.statvfs(file.parent).f_bavail == 0
        raise OSError(errno.ENOSPC if full else errno.EIO, str(error), str(file)) from error


def _weights_name(model) -> str:
    return "adapter_model.safetensors" if hasattr(model, "peft_config") else "model.safetensors"


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first and deleted after."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)  # put the previous checkpoint back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    _fsync_dir(dst.parent)


def _fsync_dir(path: Path) -> None:
    """Flush a directory's files and entry list to disk (POSIX; a no-op where directories can't be opened)."""
    for f in path.iterdir() if path.is_dir() else ():
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(path)


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entry list (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``run_dir``, or None (after recovering what a
    killed save left, see ``recover_interrupted_saves``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    recover_interrupted_saves(run_dir)
    found = [
        (int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).exists()
    ]
    return max(found)[1] if found else None


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-<step>`` directory in ``run_dir`` (complete or not), by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def recover_interrupted_saves(run_dir: str | Path) -> None:
    """Undo what a process killed mid-save left in ``run_dir``; directories of live processes are kept.

    ``.checkpoint-N.old-<pid>`` is a complete checkpoint-N moved aside for a re-save of step N: it goes
    back to ``checkpoint-N`` if that is missing, else (the new one was renamed in) it is deleted.
    ``.checkpoint-N.tmp-<pid>-*`` is a half-written checkpoint: deleted.
    """
    for path in Path(run_dir).iterdir():
        if (m := _MOVED_ASIDE.match(path.name)) and not process_alive(int(m.group(2))):
            final = path.with_name(m.group(1))
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.replace(path, final)
        elif (m := _TEMPORARY.match(path.name)) and not process_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (a reused id errs on the safe side: alive)."""
    if pid == os.getpid() or os.name != "posix":  # os.kill(pid, 0) is no probe on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, scheduler=None, ref_model=None) -> dict:
    """Restore weights (and optimizer, scheduler, reference model when given; RNG states) from ``path``.

    Every file is checked for presence and read before anything is loaded into the model, optimizer or
    scheduler; every error names its file.

    Returns:
        the trainer_state dict saved with the checkpoint.
    """
    path = Path(path)
    wanted = {"optimizer.pt": optimizer, "scheduler.pt": scheduler, "ref_model.safetensors": ref_model}
    check_files(path, [_weights_file(model, path), "rng.pt", STATE_FILE, *(f for f, x in wanted.items() if x)])
    state = _read_json(path / STATE_FILE)
    names = [name for name in ("optimizer.pt", "scheduler.pt") if wanted[name] is not None] + ["rng.pt"]
    saved = {name: load_tensors(path / name) for name in names}  # every file read before the model is touched
    load_weights(model, path)
    for name, target in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler)):
        if target is not None:
            try:
                target.load_state_dict(saved[name])
            except (ValueError, KeyError, RuntimeError) as error:
                raise ValueError(f"{path / name}: does not match this run's {name[:-3]} ({error})") from error
    if ref_model is not None:
        file = path / "ref_model.safetensors"
        with _named_safetensors_errors(file):
            load_model(ref_model, str(file), device=str(next(ref_model.parameters()).device))
    set_rng_state(saved["rng.pt"])
    return state


def check_files(path: Path, names: list[str]) -> None:
    """Each ``path/name`` exists and can be opened for reading: FileNotFoundError / OSError naming it."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is not a directory")
    for name in names:
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: {path} is not a complete checkpoint")
        try:
            with open(file, "rb"):
                pass
        except OSError as error:
            raise OSError(error.errno, f"{file}: cannot be read ({error.strerror})") from error


def _weights_file(model: nn.Module, path: Path) -> str:
    """The file ``load_weights`` reads: the adapters of a peft model when saved, else model.safetensors."""
    if hasattr(model, "peft_config") and (path / "adapter_model.safetensors").exists():
        return "adapter_model.safetensors"
    return "model.safetensors"


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: not readable JSON ({error})") from error


def load_tensors(file: str | Path):
    """``torch.load(file, weights_only=True)``: tensors and plain containers only, never code.

    Raises:
        ValueError naming the file when it holds any other object (the unpickler refuses it before
        anything in it runs).
    """
    try:
        return torch.load(file, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as error:
        detail = next((ln.strip() for ln in str(error).splitlines() if "WeightsUnpickler" in ln), "")
        raise ValueError(
            f"{file}: refused to load: it holds Python objects other than tensors and plain containers, which "
            f"could run code when unpickled (grpo_fast loads with torch.load(weights_only=True) and never writes "
            f"such objects; was the file replaced?). {detail}"
        ) from error
    except (RuntimeError, OSError, EOFError) as error:  # a truncated zip archive, a torn write
        raise ValueError(f"{file}: not a readable torch file (truncated or corrupt?): {error}") from error


@contextlib.contextmanager
def _named_safetensors_errors(file: Path):
    """Re-raise a corrupt or truncated safetensors file as a ValueError naming it."""
    try:
        yield
    except SafetensorError as error:
        raise ValueError(f"{file}: not a readable safetensors file (corrupt or truncated?): {error}") from error


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Copy ``path/model.safetensors`` into ``model`` in place (tied weights are stored once); for a peft
    model, ``path/adapter_model.safetensors`` into its adapters (the base weights are the caller's)."""
    if hasattr(model, "peft_config") and (Path(path) / "adapter_model.safetensors").exists():
        _load_adapters(model, Path(path) / "adapter_model.safetensors")
        return
    file = Path(path) / "model.safetensors"
    with _named_safetensors_errors(file):
        state = load_file(str(file), device=str(next(model.parameters()).device))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes differ: another model
        raise ValueError(f"{file}: checkpoint does not match the model (another model?): {error}") from error
    every_name = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    unique_names = {n for n, _ in model.named_parameters()}
    untied_missing = [n for n in missing if n in unique_names or n not in every_name]
    if untied_missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the model (missing {untied_missing}, unexpected {unexpected})"
        )


def _load_adapters(model: nn.Module, file: Path) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    with _named_safetensors_errors(file):
        state = load_file(str(file), device=str(next(model.parameters()).device))
    expected = set(get_peft_model_state_dict(model))
    if set(state) != expected:
        raise ValueError(
            f"{file}: adapters do not match the model (missing {sorted(expected - set(state))}, "
            f"unexpected {sorted(set(state) - expected)})"
        )
    set_peft_model_state_dict(model, state)


def rng_state() -> dict:
    """Every global RNG state the trainer touches (Python's is re-seeded per step, so not stored)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU visible when saved; a resume may see fewer (the rest are dropped) or more
        # (those keep their own seeds)
        for i, gpu_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, i)
