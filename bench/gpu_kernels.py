"""The kernel parts of ``bench.gpu_check``: the public ops at real shapes against the float64 reference, and
the kernels and their peers timed at real shapes.

Correctness (``check_ops``): ``token_logprobs`` (+ entropy) and ``grpo_loss`` from logits,
``linear_token_logprobs`` and ``linear_grpo_loss`` from hidden states, Triton backend, on the benchmark's
inputs with a masked tail (``bench.checks.mask_tail``), against ``grpo_fast.reference`` in float64 on the
same input values. The reference runs a few sequences at a time, so it never holds more than ~2 GB of
float64 logits: the default GRPO loss (``loss_type="grpo"``) is a mean over sequences of per-sequence
terms, so the loss and the gradients of the whole batch are the chunks' losses and gradients weighted by
their share of the sequences (the weight gradient summed over chunks). Errors are normwise,
||out - ref|| / ||ref||, over every token (log-probs, entropy on unmasked tokens) and every gradient entry.

Timing (``time_case``): per (shape, dtype, method, mode) a check on small inputs of the same vocabulary
(``bench.checks``; compiled peers are their eager twins' checks), warm-up calls (compilation), then
rounds timed with CUDA events (``harness.time_calls``); peak memory above the inputs and the gradients
every method must return. Bytes and flops as the bench suites state them (``bench_logits`` /
``bench_linear``): from logits 1 read of N x V (log-probs) or 2 reads + 1 write (loss); from hidden
states 2 N H V (log-probs) or 6 N H V flops (loss).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

import grpo_fast as gf
from bench import checks, harness, linear_methods, logits_methods
from bench.harness import skip_reason
from bench.shapes import LLAMA3_V, QWEN25_V
from grpo_fast import reference

MODES = ("logprobs", "loss")
# the methods timed, by the bench registries' names: grpo_fast's Triton backend and the peers
METHODS = {
    "logits": ("grpo_fast_triton", "naive", "naive_compile", "trl", "liger_triton"),
    "linear": ("grpo_fast_triton", "naive", "naive_compile", "liger", "cce"),
}
# normwise relative error allowed against float64 on the same input values, per input dtype and output
_FP32 = "fp32 arithmetic throughout: rounding ~1e-7 per operation, far under 1e-4 in norm"
_LOW_IN = "low-precision inputs are exact in fp32 and every kernel accumulates in fp32"
TOLERANCE = {
    "float32": {"stats": (1e-4, _FP32), "grad": (1e-4, _FP32)},
    "bfloat16": {"stats": (1e-4, _LOW_IN), "grad": (2.0**-7, "gradients stored in bf16: 2^-8 per rounding, two")},
    "float16": {"stats": (1e-4, _LOW_IN), "grad": (2.0**-10, "gradients stored in fp16: 2^-11 per rounding, two")},
}


@dataclass(frozen=True)
class KernelCase:
    """B sequences of T tokens over a vocabulary of V; H > 0: from hidden states (an H x V head)."""

    b: int
    t: int
    v: int
    h: int
    dtype: str

    @property
    def family(self) -> str:
        return "linear" if self.h else "logits"

    @property
    def n(self) -> int:
        return self.b * self.t

    @property
    def id(self) -> str:
        head = f"xH{self.h}" if self.h else ""
        return f"N{self.n}{head}xV{self.v}_{self.dtype}"


# LM heads (H, V): Qwen2.5 0.5B / 1.5B / 7B, Llama-3.2-1B, Llama-3-8B
HEADS = ((896, QWEN25_V), (1536, QWEN25_V), (3584, QWEN25_V), (2048, LLAMA3_V), (4096, LLAMA3_V))


def timing_plan(dry_run: bool, quick: bool) -> list[KernelCase]:
    """Cases in the order they run: the first of each family and dtype (``--quick``) first, so a time box
    that runs out cuts the least. Dry run: one tiny shape per family, fp32 from logits and fp16 from hidden
    states (the interpreter computes bf16 wrongly; ``check_plan`` covers both dtypes of both families)."""
    if dry_run:
        return [KernelCase(2, 16, 1000, 0, "float32"), KernelCase(2, 16, 1000, 32, "float16")]
    first = [KernelCase(4, 1024, QWEN25_V, 0, d) for d in ("bfloat16", "float32")]
    first += [KernelCase(4, 1024, QWEN25_V, 896, d) for d in ("bfloat16", "float32")]
    if quick:
        return first
    dtypes = ("bfloat16", "float32")
    rest = [KernelCase(b, 1024, v, 0, d) for v in (QWEN25_V, LLAMA3_V) for d in dtypes for b in (4, 16)]
    # fp32 from hidden states at N = 16384 is up to 52 TFLOP per call on FMA units (seconds): N = 4096 only
    rest += [KernelCase(b, 1024, v, h, "bfloat16") for h, v in HEADS for b in (4, 16)]
    rest += [KernelCase(4, 1024, v, h, "float32") for h, v in HEADS]
    return first + [c for c in rest if c not in first]


def check_plan(dry_run: bool, quick: bool) -> list[KernelCase]:
    """The correctness cases: N = 16384 from logits (N x V > 2^31: 64-bit offsets), N = 4096 from hidden,
    both dtypes (dry run: fp32 and fp16); ``quick``: the low-precision one of each family."""
    low, dtypes = ("float16", ("float16", "float32")) if dry_run else ("bfloat16", ("bfloat16", "float32"))
    b, t, v, h = (2, 16, 1000, 32) if dry_run else (16, 1024, QWEN25_V, 896)
    cases = [KernelCase(b, t, v, 0, d) for d in dtypes] + [KernelCase(max(b // 4, 2), t, v, h, d) for d in dtypes]
    return [c for c in cases if c.dtype == low] if quick else cases


def make_inputs(case: KernelCase, device, seed: int = 0):
    dtype = getattr(torch, case.dtype)
    if case.h:
        return linear_methods.make_inputs(case.b, case.t, case.h, case.v, dtype, device, seed)
    return logits_methods.make_inputs(case.b, case.t, case.v, dtype, device, seed)


# ---------------------------------------------------------------------------- correctness
REFERENCE_CHUNK = 1 << 28  # float64 logits per reference chunk (2 GiB): whole sequences, at least one


class NormError:
    """||a - b|| / ||b|| accumulated over pieces (float64 sums)."""

    def __init__(self):
        self.diff = self.ref = 0.0

    def add(self, actual: torch.Tensor, expected: torch.Tensor) -> None:
        self.diff += float((actual.detach().double() - expected).square().sum())
        self.ref += float(expected.square().sum())

    @property
    def value(self) -> float:
        return (self.diff / self.ref) ** 0.5 if self.ref > 0 else float(self.diff > 0) * float("inf")


def check_ops(case: KernelCase, device) -> dict:
    """The case's two public ops (log-probs forward, GRPO loss forward + backward), Triton backend, against
    the float64 reference by sequence chunks; returns the normwise errors, their bounds and ``ok``."""
    assert logits_methods.CONFIG.loss_type == "grpo", "the chunked reference relies on a mean over sequences"
    x = checks.mask_tail(make_inputs(case, device, seed=2))
    leaves = x.leaves()
    if case.h:
        with torch.no_grad():
            stats = gf.linear_token_logprobs(x.hidden, x.weight, x.ids, return_entropy=True, backend="triton")
        out = gf.linear_grpo_loss(x.hidden, x.weight, x.ids, x.adv, x.mask, x.old, x.ref,
                                  config=logits_methods.CONFIG, backend="triton")  # fmt: skip
    else:
        with torch.no_grad():
            stats = gf.token_logprobs(x.logits, x.ids, return_entropy=True, backend="triton")
        out = gf.grpo_loss(x.logits, x.ids, x.adv, x.mask, x.old, x.ref, config=logits_methods.CONFIG,
                           backend="triton")  # fmt: skip
    out.loss.backward()
    errors = _compare_by_chunks(case, x, stats, out, leaves)
    bounds = {k: TOLERANCE[case.dtype]["grad" if k.startswith("grad") else "stats"][0] for k in errors}
    ok = all(errors[k] <= bounds[k] for k in errors)  # NaN fails
    return {"case": case.id, "ops": _op_names(case), "errors": errors, "bounds": bounds, "ok": ok}


def _op_names(case: KernelCase) -> list[str]:
    return ["linear_token_logprobs", "linear_grpo_loss"] if case.h else ["token_logprobs", "grpo_loss"]


def _compare_by_chunks(case: KernelCase, x, stats, out, leaves) -> dict[str, float]:
    per_chunk = max(1, REFERENCE_CHUNK // (case.t * case.v))  # sequences per chunk
    err = {k: NormError() for k in ("logprobs", "entropy", "forward_logprobs", "loss")}
    grads = {name: NormError() for name in (("grad_hidden", "grad_weight") if case.h else ("grad_logits",))}
    w64 = x.weight.detach().double().requires_grad_() if case.h else None
    w_grad, loss64 = None, 0.0
    for b0 in range(0, case.b, per_chunk):
        rows = slice(b0, min(b0 + per_chunk, case.b))
        share = (rows.stop - rows.start) / case.b  # this chunk's weight in the mean over sequences
        if case.h:
            h64 = x.hidden.detach()[rows].double().requires_grad_()
            logits64 = h64 @ w64.T  # (b, T, V)
            inputs = [h64, w64]
        else:
            logits64 = x.logits.detach()[rows].double().requires_grad_()
            inputs = [logits64]
        given = (x.adv[rows].double(), x.mask[rows].double(), x.old[rows].double(), x.ref[rows].double())
        loss, _, logp = reference.grpo_loss(logits64, x.ids[rows], *given, logits_methods.CONFIG)
        chunk_grads = torch.autograd.grad(loss * share, inputs)
        loss64 += float(loss.detach()) * share
        active = x.mask[rows].bool()
        err["logprobs"].add(out.logprobs[rows], logp.detach())
        err["forward_logprobs"].add(stats.logprobs[rows][active], logp.detach()[active])
        entropy = reference.token_entropy(logits64.detach())
        err["entropy"].add(stats.entropy[rows][active], entropy[active])
        if case.h:
            grads["grad_hidden"].add(x.hidden.grad[rows], chunk_grads[0])
            w_grad = chunk_grads[1] if w_grad is None else w_grad + chunk_grads[1]
        else:
            grads["grad_logits"].add(x.logits.grad[rows], chunk_grads[0])
        del logits64, chunk_grads
    if case.h:
        grads["grad_weight"].add(x.weight.grad, w_grad)
    err["loss"].add(out.loss.detach().reshape(1), torch.tensor([loss64], dtype=torch.float64, device=out.loss.device))
    return {k: e.value for k, e in {**err, **grads}.items()}


# ---------------------------------------------------------------------------- timing
def methods_for(family: str) -> list:
    """The registry's methods named in ``METHODS`` (the CUDA list: grpo_fast_triton is in it), in that order."""
    registry = linear_methods if family == "linear" else logits_methods
    every = {m.name: m for m in registry.methods(torch.device("cuda"))}
    return [every[name] for name in METHODS[family]]


def not_run_reason(method, case: KernelCase, device, dry_run: bool, first_of_family: bool) -> str | None:
    """Why this method is not timed for this case here, or None."""
    if method.name == "grpo_fast_triton" and device.type != "cuda":
        return None  # under the interpreter on CPU (the dry run)
    reason = skip_reason(method, device)
    if reason is not None:
        return reason
    if method.compiled and dry_run:
        return "--dry-run: torch.compile on CPU takes longer than the dry run's time"
    if method.compiled and not first_of_family:  # each compile costs tens of seconds of the time box
        return "compiled peers: the first shape of each family only (compile time)"
    return None


def time_case(method, mode: str, case: KernelCase, x, device, rounds: int, warmup: int) -> dict:
    """One row: the check on small inputs, then ``rounds`` timed calls of ``method`` in ``mode`` on ``x``."""
    small = make_inputs(KernelCase(2, 16, case.v, case.h, case.dtype), device, seed=1)
    if getattr(method, "prepare", None) is not None:
        small, x = method.prepare(small), method.prepare(x)
    check = checks.check_linear if case.h else checks.check_logits
    # a compiled peer is torch.compile of an eager method checked on its own row; checking it on small inputs
    # would compile it twice (small, then real shape), tens of seconds each on the time box
    checked = {"skipped": "compiled twin of a checked eager method"} if method.compiled else check(method, mode, small)
    leaves = x.leaves()

    def setup():
        for leaf in leaves:
            leaf.grad = None

    def run():
        if mode == "logprobs":
            with torch.no_grad():
                return getattr(method, mode)(x)
        loss = method.loss(x)
        if loss is not None:
            loss.backward()

    if method.compiled:
        torch._dynamo.reset()
    grad_bytes = 0 if mode == "logprobs" else sum(leaf.numel() * leaf.element_size() for leaf in leaves)
    for _ in range(warmup):  # compilation and the first launches, untimed and outside the memory window
        setup()
        run()
    setup()
    peak = harness.PeakMemory(device)
    peak.start()
    times = harness.time_calls(run, device, rounds, warmup=0, setup=setup)
    used = peak.stop()
    setup()
    return {**_work(case, mode, statistics.median(times)), "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "rounds": rounds, "peak_extra_mib": max(used - grad_bytes, 0) / 2**20,
            "check": checked}  # fmt: skip


def _work(case: KernelCase, mode: str, seconds: float) -> dict:
    """Bytes (from logits) or flops (from hidden states) of the call, and the rate achieved."""
    if case.h:
        flops = (2 if mode == "logprobs" else 6) * case.n * case.h * case.v
        return {"flops": flops, "tflops": flops / seconds / 1e12}
    moved = (1 if mode == "logprobs" else 3) * case.n * case.v * getattr(torch, case.dtype).itemsize
    return {"bytes": moved, "gbps": moved / seconds / 1e9}
