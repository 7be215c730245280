"""Training checkpoints: the model as ``save_pretrained`` (safetensors) plus everything needed to
continue bit-exactly (optimizer, LR scheduler, RNG states, trainer counters).

Layout of ``RUN_DIR/checkpoint-<step>/``::

    config.json, model.safetensors, generation_config.json   save_pretrained: loads with from_pretrained
    tokenizer.json, tokenizer_config.json                    when a tokenizer is given
    optimizer.pt, scheduler.pt, rng.pt                       torch.save of tensors/dicts only
    ref_model.safetensors                                    the KL reference model, when there is one
    trainer_state.json                                       step, data cursor, seed, ...

Writes are atomic: everything goes to a hidden temporary directory that is renamed into place with
``os.replace`` only when complete, so a crash mid-save leaves the previous checkpoints untouched and
never a half-written ``checkpoint-<step>``. Loading uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_model
from torch import nn

_NAME = re.compile(r"^checkpoint-(\d+)$")
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
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=run_dir))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        if ref_model is not None:
            save_model(ref_model, str(tmp / "ref_model.safetensors"))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first and deleted after."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
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
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``run_dir``, or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = [
        (int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).exists()
    ]
    return max(found)[1] if found else None


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, scheduler=None, ref_model=None) -> dict:
    """Restore weights (and optimizer, scheduler, reference model when given; RNG states) from ``path``.

    Returns:
        the trainer_state dict saved with the checkpoint.
    """
    path = Path(path)
    load_weights(model, path)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if ref_model is not None:
        load_model(ref_model, str(path / "ref_model.safetensors"), device=str(next(ref_model.parameters()).device))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / STATE_FILE).read_text())


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Copy ``path/model.safetensors`` into ``model`` in place (tied weights are stored once)."""
    state = load_file(str(Path(path) / "model.safetensors"), device=str(next(model.parameters()).device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    every_name = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    unique_names = {n for n, _ in model.named_parameters()}
    untied_missing = [n for n in missing if n in unique_names or n not in every_name]
    if untied_missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the model (missing {untied_missing}, unexpected {unexpected})"
        )


def rng_state() -> dict:
    """Every global RNG state the trainer touches (Python's is re-seeded per step, so not stored)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
