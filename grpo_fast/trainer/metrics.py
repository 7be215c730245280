"""The metrics log (one JSON line per step) and the console summary of a step."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import torch

from . import writes
from .checkpoint import fsync_dir, process_alive


class MetricsLog:
    """Appends one JSON object per logged step to ``path``; on resume, drops lines past the checkpoint.

    Strict JSON: a non-finite value (NaN, inf) is written as ``null``. Each line is flushed and fsynced
    before ``write`` returns (the trainer writes a step's line before publishing that step's checkpoint).
    The file is never rewritten in place: dropping lines on resume, or amending the last line, writes a new
    file, fsyncs it and renames it over the old one, so a crash or a full disk leaves the old history whole.
    A write that fails is an OSError naming the file and the cause (``grpo_fast.trainer.writes``).
    """

    def __init__(self, path: Path, keep_up_to_step: int = 0):
        self.path = Path(path)
        _remove_dead_temporaries(self.path)
        if self.path.exists():
            text = self.path.read_text()
            kept = [ln for ln, r in read_records(self.path, "dropped", text) if r.get("step", 0) <= keep_up_to_step]
            if "".join(ln + "\n" for ln in kept) != text:
                self._replace("".join(ln + "\n" for ln in kept))

    def write(self, metrics: dict) -> None:
        """Append ``metrics`` as one line, on disk (flushed and fsynced) when this returns."""
        line = _json(metrics) + "\n"
        with writes.reported(self.path), open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def amend_last(self, metrics: dict) -> None:
        """Add ``metrics`` to the last line (the step's evaluation, which runs after its checkpoint)."""
        lines = self.path.read_text().splitlines()
        lines[-1] = _json({**json.loads(lines[-1]), **metrics})
        self._replace("".join(ln + "\n" for ln in lines))

    def _replace(self, text: str) -> None:
        """Atomically: ``text`` to a temporary file, fsync, rename over ``path``, fsync the directory."""
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException as error:
            tmp.unlink(missing_ok=True)
            if isinstance(error, OSError):
                raise writes.write_error(error, self.path) from error
            raise
        fsync_dir(self.path.parent)


def _json(metrics: dict) -> str:
    """One strict JSON object: NaN and inf become null."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    return json.dumps(finite, allow_nan=False)


def _remove_dead_temporaries(path: Path) -> None:
    """Delete what a process killed while replacing ``path`` left (``.<name>.tmp-<pid>`` of dead pids)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.tmp-(\d+)$")
    for leftover in path.parent.glob(f".{path.name}.tmp-*") if path.parent.is_dir() else ():
        if (m := pattern.match(leftover.name)) and not process_alive(int(m.group(1))):
            leftover.unlink(missing_ok=True)


def read_records(path: Path, torn: str = "skipped", text: str | None = None) -> list[tuple[str, dict]]:
    """(line, record) of every line of a metrics.jsonl; a torn last line (a run writing it, or stopped
    mid-write) is left out with a message saying it was ``torn`` ("dropped", "skipped"); a line in the
    middle that is not a JSON object is a ValueError naming the file and the line."""
    text = path.read_text() if text is None else text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    records = [_json_line(ln, path, i + 1, i == len(lines) - 1, torn) for i, ln in enumerate(lines)]
    return [(ln, r) for ln, r in zip(lines, records) if r is not None]


def _json_line(line: str, path: Path, number: int, last: bool, torn: str) -> dict | None:
    """One metrics.jsonl line; a torn last line is None, with a message."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        if last:
            print(f"{path}: {torn} its torn last line {number} (a run writing it, or stopped mid-write): "
                  f"{line[:80]!r}", file=sys.stderr)  # fmt: skip
            return None
        raise ValueError(f"{path}, line {number}: not a JSON object ({error}); fix or delete that line") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}, line {number}: not a JSON object: {line[:80]!r}; fix or delete that line")
    return record


def format_metrics(metrics: dict, max_steps: int) -> str:
    """One console line: the metrics a reader watches first."""
    keys = [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "kl",
        "entropy",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "grad_norm",
        "learning_rate",
        "step_time",
    ]
    keys += [k for k in metrics if k.startswith("eval/rewards/") and k.endswith("/mean")]
    parts = [f"{k} {metrics[k]:.3g}" for k in keys if k in metrics]
    return f"step {metrics['step']}/{max_steps} | " + " | ".join(parts)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: max_memory_allocated on CUDA, the process' RSS high-water mark elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource  # POSIX only
    except ImportError:
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
