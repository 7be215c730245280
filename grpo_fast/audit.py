"""Offline GPU-readiness audit: compile every Triton kernel variant for real GPUs, without a GPU.

    python -m grpo_fast.audit --arch sm_80 sm_90 --out /tmp/audit

For each (kernel, logits dtype, constexprs, num_warps) that ``kernel_configs()`` lists and each
target, compiles with the specialisation a real launch gets (Triton's own binder applied to the
launcher's arguments: pointer and int arguments divisible by 16 marked ``tt.divisibility``), then
reads from the cubin and its SASS: registers, spill bytes, stack and local memory, shared memory, and
the width of every global load. Writes DIR/<arch>/<variant>.cubin and .sass and DIR/audit.json,
prints a table, and exits 1 if any variant spills, uses local memory, or loads its logits row
narrower than 128 bits. Takes about a minute for two targets on 2 cores, less with Triton's cache warm.

Run it with TRITON_INTERPRET unset: under TRITON_INTERPRET=1, triton.jit builds interpreter objects,
which cannot be compiled (tests run the audit in a subprocess with the variable removed).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from grpo_fast.kernels import linear_token_stats, token_stats

# Every module whose kernels are audited; each exposes kernel_configs().
KERNEL_MODULES = (token_stats, linear_token_stats)


def parse_arch(text: str) -> int:
    """'sm_90' / 'sm_90a' / '90' -> 90."""
    match = re.fullmatch(r"(?:sm_)?(\d+)a?", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"--arch must look like sm_80 or 90, got {text!r}")
    return int(match.group(1))


def specialise(config, backend) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) exactly as JITFunction.run derives them for these arguments.

    Uses Triton's own binder (triton 3.9 internals), so the audit cannot drift from a real launch:
    e.g. ints divisible by 16 get tt.divisibility, an int equal to 1 becomes a constexpr.
    """
    kernel = config.kernel
    kwargs = {**config.constexprs, "num_warps": config.num_warps}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*config.args, **kwargs)
    _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs


def compile_config(config, capability: int):
    """Compile one variant for sm_<capability>: (Triton's CompiledKernel, the signature it was given)."""
    if not isinstance(config.kernel, JITFunction):
        raise RuntimeError(
            "the kernels were built for the interpreter (TRITON_INTERPRET=1 was set when triton was "
            "imported); run the audit with TRITON_INTERPRET unset"
        )
    target = GPUTarget("cuda", capability, 32)
    signature, constexprs, attrs = specialise(config, make_backend(target))
    src = ASTSource(config.kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options={"num_warps": config.num_warps}), signature


def _cuobjdump(flag: str, cubin: Path) -> str:
    # stderr captured: nvdisasm warns about the ELF flavour of sm_80 cubins, harmlessly
    cmd = [triton.knobs.nvidia.cuobjdump.path, flag, str(cubin)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def resource_usage(cubin: Path) -> dict:
    """Registers, stack and local memory (bytes) from ``cuobjdump -res-usage``."""
    text = _cuobjdump("-res-usage", cubin)
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump -res-usage output:\n{text}")
    regs, stack, local = map(int, match.groups())
    return {"registers": regs, "stack_bytes": stack, "local_bytes": local}


def spill_bytes(ptx: str, capability: int) -> dict:
    """Spill store / load bytes from ``ptxas -v``, run with the flags Triton's own ptxas call uses."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2"]
        cmd += [f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o", str(Path(tmp) / "k.o")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if match is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return {"spill_store_bytes": int(match.group(1)), "spill_load_bytes": int(match.group(2))}


def access_widths(sass: str, opcode: str) -> dict[str, int]:
    """Count of global loads (LDG) or stores (STG) by width in bits, e.g. {'128': 4, '8': 1}."""
    counts = collections.Counter()
    for suffixes in re.findall(rf"\b{opcode}\.E((?:\.\w+)*)", sass):
        width = re.search(r"\.(128|64|U16|S16|U8|S8)\b", suffixes)
        bits = {"U16": "16", "S16": "16", "U8": "8", "S8": "8"}.get(width.group(1), width.group(1)) if width else "32"
        counts[bits] += 1
    return dict(sorted(counts.items(), key=lambda kv: -int(kv[0])))


def loop_instructions(sass: str) -> int:
    """Instructions in the longest loop body (target .. backward BRA to it); 16-byte instructions."""
    longest = 0
    for addr, target in re.findall(r"/\*([0-9a-f]{4,})\*/[^\n;]*\bBRA 0x([0-9a-f]+)", sass):
        if int(target, 16) < int(addr, 16):
            longest = max(longest, (int(addr, 16) - int(target, 16)) // 16 + 1)
    return longest


def audit_config(config, capability: int, out_dir: Path) -> dict:
    """Compile one variant, write its cubin and SASS, and return its row of the summary."""
    return inspect_cubin(config, capability, out_dir, *compile_config(config, capability))


def inspect_cubin(config, capability: int, out_dir: Path, compiled, signature: dict) -> dict:
    """Write the cubin and its SASS, read them back with the CUDA tools (subprocesses, thread-safe)."""
    stem = re.sub(r"[^\w.-]+", "_", config.name).strip("_")
    arch_dir = out_dir / f"sm_{capability}"
    arch_dir.mkdir(parents=True, exist_ok=True)
    cubin = arch_dir / f"{stem}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    sass = _cuobjdump("-sass", cubin)
    (arch_dir / f"{stem}.sass").write_text(sass)
    loads = access_widths(sass, "LDG")
    async_loads = access_widths(sass, "LDGSTS")  # cp.async: how the GEMM kernels stage their tiles
    narrow_loads = sum(n for bits, n in loads.items() if bits != "128")
    gemm = config.name.startswith("linear_")
    if config.name.startswith("linear_merge"):
        vectorised = True  # reads (split, row) partial statistics only: no logits, hidden or weight tiles
    elif gemm:  # hidden/weight tiles must arrive in 128-bit loads; per-row scalars may be narrower
        vectorised = async_loads.get("128", 0) + loads.get("128", 0) > 0
    else:  # the logits row streams in 128-bit loads; only the per-row scalars may be narrower
        vectorised = loads.get("128", 0) > 0 and narrow_loads <= config.row_scalar_loads
    per_value = None
    if not gemm:
        values_per_thread = config.constexprs["BLOCK_V"] // (32 * config.num_warps)
        per_value = round(loop_instructions(sass) / values_per_thread, 2)
    return {
        "name": config.name,
        "arch": f"sm_{capability}",
        "num_warps": config.num_warps,
        "constexprs": config.constexprs,
        "signature": {name: kind for name, kind in signature.items() if kind != "constexpr"},
        **resource_usage(cubin),
        "shared_bytes": compiled.metadata.shared,  # dynamic, as the launch requests it
        **spill_bytes(compiled.asm["ptx"], capability),
        "loads": loads,
        "async_loads": async_loads,
        "stores": access_widths(sass, "STG"),
        "vectorised": vectorised,
        "loop_instructions_per_value": per_value,
        "cubin": str(cubin.relative_to(out_dir)),
    }


def problems(row: dict) -> list[str]:
    found = []
    if row["spill_store_bytes"] or row["spill_load_bytes"]:
        found.append(f"spills {row['spill_store_bytes']} B stores / {row['spill_load_bytes']} B loads")
    if row["local_bytes"] or row["stack_bytes"]:
        found.append(f"uses local memory ({row['local_bytes']} B local, {row['stack_bytes']} B stack)")
    if not row["vectorised"]:
        found.append(f"logits loads not all 128-bit (global loads by width: {row['loads']})")
    return found


def audit(capabilities: list[int], out_dir: Path) -> list[dict]:
    """Audit every variant of every kernel module for every target; writes out_dir/audit.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(config, cap) for cap in capabilities for module in KERNEL_MODULES for config in module.kernel_configs()]
    with warnings.catch_warnings():
        # a launch compiles with the same default (fusion on); the notice about 3.10 is noise here
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        compiled = [compile_config(config, cap) for config, cap in jobs]  # in order: Triton is not thread-safe
    # disassembly (nvdisasm, once per cubin) dominates: run the tools concurrently
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        rows = list(pool.map(lambda job, out: inspect_cubin(*job, out_dir, *out), jobs, compiled))
    summary = {"triton": triton.__version__, "variants": rows}
    (out_dir / "audit.json").write_text(json.dumps(summary, indent=1) + "\n")
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'variant':92} {'arch':6} {'regs':>4} {'spill':>5} {'local':>5} {'smem':>5} {'ld128':>6} {'narrow':>6}"
    head += f" {'instr/v':>7}  vectorised"
    lines = [head]
    for r in rows:
        narrow = sum(n for bits, n in r["loads"].items() if bits != "128")
        spill = r["spill_store_bytes"] + r["spill_load_bytes"]
        lines.append(
            f"{r['name']:92} {r['arch']:6} {r['registers']:>4} {spill:>5} {r['local_bytes']:>5} "
            f"{r['shared_bytes']:>5} {r['loads'].get('128', 0) + r['async_loads'].get('128', 0):>6} {narrow:>6} "
            f"{r['loop_instructions_per_value'] or '-':>7}  {'yes' if r['vectorised'] else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo_fast.audit", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", type=parse_arch, default=[80, 90], help="targets, e.g. sm_80 sm_90")
    parser.add_argument("--out", type=Path, required=True, help="directory for the cubins and audit.json")
    args = parser.parse_args(argv)
    try:
        rows = audit(args.arch, args.out)
    except RuntimeError as err:
        print(f"audit failed: {err}", file=sys.stderr)
        return 2
    print(format_table(rows))
    failures = [f"{r['name']} on {r['arch']}: {p}" for r in rows for p in problems(r)]
    if failures:
        print(f"\n{len(failures)} problem(s):\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"\nall {len(rows)} variants: no spills, no local memory, 128-bit logits loads ({args.out}/audit.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
