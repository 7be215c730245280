"""GRPO loss from hidden states, forward + backward, on this CPU: grpo_fast vs the GEMM floor and peers.

Launch:  python -m bench.linear_cpu --n 2048 --dtype float32 [--methods gemm3 ours naive liger]
Each method runs in its own subprocess so its peak RSS is its own. Prints a table and writes JSON
(--out). Expected (2-core EPYC, fp32, N=2048, H=896, V=151936): the three GEMMs need
6 N H V = 1.67 TFLOP (~17 s at ~100 GFLOP/s); grpo_fast within 1.15x of that, with peak memory
above inputs + gradients a small fraction of the naive path's (which holds N x V float32 logits,
their log-softmax and their gradient: ~3 x 1.24 GB).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

METHODS = ("gemm3", "ours", "naive", "liger")


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b = max(1, n // 256)
    t = n // b
    hidden = _randn((b, t, h), 0.5, dtype, g).requires_grad_()
    weight = _randn((v, h), h**-0.5, dtype, g).requires_grad_()
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t)
    adv = torch.randn(b, generator=g)
    old = -torch.rand(b, t, generator=g) * 3 - 9  # near log(1/V): ratios away from 1 but finite
    ref = old + 0.1 * torch.randn(b, t, generator=g)
    return hidden, weight, ids, mask, adv, old, ref


def _randn(shape, scale, dtype, g):
    """Filled block by block: no full-size float32 temporary, so the RSS high-water mark measured after
    the inputs exist is the inputs themselves."""
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1, shape[-1])
    rows = max(1, (1 << 22) // shape[-1])  # blocks of ~16 MB in float32
    for i in range(0, flat.shape[0], rows):
        flat[i : i + rows] = torch.randn(flat[i : i + rows].shape, generator=g) * scale
    return out


def run_gemm3(hidden, weight, chunk):
    """The floor: logits, grad_hidden and grad_weight GEMMs per chunk, nothing else."""
    h2 = hidden.detach().reshape(-1, hidden.shape[-1])
    w = weight.detach()
    grad_w = torch.zeros(w.shape, dtype=torch.float32)
    grad_h = torch.empty_like(h2)
    z_buf = torch.empty(chunk, w.shape[0], dtype=w.dtype)  # reused, as grpo_fast does
    gw_low = w.new_empty((min(8192, w.shape[0]), w.shape[1]))  # low-precision product, one vocab block
    for s in range(0, h2.shape[0], chunk):
        hc = h2[s : s + chunk]
        z = torch.mm(hc, w.T, out=z_buf[: hc.shape[0]])  # (C, V)
        torch.mm(z, w, out=grad_h[s : s + chunk])  # (C, H)
        if w.dtype == torch.float32:
            grad_w.addmm_(z.T, hc)
        else:  # as grpo_fast: bf16 product per vocabulary block, summed across chunks in fp32
            for v0 in range(0, w.shape[0], gw_low.shape[0]):
                v1 = min(v0 + gw_low.shape[0], w.shape[0])
                grad_w[v0:v1].add_(torch.mm(z[:, v0:v1].T, hc, out=gw_low[: v1 - v0]))


def run_ours(hidden, weight, ids, mask, adv, old, ref):
    import grpo_fast as gf

    out = gf.linear_grpo_loss(hidden, weight, ids, adv, mask, old, ref, backend="torch")
    out.loss.backward()


def run_naive(hidden, weight, ids, mask, adv, old, ref):
    """What a plain PyTorch GRPO loop does: materialise fp32 logits, log_softmax, gather (TRL's formula)."""
    from grpo_fast import reference
    from grpo_fast.config import LossConfig

    logits = (hidden @ weight.T).float()  # (B, T, V)
    logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    loss, _ = reference.grpo_objective(logp, None, adv, mask, old, ref, LossConfig())
    loss.backward()


def run_liger(hidden, weight, ids, mask, adv, old, ref):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    fn = LigerFusedLinearGRPOLoss(beta=0.04, compiled=False, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2)
    loss = fn(hidden, weight, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
    (loss[0] if isinstance(loss, tuple) else loss).backward()


def child(args) -> dict:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(args.n, args.h, args.v, dtype)
    hidden, weight = inputs[0], inputs[1]
    from grpo_fast.ops.linear_loss import default_chunk_rows

    chunk = default_chunk_rows(args.v)
    if args.method == "gemm3":
        fn = lambda: run_gemm3(hidden, weight, chunk)  # noqa: E731
    else:
        fn = lambda: globals()[f"run_{args.method}"](*inputs)  # noqa: E731
    if args.method != "gemm3":  # a tiny call first: imported modules are not the method's working memory
        globals()[f"run_{args.method}"](*make_inputs(8, 16, 64, dtype))
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(args.warmup + args.repeats):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        fn()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the gradients themselves, in the parameters' dtype: what any method must end up holding
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    extra = (peak_kb - base_kb) * 1024 - grad_bytes
    return {"method": args.method, "times_s": times, "peak_extra_bytes": max(extra, 0), "chunk": chunk}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--h", type=int, default=896)
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
        cmd = [
            sys.executable,
            "-m",
            "bench.linear_cpu",
            "--method",
            m,
            "--n",
            str(args.n),
            "--h",
            str(args.h),
            "--v",
            str(args.v),
            "--dtype",
            args.dtype,
            "--warmup",
            str(args.warmup),
            "--repeats",
            str(args.repeats),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{m}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    report(args, rows)


def report(args, rows) -> None:
    flops = 6 * args.n * args.h * args.v
    floor = next((min(r["times_s"]) for r in rows if r["method"] == "gemm3"), None)
    naive = next((r["peak_extra_bytes"] for r in rows if r["method"] == "naive"), None)
    print(
        f"# N={args.n} H={args.h} V={args.v} {args.dtype}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; 6NHV = {flops / 1e12:.2f} TFLOP"
    )
    print(
        f"{'method':8} {'best s':>8} {'median s':>9} {'GFLOP/s':>8} {'x floor':>8} "
        f"{'peak extra MiB':>15} {'% naive':>8}"
    )
    for r in rows:
        best = min(r["times_s"])
        med = sorted(r["times_s"])[len(r["times_s"]) // 2]
        xf = f"{best / floor:.3f}" if floor else "-"
        pn = f"{100 * r['peak_extra_bytes'] / naive:.1f}" if naive else "-"
        print(
            f"{r['method']:8} {best:8.2f} {med:9.2f} {flops / best / 1e9:8.1f} {xf:>8} "
            f"{r['peak_extra_bytes'] / 2**20:15.0f} {pn:>8}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
