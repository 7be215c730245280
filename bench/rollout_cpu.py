"""The rollout alone on the demo's model, paired: eager LeanDecoder steps (decode_graphs=off) against the
fixed-shape step compiled by inductor (decode_graphs=on), alternating, same prompts and per-row uniforms.

Launch:  python -m bench.rollout_cpu [--rounds 20] [--threads 2] [--out results.json]

The shape of one demo / bench.trainer_cpu step: 32 prompts x G = 8 rows, <= 40 new tokens, random weights of
the demo's model (rows rarely stop early, as at the start of training). Printed: the first call of each
(the compiled one includes compiling its step), then the median and min of wall-clock and of process CPU
time per rollout, and their ratio. CPU time is the figure to trust on a shared machine (it counts only this
process's work, not the time others hold the cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from grpo_fast.r1 import toy
from grpo_fast.trainer.engines import group_uniforms
from grpo_fast.trainer.rollout import encode_prompts, generate

SETTINGS = ("off", "on")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20, help="timed rollouts of each setting, alternating")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", help="also write the times to this JSON file")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(tokenizer, seed=0).eval()
    ids, mask = encode_prompts(tokenizer, _prompts(32), None, "cpu")
    ids, mask = ids.repeat_interleave(8, 0), mask.repeat_interleave(8, 0)
    uniforms = group_uniforms(list(range(32)), 8, 40, "cpu")

    def rollout(setting: str) -> tuple[float, float, torch.Tensor]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = generate(model, ids, mask, 40, tokenizer.eos_token_id, tokenizer.pad_token_id, 1.0, uniforms=uniforms,
                       decode_graphs=setting)  # fmt: skip
        return time.perf_counter() - wall, time.process_time() - cpu, out.completion_ids

    first = {s: rollout(s) for s in SETTINGS}
    if not torch.equal(first["off"][2], first["on"][2]):
        raise SystemExit("the compiled step's tokens differ from the eager steps': not a fair comparison")
    times = {s: [] for s in SETTINGS}
    for i in range(args.rounds):
        for s in SETTINGS if i % 2 == 0 else SETTINGS[::-1]:
            times[s].append(rollout(s)[:2])
    print(f"# rollout: 256 rows (32 prompts x G 8), <= 40 new tokens, demo model; {torch.get_num_threads()} threads; "
          f"{args.rounds} rounds alternating")  # fmt: skip
    print(f"{'decode_graphs':14} {'first call s':>12} {'median wall s':>14} {'min wall s':>11} {'median CPU s':>13}")
    for s in SETTINGS:
        wall, cpu = [t[0] for t in times[s]], [t[1] for t in times[s]]
        print(f"{s:14} {first[s][0]:12.2f} {statistics.median(wall):14.4f} {min(wall):11.4f} "
              f"{statistics.median(cpu):13.4f}")  # fmt: skip
    ratio = {k: statistics.median(t[k] for t in times["off"]) / statistics.median(t[k] for t in times["on"])
             for k in (0, 1)}  # fmt: skip
    print(f"eager / compiled: wall {ratio[0]:.2f}x, CPU {ratio[1]:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "first_s": {s: first[s][0] for s in SETTINGS}, "times": times}, f, indent=1)


def _prompts(n: int) -> list[str]:
    """n distinct addition prompts of the demo's form."""
    return [f"{100 + 7 * i}+{200 + 13 * i}=" for i in range(n)]


if __name__ == "__main__":
    main()
