"""The body shared by the logits and linear suites: warm up (with a correctness check), time, record."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch

from bench import harness
from bench.harness import skip_reason

_inputs: dict = {}


def cached_inputs(key, make: Callable):
    """Inputs for ``key``, kept for the next mode of the same (method, shape); one set in memory."""
    if _inputs.get("key") != key:
        _inputs.clear()
        _inputs.update(key=key, x=make())
    return _inputs["x"]


def bench_method(
    benchmark, method, mode: str, shape, x, small: Callable, check: Callable, info: dict, device, floor=None
):
    """Time ``method`` in ``mode`` on inputs ``x`` and record memory, the check and the fwd/bwd split.

    Args:
        method: a logits_methods.Method or linear_methods.Method.
        mode: "loss" (forward + backward) or "logprobs" (forward only, no grad).
        shape: its ``rounds``, ``full_warmup``, ``n`` and size decide the warm-up.
        x: the inputs; ``x.leaves()`` are the tensors that receive gradients.
        small: () -> small inputs of the same vocabulary and dtype, for the eager warm-up and check.
        check: (method, mode, inputs) -> dict of errors vs the float64 reference (raises if too large).
        info: the record's description (suite, shape, bytes or flops, ...).
        floor: a method computing only the floor's work (the GEMM floor), timed in rounds alternating
            with ``method``'s (``harness.measure_paired``); None: ``method`` alone.
    """
    reason = skip_reason(method, device)
    if reason is not None:
        pytest.skip(reason)
    if method.compiled:
        torch._dynamo.reset()  # compile for this shape, whatever an earlier test of this process compiled
    splits: list[tuple[float, float]] = []
    leaves = x.leaves()

    def setup():
        for leaf in leaves:
            leaf.grad = None

    if mode == "logprobs":

        def run():
            with torch.no_grad():
                return method.logprobs(x)
    else:

        def run():
            t0 = _now(device)
            loss = method.loss(x)
            t1 = _now(device)
            if loss is not None:  # the GEMM floor formed its gradients already
                loss.backward()
            splits.append((t1 - t0, _now(device) - t1))

    checked: dict = {}

    def warmup():
        if not method.compiled:  # a small eager call: imports and lazy initialisation, and the check
            checked.update(check(method, mode, small()))
        elif shape.n * getattr(shape, "v", 0) <= 1 << 22:  # compiled and small: check this shape itself
            checked.update(check(method, mode, x))
        if method.compiled or shape.full_warmup:  # compilation specialises to the shape
            run()
        splits.clear()

    grad_bytes = 0 if mode == "logprobs" else sum(leaf.numel() * leaf.element_size() for leaf in leaves)
    case = harness.Case(run=run, setup=setup, warmup=warmup, grad_bytes=grad_bytes, extra_info=info)
    try:
        if floor is None:
            harness.measure(benchmark, case, shape.rounds, device)
        else:
            floor_case = _floor_case(floor, mode, shape, x, small, setup, grad_bytes)
            paired = getattr(shape, "paired_rounds", None)
            rounds = shape.rounds if paired is None else paired[0 if mode == "logprobs" else 1]
            harness.measure_paired(benchmark, case, floor_case, rounds, device)
    except torch.OutOfMemoryError as err:  # e.g. naive logits of a 262144-word vocabulary on a GPU
        pytest.skip(f"{method.label}: out of memory at {shape.id} ({str(err).splitlines()[0]})")
    benchmark.extra_info.update({f"check_{k}": v for k, v in checked.items()})
    benchmark.extra_info["checked"] = bool(checked)
    if splits:
        benchmark.extra_info["fwd_s"] = _median([s[0] for s in splits])
        benchmark.extra_info["bwd_s"] = _median([s[1] for s in splits])


def _floor_case(floor, mode: str, shape, x, small: Callable, setup: Callable, grad_bytes: int) -> harness.Case:
    """The floor's calls on the same inputs (it computes no loss: its gradients are formed directly)."""

    def run():
        if mode == "logprobs":
            with torch.no_grad():
                return floor.logprobs(x)
        return floor.loss(x)

    def warmup():
        (floor.logprobs if mode == "logprobs" else floor.loss)(small())
        if shape.full_warmup:
            run()

    info = {"method": floor.name, "label": floor.label, "is_floor": True}
    return harness.Case(run=run, setup=setup, warmup=warmup, grad_bytes=grad_bytes, extra_info=info)


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def _now(device) -> float:
    harness.synchronize(device)
    return time.perf_counter()
