"""The five sections of ``bench.gpu_check``, each run in its own process by ``python -m bench.gpu_check
--section NAME`` (the parent starts it, time-boxes it and merges what it saved).

Each section fills ``ctx.state`` and calls ``ctx.save()`` whenever it has a result, so what it found
survives a crash or the parent's kill at the end of its time box. It sets ``status`` to "ok", "failed"
or "skipped" with a ``reason``; an exception is recorded as a failure by the caller.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import gpu_kernels, gpu_report, harness
from bench.shapes import PROFILES, TrainerShape

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy", "datasets", "peft",
            "accelerate", "pandas", "pyarrow", "pytest")  # fmt: skip
# every test marked as running a Triton kernel or a GPU: on the GPU with real kernels; in the dry run the same
# selection, Triton under the interpreter and the gpu tests skipped (pytest imports every test module either way)
GPU_TESTS = ("-m", "triton or gpu", "tests")


@dataclass
class Context:
    device: torch.device
    dry_run: bool
    quick: bool
    deadline: float  # time.time() by which the section should be done
    path: Path  # where ``save`` writes ``state``
    state: dict

    def save(self) -> None:
        gpu_report.write_atomic(self.path, json.dumps(self.state, indent=1, default=str))

    def left(self) -> float:
        return self.deadline - time.time()


# ---------------------------------------------------------------------------- 1. environment
def environment(ctx: Context) -> None:
    """The machine and versions, then the ceilings: a large device-to-device copy and GEMM rates."""
    ctx.state["machine"] = {**harness.machine_info(ctx.device), **_gpu_info(ctx.device)}
    ctx.state["versions"] = {name: _version(name) for name in PACKAGES}
    ctx.save()
    profile = PROFILES["smoke" if ctx.dry_run else "gpu"]
    ceilings = {"copy": _copy_rate(ctx.device, profile.ceiling_copy_mib, profile.ceiling_rounds)}
    for dtype in ("bfloat16", "float32"):
        reason = harness.no_native_bf16_reason(ctx.device, dtype)
        skipped = {"status": "skipped", "reason": reason}
        ceilings[f"gemm_{dtype}"] = skipped if reason else _gemm_rate(ctx.device, dtype, profile.ceiling_gemm,
                                                                      profile.ceiling_rounds)  # fmt: skip
    ctx.state["ceilings"] = ceilings
    measured = [key for key, c in ceilings.items() if "median" in c]
    ctx.state.update(status="ok", reason=f"measured: {', '.join(measured)}")


def _copy_rate(device: torch.device, mib: int, rounds: int) -> dict:
    """dst.copy_(src) of ``mib`` MiB of random fp32: bytes = read + write."""
    src = torch.randn(mib * 2**20 // 4, generator=torch.Generator(device).manual_seed(0), device=device)
    dst = torch.empty_like(src)
    times = harness.time_calls(lambda: dst.copy_(src), device, rounds, warmup=2)
    return _rate(2 * src.numel() * 4, times, 1e9, "GB/s", f"{mib} MiB fp32, read + write")


def _gemm_rate(device: torch.device, dtype: str, m: int, rounds: int) -> dict:
    """torch.mm of two m x m random matrices in ``dtype`` (METHOD: never time on zeros): 2 m^3 flops."""
    g = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(m, m, generator=g, device=device).to(getattr(torch, dtype)) for _ in range(2))
    c = torch.empty_like(a)
    times = harness.time_calls(lambda: torch.mm(a, b, out=c), device, rounds, warmup=2)
    return _rate(2 * m**3, times, 1e12, "TFLOP/s", f"{m}^3 {dtype}, random data")


def _rate(work: float, times: list[float], unit: float, name: str, what: str) -> dict:
    return {"median": work / statistics.median(times) / unit, "best": work / min(times) / unit, "unit": name,
            "what": what, "rounds": len(times)}  # fmt: skip


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"gpu": None}
    props = torch.cuda.get_device_properties(device)
    info = {"gpu": props.name, "sm_count": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda_runtime": torch.version.cuda,
            "l2_mib": getattr(props, "L2_cache_size", 0) / 2**20, "driver": None}  # fmt: skip
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    return info


# ---------------------------------------------------------------------------- 2. tests
def tests(ctx: Context) -> None:
    """The public ops at real shapes against float64, then the project's Triton/GPU tests under pytest."""
    ops = ctx.state.setdefault("ops", [])
    for case in gpu_kernels.check_plan(ctx.dry_run, ctx.quick):
        try:
            ops.append(gpu_kernels.check_ops(case, ctx.device))
        except Exception as err:  # one case's failure is recorded; the others still run
            ops.append({"case": case.id, "ok": False, "error": f"{type(err).__name__}: {err}"[:1000]})
        _free(ctx.device)
        ctx.save()
    ctx.state["pytest"] = run_pytest(ctx)
    problems = [f"{op['case']}: {op.get('error') or op['errors']}" for op in ops if not op["ok"]]
    pytest_run = ctx.state["pytest"]
    if pytest_run["status"] == "failed":
        problems.append(f"pytest: {pytest_run['reason']}")
    ctx.state["status"] = "failed" if problems else "ok"
    ctx.state["reason"] = (
        "; ".join(problems)[:2000] if problems else f"every op check passed; pytest: {pytest_run['reason']}"
    )


def run_pytest(ctx: Context) -> dict:
    """pytest in its own process, bounded by what is left of the section's time; outcomes read from its
    verbose output, so a run cut short still reports the tests it finished."""
    selection = list(GPU_TESTS)
    if importlib.util.find_spec("pytest") is None:
        return {"selection": " ".join(selection), "status": "skipped", "reason": "pytest is not installed here"}
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--tb=short", *selection]
    timeout = max(ctx.left() - 5, 1)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group this call started
            proc.wait()
            code = "timeout"
        log.seek(0)
        output = log.read()
    print(output, flush=True)  # into the run's log
    outcomes = re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", output, flags=re.M)
    counts = {kind: sum(1 for _, k in outcomes if k == kind) for kind in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    failed = [name for name, kind in outcomes if kind in ("FAILED", "ERROR")]
    result = {"selection": " ".join(selection), "seconds": round(time.time() - t0, 1), "exit": code,
              "counts": {k.lower(): v for k, v in counts.items()}, "failed": failed[:50]}  # fmt: skip
    if code == 0:
        return {**result, "status": "ok", "reason": f"{counts['PASSED']} passed, {counts['SKIPPED']} skipped"}
    if code == "timeout":
        reason = f"stopped after {timeout:.0f} s (the section's time box), {len(outcomes)} tests done"
    elif code == 5:
        reason = "no test selected"
    else:
        reason = f"exit code {code}: {len(failed)} failed ({', '.join(failed[:5])})"
    return {**result, "status": "failed", "reason": reason, "output_tail": output[-3000:]}


# ---------------------------------------------------------------------------- 3. kernels
def kernels(ctx: Context) -> None:
    """Every (shape, method, mode) of the timing plan; a row that fails is recorded and the next runs.
    The compiled peers (the first shape of each family only) run last: their compilation is the slowest
    part, so a time box that runs out cuts them before any uncompiled row."""
    rows = ctx.state.setdefault("rows", [])
    plan = gpu_kernels.timing_plan(ctx.dry_run, ctx.quick)
    firsts = list({case.family: case for case in reversed(plan)}.values())  # the first case of each family
    for case in plan:
        methods = gpu_kernels.methods_for(case.family)
        _time_rows(ctx, rows, case, [m for m in methods if not (m.compiled and case in firsts)], case in firsts)
    for case in firsts:
        _time_rows(ctx, rows, case, [m for m in gpu_kernels.methods_for(case.family) if m.compiled], True)
    _kernels_status(ctx, rows)


def _time_rows(ctx: Context, rows: list[dict], case, methods: list, first: bool) -> None:
    """One case's rows for ``methods`` (both modes each), saved one by one; its inputs made once, if needed."""
    # dry run: one call after the check's call on the same shape (nothing to compile: no warm-up)
    rounds, warmup = (1, 0) if ctx.dry_run else ((10, 2) if case.family == "logits" else (5, 1))
    x = None
    for method in methods:
        for mode in (m for m in gpu_kernels.MODES if getattr(method, m) is not None):
            row = {"case": case.id, "family": case.family, "method": method.name, "label": method.label,
                   "mode": mode, "dtype": case.dtype, "n": case.n, "v": case.v, "h": case.h}  # fmt: skip
            reason = gpu_kernels.not_run_reason(method, case, ctx.device, ctx.dry_run, first)
            if reason is None and ctx.left() <= 0:
                reason = "not reached: the section's time box ran out"
            if reason is not None:
                rows.append({**row, "status": "skipped", "reason": reason})
                continue
            try:
                x = gpu_kernels.make_inputs(case, ctx.device) if x is None else x
                timed = gpu_kernels.time_case(method, mode, case, x, ctx.device, rounds, warmup)
                rows.append({**row, "status": "ok", **timed})
            except Exception as err:  # out of memory, a peer's API change, a failed check: recorded
                rows.append({**row, "status": "failed", "reason": f"{type(err).__name__}: {err}"[:1000]})
            ctx.save()
    del x
    _free(ctx.device)


def _kernels_status(ctx: Context, rows: list[dict]) -> None:
    failed = [f"{r['method']} {r['mode']} {r['case']}" for r in rows if r["status"] == "failed"]
    cut = sum(r.get("reason", "").startswith("not reached") for r in rows)
    timed = sum(r["status"] == "ok" for r in rows)
    ctx.state["status"] = "failed" if failed or cut else "ok"
    reason = f"{timed} rows timed"
    reason += f"; {cut} rows not reached in the time box" if cut else ""
    reason += f"; failed: {', '.join(failed[:10])}" if failed else ""
    ctx.state["reason"] = reason


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- 4. trainer
def trainer_shape(dry_run: bool) -> TrainerShape:
    if dry_run:
        return TrainerShape(2, 4, 8, 8, warmup=0, rounds=1, model="tiny-qwen2", dtype="float32")
    return TrainerShape(16, 8, 256, 32, warmup=1, rounds=2, model="qwen2.5-0.5b", dtype="bfloat16")


def trainer(ctx: Context) -> None:
    """grpo_fast's GRPOTrainer step, and TRL's on the same model and batch when trl imports, steps alternating."""
    from bench.trainer_steps import run_paired, trl_unusable

    shape = trainer_shape(ctx.dry_run)
    trl_reason = trl_unusable()  # TRL is skipped alone: grpo_fast's steps are timed whatever TRL's state
    trainers = ("grpo_fast",) if trl_reason else ("grpo_fast", "trl")
    ctx.state.update(shape=shape.__dict__, trainers=list(trainers), steps={name: [] for name in trainers})
    if trl_reason:
        ctx.state["trl"] = (f"skipped: TRL's GRPOTrainer does not import here ({trl_reason}); grpo_fast alone "
                            "(carry trl and what it needs: bench/gpu_wheels.sh DIR, then --wheels DIR)")  # fmt: skip

    def on_step(name: str, i: int, report: dict) -> None:
        ctx.state["steps"][name].append({"warmup": i < shape.warmup, **report})
        ctx.save()

    result = run_paired(shape, False, trainers, on_step=on_step)
    ctx.state["results"] = {name: _trainer_summary(shape, r) for name, r in result.items()}
    ctx.state["status"] = "ok"
    ctx.state["reason"] = f"{shape.rounds} timed steps of {', '.join(trainers)} after {shape.warmup} warm-up"
    ctx.state["reason"] += "; TRL skipped: its trainer does not import" if trl_reason else ""


def _trainer_summary(shape: TrainerShape, r: dict) -> dict:
    step = statistics.median(r["times"])
    sampling = None if None in r["sampling_times"] else statistics.median(r["sampling_times"])
    slots = shape.prompts * shape.group * shape.max_new  # every completion at full length (see docs/cuda.md)
    return {"step_s": step, "sampling_s": sampling, "update_s": None if sampling is None else step - sampling,
            "tokens_per_s": slots / step, "peak_extra_mib": r["peak_extra_bytes"] / 2**20,
            "memory_kind": r["memory_kind"], "times": r["times"], "warmup_s": r["warmup_s"]}  # fmt: skip


def rollout(ctx: Context) -> None:
    """Sampling tokens/s: eager steps, the graph-replayed (CPU: compiled) step, model.generate."""
    from bench import gpu_rollout

    gpu_rollout.run(ctx)


SECTIONS = {"environment": environment, "tests": tests, "kernels": kernels, "rollout": rollout,
            "trainer": trainer}  # fmt: skip
