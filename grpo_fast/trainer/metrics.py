"""The metrics log (one JSON line per step) and the console summary of a step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


class MetricsLog:
    """Appends one JSON object per logged step to ``path``; on resume, drops lines past the checkpoint."""

    def __init__(self, path: Path, keep_up_to_step: int = 0):
        self.path = path
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            records = [_json_line(ln, path, i + 1, last=i == len(lines) - 1) for i, ln in enumerate(lines)]
            kept = [ln for ln, r in zip(lines, records) if r is not None and r.get("step", 0) <= keep_up_to_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")


def _json_line(line: str, path: Path, number: int, last: bool) -> dict | None:
    """One metrics.jsonl line; a torn last line (a run killed mid-write) is None, with a message."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        if last:
            print(f"{path}: dropped its torn last line {number} (a run stopped mid-write): {line[:80]!r}",
                  file=sys.stderr)  # fmt: skip
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
