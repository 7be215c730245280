"""Measurement machinery shared by the bench suites: timing, peak memory, machine description.

Timing goes through pytest-benchmark's ``benchmark.pedantic``: warm-up calls (and torch.compile
compilation) happen before it and are reported apart; on CUDA the timed callable synchronises the
device before it returns, so a round is the GPU's time, not the launch time.

Peak memory is measured in the process that runs the benchmark, above what exists before the timed
rounds (the inputs), minus the gradients every method must end up holding:
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
- CPU: the RSS high-water mark (VmHWM). ``ru_maxrss`` never goes down, so ``bench.run`` starts a fresh
  process per (method, shape); inside it the mark is reset between modes through
  ``/proc/self/clear_refs`` (Linux), after free heap pages went back to the OS (``malloc_trim``), so
  memory freed by an earlier mode cannot hide a later mode's allocations.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


# ---------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector extensions that decide CPU GEMM and softmax speed (from /proc/cpuinfo)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in wanted if flag in flags]


def no_native_bf16_reason(device: torch.device, dtype) -> str | None:
    """Why a bf16 GEMM case is not worth running: a CPU without bf16 matrix instructions, where torch
    emulates bf16 GEMMs at well under 1 GFLOP/s (0.27 measured on a 2-core EPYC with AVX2 only)."""
    bf16 = str(dtype).removeprefix("torch.") in ("bfloat16", "bf16")
    if bf16 and device.type == "cpu" and not {"avx512_bf16", "amx_bf16"} & set(cpu_flags()):
        return f"bf16: this CPU has no bf16 matrix instructions (flags: {', '.join(cpu_flags()) or 'none'})"
    return None


def skip_unless_native_bf16(device: torch.device, dtype) -> None:
    """pytest.skip a bf16 GEMM case for ``no_native_bf16_reason``."""
    import pytest

    reason = no_native_bf16_reason(device, dtype)
    if reason is not None:
        pytest.skip(reason)


def machine_info(device: torch.device) -> dict:
    """What the report labels every table and plot with."""
    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": loadavg(),
        "mem_total_gib": _mem_total_gib(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        return round(kib / 2**20, 1)
    except (OSError, AttributeError):
        return None


def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- peak memory
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


def _malloc_trim() -> None:
    """Give free heap pages back to the OS (glibc), so they are not silently reused by the next mode."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def can_reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak bytes allocated between ``start()`` and ``stop()``, above what was allocated at ``start()``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "RSS high-water mark (VmHWM)"
        self.reset_ok = True
        self.base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        _malloc_trim()
        self.reset_ok = can_reset_rss_peak()  # False: the mark is the process' so far (fresh process per case)
        self.base = _status_kib("VmRSS") * 1024

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _status_kib("VmHWM") * 1024 - self.base


# ---------------------------------------------------------------------------- one measurement
@dataclass
class Case:
    """One benchmark: ``run()`` is the timed call; ``setup()`` runs untimed before each call."""

    run: Callable[[], object]
    setup: Callable[[], None] = lambda: None
    warmup: Callable[[], None] | None = None  # untimed calls before the rounds (compilation included)
    grad_bytes: int = 0  # gradients the call must leave behind, in the parameters' dtypes
    extra_info: dict = field(default_factory=dict)


def measure(benchmark, case: Case, rounds: int, device: torch.device) -> dict:
    """Warm up, then time ``rounds`` calls with pytest-benchmark and record peak memory.

    Returns the extra_info written into the benchmark's JSON record.
    """
    t0 = time.perf_counter()
    if case.warmup is not None:
        case.setup()
        case.warmup()
        synchronize(device)
    warmup_s = time.perf_counter() - t0
    case.setup()  # e.g. gradients of the warm-up set to None: not part of the baseline
    peak = PeakMemory(device)
    peak.start()

    def timed():
        out = case.run()
        synchronize(device)  # inside the timed call: the GPU's time, not the launch time
        return out

    def setup():
        case.setup()
        synchronize(device)

    benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    used = peak.stop()
    info = {
        **case.extra_info,
        "warmup_s": round(warmup_s, 4),
        "peak_bytes": used,
        "peak_extra_bytes": max(used - case.grad_bytes, 0),
        "grad_bytes": case.grad_bytes,
        "memory_kind": peak.kind,
        "peak_reset": peak.reset_ok,
        "threads": torch.get_num_threads(),
        "loadavg": loadavg(),
    }
    benchmark.extra_info.update(info)
    return info


def measure_paired(benchmark, case: Case, floor: Case, rounds: int, device: torch.device) -> dict:
    """``measure`` for a method and its floor in alternating rounds (floor, method, floor, method, ...).

    Measured in separate processes a minute apart, the two drifted apart with the machine (10-20% per
    hour here); alternating, each method round has a floor round seconds before it. Every call gets its
    own peak-memory window (base: the RSS just before it). The method's rounds are the benchmark's
    record; the floor's go into its extra_info under "floor".
    """
    t0 = time.perf_counter()
    for c in (floor, case):
        if c.warmup is not None:
            c.setup()
            c.warmup()
            synchronize(device)
    warmup_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {"floor": [], "method": []}
    peaks = {"floor": 0, "method": 0}
    for _ in range(rounds):
        for key, c in (("floor", floor), ("method", case)):
            c.setup()
            synchronize(device)
            peak = PeakMemory(device)
            peak.start()
            start = time.perf_counter()
            c.run()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
            peaks[key] = max(peaks[key], peak.stop())
    case.setup()  # the method's last gradients go; they are not part of anything measured after
    record_external(benchmark, times["method"])
    info = {
        **case.extra_info,
        "warmup_s": round(warmup_s, 4),
        "peak_bytes": peaks["method"],
        "peak_extra_bytes": max(peaks["method"] - case.grad_bytes, 0),
        "grad_bytes": case.grad_bytes,
        "memory_kind": PeakMemory(device).kind + ", per call",
        "peak_reset": device.type == "cuda" or can_reset_rss_peak(),
        "threads": torch.get_num_threads(),
        "loadavg": loadavg(),
        "floor": {
            **floor.extra_info,
            "times": times["floor"],
            "peak_extra_bytes": max(peaks["floor"] - floor.grad_bytes, 0),
        },
    }
    benchmark.extra_info.update(info)
    return info


def time_calls(run: Callable[[], object], device: torch.device, rounds: int, warmup: int = 1,
               setup: Callable[[], None] = lambda: None) -> list[float]:  # fmt: skip
    """Seconds of each of ``rounds`` calls of ``run`` after ``warmup`` untimed ones, ``setup`` untimed before
    each. On CUDA the time between two events around the call (the device's time, launch gaps included);
    elsewhere the host clock. For scripts outside pytest-benchmark (``bench.gpu_check``)."""
    for _ in range(warmup):
        setup()
        run()
    times = []
    for _ in range(rounds):
        setup()
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return times


def record_external(benchmark, durations: list[float]) -> None:
    """Hand durations timed elsewhere (TRL's training loop, by a callback) to pytest-benchmark.

    pytest-benchmark has no public call for this; ``_make_stats`` is what ``pedantic`` itself uses
    (pytest-benchmark 4-5), so the record is the same as a pedantic run with these rounds.
    """
    stats = benchmark._make_stats(1)
    for d in durations:
        stats.update(d)
    benchmark._mode = "external timings"


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def skip_reason(method, device: torch.device) -> str | None:
    """Why a bench method (logits_methods / linear_methods) cannot run here: it needs CUDA, or its optional
    ``package`` (a module name, e.g. ``trl.trainer.utils``) does not import. None: it can."""
    if method.needs_cuda and device.type != "cuda":
        return f"{method.label}: needs CUDA ({method.note})"
    package = getattr(method, "package", None)
    if package is not None:
        try:
            __import__(package)
        except ImportError as err:
            return f"{method.label}: {package} does not import here ({type(err).__name__}: {err})"
    return None
