"""One command that turns a short slot on one GPU into evidence: is every kernel right on this device, how
close to the measured hardware limits are they, how does the trainer compare with TRL's.

    python -m bench.gpu_check --out DIR [--budget-s 480] [--quick] [--wheels WHEELS_DIR]
    python -m bench.gpu_check --dry-run --out DIR     # the same code paths on CPU at tiny shapes (~3-4 min)

Sections, in order, each in its own process with its own time box (a share of what is left of
``--budget-s``; time a section does not use goes to the ones after it):
  environment  GPU, SM count, driver, versions; measured copy bandwidth and bf16 / fp32 GEMM rates
  tests        the public ops at real shapes against the float64 reference (bench.gpu_kernels), then
               ``pytest -m "triton or gpu" tests`` (the dry run: the same, Triton under the interpreter)
  kernels      log-probs and the GRPO loss from logits and from hidden states at Qwen2.5 / Llama-3 shapes,
               bf16 and fp32, against plain torch, torch.compile, TRL, Liger and Cut Cross-Entropy where
               they import: time, GB/s or TFLOP/s and % of the measured ceiling, peak memory
  rollout      sampling tokens/s on a Qwen2.5-0.5B-shaped model (random weights): grpo_fast's eager steps,
               its fixed-shape step replayed as a CUDA graph (the dry run: compiled on CPU), model.generate
  trainer      GRPO steps on a Qwen2.5-0.5B-shaped model (random weights), grpo_fast and TRL alternating
A section that fails, crashes or runs out of time is recorded with its reason and the next one runs.
``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` are rewritten whenever a section saves a result, and
``DIR/gpu_check.log`` holds the sections' output. ``GPU_CHECK_FAIL=kernels,...`` makes the named sections
raise at their start, ``GPU_CHECK_STALL=...`` hang after saving a partial result: to check that the others
still complete, and that a section is stopped at the end of its time box with what it saved kept.
``--wheels DIR`` installs each wheel in DIR on its own (``bench/gpu_wheels.sh`` prepares them) into a temporary
folder (inside sys.prefix where writable: see ``wheel_site``; removed at the end) put on the sections'
PYTHONPATH, without network and without installing into the environment; a wheel that does not install is
named and makes the exit status 1. A section that cannot import an optional package (``OPTIONAL``) is
skipped with the reason, not failed. ``--budget-s`` counts from the start of this process.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import gpu_report

ROOT = Path(__file__).resolve().parent.parent
# each section's share of the time left when it starts, relative to the sections after it
WEIGHTS = {"environment": 0.05, "tests": 0.23, "kernels": 0.38, "rollout": 0.1, "trainer": 0.24}
FAIL_ENV = "GPU_CHECK_FAIL"  # sections that raise at their start
STALL_ENV = "GPU_CHECK_STALL"  # sections that save a partial result, then hang (to check the time box)
MIN_SECTION_S = 5.0  # below this a section is not started
END_MARGIN_S = 3.0  # the sections' time ends this long before --budget-s: the parent's last writes and exit
# packages a section may need that the GPU image may lack: a section that cannot import one is skipped, not failed
OPTIONAL = {"pytest", "trl", "accelerate", "datasets", "pandas", "pyarrow", "liger_kernel", "cut_cross_entropy",
            "peft", "xxhash", "dill", "multiprocess"}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md, gpu_check.log")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock bound of the whole run (default 480)")
    p.add_argument("--quick", action="store_true", help="one shape per op in the kernels section")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton under the interpreter")
    p.add_argument("--wheels", type=Path, help="a folder of wheels to install without network (bench/gpu_wheels.sh)")
    p.add_argument("--sections", default=",".join(WEIGHTS), help=f"comma-separated subset of {','.join(WEIGHTS)}")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    p.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    unknown = set(args.sections.split(",")) - set(WEIGHTS)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}; choose from {','.join(WEIGHTS)}")
    if args.wheels is not None and not args.wheels.is_dir():
        p.error(f"--wheels must be a folder of .whl files, got {args.wheels}")
    return args


# ---------------------------------------------------------------------------- one section (child process)
def run_section(args: argparse.Namespace) -> int:
    state = {"status": "running"}
    try:
        if args.section in os.environ.get(FAIL_ENV, "").split(","):
            raise RuntimeError(f"forced failure ({FAIL_ENV}={os.environ[FAIL_ENV]})")
        if args.section in os.environ.get(STALL_ENV, "").split(","):
            state["partial"] = f"saved before a forced stall ({STALL_ENV})"
            gpu_report.write_atomic(args.state, json.dumps(state))
            time.sleep(3600)
        import torch

        from bench import gpu_sections

        device = torch.device("cpu" if args.dry_run else "cuda")
        ctx = gpu_sections.Context(device, args.dry_run, args.quick, args.deadline, args.state, state)
        gpu_sections.SECTIONS[args.section](ctx)
    except Exception as err:
        traceback.print_exc()
        missing = err.name if isinstance(err, ModuleNotFoundError) else None
        if missing and missing.split(".")[0] in OPTIONAL:
            state.update(status="skipped", reason=f"needs the {missing} package, which does not import here ({err})")
        else:
            state.update(status="failed", reason=f"{type(err).__name__}: {err}"[:2000],
                         traceback=traceback.format_exc()[-4000:])  # fmt: skip
    if state["status"] == "running":
        state["status"] = "ok"
    gpu_report.write_atomic(args.state, json.dumps(state, indent=1, default=str))
    return 0 if state["status"] != "failed" else 1


# ---------------------------------------------------------------------------- the run (parent process)
class Run:
    """The combined record: written to DIR/gpu_check.json and .md after every change."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.out = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = process_start()  # --budget-s counts from here: imports and CUDA set-up are inside it
        self.deadline = self.start + args.budget_s
        self.data = {
            "command": " ".join(["python -m bench.gpu_check", *argv]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.start)),
            "dry_run": args.dry_run,
            "quick": args.quick,
            "budget_s": args.budget_s,
            **{name: {"status": "pending"} for name in WEIGHTS},
        }
        for name in set(WEIGHTS) - set(args.sections.split(",")):
            self.data[name] = {"status": "skipped", "reason": "not in --sections"}

    def write(self) -> None:
        self.data["wall_s"] = round(time.time() - self.start, 1)
        gpu_report.add_fractions(self.data)
        gpu_report.write_atomic(self.out / "gpu_check.json", json.dumps(self.data, indent=1, default=str) + "\n")
        gpu_report.write_atomic(self.out / "gpu_check.md", gpu_report.render(self.data) + "\n")


def process_start() -> float:
    """The wall-clock time this process started (Linux: from /proc), else now."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        since_boot = float(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5): starttime, in ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - uptime + since_boot


def section_env(args: argparse.Namespace, site: str | None) -> dict:
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([site, str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path even on a GPU machine
        env["TRITON_INTERPRET"] = "1"  # Triton kernels on CPU tensors (read when triton is first imported)
        env["GRPO_FAST_EAGER"] = "1"  # the torch backend's CPU passes uncompiled: no inductor compile time
    return env


def run_one(run: Run, args: argparse.Namespace, name: str, seconds: float, env: dict, log, tmp: Path) -> None:
    """Start the section's process, merge its saved state while it runs, stop it at the end of its time box."""
    state = tmp / f"{name}.json"
    margin = min(15.0, 0.1 * seconds)  # the section stops starting work this long before it is killed
    cmd = [sys.executable, "-m", "bench.gpu_check", "--section", name, "--state", str(state),
           "--deadline", str(time.time() + seconds - margin), "--out", str(args.out)]  # fmt: skip
    cmd += ["--dry-run"] * args.dry_run + ["--quick"] * args.quick
    print(f"== {name}: time box {seconds:.0f} s", file=log, flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    run.data[name] = {"status": "running", "time_box_s": round(seconds, 1)}
    run.write()
    try:
        _follow(run, name, proc, state, seconds)
    finally:  # also when this process is interrupted: the section must not outlive the run
        timed_out = proc.poll() is None
        if timed_out:
            os.killpg(proc.pid, signal.SIGKILL)  # the section and every process it started
        proc.wait()
    _merge(run, name, state, seconds)
    record = run.data[name]
    if timed_out:
        record.update(status="failed", reason=f"ran past its time box of {seconds:.0f} s and was stopped; "
                      f"partial results kept. {record.get('reason', '')}".strip())  # fmt: skip
    elif record["status"] == "running":  # died without saving its end (a crash in native code)
        record.update(status="failed", reason=f"the section's process ended with exit code {proc.returncode}")
    record["seconds"] = round(time.time() - t0, 1)
    print(f"== {name}: {record['status']} in {record['seconds']} s: {record.get('reason', '')}", file=log, flush=True)
    run.write()


def _follow(run: Run, name: str, proc: subprocess.Popen, state: Path, seconds: float) -> None:
    """Until the section ends or its time box is over, merge what it saves as soon as it saves it."""
    t0, seen = time.time(), 0.0
    while proc.poll() is None and time.time() - t0 < seconds:
        time.sleep(0.5)
        if state.exists() and state.stat().st_mtime != seen:
            seen = state.stat().st_mtime
            _merge(run, name, state, seconds)


def _merge(run: Run, name: str, state: Path, seconds: float) -> None:
    try:
        saved = json.loads(state.read_text())
    except (OSError, json.JSONDecodeError):
        return
    run.data[name] = {**saved, "time_box_s": round(seconds, 1)}
    run.write()


def wheel_site() -> tempfile.TemporaryDirectory:
    """A temporary folder for the carried wheels, inside ``sys.prefix`` where it can be: dill, which datasets
    fingerprints with, pickles the classes of modules outside the prefixes by value, and fails on pyarrow's
    (``MonthDayNano``), so TRL's and grpo_fast's ``Dataset.from_list`` would fail from a folder under /tmp."""
    try:
        return tempfile.TemporaryDirectory(prefix=".gpu_check_wheels_", dir=sys.prefix)
    except OSError:  # a prefix this user cannot write to
        return tempfile.TemporaryDirectory(prefix="gpu_check_wheels_")


def install_wheels(folder: Path, log, site: str) -> tuple[str | None, dict]:
    """pip install each wheel of ``folder`` into ``site`` on its own, no index, no dependencies resolved: a wheel
    that does not install (another Python's, a broken file) is reported and the others still are."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return None, {"status": "failed", "reason": f"no .whl files in {folder}"}
    installed, failed = [], {}
    for wheel in wheels:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", site, str(wheel)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        log.write(f"== install {wheel.name}: exit code {out.returncode}\n{out.stdout}{out.stderr}")
        if out.returncode == 0:
            installed.append(wheel.name)
        else:
            said = (out.stderr or out.stdout).strip().splitlines() or [f"pip's exit code {out.returncode}"]
            failed[wheel.name] = said[-1][-500:]
    record = {"status": "failed" if failed else "ok", "installed": installed, "target": site}
    if failed:
        record.update(failed=failed, reason=f"{len(failed)} of {len(wheels)} wheels did not install: "
                      + "; ".join(f"{name}: {why}" for name, why in failed.items()))  # fmt: skip
    return (site if installed else None), record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.section is not None:
        return run_section(args)
    if not args.dry_run and not has_cuda():
        raise SystemExit("python -m bench.gpu_check needs a CUDA device; --dry-run runs it on CPU at tiny shapes")
    if importlib.util.find_spec("grpo_fast.kernels") is None:  # the top-level kernels/ folder, mapped at install
        raise SystemExit(
            "grpo_fast is not installed, so grpo_fast.kernels (the kernels/ folder) does not import: "
            "pip install -e . (without network: pip install --no-deps --no-build-isolation -e .)"
        )
    run = Run(args, argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill from outside still stops the section
    wheels_dir = wheel_site() if args.wheels is not None else contextlib.nullcontext()
    with open(args.out / "gpu_check.log", "a") as log, tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp,\
            wheels_dir as site_dir:  # fmt: skip
        site = None
        if args.wheels is not None:
            site, run.data["wheels"] = install_wheels(args.wheels, log, site_dir)
        env = section_env(args, site)
        todo = [name for name in WEIGHTS if name in args.sections.split(",")]
        for i, name in enumerate(todo):
            left = run.deadline - END_MARGIN_S - time.time()
            seconds = left * WEIGHTS[name] / sum(WEIGHTS[n] for n in todo[i:])
            if seconds < MIN_SECTION_S:
                run.data[name] = {"status": "skipped", "reason": f"no time left in --budget-s {args.budget_s:g}"}
                continue
            run_one(run, args, name, seconds, env, log, Path(tmp))
    run.write()
    statuses = {name: run.data[name]["status"] for name in WEIGHTS}
    if "wheels" in run.data:  # a wheel that did not install fails the run, whatever the sections did without it
        statuses["wheels"] = run.data["wheels"]["status"]
    print(f"wrote {args.out}/gpu_check.json and gpu_check.md in {run.data['wall_s']:.0f} s: {statuses}")
    return 1 if "failed" in statuses.values() else 0


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
