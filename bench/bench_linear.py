"""Benchmark: GRPO from hidden states (fused LM head), grpo_fast vs the GEMM floor and peers, in one run.

    python -m pytest bench/bench_linear.py --benchmark-only [--bench-profile cpu]

Per (method, shape): ``loss`` (forward + backward; floor 6 N H V flops: logits, grad_hidden and
grad_W GEMMs) and ``logprobs`` (old/ref log-probs, forward only; floor 2 N H V flops). Every record
carries its flop count; bench.report divides it by the median time and by the GEMM rate measured in
the same run. The GEMM floor has no process of its own: it runs in grpo_fast's, its rounds alternating
with grpo_fast's (``paired_with_floor``). Expected on the AVX2 2-core EPYC (fp32, N = 1024, H = 896,
V = 151936): the floor ~10 s per forward + backward, grpo_fast within 1.15x of it, with peak memory
above inputs + gradients of one chunk buffer (~0.13 GB; on CPU the row passes run in place) where the
naive path holds N x V fp32 logits, their log-softmax and gradient.
"""

from __future__ import annotations

import torch

from bench import harness
from bench.checks import check_linear
from bench.conftest import profile, selected
from bench.linear_methods import make_inputs, methods
from bench.suite import bench_method, cached_inputs

MODES = ("logprobs", "loss")


def pytest_generate_tests(metafunc):
    if "linear_case" not in metafunc.fixturenames:
        return
    cases, ids = [], []
    for shape in profile(metafunc.config).linear:
        for method in methods(harness.bench_device()):
            if method.is_floor:  # timed in grpo_fast's process, alternating with it (``paired_with_floor``)
                continue
            for mode in MODES:
                wanted = shape.methods is None or method.name in shape.methods
                if wanted and selected(metafunc.config, method.name) and getattr(method, mode) is not None:
                    cases.append((method.name, shape, mode))
                    ids.append(f"{method.name}-{shape.id}-{mode}")
    metafunc.parametrize("linear_case", cases, ids=ids)


def test_linear(benchmark, linear_case, device):
    name, shape, mode = linear_case
    method = next(m for m in methods(device) if m.name == name)
    harness.skip_unless_native_bf16(device, shape.dtype)
    dtype = getattr(torch, shape.dtype)
    x = cached_inputs(shape, lambda: make_inputs(shape.b, shape.t, shape.h, shape.v, dtype, device))
    flops = (6 if mode == "loss" else 2) * shape.n * shape.h * shape.v
    info = {
        "suite": "linear",
        "method": method.name,
        "label": method.label,
        "mode": mode,
        "shape": shape.id,
        "b": shape.b,
        "t": shape.t,
        "h": shape.h,
        "v": shape.v,
        "n": shape.n,
        "dtype": shape.dtype,
        "flops": flops,
        "flops_rule": "6 N H V (3 GEMMs)" if mode == "loss" else "2 N H V (1 GEMM)",
        "is_floor": method.is_floor,
        "note": method.note,
    }

    def small():
        return make_inputs(2, 16, shape.h, shape.v, dtype, device, seed=1)

    floor = next(m for m in methods(device) if m.is_floor) if paired_with_floor(method, device) else None
    bench_method(benchmark, method, mode, shape, x, small, check_linear, info, device, floor=floor)


def paired_with_floor(method, device: torch.device) -> bool:
    """grpo_fast's default backend on this device (the one the done-when holds to the floor) gets the GEMM
    floor timed in alternating rounds in its own process: one floor per table, compared without drift."""
    return method.name == ("grpo_fast_triton" if device.type == "cuda" else "grpo_fast_torch")
