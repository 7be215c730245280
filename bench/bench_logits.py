"""Benchmark: GRPO from logits, grpo_fast vs plain torch, torch.compile, TRL and Liger, in one run.

    python -m pytest bench/bench_logits.py --benchmark-only [--bench-profile cpu]

Per (method, shape): ``logprobs`` (per-token log-probs + entropy, forward only; floor 1 read of the
N x V logits) and ``loss`` (GRPO loss forward + backward; floor 2 reads + 1 write). Every record
carries its byte count; bench.report divides it by the median time and by the copy bandwidth
measured in the same run. Expected on the 2-core EPYC (fp32, V = 151936): grpo_fast's peak memory
above inputs + gradient is a few MB (one block of rows), the naive path's several N x V fp32 tensors.
"""

from __future__ import annotations

import torch

from bench import harness
from bench.checks import check_logits
from bench.conftest import profile, selected
from bench.logits_methods import make_inputs, methods
from bench.suite import bench_method, cached_inputs, skip_reason

MODES = ("logprobs", "loss")


def pytest_generate_tests(metafunc):
    if "logits_case" not in metafunc.fixturenames:
        return
    cases, ids = [], []
    for shape in profile(metafunc.config).logits:
        for method in methods(harness.bench_device()):
            for mode in MODES:
                wanted = shape.methods is None or method.name in shape.methods
                if wanted and selected(metafunc.config, method.name) and getattr(method, mode) is not None:
                    cases.append((method.name, shape, mode))
                    ids.append(f"{method.name}-{shape.id}-{mode}")
    metafunc.parametrize("logits_case", cases, ids=ids)


def test_logits(benchmark, logits_case, device):
    name, shape, mode = logits_case
    method = next(m for m in methods(device) if m.name == name)
    dtype = getattr(torch, shape.dtype)
    x = cached_inputs(shape, lambda: make_inputs(shape.b, shape.t, shape.v, dtype, device))
    if method.prepare is not None and skip_reason(method, device) is None:
        x = method.prepare(x)

    def small():
        s = make_inputs(2, 16, shape.v, dtype, device, seed=1)
        return method.prepare(s) if method.prepare is not None else s

    info = {
        "suite": "logits",
        "method": method.name,
        "label": method.label,
        "mode": mode,
        "shape": shape.id,
        "b": shape.b,
        "t": shape.t,
        "v": shape.v,
        "n": shape.n,
        "dtype": shape.dtype,
        "bytes": (1 if mode == "logprobs" else 3) * shape.n * shape.v * dtype.itemsize,
        "bytes_rule": "1 read of N x V" if mode == "logprobs" else "2 reads + 1 write of N x V",
        "note": method.note,
    }
    bench_method(benchmark, method, mode, shape, x, small, check_logits, info, device)
