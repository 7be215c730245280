"""Turn the saved benchmark JSON into markdown tables and PNG plots.

    python -m bench.report [--results bench/results/cpu.json ...] [--out bench/results]

Reads ``bench/results/cpu.json`` and ``gpu.json`` (whichever exist; written by ``python -m bench.run``,
or by ``pytest bench/ --benchmark-only --benchmark-json FILE``), and ``bench/results/audit.json``
(the offline Triton audit, ``python -m grpo_fast.audit``) when present. Writes
``README_tables.md`` (also printed) and ``<profile>_<suite>_<family>.png`` (time and peak memory vs
tokens, one line per method), labelled with the machine and the date of the run. GPU rows appear
only from a GPU run: run ``python -m bench.run --gpu`` on a CUDA machine, which writes gpu.json.

Derived numbers: achieved GB/s = the benchmark's stated bytes / median time, GFLOP/s = its stated
flops / median time; "% ceiling" divides by the copy bandwidth or the GEMM rate of the same dtype
measured in the same run (bench_ceilings.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import OrderedDict, defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
OURS = ("grpo_fast_triton", "grpo_fast_torch")  # the first present is "grpo_fast" in comparisons
MIB = 2**20
LOGITS_MODES = {"logprobs": "log-probs + entropy, forward only", "loss": "GRPO loss forward + backward"}
LINEAR_MODES = {"logprobs": "old/ref log-probs, forward only", "loss": "GRPO loss forward + backward"}
LINEAR_FLOOR_TARGET = 1.15  # the goal: the linear path within 1.15x of the GEMM floor


# ---------------------------------------------------------------------------- reading
def load(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.setdefault("run", {})
    data["run"].setdefault("profile", _profile_of(data, path))
    return data


def _profile_of(data: dict, path: Path) -> str:
    return data.get("machine_info", {}).get("grpo_fast_bench", {}).get("profile", path.stem)


_SHAPE_KEYS = (
    "suite",
    "mode",
    "shape",
    "b",
    "t",
    "h",
    "v",
    "n",
    "dtype",
    "flops",
    "flops_rule",
    "grad_bytes",
    "threads",
)


def records(data: dict, suite: str) -> list[dict]:
    """The suite's records; a floor timed alternating with a method (``harness.measure_paired``) becomes
    a record of its own, just before that method's; a peer trainer's alternating steps, just after it."""
    out = []
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        if e.get("suite") == suite:
            s = b["stats"]
            out.append({**e, "median": s["median"], "min": s["min"], "max": s["max"], "rounds": s["rounds"]})
            if "paired" in e:  # a peer's steps, alternating with the method's (bench.trainer_steps)
                times = e["paired"]["times"]
                stats = {"median": statistics.median(times), "min": min(times), "max": max(times), "rounds": len(times)}
                out.append({**e["paired"], **stats, "paired_with": e["method"]})
            if "floor" in e:
                times = e["floor"]["times"]
                stats = {"median": statistics.median(times), "min": min(times), "max": max(times), "rounds": len(times)}
                own = {k: v for k, v in e.items() if k in _SHAPE_KEYS}  # not the method's split or checks
                out.insert(len(out) - 1, {**own, **e["floor"], **stats, "paired_with": e["method"]})
    return out


def ceilings(data: dict) -> dict:
    """{"copy_GBps": ..., "gemm_float32_GFLOPps": ..., ...}: the best round of the ceiling benchmarks of the
    run (measured at its start and end), i.e. the most this machine was seen to do."""
    out: dict[str, float] = {}
    for r in records(data, "ceiling"):
        key = "copy_GBps" if r["mode"] == "copy" else f"gemm_{r['dtype']}_GFLOPps"
        rate = (r["bytes"] if r["mode"] == "copy" else r["flops"]) / r["min"] / 1e9
        out[key] = max(out.get(key, 0.0), rate)
    return out


def machine_label(data: dict) -> str:
    m = data.get("machine_info", {}).get("grpo_fast_bench", {})
    flags = f" [{' '.join(m['cpu_flags'])}]" if m.get("cpu_flags") else ""
    cpu = f"{m.get('cpu', '?')}{flags}, {m.get('cores', '?')} cores ({m.get('torch_threads', '?')} threads)"
    device = m.get("gpu") or cpu
    return f"{device}, torch {m.get('torch', '?')}, {m.get('date', '?')}"


# ---------------------------------------------------------------------------- tables
def _fmt_s(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _spread(r: dict) -> str:
    return f"{_fmt_s(r['min'])}-{_fmt_s(r['max'])}"


def _mib(x: float | None) -> str:
    """MiB, to 0.001 below 0.1 MiB: the fused forward-only paths hold only their outputs (a few KiB)."""
    if x is None:
        return "-"
    return f"{x / MIB:,.0f}" if x >= 10 * MIB else f"{x / MIB:.1f}" if x >= 0.1 * MIB else f"{x / MIB:.3f}"


def _groups(rows: list[dict]) -> OrderedDict:
    """(shape, mode) -> rows, shapes in order of tokens."""
    out: OrderedDict = OrderedDict()
    order = {"float32": 0, "bfloat16": 1, "float16": 2}
    for r in sorted(rows, key=lambda r: (order.get(r["dtype"], 3), r.get("h", 0), r.get("v", 0), r["n"], r["mode"])):
        out.setdefault((r["shape"], r["mode"]), []).append(r)
    return out


def _ours(rows: list[dict]) -> dict | None:
    """grpo_fast's default backend on the run's device: triton when it ran, else torch."""
    return next((r for name in OURS for r in rows if r["method"] == name), None)


def logits_tables(data: dict, ceil: dict) -> list[str]:
    lines = []
    for (shape, mode), rows in _groups(records(data, "logits")).items():
        ours = _ours(rows)
        lines += [
            "",
            f"**{shape}, {LOGITS_MODES[mode]}** (floor: {rows[0]['bytes_rule']} = {rows[0]['bytes'] / 1e9:.2f} GB)",
            "",
        ]
        lines += [
            "| method | median s | min-max s | rounds | fwd / bwd s | GB/s at floor | % copy BW "
            "| peak extra MiB | time vs grpo_fast |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            gbps = r["bytes"] / r["median"] / 1e9
            frac = f"{100 * gbps / ceil['copy_GBps']:.0f}%" if "copy_GBps" in ceil else "-"
            split = f"{_fmt_s(r['fwd_s'])} / {_fmt_s(r['bwd_s'])}" if "fwd_s" in r else "-"
            rel = f"{r['median'] / ours['median']:.2f}x" if ours else "-"
            lines.append(
                f"| {r['label']} | {_fmt_s(r['median'])} | {_spread(r)} | {r['rounds']} | {split} | {gbps:.2f} "
                f"| {frac} | {_mib(r['peak_extra_bytes'])} | {rel} |"
            )
    return lines


def linear_tables(data: dict, ceil: dict) -> list[str]:
    lines = []
    for (shape, mode), rows in _groups(records(data, "linear")).items():
        floor = next((r for r in rows if r.get("is_floor")), None)
        ours = _ours(rows)
        gemm = ceil.get(f"gemm_{rows[0]['dtype']}_GFLOPps")
        lines += [
            "",
            f"**{shape}, {LINEAR_MODES[mode]}** (floor: {rows[0]['flops_rule']} = {rows[0]['flops'] / 1e12:.2f} TFLOP)",
            "",
        ]
        lines += [
            "| method | median s | min-max s | rounds | fwd / bwd s | GFLOP/s | % GEMM ceiling | time / floor "
            "| peak extra MiB | time vs grpo_fast |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            rate = r["flops"] / r["median"] / 1e9
            frac = f"{100 * rate / gemm:.0f}%" if gemm else "-"
            xf = f"{r['median'] / floor['median']:.3f}" if floor else "-"
            split = f"{_fmt_s(r['fwd_s'])} / {_fmt_s(r['bwd_s'])}" if "fwd_s" in r else "-"
            rel = f"{r['median'] / ours['median']:.2f}x" if ours else "-"
            lines.append(
                f"| {r['label']} | {_fmt_s(r['median'])} | {_spread(r)} | {r['rounds']} | {split} | {rate:.1f} "
                f"| {frac} | {xf} | {_mib(r['peak_extra_bytes'])} | {rel} |"
            )
    return lines


def trainer_table(data: dict) -> list[str]:
    rows = records(data, "trainer")
    if not rows:
        return []
    lines = []
    for shape in OrderedDict.fromkeys(r["shape"] for r in rows):
        group = [r for r in rows if r["shape"] == shape]
        r0 = group[0]
        lines += [
            "",
            f"**One GRPO step: {r0['prompts']} prompts x G={r0['group']} completions, <= {r0['max_new']} "
            f"new tokens, per_device_train_batch_size {r0['micro']}** (sampling + rewards + update)",
            "",
        ]
        lines += [
            "| trainer | median s / step | min-max s | rounds | completions / s | peak extra MiB |",
            "|---|---|---|---|---|---|",
        ]
        for r in group:
            lines.append(
                f"| {r['label']} | {_fmt_s(r['median'])} | {_spread(r)} | {r['rounds']} "
                f"| {r['completions'] / r['median']:.0f} | {_mib(r['peak_extra_bytes'])} |"
            )
        by = {r["method"]: r for r in group}
        for suffix, what in (("", "without"), ("_gc", "with")):
            ours, trl = by.get(f"grpo_fast{suffix}"), by.get(f"trl{suffix}")
            if ours and trl:
                lines.append(
                    f"\n{what} gradient checkpointing: TRL median / grpo_fast median "
                    f"{trl['median'] / ours['median']:.2f}x{_round_ratios(ours, trl)}; peak extra memory grpo_fast "
                    f"{_mib(ours['peak_extra_bytes'])} vs TRL {_mib(trl['peak_extra_bytes'])} MiB"
                )
    return lines


def _round_ratios(ours: dict, trl: dict) -> str:
    """Per round of alternating steps (bench.trainer_steps), TRL's step / grpo_fast's: their range."""
    if trl.get("paired_with") != ours["method"] or len(ours.get("times", ())) != len(trl["times"]):
        return ""
    ratios = [t / o for o, t in zip(ours["times"], trl["times"])]
    return f" (steps alternating; per round {min(ratios):.2f}-{max(ratios):.2f}x)"


def ceiling_table(data: dict, ceil: dict) -> list[str]:
    """The ceilings used for the fractions, with each measurement (median of its rounds) per phase."""
    if not ceil:
        return []
    seen: dict[str, dict[str, float]] = defaultdict(dict)
    for r in records(data, "ceiling"):
        key = "copy_GBps" if r["mode"] == "copy" else f"gemm_{r['dtype']}_GFLOPps"
        rate = (r["bytes"] if r["mode"] == "copy" else r["flops"]) / r["median"] / 1e9
        seen[key][r.get("phase") or "run"] = rate
    lines = ["| ceiling | used (best round) | median per measurement |", "|---|---|---|"]
    for key, value in ceil.items():
        name = "copy bandwidth (read + write), GB/s" if key == "copy_GBps" else f"GEMM {key.split('_')[1]}, GFLOP/s"
        each = ", ".join(f"{phase} {rate:.1f}" for phase, rate in seen[key].items())
        lines.append(f"| {name} | {value:.1f} | {each} |")
    return lines


def verdicts(data: dict) -> list[str]:
    """The issue's done-when, measured: memory ahead of every peer, linear time vs the floor, and every
    place where a peer is faster than grpo_fast."""
    lines, slower = [], []
    for suite in ("logits", "linear"):
        for (shape, mode), rows in _groups(records(data, suite)).items():
            ours = _ours(rows)
            if ours is None:
                continue
            peers = [r for r in rows if r["method"] not in OURS and not r.get("is_floor")]
            worse = [r for r in peers if r["peak_extra_bytes"] <= ours["peak_extra_bytes"]]
            lines.append(
                f"- {suite} {shape} {mode}: peak memory {_mib(ours['peak_extra_bytes'])} MiB; "
                + (
                    "below every peer here"
                    if not worse
                    else "NOT below " + ", ".join(f"{r['label']} ({_mib(r['peak_extra_bytes'])} MiB)" for r in worse)
                )
            )
            floor = next((r for r in rows if r.get("is_floor")), None)
            if floor is not None:
                ratio = ours["median"] / floor["median"]
                ok = "within" if ratio <= LINEAR_FLOOR_TARGET else "OUTSIDE"
                how = " (rounds alternating in one process)" if floor.get("paired_with") == ours["method"] else ""
                lines.append(f"  - time {ratio:.3f}x the GEMM floor{how} ({ok} {LINEAR_FLOOR_TARGET}x)")
            slower += [
                f"- {suite} {shape} {mode}: {r['label']} {_fmt_s(r['median'])} s vs grpo_fast "
                f"{_fmt_s(ours['median'])} s ({ours['median'] / r['median']:.2f}x)"
                for r in peers
                if r["median"] < ours["median"]
            ]
    if slower:
        lines += ["", "Where a peer is faster than grpo_fast here:", *slower]
    return lines


def not_run_table(data: dict) -> list[str]:
    run = data.get("run", {})
    reasons = OrderedDict()
    for item in run.get("not_run", []):
        suite, _, params = item["key"].partition(":")
        method = params.split("-", 1)[0] if suite in ("logits", "linear") else suite
        reasons.setdefault((method, item["reason"]), None)
    lines = [f"- {method}: {reason}" for method, reason in reasons]
    lines += [f"- FAILED {f['key']} (exit {f['exit']}): see the run's JSON" for f in run.get("failed", [])]
    return (["", "Not run here:", *lines]) if lines else []


def audit_table(path: Path) -> list[str]:
    """Per (arch, kernel, dtype): variants, registers, spills, local and shared memory, 128-bit loads, and
    SASS instructions per logit where the audit counts them (the row kernels)."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    groups = defaultdict(list)
    for v in data["variants"]:
        kernel, _, rest = v["name"].partition("[")
        groups[(v["arch"], kernel, rest.split(",")[0])].append(v)
    lines = [
        "",
        f"## Offline Triton audit (triton {data.get('triton', '?')}, `python -m grpo_fast.audit`, "
        f"{len(data['variants'])} variants)",
        "",
        "| arch | kernel | dtype | variants | registers | spill bytes | local bytes | shared KiB | vectorised loads "
        "| SASS instr / value |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (arch, kernel, dtype), vs in sorted(groups.items()):
        regs = [v["registers"] for v in vs]
        instr = [v["loop_instructions_per_value"] for v in vs if v.get("loop_instructions_per_value") is not None]
        spill = sum(v["spill_store_bytes"] + v["spill_load_bytes"] for v in vs)
        local = sum(v["local_bytes"] + v["stack_bytes"] for v in vs)
        shared = max(v.get("shared_bytes", 0) for v in vs) / 1024
        vec = sum(bool(v["vectorised"]) for v in vs)
        per_value = f"{min(instr):.1f}-{max(instr):.1f}" if instr else "-"
        lines.append(
            f"| {arch} | {kernel} | {dtype} | {len(vs)} | {min(regs)}-{max(regs)} | {spill} | {local} | {shared:.0f} "
            f"| {vec}/{len(vs)} | {per_value} |"
        )
    return lines


def markdown(data: dict) -> list[str]:
    run, ceil = data["run"], ceilings(data)
    loads = [g["loadavg"][0] for g in run.get("groups", []) if g.get("loadavg")]
    load = f"1-min load average {min(loads):.2f}-{max(loads):.2f} during the run" if loads else ""
    lines = [f"## {run['profile'].upper()} run: {machine_label(data)}", ""]
    if run.get("command"):
        lines.append(
            f"`{run['command']}`: {run.get('wall_s', 0):.0f} s wall; {load}. Times: median of the rounds "
            "after warm-up (compilation excluded); peak memory above inputs + gradients; plots in bench/results/."
        )
    for rerun in run.get("reruns", []):
        lines.append(
            f"Rerun afterwards (its results replace the full run's for what it ran): `{rerun['command']}` "
            f"at {rerun['started']}, {rerun['wall_s']:.0f} s, load {rerun['loadavg_start'][0]:.2f}."
        )
    lines += ["", *ceiling_table(data, ceil), *not_run_table(data)]
    for title, body in (
        ("From logits", logits_tables(data, ceil)),
        ("From hidden states (fused linear)", linear_tables(data, ceil)),
        ("Trainer", trainer_table(data)),
    ):
        if body:
            lines += ["", f"### {title}", *body]
    checks = verdicts(data)
    if checks:
        lines += ["", "### Checks (issue 7 done-when)", "", *checks]
    return lines


# ---------------------------------------------------------------------------- plots
def plots(data: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    profile = data["run"]["profile"]
    for suite in ("logits", "linear"):
        families = defaultdict(list)
        for r in records(data, suite):
            families[(r["dtype"], r.get("h"), r["v"])].append(r)
        for (dtype, h, v), rows in families.items():
            modes = list(OrderedDict.fromkeys(r["mode"] for r in rows))
            fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.6 * len(modes)), squeeze=False)
            for row, mode in zip(axes, modes):
                by_method = OrderedDict()
                for r in sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["n"]):
                    by_method.setdefault(r["label"], []).append(r)
                for label, rs in by_method.items():
                    name = rs[0]["method"]
                    style = {"marker": "o", "linewidth": 2.5 if name in OURS else 1.2, "color": _color(name)}
                    if rs[0].get("is_floor"):
                        style.update(linestyle="--")
                    row[0].plot([r["n"] for r in rs], [r["median"] for r in rs], label=label, **style)
                    row[1].plot([r["n"] for r in rs], [r["peak_extra_bytes"] / MIB for r in rs], label=label, **style)
                what = "forward-only log-probs" if mode == "logprobs" else "loss forward + backward"
                for ax, ylabel in zip(row, ("median time (s)", "peak memory above inputs + grads (MiB)")):
                    ax.set_xscale("log", base=2)
                    if ylabel.startswith("median"):
                        ax.set_yscale("log")
                    else:  # grpo_fast's logits path can measure 0 MiB: symlog keeps it on the axis
                        ax.set_yscale("symlog", linthresh=1.0)
                        ax.set_ylim(bottom=0)
                    ax.set_xlabel("tokens N")
                    ax.set_ylabel(ylabel)
                    ax.set_title(what, fontsize=10)
                    ax.grid(True, which="both", alpha=0.3)
                row[0].legend(fontsize=7)
            head = f"H={h} " if h else ""
            fig.suptitle(f"{suite}: {head}V={v} {dtype} — {machine_label(data)}", fontsize=10)
            fig.tight_layout()
            path = out / f"{profile}_{suite}_{f'H{h}_' if h else ''}V{v}_{dtype}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


_COLORS = {
    "gemm_floor": "black",
    "grpo_fast_torch": "tab:blue",
    "grpo_fast_triton": "tab:cyan",
    "naive": "tab:orange",
    "naive_compile": "tab:green",
    "trl": "tab:brown",
    "liger": "tab:red",
    "liger_compile": "tab:purple",
    "liger_triton": "tab:red",
    "cce": "tab:olive",
    "cce_torch_compile": "tab:pink",
}


def _color(method: str) -> str:
    return _COLORS.get(method, "tab:gray")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, nargs="*", default=None, help="default: bench/results/{cpu,gpu}.json")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    paths = args.results or [RESULTS / f"{name}.json" for name in ("cpu", "gpu") if (RESULTS / f"{name}.json").exists()]
    lines = [
        "# grpo_fast benchmark results",
        "",
        "Generated by `python -m bench.report` from " + ", ".join(f"`{_rel(p)}`" for p in paths) + "."
        if paths
        else "No results yet: run `python -m bench.run`.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        data = load(path)
        lines += ["", *markdown(data)]
        written += plots(data, args.out)
    lines += audit_table(RESULTS / "audit.json")
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out / "README_tables.md").write_text(text)
    print(f"wrote {_rel(args.out / 'README_tables.md')}" + "".join(f", {_rel(w)}" for w in written))
    return 0


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(RESULTS.parent.parent))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    raise SystemExit(main())
