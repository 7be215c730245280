"""Training curves from RUN_DIR/metrics.jsonl as PNG (matplotlib's Agg renderer: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

from .metrics import read_records
from .writes import reported

# (panel title, metric keys tried in order: the first one present in the log is drawn)
PANELS = (
    ("reward", ("reward",)),
    ("accuracy", ("eval/rewards/accuracy_reward/mean", "rewards/accuracy_reward/mean")),
    ("kl", ("kl",)),
    ("completion length", ("completions/mean_length",)),
)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of run_dir/metrics.jsonl, in file order; a torn last line (a live run writing it) is
    skipped; null values (non-finite metrics) stay None."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a training run directory?")
    return [record for _, record in read_records(path, "skipped")]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a 2x2 figure (reward, accuracy, kl, completion length vs step) to run_dir/curves.png.

    Accuracy is the held-out greedy accuracy when the run logged evaluations, else the training
    accuracy reward; a panel whose metric was never logged (kl with beta = 0) says so.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; pyplot's global state is untouched

    records = read_metrics(run_dir)
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    for ax, (title, keys) in zip(axes.flat, PANELS, strict=True):
        key = next((k for k in keys if any(k in r for r in records)), None)
        if key is None:
            note = f"{' / '.join(keys)} not logged" + ("\n(beta = 0: no reference model)" if title == "kl" else "")
            ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
        else:
            points = [(r["step"], math.nan if r[key] is None else r[key]) for r in records if key in r]
            ax.plot(*zip(*points, strict=True), marker="o" if len(points) < 30 else None, markersize=3)
            ax.set_ylabel(key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    with reported(out, "plot_run(out=...)"):
        fig.savefig(out, dpi=100)
    return out
