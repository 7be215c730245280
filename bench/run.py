"""Run every benchmark suite, one fresh process per (method, shape), then write the tables and plots.

    python -m bench.run --cpu      # the published CPU tables: ~12 min on a 2-core EPYC
    python -m bench.run --gpu      # on a CUDA machine: real-model shapes, Triton backends and GPU peers
    python -m bench.run --smoke    # tiny shapes: the machinery and every method's correctness check, ~2 min
    python -m bench.run --cpu --suites trainer --trainer-scaling   # + both trainers across model sizes

Each (method, shape) runs as its own ``python -m pytest bench/... --benchmark-only`` process, because
the CPU's peak-memory counter (the RSS high-water mark) never goes down within a process; inside it
the modes (log-probs, loss) reset the mark between them. The per-process pytest-benchmark JSON files
are merged into ``bench/results/<profile>.json`` with the run's description (machine, load average,
wall time, what could not run here and why), and ``bench.report`` turns that into
``bench/results/README_tables.md`` and PNG plots. A method that fails or times out is recorded and
the run goes on. Pass ``--suites``/``--methods`` to run a subset (merged into the existing JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# pytest plugins the suites do not use; hypothesis' alone costs ~1.6 s of start-up per process here
_NO_PLUGINS = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio")
SUITES = ("ceilings", "logits", "linear", "trainer")  # in run order: ceilings first, as the machine is now


def collect(suites: list[str], profile: str, methods: str | None, only: str | None) -> dict[str, list[str]]:
    """suite -> node ids under a profile, as pytest itself names them (one collection for all suites)."""
    cmd = [sys.executable, "-m", "pytest", *(f"bench/bench_{s}.py" for s in suites), "--collect-only", "-q"]
    cmd += [*_NO_PLUGINS, "--bench-profile", profile] + (["--bench-methods", methods] if methods else [])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode not in (0, 5):
        raise RuntimeError(f"collecting the bench suites failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    nodes = [line.strip() for line in out.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    nodes = [n for n in nodes if only is None or any(part in n for part in only.split(","))]
    return {s: [n for n in nodes if n.startswith(f"bench/bench_{s}.py::")] for s in suites}


def group(suite: str, nodes: list[str]) -> OrderedDict[str, list[str]]:
    """(method, shape) -> its node ids (one per mode); the ceilings share one process."""
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for node in nodes:
        params = re.search(r"\[(.*)\]$", node)
        if suite == "ceilings":
            key = "ceilings"
        elif suite in ("logits", "linear") and params:
            key = f"{suite}:{params.group(1).rsplit('-', 1)[0]}"  # drop the mode
        else:
            key = f"{suite}:{params.group(1) if params else node}"
        groups.setdefault(key, []).append(node)
    return groups


def not_run_reason(key: str) -> str | None:
    """Why a (method, shape) cannot run on this machine, from the method's own declaration."""
    suite, _, params = key.partition(":")
    if suite not in ("logits", "linear"):
        return None
    from bench import harness, linear_methods, logits_methods
    from bench.suite import skip_reason

    device = harness.bench_device()
    if suite == "linear" and harness.no_native_bf16_reason(device, params.rsplit("_", 1)[-1]):
        return harness.no_native_bf16_reason(device, "bf16")
    registry = logits_methods if suite == "logits" else linear_methods
    name = params.split("-", 1)[0]
    method = next((m for m in registry.methods(device) if m.name == name), None)
    return None if method is None else skip_reason(method, device)


def run_group(nodes: list[str], profile: str, out_json: Path, timeout: float, phase: str) -> tuple[int | str, str]:
    """One fresh pytest process; returns (exit code or "timeout", the tail of its output)."""
    cmd = [sys.executable, "-m", "pytest", *nodes, "--benchmark-only", "--benchmark-json", str(out_json)]
    cmd += ["--bench-phase", phase] if phase else []
    cmd += [
        "--bench-profile",
        profile,
        "-q",
        "-rs",
        *_NO_PLUGINS,
        "--benchmark-columns=min,median,max,rounds",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output[-4000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group this run started, nothing else
        output, _ = proc.communicate()
        return "timeout", (output or "")[-4000:]


def merge(previous: dict | None, parts: list[dict], run: dict, replaced: set[str], keys: set[str]) -> dict:
    """The run's records; for a partial run, merged into the previous file: its records of what was not
    rerun are kept, and the partial run is listed under the full run's ``reruns``."""
    benchmarks = [b for p in parts for b in p.get("benchmarks", [])]
    machine = next((p["machine_info"] for p in parts if "machine_info" in p), {})
    if previous is None:
        return {"machine_info": machine, "benchmarks": benchmarks, "run": run}
    base = previous.get("run", {})
    kept = [b for b in previous.get("benchmarks", []) if b["fullname"] not in replaced]
    merged = {
        **base,
        "not_run": [r for r in base.get("not_run", []) if r["key"] not in keys] + run["not_run"],
        "groups": [g for g in base.get("groups", []) if g["key"] not in keys] + run["groups"],
        "failed": [f for f in base.get("failed", []) if f["key"] not in keys] + run["failed"],
        "reruns": base.get("reruns", [])
        + [{k: run[k] for k in ("command", "started", "wall_s", "loadavg_start", "loadavg_end")}],
    }
    # the machine as the full run saw it (its date labels the tables)
    return {"machine_info": previous.get("machine_info") or machine, "benchmarks": kept + benchmarks, "run": merged}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--cpu", action="store_const", dest="profile", const="cpu")
    which.add_argument("--gpu", action="store_const", dest="profile", const="gpu")
    which.add_argument("--smoke", action="store_const", dest="profile", const="smoke")
    p.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    p.add_argument("--only", default=None, help="comma-separated substrings of node ids to keep, e.g. N512,ceil")
    p.add_argument("--out", type=Path, default=None, help="merged JSON (default bench/results/<profile>.json)")
    p.add_argument("--timeout", type=float, default=1500.0, help="seconds per (method, shape) process")
    p.add_argument("--no-report", action="store_true", help="only write the JSON")
    p.add_argument("--trainer-scaling", action="store_true",
                   help="then both trainers across model sizes: python -m bench.trainer_scaling")  # fmt: skip
    args = p.parse_args(argv)
    profile = args.profile or ("gpu" if has_cuda() else "cpu")
    suites = [s for s in SUITES if s in args.suites.split(",")]
    partial = args.methods is not None or args.only is not None or len(suites) < len(SUITES)
    out = args.out or RESULTS / f"{profile}.json"
    start = time.time()
    run = {
        "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "profile": profile,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start)),
        "loadavg_start": _load(),
        "not_run": [],
        "failed": [],
        "groups": [],
    }
    parts, replaced = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        collected = collect(suites, profile, args.methods, args.only)
        todo = [
            (k, nodes, "start" if s == "ceilings" else "")
            for s in suites
            for k, nodes in group(s, collected[s]).items()
        ]
        # the ceilings again at the end: the report takes the best of both (other jobs may share the machine)
        todo += [("ceilings:end", nodes, "end") for key, nodes, _ in todo[:1] if key == "ceilings"]
        for i, (key, nodes, phase) in enumerate(todo, 1):
            replaced.update(nodes)
            reason = not_run_reason(key)
            if reason is not None:
                run["not_run"].append({"key": key, "reason": reason})
                print(f"[{i}/{len(todo)}] {key}: not run here: {reason}", flush=True)
                continue
            t0, load = time.time(), _load()
            code, tail = run_group(nodes, profile, Path(tmp) / f"{i}.json", args.timeout, phase)
            seconds = time.time() - t0
            run["groups"].append({"key": key, "seconds": round(seconds, 1), "loadavg": load, "exit": code})
            print(
                f"[{i}/{len(todo)}] {key}: {seconds:.1f} s, load {load[0]:.2f}"
                + ("" if code == 0 else f"  ** exit {code} **"),
                flush=True,
            )
            skipped = re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", tail, flags=re.M)
            run["not_run"] += [{"key": key, "reason": reason} for reason in dict.fromkeys(skipped)]
            if code != 0:
                run["failed"].append({"key": key, "exit": code, "output_tail": tail})
                print(tail[-1500:], file=sys.stderr)
            if (Path(tmp) / f"{i}.json").exists() and (Path(tmp) / f"{i}.json").stat().st_size:
                parts.append(json.loads((Path(tmp) / f"{i}.json").read_text()))
    run.update(wall_s=round(time.time() - start, 1), loadavg_end=_load())
    previous = json.loads(out.read_text()) if partial and out.exists() else None
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = merge(previous, parts, run, replaced, {k for k, _, _ in todo})
    merged["run"]["ceilings"] = report.ceilings(merged)  # this run's copy bandwidth and GEMM rates
    out.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"wrote {out} ({run['wall_s']:.0f} s, load {run['loadavg_start']} -> {run['loadavg_end']})")
    if not args.no_report:
        report.main([])
    scaling = 0
    if args.trainer_scaling:
        scaling = subprocess.run([sys.executable, "-m", "bench.trainer_scaling"], cwd=ROOT).returncode
    print(f"total wall time {time.time() - start:.0f} s")
    return 1 if run["failed"] or scaling else 0


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
