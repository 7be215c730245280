"""How the trainer's advantage over TRL's GRPOTrainer grows with the model: step time and peak memory of both
trainers across vocabulary and model sizes, steps alternating (``bench.trainer_steps``).

Launch:  python -m bench.trainer_scaling [--vocabs 20,32000,151936] [--hiddens 128,512] [--betas 0,0.04]
                                          [--steps 3 --warmup 1] [--out bench/results]

Each cell is a Qwen2 built from a config (``bench.trainer_models.scaled_fields``: random weights, the demo's
character tokenizer padded with filler words up to the vocabulary, nothing downloaded), the same prompts,
batch shape and settings for both trainers: P prompts x G completions of at most T new tokens, one
optimizer step per generation batch in micro-batches of M completions, fp32, a reward spread over [0, 1]
(``hash_reward``: a random model never answers). Written: ``OUT/trainer_scaling.json`` (one row per
(trainer, cell)), ``OUT/trainer_scaling.md`` (the table) and ``OUT/trainer_scaling.png`` (time ratio and
peak memory against the vocabulary, one line per hidden size and beta).

Memory model, printed before each cell with V > the smallest: the (B, T, V) logits cost TRL
``2 * M * (T + 1) * V * 4`` bytes at the peak of its update (the fp32 logits of a micro-batch's completion
positions and their gradient), grpo_fast ``2 * C * V * 4`` (one chunk of C token rows of logits and its
gradient, C = 2**25 / V, ``linear_grpo_loss``'s default), both plus the LM-head weight's gradient
``V * H * 4``. Added to each trainer's peak at the smallest vocabulary (same hidden size and beta), that
predicts the peak and the TRL / grpo_fast factor at V; the table shows prediction and measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench import harness
from bench.shapes import TrainerShape
from bench.trainer_models import scaled_fields, scaled_name
from bench.trainer_steps import TRAINERS, run_paired, trl_available

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocabs", default="20,32000,151936", help="vocabulary sizes (20: the demo's tokenizer)")
    p.add_argument("--hiddens", default="128,512", help="hidden sizes (layers and heads scale with them)")
    p.add_argument("--betas", default="0,0.04", help="KL coefficients (> 0: reference log-probs on both sides)")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=8, help="G, completions per prompt")
    p.add_argument("--max-new", type=int, default=32, help="T, new tokens per completion at most")
    p.add_argument("--micro", type=int, default=8, help="M, completions per micro-batch")
    p.add_argument("--steps", type=int, default=3, help="timed steps per trainer and cell")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per trainer before them")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder of the JSON, table and plot")
    args = p.parse_args(argv)
    if not trl_available():
        p.error("this comparison needs TRL: pip install 'grpo-fast[bench]'")
    vocabs, hiddens = _ints(args.vocabs, "--vocabs"), _ints(args.hiddens, "--hiddens")
    betas = [float(b) for b in args.betas.split(",")]
    if args.prompts * args.group % args.micro:
        p.error(f"--micro must divide prompts x group = {args.prompts * args.group}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, rows = time.time(), []
    for hidden in hiddens:
        for beta in betas:
            for vocab in sorted(vocabs):  # the smallest first: its peaks are the memory model's base
                shape = TrainerShape(args.prompts, args.group, args.max_new, args.micro, args.warmup, args.steps,
                                     model=scaled_name(vocab, hidden), beta=beta)  # fmt: skip
                rows += run_cell(shape, vocab, hidden, beta, rows)
                write(out, rows, vars(args), time.time() - start)
    print(f"# {time.time() - start:.0f} s; wrote {out / 'trainer_scaling.json'}, .md and .png")


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"bench.trainer_scaling: {name} takes comma-separated integers, got {text!r}") from None


def predicted_peaks(shape: TrainerShape, vocab: int, hidden: int, base: dict[str, float] | None) -> dict | None:
    """trainer -> predicted peak extra MiB at ``vocab`` (the module docstring's model), or None without a base."""
    if base is None:
        return None
    chunk = max(1, 2**25 // vocab)
    logits = {"trl": 2 * shape.micro * (shape.max_new + 1) * vocab * 4,
              "grpo_fast": 2 * min(chunk, shape.micro * shape.max_new) * vocab * 4}  # fmt: skip
    return {t: base[t] + (logits[t] + vocab * hidden * 4) / MIB for t in TRAINERS}


def run_cell(shape: TrainerShape, vocab: int, hidden: int, beta: float, done: list[dict]) -> list[dict]:
    layers = scaled_fields(vocab, hidden)["num_hidden_layers"]
    cell = {"vocab": vocab, "hidden": hidden, "layers": layers, "beta": beta}
    smallest = [r for r in done if r["hidden"] == hidden and r["beta"] == beta and r.get("median_s") is not None]
    base = None
    if smallest and smallest[0]["vocab"] < vocab:
        v0 = smallest[0]["vocab"]
        base = {r["trainer"]: r["peak_extra_mib"] - (v0 * hidden * 4) / MIB for r in smallest if r["vocab"] == v0}
    predicted = predicted_peaks(shape, vocab, hidden, base if base and len(base) == 2 else None)
    if predicted:
        ours, trl = predicted["grpo_fast"], predicted["trl"]
        print(f"# V={vocab} H={hidden} beta={beta:g}: predicted peak extra MiB grpo_fast {ours:.0f}, TRL {trl:.0f} "
              f"(factor {trl / ours:.2f})", flush=True)  # fmt: skip
    try:
        result = run_paired(shape, gc=False)
    except RuntimeError as error:  # a trainer process died (e.g. out of memory): recorded, the grid goes on
        print(f"# V={vocab} H={hidden} beta={beta:g}: {error}", flush=True)
        return [{"trainer": t, **cell, "median_s": None, "error": str(error)} for t in TRAINERS]
    rows = {trainer: _row(trainer, cell, r, predicted) for trainer, r in result.items()}
    ours, trl = rows["grpo_fast"], rows["trl"]
    print(f"# V={vocab} H={hidden} beta={beta:g}: grpo_fast {ours['median_s']:.3f} s, {ours['peak_extra_mib']:.0f} "
          f"MiB; TRL {trl['median_s']:.3f} s, {trl['peak_extra_mib']:.0f} MiB; TRL / grpo_fast: time "
          f"{trl['median_s'] / ours['median_s']:.2f}x, memory {trl['peak_extra_mib'] / ours['peak_extra_mib']:.2f}x",
          flush=True)  # fmt: skip
    return list(rows.values())


def _row(trainer: str, cell: dict, r: dict, predicted: dict | None) -> dict:
    times, sampling = r["times"], r["sampling_times"]
    split = all(s is not None for s in sampling)
    return {
        "trainer": trainer,
        **cell,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "peak_extra_mib": r["peak_extra_bytes"] / MIB,
        "sampling_s": statistics.median(sampling) if split else None,
        "update_s": statistics.median([t - s for t, s in zip(times, sampling)]) if split else None,
        "predicted_peak_extra_mib": None if predicted is None else predicted[trainer],
    }


def _pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(grpo_fast row, TRL row) per cell, in run order."""
    trl = {(r["vocab"], r["hidden"], r["beta"]): r for r in rows if r["trainer"] == "trl"}
    return [(r, trl[(r["vocab"], r["hidden"], r["beta"])]) for r in rows if r["trainer"] == "grpo_fast"]


def table(rows: list[dict]) -> str:
    head = (
        "| V | H | layers | beta | grpo_fast s (min-max) | TRL s (min-max) | TRL / grpo_fast time | sampling ratio "
        "| update ratio | grpo_fast MiB (predicted) | TRL MiB (predicted) | TRL / grpo_fast memory (predicted) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for ours, trl in _pairs(rows):
        cell = f"| {ours['vocab']} | {ours['hidden']} | {ours['layers']} | {ours['beta']:g} |"
        if ours["median_s"] is None or trl["median_s"] is None:
            failed = ours.get("error") or trl.get("error")
            lines.append(f"{cell} failed: {failed} |" + " |" * 7)
            continue
        lines.append(cell + " | ".join([
            f" {_span(ours)}", _span(trl), f"**{trl['median_s'] / ours['median_s']:.2f}x**",
            _ratio(trl["sampling_s"], ours["sampling_s"]), _ratio(trl["update_s"], ours["update_s"]),
            _mib(ours), _mib(trl), _memory_ratio(ours, trl),
        ]) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _span(r: dict) -> str:
    return f"{r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f})"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def _mib(r: dict) -> str:
    p = r["predicted_peak_extra_mib"]
    return f"{r['peak_extra_mib']:.0f}" + ("" if p is None else f" ({p:.0f})")


def _memory_ratio(ours: dict, trl: dict) -> str:
    measured = f"{trl['peak_extra_mib'] / ours['peak_extra_mib']:.2f}x"
    p, q = ours["predicted_peak_extra_mib"], trl["predicted_peak_extra_mib"]
    return measured + ("" if p is None else f" ({q / p:.2f}x)")


def write(out: Path, rows: list[dict], args: dict, seconds: float) -> None:
    """The JSON rows, the Markdown table and the plot (rewritten after every cell: partial results stay)."""
    meta = {
        "args": args,
        "seconds": round(seconds, 1),
        "commit": _commit(),
        **harness.machine_info(harness.bench_device()),
    }
    (out / "trainer_scaling.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "trainer_scaling.md").write_text(table(rows))
    plot(rows, out / "trainer_scaling.png")


def _commit() -> str:
    import subprocess

    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()  # fmt: skip
    return done.stdout.strip() + (" (uncommitted changes)" if dirty else "") if done.returncode == 0 else "unknown"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines = sorted({(r["hidden"], r["beta"]) for r in rows})
    for i, (hidden, beta) in enumerate(lines):  # one colour per (H, beta); TRL dashed
        pairs = [(o, t) for o, t in _pairs(rows) if (o["hidden"], o["beta"]) == (hidden, beta)
                 and o["median_s"] is not None and t["median_s"] is not None]  # fmt: skip
        if not pairs:
            continue
        v = [o["vocab"] for o, _ in pairs]
        label = f"H {hidden}, beta {beta:g}"
        left.plot(v, [t["median_s"] / o["median_s"] for o, t in pairs], marker="o", color=f"C{i}", label=label)
        right.plot(v, [o["peak_extra_mib"] for o, _ in pairs], marker="o", color=f"C{i}", label=f"grpo_fast, {label}")
        right.plot(v, [t["peak_extra_mib"] for _, t in pairs], marker="s", linestyle="--", color=f"C{i}",
                   label=f"TRL, {label}")  # fmt: skip
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set(xscale="log", xlabel="vocabulary size", ylabel="TRL step time / grpo_fast step time",
             title="step time ratio (higher: grpo_fast faster)")  # fmt: skip
    right.set(xscale="log", yscale="log", xlabel="vocabulary size", ylabel="peak memory above set-up (MiB)",
              title="peak memory of a step")  # fmt: skip
    left.legend(fontsize=7)
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
