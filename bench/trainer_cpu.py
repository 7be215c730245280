"""One GRPO step on the demo's tiny model: grpo_fast's GRPOTrainer vs TRL's GRPOTrainer, same batch shape,
steps alternating, each trainer in its own process (``bench.trainer_steps`` says what both are given).

Launch:  python -m bench.trainer_cpu [--steps 20 --warmup 2] [--checkpointing] [--out results.json]

The same measurement as the trainer suite of ``python -m bench.run``, with as many steps as asked:
32 prompts x G = 8 completions of at most 40 tokens, per_device_train_batch_size 64; grpo_fast also as
grpo_fast_compiled (decode_graphs=on: its sampling step compiled, grpo_fast.trainer.static_decode). Printed: each
trainer's median, min and max step time and peak memory above the process after set-up; the median of
each phase (sampling = completions + rewards + advantages; update = the rest of the step) and their
ratios; the ratio of the step medians and the range of the per-round ratios (a round = one step of each,
back to back).
"""

from __future__ import annotations

import argparse
import json
import statistics

from bench.shapes import TrainerShape
from bench.trainer_steps import run_paired, trl_available


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per trainer before them")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on both sides")
    p.add_argument("--out", help="also write the step times to this JSON file")
    p.add_argument("--no-compiled", action="store_true", help="without grpo_fast_compiled (decode_graphs=on), the "
                   "paired run that shows what the compiled sampling step gains or loses")  # fmt: skip
    args = p.parse_args()
    if not trl_available():
        p.error("this comparison needs TRL: pip install trl (bench.run's trainer suite runs grpo_fast alone)")
    shape = TrainerShape(32, 8, 40, 64, warmup=args.warmup, rounds=args.steps)
    trainers = ("grpo_fast", "trl") if args.no_compiled else ("grpo_fast", "grpo_fast_compiled", "trl")
    result = run_paired(shape, args.checkpointing, trainers)
    gc = ", gradient checkpointing" if args.checkpointing else ""
    threads = result["grpo_fast"]["threads"]
    print(f"# one GRPO step: {shape.prompts} prompts x G={shape.group}, <= {shape.max_new} new tokens{gc}, {threads} "
          f"threads; {args.steps} steps each after {args.warmup} warm-up, alternating")  # fmt: skip
    print(f"{'trainer':18} {'median s':>9} {'min s':>7} {'max s':>7} {'peak extra MiB':>15} {'warm-up s':>10}")
    for name, r in result.items():
        s = r["times"]
        mib = r["peak_extra_bytes"] / 2**20
        print(f"{name:18} {statistics.median(s):9.3f} {min(s):7.3f} {max(s):7.3f} {mib:15.0f} {r['warmup_s']:10.1f}")
    print("(warm-up s: the untimed first steps; grpo_fast_compiled's include compiling its sampling step)")
    _print_phases(result)
    ours, trl = result["grpo_fast"]["times"], result["trl"]["times"]
    ratios = [t / o for o, t in zip(ours, trl)]
    print(f"speed-up (TRL median / grpo_fast median): {statistics.median(trl) / statistics.median(ours):.2f}x; "
          f"per round {min(ratios):.2f}-{max(ratios):.2f}x, median {statistics.median(ratios):.2f}x")  # fmt: skip
    if "grpo_fast_compiled" in result:  # the paired measurement of the compiled sampling step
        compiled = result["grpo_fast_compiled"]["times"]
        print(f"speed-up (TRL median / grpo_fast_compiled median, decode_graphs=on): "
              f"{statistics.median(trl) / statistics.median(compiled):.2f}x")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": result}, f, indent=1)


def _print_phases(result: dict) -> None:
    """Median time per phase: sampling (completions, rewards, advantages) and the rest of the step (update)."""
    phases = {}
    for name, r in result.items():
        if any(s is None for s in r["sampling_times"]):
            print(f"{name}: this version cannot tell its sampling time; no per-phase split")
            return
        update = [t - s for t, s in zip(r["times"], r["sampling_times"])]
        phases[name] = (statistics.median(r["sampling_times"]), statistics.median(update))
    print(f"{'phase (median s)':30} {'sampling':>9} {'update':>9}")
    for name, (sampling, update) in phases.items():
        print(f"{name:30} {sampling:9.3f} {update:9.3f}")
    for other in ("trl", "grpo_fast_compiled"):
        if other in phases:
            (s_ours, u_ours), (s_other, u_other) = phases["grpo_fast"], phases[other]
            print(f"{other + ' / grpo_fast':30} {s_other / s_ours:8.2f}x {u_other / u_ours:8.2f}x")


if __name__ == "__main__":
    main()
