"""GRPO loss from logits, forward + backward, on this CPU: grpo_fast's torch backend vs plain PyTorch and TRL.

Launch:  python -m bench.logits_cpu --n 4096 [--v 151936 --dtype float32 --methods ours naive trl]
Each method runs in its own subprocess so its peak RSS is its own; "peak extra" is the RSS high-water
mark above the inputs and the gradient (which every method must hold). Traffic floor: 2 reads + 1 write
of the N x V logits. Expected: the naive path (log_softmax + gather under autograd) holds an N x V
float32 log-softmax for its backward; grpo_fast holds O(block x V) beyond the gradient. (With
``inplace_backward=True`` the gradient also reuses the logits' storage; that saving shows only when the
logits are an intermediate of a model, so it is not measured here.)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from bench.linear_cpu import _randn

METHODS = ("ours", "naive", "trl")


def make_inputs(n: int, v: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b = max(1, n // 256)
    t = n // b
    logits = _randn((b, t, v), 2.0, dtype, g)
    ids = torch.randint(0, v, (b, t), generator=g)
    adv = torch.randn(b, generator=g)
    old = -torch.rand(b, t, generator=g) * 3 - 9
    ref = old + 0.1 * torch.randn(b, t, generator=g)
    return logits, ids, torch.ones(b, t), adv, old, ref


def run(method: str, logits, ids, mask, adv, old, ref) -> None:
    import grpo_fast as gf
    from grpo_fast import reference

    x = logits.requires_grad_()
    if method == "ours":
        gf.grpo_loss(x, ids, adv, mask, old, ref, backend="torch").loss.backward()
        return
    if method == "naive":
        logp = torch.log_softmax(x.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        entropy = None
    else:  # TRL's memory-efficient helpers, as its GRPOTrainer uses them on CPU
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        logp = selective_log_softmax(x, ids)
        with torch.no_grad():
            entropy = entropy_from_logits(x)
    loss, _ = reference.grpo_objective(logp, entropy, adv, mask, old, ref, gf.LossConfig())
    loss.backward()


def child(args) -> dict:
    inputs = make_inputs(args.n, args.v, getattr(torch, args.dtype))
    logits = inputs[0]
    # one tiny call first: the modules it imports (torch._dynamo for custom ops, ~150 MB) are not the
    # method's working memory
    run(args.method, *make_inputs(8, 64, getattr(torch, args.dtype)))
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(args.warmup + args.repeats):
        logits.grad = None
        t0 = time.perf_counter()
        run(args.method, *inputs)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grad_bytes = logits.numel() * logits.element_size()
    extra = (peak_kb - base_kb) * 1024 - grad_bytes
    return {"method": args.method, "times_s": times, "peak_extra_bytes": max(extra, 0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args()
    if args.method:
        print(json.dumps(child(args)))
        return
    rows = []
    for m in args.methods:
        flags = ["--n", str(args.n), "--v", str(args.v), "--dtype", args.dtype]
        flags += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        res = subprocess.run(
            [sys.executable, "-m", "bench.logits_cpu", "--method", m, *flags], capture_output=True, text=True
        )
        if res.returncode != 0:
            print(f"{m}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    report(args, rows)


def report(args, rows) -> None:
    size = torch.finfo(getattr(torch, args.dtype)).bits // 8
    floor_bytes = 3 * args.n * args.v * size  # 2 reads + 1 write of the logits
    naive = next((r["peak_extra_bytes"] for r in rows if r["method"] == "naive"), None)
    print(f"# N={args.n} V={args.v} {args.dtype}; {torch.get_num_threads()} threads; floor traffic "
          f"{floor_bytes / 1e9:.2f} GB (2 reads + 1 write)")  # fmt: skip
    print(f"{'method':8} {'best s':>8} {'median s':>9} {'GB/s at floor':>14} {'peak extra MiB':>15} {'% naive':>8}")
    for r in rows:
        best = min(r["times_s"])
        med = sorted(r["times_s"])[len(r["times_s"]) // 2]
        pn = f"{100 * r['peak_extra_bytes'] / naive:.1f}" if naive else "-"
        print(f"{r['method']:8} {best:8.2f} {med:9.2f} {floor_bytes / best / 1e9:14.2f} "
              f"{r['peak_extra_bytes'] / 2**20:15.0f} {pn:>8}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
