"""Memory traffic of the GRPO loss from logits, per variant, and the projected GPU time it implies.

Launch:  python -m bench.traffic [--n 16384 --v 151936 --dtype-bytes 2 --bandwidth-tbs 3.0]
The projection is bytes / bandwidth: a floor for a memory-bound kernel, not a measurement. Passes
over the N x V logits (R = read, W = write) as implemented; Liger's from its triton_grpo_loss
(forward read; backward read + write; sequence-level importance sampling adds a pass).
"""

from __future__ import annotations

import argparse

# (variant, reads, writes) of N x V elements for forward + backward
VARIANTS = (
    ("grpo_fast, token-level IS, fwd+bwd", 2, 1),
    ("grpo_fast, sequence-level IS (GSPO), fwd+bwd", 2, 1),
    ("grpo_fast, old/ref log-probs (forward only)", 1, 0),
    ("Liger triton_grpo_loss, token-level, fwd+bwd", 2, 1),
    ("Liger triton_grpo_loss, sequence-level, fwd+bwd", 3, 1),
)


def table(n: int, v: int, dtype_bytes: int, bandwidth_tbs: float) -> list[str]:
    elements = n * v
    lines = [
        f"N = {n} tokens, V = {v}, {dtype_bytes}-byte logits; projection at {bandwidth_tbs} TB/s",
        "| variant | passes over N x V | GB moved | projected ms |",
        "|---|---|---|---|",
    ]
    for name, reads, writes in VARIANTS:
        gb = (reads + writes) * elements * dtype_bytes / 1e9
        lines.append(f"| {name} | {reads} R + {writes} W | {gb:.2f} | {gb / bandwidth_tbs:.2f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--dtype-bytes", type=int, default=2)
    p.add_argument("--bandwidth-tbs", type=float, default=3.0)
    args = p.parse_args()
    print("\n".join(table(args.n, args.v, args.dtype_bytes, args.bandwidth_tbs)))


if __name__ == "__main__":
    main()
