"""The tables of ``bench.gpu_check``: ``DIR/gpu_check.md`` from the run's JSON, and the fraction of the measured
ceilings each kernel row achieved (the copy bandwidth for the ops from logits, the GEMM rate of the row's dtype
for the ops from hidden states; medians over medians)."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def add_fractions(data: dict) -> None:
    """Put ``pct_of_ceiling`` on every timed kernel row for which the environment section measured the ceiling."""
    ceilings = data.get("environment", {}).get("ceilings", {})
    for row in data.get("kernels", {}).get("rows", []):
        key = "gemm_" + row["dtype"] if row.get("h") else "copy"
        rate = row.get("tflops") if row.get("h") else row.get("gbps")
        ceiling = ceilings.get(key, {}).get("median")
        if rate is not None and ceiling:
            row["ceiling"] = key
            row["pct_of_ceiling"] = 100 * rate / ceiling


def render(data: dict) -> str:
    lines = [f"# bench.gpu_check, {data['started']}", "", f"`{data['command']}`: {data.get('wall_s', 0):.0f} s of "
             f"--budget-s {data['budget_s']:g}" + (" (quick)" if data["quick"] else "")]  # fmt: skip
    if data["dry_run"]:
        lines += ["", "**Dry run**: CPU, tiny shapes, Triton under the interpreter. It shows that the script runs;"
                  " its figures are not performance."]  # fmt: skip
    lines += ["", "| section | status | seconds | reason |", "|---|---|---|---|"]
    for name in ("environment", "tests", "kernels", "rollout", "trainer"):
        s = data[name]
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {_cell(s.get('reason', ''))} |")
    if "wheels" in data:
        w = data["wheels"]
        lines += ["", f"Wheels: {w['status']}, installed {', '.join(w.get('installed', [])) or 'none'}"]
        lines += [f"Wheels not installed: {_cell(w['reason'])}"] if w.get("reason") else []
    lines += _environment(data["environment"]) + _tests(data["tests"]) + _kernels(data["kernels"])
    lines += _rollout(data.get("rollout", {}))
    return "\n".join(lines + _trainer(data["trainer"]))


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")[:300]


def _num(x, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _environment(s: dict) -> list[str]:
    if "machine" not in s:
        return []
    m, v = s["machine"], s.get("versions", {})
    gpu = m.get("gpu") or f"no GPU ({m.get('cpu')})"
    versions = ", ".join(f"{k} {val or 'missing'}" for k, val in v.items())
    lines = ["", "## Environment", "", f"{gpu}, {m.get('sm_count', '-')} SMs, driver {m.get('driver') or '-'}, "
             f"CUDA {m.get('cuda_runtime') or '-'}; {versions}"]  # fmt: skip
    lines += ["", "| ceiling | median | best | what |", "|---|---|---|---|"]
    for key, c in s.get("ceilings", {}).items():
        if "median" in c:
            lines.append(f"| {key} | {c['median']:.4g} {c['unit']} | {c['best']:.4g} | {c['what']} |")
        else:
            lines.append(f"| {key} | - | - | {_cell(c.get('reason'))} |")
    return lines


def _tests(s: dict) -> list[str]:
    lines = []
    if s.get("ops"):
        lines += ["", "## Ops against the float64 reference (normwise relative error)", "",
                  "| case | ops | ok | errors (bound) |", "|---|---|---|---|"]  # fmt: skip
        for op in s["ops"]:
            errs = op.get("errors")
            text = (", ".join(f"{k} {e:.2e} ({op['bounds'][k]:.0e})" for k, e in errs.items()) if errs
                    else _cell(op.get("error")))  # fmt: skip
            lines.append(f"| {op['case']} | {', '.join(op.get('ops', []))} | {op['ok']} | {text} |")
    if "pytest" in s:
        p = s["pytest"]
        lines += [
            "",
            f"pytest `{p['selection']}`: {p['status']}, {p.get('counts', {})}, {p.get('seconds', 0)} s: "
            f"{_cell(p['reason'])}",
        ]
    return lines


def _kernels(s: dict) -> list[str]:
    rows = s.get("rows", [])
    if not rows:
        return []
    lines = ["", "## Kernels", "", "| case | method | mode | median ms | rate | % ceiling | peak extra MiB | note |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['method']} | {r['mode']} | - | - | - | - | {r['status']}: "
                         f"{_cell(r.get('reason'))} |")  # fmt: skip
            continue
        rate = f"{r['tflops']:.3g} TFLOP/s" if r.get("h") else f"{r['gbps']:.4g} GB/s"
        lines.append(f"| {r['case']} | {r['method']} | {r['mode']} | {1e3 * r['median_s']:.4g} | {rate} | "
                     f"{_num(r.get('pct_of_ceiling'), '.1f')} | {r['peak_extra_mib']:.1f} | |")  # fmt: skip
    return lines


def _trainer(s: dict) -> list[str]:
    if "shape" not in s:
        return []
    shape = s["shape"]
    title = (f"## Trainer step: {shape['model']}, {shape['prompts']} prompts x G {shape['group']}, <= "
             f"{shape['max_new']} tokens, {shape['dtype']}")  # fmt: skip
    if "results" not in s:  # stopped before the end: the steps it reported
        steps = [f"{name} {'warm-up ' if st['warmup'] else ''}{st['step_s']:.3g} s" for name, done in
                 s["steps"].items() for st in done]  # fmt: skip
        return ["", title, "", f"Steps reported before the section ended: {', '.join(steps) or 'none'}"]
    lines = ["", title, "",
             "| trainer | s / step | sampling s | update s | token slots / s (P G T / step) | peak extra MiB |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in s["results"].items():
        lines.append(f"| {name} | {r['step_s']:.3g} | {_num(r['sampling_s'])} | {_num(r['update_s'])} | "
                     f"{r['tokens_per_s']:.4g} | {r['peak_extra_mib']:.0f} |")  # fmt: skip
    if "trl" in s:
        lines.append(f"\n{s['trl']}")
    return lines


def _rollout(s: dict) -> list[str]:
    if "shape" not in s:
        return []
    shape = s["shape"]
    lines = ["", f"## Rollout: {shape['model']}, {shape['rows']} rows, {shape['prompt']} prompt + {shape['new']} new "
             f"tokens, {shape['dtype']}", "", "| method | tokens / s | median s | first call s (compile / capture) |",
             "|---|---|---|---|"]  # fmt: skip
    for r in s["rows"]:
        lines.append(f"| {r['method']} | {r['tokens_per_s']:.4g} | {r['median_s']:.3g} | {r['first_call_s']:.3g} |")
    return lines
