"""The offline GPU-readiness audit (grpo_fast.audit): every Triton kernel variant compiles for sm_80 and
sm_90 without a GPU, with no register spills, no local memory and 128-bit loads of the logits.

Compilation runs in a subprocess with TRITON_INTERPRET removed from its environment: conftest.py turns
the interpreter on for this session when there is no CUDA device, and triton.jit then builds
interpreter objects, which cannot be compiled.
Run: pytest tests/test_audit.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from triton.runtime.interpreter import InterpretedFunction

from grpo_fast import audit
from grpo_fast.kernels import linear_token_stats as lts
from grpo_fast.kernels import token_stats as ts

ARCHS = ("sm_80", "sm_90")


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_every_variant_compiles_clean(tmp_path):
    proc = _python("-m", "grpo_fast.audit", "--arch", *ARCHS, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "audit.json").read_text())["variants"]
    names = {c.name for c in ts.kernel_configs()} | {c.name for c in lts.kernel_configs()}
    assert sorted((r["name"], r["arch"]) for r in rows) == sorted((n, a) for n in names for a in ARCHS)
    for r in rows:
        where = f"{r['name']} on {r['arch']}"
        assert r["spill_store_bytes"] == r["spill_load_bytes"] == 0, where
        assert r["local_bytes"] == r["stack_bytes"] == 0, where
        assert r["vectorised"], where
        if r["name"].startswith("linear_"):
            if not r["name"].startswith("linear_merge"):  # GEMM tiles arrive in 128-bit (async) loads
                assert r["loads"].get("128", 0) + r["async_loads"].get("128", 0) > 0, where
            continue
        assert r["loads"]["128"] > 0, where
        assert r["signature"]["inv_tau"] == "fp32", where  # a runtime scalar: no recompile per temperature
        assert (tmp_path / r["cubin"]).stat().st_size > 0, where
        if r["name"].startswith("bwd"):
            assert set(r["stores"]) == {"128"}, f"{where}: gradient stores {r['stores']}"


_ODD_VOCAB = """
import json, pathlib, sys, torch
from grpo_fast import audit
from grpo_fast.kernels import token_stats as ts
config = ts._forward_config(50257, torch.bfloat16, True)  # GPT-2's odd V: rows not 16-byte aligned
row = audit.audit_config(config, 90, pathlib.Path(sys.argv[1]))
print(json.dumps({"vectorised": row["vectorised"], "loads": row["loads"], "problems": audit.problems(row)}))
"""


@pytest.mark.slow
def test_flags_unvectorised_loads(tmp_path):
    """The check has teeth: with V = 50257 no row start is 16-byte aligned, and the audit says so."""
    proc = _python("-c", _ODD_VOCAB, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert not result["vectorised"] and "128" not in result["loads"]
    assert any("not all 128-bit" in p for p in result["problems"])


def test_access_widths_reads_sass():
    sass = """
        /*0050*/                   LDG.E.U8 R2, [R2.64] ;
        /*00a0*/                   LDG.E.64 R2, desc[UR6][R2.64] ;
        /*0450*/              @!P0 LDG.E.128 R4, [R34.64] ;
        /*0460*/              @!P0 LDG.E.EF.128 R8, [R34.64+0x1000] ;
        /*0470*/                   LDG.E R9, [R3.64] ;
        /*0480*/                   STG.E.128 [R2.64], R4 ;
    """
    assert audit.access_widths(sass, "LDG") == {"128": 2, "64": 1, "32": 1, "8": 1}
    assert audit.access_widths(sass, "STG") == {"128": 1}


def test_loop_instructions_counts_the_longest_backward_branch():
    sass = """
        /*0100*/   FADD R1, R2, R3 ;
        /*0110*/   @!P0 BRA 0x100 ;
        /*0120*/   MUFU.EX2 R1, R1 ;
        /*0150*/   @!P0 BRA 0x120 ;
        /*0160*/   BRA 0x160;
    """
    assert audit.loop_instructions(sass) == 4


def test_problems_names_each_failure():
    row = {"spill_store_bytes": 8, "spill_load_bytes": 8, "local_bytes": 16, "stack_bytes": 16}
    row |= {"vectorised": False, "loads": {"16": 9}}
    found = " | ".join(audit.problems(row))
    assert "spills" in found and "local memory" in found and "128-bit" in found
    clean = {k: 0 for k in ("spill_store_bytes", "spill_load_bytes", "local_bytes", "stack_bytes")}
    assert audit.problems({**clean, "vectorised": True, "loads": {"128": 4}}) == []


def test_parse_arch():
    assert [audit.parse_arch(a) for a in ("sm_80", "sm_90a", "90")] == [80, 90, 90]
    with pytest.raises(Exception, match="--arch"):
        audit.parse_arch("hopper")


@pytest.mark.skipif(
    not isinstance(ts._token_stats_fwd_kernel, InterpretedFunction), reason="kernels not built for the interpreter"
)
def test_refuses_interpreted_kernels(tmp_path, capsys):
    assert audit.main(["--arch", "sm_90", "--out", str(tmp_path)]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err
