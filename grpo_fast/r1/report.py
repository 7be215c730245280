"""The report of ``grpo-fast pipeline`` (grpo_fast.r1.pipeline): the stage table, the table per round, the
effects the DeepSeek-R1 report describes checked as paired differences, and the plots."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

COLUMNS = (
    ("accuracy", "pass@1"),
    ("greedy_accuracy", "greedy acc"),
    ("format", "format"),
    ("language_consistency", "lang. consistency"),
    ("no_reasoning", "no reasoning"),
    ("mean_length", "mean length"),
    ("reasoning_length", "reasoning length"),
    ("simple_accuracy", "simple: pass@1"),
    ("simple_thinks", "simple: thinks"),
    ("simple_reasoning_length", "simple: reasoning length"),
)
LENGTHS = ("mean_length", "reasoning_length", "simple_reasoning_length")


def stage_table(report: list[dict], header: str = "") -> str:
    """The stage table as Markdown: one row per stage, held-out metrics after it (those of the simple,
    non-reasoning queries prefixed "simple:"), compute and time (wall and CPU seconds of training +
    evaluation)."""
    lines = [f"Held-out metrics after each stage ({header})", ""] if header else []
    titles = [c[1] for c in COLUMNS] + ["train TFLOP", "wall s", "CPU s"]
    lines.append("| stage | kind | from | params | " + " | ".join(titles) + " |")
    lines.append("|---" * (len(titles) + 4) + "|")
    for r in report:
        m = r.get("metrics", {})
        cells = [_cell(m, k) for k, _ in COLUMNS]
        if not m:
            d = r.get("details", {})
            cells = [f"kept {d.get('kept', 0)} / {d.get('sampled', 0)} sampled"] + [""] * (len(COLUMNS) - 1)
        cells.append(f"{r['train_flops'] / 1e12:.2f}" if r.get("train_flops") else "")
        cells.append(f"{r.get('seconds', 0) + r.get('eval_seconds', 0):.0f}")
        cells.append(f"{r.get('cpu_seconds', 0) + r.get('eval_cpu_seconds', 0):.0f}")
        params = f"{r['params'] / 1e6:.2f}M" if r.get("params") else ""
        lines.append(f"| {r['name']} | {r['kind']} | {r.get('model', '')} | {params} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# What the R1 report found, as (claim, stage, metric, expected direction, reference stage): checked on
# the held-out prompts of a run whose stage list has both stages.
EFFECTS = (
    ("RL with rule rewards raises accuracy (R1-Zero)", "r1_zero", "accuracy", "higher", "base"),
    ("R1-Zero learns to reason before answering", "r1_zero", "no_reasoning", "lower", "base"),
    ("R1-Zero's reasoning stays language-mixed (R1's does not)", "r1_zero", "language_consistency", "lower",
     "reasoning_rl"),
    ("cold-start SFT makes the reasoning readable", "cold_start", "language_consistency", "higher", "base"),
    ("the language-consistency reward raises consistency", "reasoning_rl", "language_consistency", "higher",
     "cold_start"),
    ("reasoning RL raises accuracy", "reasoning_rl", "accuracy", "higher", "cold_start"),
    ("cold start + RL beats R1-Zero (same RL steps)", "reasoning_rl", "accuracy", "higher", "r1_zero"),
    ("rejection-sampling SFT keeps the RL model's accuracy", "rs_sft", "accuracy", "not lower", "reasoning_rl"),
    ("rejection-sampling SFT keeps its readability", "rs_sft", "language_consistency", "not lower", "reasoning_rl"),
    ("rejection-sampling SFT is better formatted than the base", "rs_sft", "format", "higher", "base"),
    ("the second RL stage raises accuracy", "rl2", "accuracy", "higher", "rs_sft"),
    ("DeepSeek-R1 (every stage) beats R1-Zero", "rl2", "accuracy", "higher", "r1_zero"),
    ("distillation improves the small model", "distill", "accuracy", "higher", "student_base"),
    ("distillation beats GRPO alone on the small model at equal compute", "distill", "accuracy", "higher",
     "student_grpo"),
    ("... and at 4x the compute", "distill", "accuracy", "higher", "student_grpo_4x"),
    ("SFT with non-reasoning data answers simple queries without reasoning", "rs_sft", "simple_thinks", "lower",
     "rs_sft_reasoning_only"),
    ("... and answers them right more often", "rs_sft", "simple_accuracy", "higher", "rs_sft_reasoning_only"),
    ("... while keeping reasoning on hard ones", "rs_sft", "no_reasoning", "not higher", "rs_sft_reasoning_only"),
    ("... and their accuracy", "rs_sft", "accuracy", "not lower", "rs_sft_reasoning_only"),
)  # fmt: skip
# "round r keeps or improves round r - 1": the last stage of each round against the previous round's
ROUND_EFFECTS = (("pass@1", "accuracy"), ("readability: language consistency", "language_consistency"),
                 ("readability: format", "format"))  # fmt: skip


def compare(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean of a - b, its standard error) over the prompts where both are defined (paired by prompt)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    if not pairs:
        return math.nan, math.nan
    diffs = torch.tensor([x - y for x, y in pairs], dtype=torch.float64)
    se = float(diffs.std() / math.sqrt(len(diffs))) if len(diffs) > 1 else math.nan
    return float(diffs.mean()), se


def effects(records: list[dict], round_last: list[str] | None = None) -> list[tuple]:
    """EFFECTS whose stages both ran, then for rounds 2, 3, ...: "round r keeps or improves round r - 1"
    comparing ``round_last`` (the last stage of each round, in order) on ROUND_EFFECTS."""
    names = {r["name"] for r in records}
    out = [e for e in EFFECTS if e[1] in names and e[4] in names]
    chain = [n for n in (round_last or []) if n in names]
    for previous, stage in zip(chain, chain[1:]):
        r = _round_of(stage)
        for label, metric in ROUND_EFFECTS:
            out.append((f"round {r} keeps or improves round {r - 1} ({label})", stage, metric, "not lower", previous))
    return out


def _round_of(name: str) -> int:
    match = re.search(r"_r(\d+)$", name)
    return int(match.group(1)) if match else 1


def verdict(diff: float, se: float, direction: str) -> str:
    """The verdict: "yes" when the paired difference is beyond 2 standard errors in the expected ``direction``
    (higher / lower); "not lower" / "not higher": not beyond 2 standard errors the other way."""
    if direction in ("not lower", "not higher"):
        sign = 1 if direction == "not lower" else -1
        return "yes" if sign * diff >= -2 * se else "no"
    sign = -1 if direction == "lower" else 1
    return "yes" if sign * diff > 2 * se else ("no (opposite)" if sign * diff < -2 * se else "no (within noise)")


def effect_table(records: list[dict], round_last: list[str] | None = None) -> str:
    """Markdown table of the effects (``effects``): reproduced when the paired difference is beyond 2
    standard errors in the expected direction ("not lower": not below -2 standard errors)."""
    by_name = {r["name"]: r for r in records if "per_prompt" in r}
    lines = ["Effects the R1 report describes, on this run (difference over the held-out prompts, paired, "
             "with its standard error):", "", "| claim | stage vs reference | metric | difference | reproduced |",
             "|---|---|---|---|---|"]  # fmt: skip
    for claim, stage, metric, direction, reference in effects(records, round_last):
        a, b = (by_name[n]["per_prompt"].get(metric) if n in by_name else None for n in (stage, reference))
        if a is None or b is None:
            continue
        diff, se = compare(a, b)
        lines.append(f"| {claim} | {stage} vs {reference} | {metric} | {diff:+.3f} ± {se:.3f} | "
                     f"{verdict(diff, se, direction)} |")  # fmt: skip
    return "\n".join(lines)


def plot_report(report: list[dict], run_dir: Path) -> Path:
    """run_dir/report.png: each held-out metric per stage (bars, students hatched) and
    run_dir/rl_curves.png: the training rewards of every GRPO stage against its step."""
    from matplotlib.figure import Figure

    rows = [r for r in report if r.get("metrics")]
    fig = Figure(figsize=(20, 7), layout="constrained")
    for ax, (key, title) in zip(fig.subplots(2, 5).flat, COLUMNS, strict=True):
        values = [r["metrics"].get(key, math.nan) for r in rows]
        bars = ax.bar(range(len(rows)), values, color=["C1" if r["kind"] == "grpo" else "C0" for r in rows])
        for bar, r in zip(bars, rows, strict=True):
            if r.get("params", 1e9) < 0.3e6:
                bar.set_hatch("//")
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=45, ha="right", fontsize=8)
        ax.set_title(title + ("" if key in LENGTHS else " (0-1)"))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{run_dir}: held-out metrics after each stage (orange = GRPO, blue = SFT, hatched = student)")
    out = run_dir / "report.png"
    fig.savefig(out, dpi=90)
    _plot_rl_curves(report, run_dir)
    return out


def _plot_rl_curves(report: list[dict], run_dir: Path) -> None:
    from matplotlib.figure import Figure

    from ..trainer.plotting import read_metrics

    keys = (
        ("rewards/accuracy_reward/mean", "accuracy reward (training samples)"),
        ("rewards/language_consistency_reward/mean", "language consistency (training samples)"),
        ("completions/mean_length", "completion length"),
    )
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    for i, r in enumerate(r for r in report if r["kind"] == "grpo"):
        records = read_metrics(run_dir / r["name"]) if (run_dir / r["name"] / "metrics.jsonl").exists() else []
        for ax, (key, _) in zip(axes, keys, strict=True):
            points = [(m["step"], m[key]) for m in records if key in m]
            if points:  # one colour per stage in every panel, whichever metrics it logged
                ax.plot(*zip(*points, strict=True), label=r["name"], color=f"C{i}")
    for ax, (_, title) in zip(axes, keys, strict=True):
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.savefig(run_dir / "rl_curves.png", dpi=90)


def _cell(metrics: dict, key: str) -> str:
    if key not in metrics:
        return ""
    return f"{metrics[key]:.1f}" if key in LENGTHS else f"{metrics[key]:.3f}"


def round_table(records: list[dict], rounds: list[tuple[str, ...]]) -> str:
    """Markdown table, one row per round: what its rejection sampling kept (reasoning + non-reasoning
    rows) and each of its model stages' pass@1 and thinking on the hard (addition) and the simple
    queries. ``rounds``: the stage names of each round, in order."""
    by_name = {r["name"]: r for r in records}
    lines = ["Per round (hard = addition with reasoning, simple = non-reasoning queries; thinks = share "
             "of answers whose reasoning has words):", "",
             "| round | stage | kind | kept (reasoning + non-reasoning) | hard pass@1 | hard no reasoning | "
             "hard lang. consistency | simple pass@1 | simple thinks |", "|---" * 9 + "|"]  # fmt: skip
    for number, names in enumerate(rounds, start=1):
        for name in (n for n in names if n in by_name):
            r, m = by_name[name], by_name[name].get("metrics") or {}
            mix = (r.get("details") or {}).get("mix") or {}
            kept = f"{mix['reasoning']} + {mix['non_reasoning']}" if mix else ""
            if not mix and r["kind"] == "rejection_sampling":
                kept = f"{r['details'].get('kept', 0)} + 0"
            cells = [_cell(m, k) for k in ("accuracy", "no_reasoning", "language_consistency", "simple_accuracy",
                                           "simple_thinks")]  # fmt: skip
            lines.append(f"| {number} | {name} | {r['kind']} | {kept} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
