"""This machine's ceilings, measured in the same run as the suites: copy bandwidth and GEMM rates.

    python -m pytest bench/bench_ceilings.py --benchmark-only

bandwidth: ``dst.copy_(src)`` of a large fp32 tensor, bytes = read + write = 2 x size.
flops: ``torch.mm(a, b, out=c)`` of M x M x M in fp32 and bf16 (fp16 too on CUDA), 2 M^3 flops.
``bench.run`` measures them at the start and at the end of the run (other jobs may share the machine);
bench.report takes the best round of either as the ceiling and divides every benchmark's bytes or
flops by it to give the benchmark's fraction of the ceiling.
"""

from __future__ import annotations

import pytest
import torch

from bench import harness
from bench.conftest import profile

GEMM_DTYPES = ("float32", "bfloat16", "float16")


def test_copy_bandwidth(benchmark, device, request, phase):
    p = profile(request.config)
    numel = p.ceiling_copy_mib * 2**20 // 4
    src = torch.ones(numel, device=device)
    dst = torch.zeros_like(src)  # pages touched before timing
    case = harness.Case(
        run=lambda: dst.copy_(src),
        warmup=lambda: dst.copy_(src),
        extra_info={
            "suite": "ceiling",
            "method": "copy",
            "mode": "copy",
            "shape": f"{p.ceiling_copy_mib} MiB fp32",
            "bytes": 2 * numel * 4,
            "bytes_rule": "1 read + 1 write",
            "phase": phase,
        },
    )
    harness.measure(benchmark, case, p.ceiling_rounds, device)


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
def test_gemm_rate(benchmark, device, request, phase, dtype):
    if dtype == "float16" and device.type != "cuda":
        pytest.skip("fp16 GEMM: only measured on CUDA (no model here runs in fp16 on CPU)")
    harness.skip_unless_native_bf16(device, dtype)
    p = profile(request.config)
    m = p.ceiling_gemm
    g = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(m, m, generator=g, device=device).to(getattr(torch, dtype)) for _ in range(2))
    c = torch.empty_like(a)
    case = harness.Case(
        run=lambda: torch.mm(a, b, out=c),
        warmup=lambda: torch.mm(a, b, out=c),
        extra_info={
            "suite": "ceiling",
            "method": f"gemm_{dtype}",
            "mode": "gemm",
            "shape": f"{m}^3 {dtype}",
            "dtype": dtype,
            "flops": 2 * m**3,
            "flops_rule": "2 M^3",
            "phase": phase,
        },
    )
    harness.measure(benchmark, case, p.ceiling_rounds, device)
