"""bench.gpu_check, the one-command GPU acceptance run, checked the way CI can: its dry run (the same code
paths on CPU at tiny shapes, Triton under the interpreter), a run with sections forced to fail, and a
section that outlives its time box. Each is a real ``python -m bench.gpu_check`` process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from bench import gpu_check, gpu_kernels, gpu_report
from bench.shapes import LLAMA3_V, QWEN25_V

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("environment", "tests", "kernels", "rollout", "trainer")


def run_check(out: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict, str]:
    cmd = [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    return proc, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    # CPU, shared with other jobs: the tests section's ~280 Triton tests under the interpreter need more than the
    # default budget's share
    return run_check(tmp_path_factory.mktemp("gpu_check"), "--budget-s", "900")


@pytest.mark.slow  # ~4 min: five section processes, two trainer processes, Triton under the interpreter
def test_dry_run_passes_with_every_section_ok(dry_run):
    proc, data, md = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {name: data[name]["status"] for name in SECTIONS} == dict.fromkeys(SECTIONS, "ok")
    assert data["environment"]["ceilings"]["copy"]["median"] > 0
    assert data["tests"]["ops"] and all(op["ok"] for op in data["tests"]["ops"])
    assert data["tests"]["pytest"]["counts"]["passed"] > 200  # the GPU selection, -m "triton or gpu"
    timed = {(r["family"], r["method"], r["mode"]) for r in data["kernels"]["rows"] if r["status"] == "ok"}
    for family in ("logits", "linear"):  # grpo_fast's Triton kernels ran, and the plain-torch peer
        for method in ("grpo_fast_triton", "naive"):
            assert {(family, method, "logprobs"), (family, method, "loss")} <= timed
    assert data["trainer"]["results"]["grpo_fast"]["step_s"] > 0
    rollout = data["rollout"]["rows"]  # eager steps, the compiled fixed-shape step, model.generate
    assert [r["method"] for r in rollout] == ["eager", "compiled (CPU)", "model.generate"]
    assert all(r["tokens_per_s"] > 0 and r["first_call_s"] > 0 for r in rollout)


@pytest.mark.slow
def test_dry_run_markdown_has_every_table(dry_run):
    _, _, md = dry_run
    assert "**Dry run**" in md  # its figures are labelled as not performance
    for heading in ("| section | status |", "## Environment", "## Ops against the float64 reference", "## Kernels",
                    "## Rollout", "## Trainer step"):  # fmt: skip
        assert heading in md


@pytest.mark.slow  # ~30 s
def test_forced_failures_leave_the_other_sections_complete(tmp_path):
    proc, data, md = run_check(tmp_path, "--quick", env={gpu_check.FAIL_ENV: "tests,trainer"})
    assert proc.returncode == 1
    for name in ("tests", "trainer"):
        assert data[name]["status"] == "failed"
        assert f"forced failure ({gpu_check.FAIL_ENV}=tests,trainer)" in data[name]["reason"]
    # the section after the first failure still ran to its end, with its results
    assert data["environment"]["status"] == data["kernels"]["status"] == "ok"
    assert any(r["status"] == "ok" and r["method"] == "grpo_fast_triton" for r in data["kernels"]["rows"])
    assert "| tests | failed |" in md and "| kernels | ok |" in md


def test_a_section_past_its_time_box_is_stopped_with_its_partial_result_kept(tmp_path):
    start = time.time()
    proc, data, _ = run_check(tmp_path, "--sections", "environment", "--budget-s", "15",
                              env={gpu_check.STALL_ENV: "environment"})  # fmt: skip
    assert time.time() - start < 15 + 1.5  # the whole run, start-up included, ends within --budget-s
    record = data["environment"]
    assert proc.returncode == 1
    assert record["status"] == "failed"
    assert record["reason"].startswith("ran past its time box of")
    assert record["partial"] == f"saved before a forced stall ({gpu_check.STALL_ENV})"
    assert record["seconds"] < 30
    assert data["tests"] == {"status": "skipped", "reason": "not in --sections"}


@pytest.mark.parametrize(
    "args,match",
    [
        (["--budget-s", "0"], "--budget-s must be positive"),
        (["--sections", "kernels,gpu"], "--sections: unknown"),
        (["--wheels", "/nonexistent/wheels"], "--wheels must be a folder"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--out", str(tmp_path), *args])
    assert match in capsys.readouterr().err


@pytest.mark.skipif(gpu_check.has_cuda(), reason="checks the message given where no CUDA device is attached")
def test_without_a_gpu_the_full_run_says_to_use_dry_run(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA device; --dry-run"):
        gpu_check.main(["--out", str(tmp_path)])


def test_an_uninstalled_checkout_is_told_to_install(tmp_path, monkeypatch):
    """grpo_fast.kernels is the top-level kernels/ folder mapped at install: a bare clone cannot import it."""
    find_spec = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(
        gpu_check.importlib.util, "find_spec", lambda name: None if name == "grpo_fast.kernels" else find_spec(name)
    )
    with pytest.raises(SystemExit, match="grpo_fast is not installed.*pip install -e ."):
        gpu_check.main(["--dry-run", "--out", str(tmp_path)])


def test_wheels_install_one_at_a_time_and_a_failure_fails_the_run(tmp_path):
    """A wheel for another Python is reported by name, the others are installed, and the exit status is 1."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    other = "cp39" if sys.version_info[:2] != (3, 9) else "cp310"
    for name in ("good_pkg-1.0-py3-none-any.whl", f"other_py-1.0-{other}-{other}-manylinux_2_17_x86_64.whl"):
        _write_wheel(wheels / name)
    proc, data, md = run_check(tmp_path / "out", "--sections", "environment", "--wheels", str(wheels))
    record = data["wheels"]
    assert proc.returncode == 1 and data["environment"]["status"] == "ok"
    assert record["status"] == "failed" and record["installed"] == ["good_pkg-1.0-py3-none-any.whl"]
    assert list(record["failed"]) == [f"other_py-1.0-{other}-{other}-manylinux_2_17_x86_64.whl"]
    assert "1 of 2 wheels did not install" in record["reason"] and "Wheels not installed" in md
    assert "'wheels': 'failed'" in proc.stdout


def _write_wheel(path: Path) -> None:
    """A minimal wheel: one module and its dist-info (METADATA, WHEEL, RECORD)."""
    name, version = path.name.split("-")[:2]
    tag = "-".join(path.name[:-4].split("-")[2:])
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": "VALUE = 1\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for arcname, text in files.items():
            z.writestr(arcname, text)
        z.writestr(f"{info}/RECORD", "".join(f"{a},,\n" for a in [*files, f"{info}/RECORD"]))


def test_the_budget_clock_starts_at_process_start():
    """What a process does before it reads the clock (imports, CUDA set-up) counts against --budget-s."""
    code = "import time; t = time.time(); time.sleep(1.5); from bench.gpu_check import process_start; "
    code += "print(t - process_start())"
    before_read = float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                       check=True).stdout)  # fmt: skip
    assert 0 <= before_read < 1.5  # the start is before the first line ran, not when process_start was called


def test_only_the_tests_section_needs_pytest(tmp_path, monkeypatch):
    """Every section's modules import without pytest; the tests section then skips its pytest part, saying why."""
    code = "import sys; sys.modules['pytest'] = None; "  # `import pytest` now fails, as where it is not installed
    code += "import bench.gpu_check, bench.gpu_sections, bench.gpu_rollout, bench.gpu_kernels, bench.trainer_steps"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    from bench import gpu_sections

    find_spec = gpu_sections.importlib.util.find_spec
    monkeypatch.setattr(gpu_sections.importlib.util, "find_spec", lambda n: None if n == "pytest" else find_spec(n))
    ctx = gpu_sections.Context(torch.device("cpu"), True, True, time.time() + 60, tmp_path / "s.json", {})
    assert gpu_sections.run_pytest(ctx) == {"selection": "-m triton or gpu tests", "status": "skipped",
                                            "reason": "pytest is not installed here"}  # fmt: skip


@pytest.mark.parametrize("module,status", [("accelerate", "skipped"), ("torchvision", "failed")])
def test_a_section_missing_an_optional_package_is_skipped_not_failed(tmp_path, monkeypatch, module, status):
    from bench import gpu_sections

    def needs_it(ctx):
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)

    monkeypatch.setitem(gpu_sections.SECTIONS, "trainer", needs_it)
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path), "--section", "trainer", "--state",
                                 str(tmp_path / "state.json"), "--deadline", str(time.time() + 60)])  # fmt: skip
    assert gpu_check.run_section(args) == (status == "failed")
    record = json.loads((tmp_path / "state.json").read_text())
    assert record["status"] == status and module in record["reason"]


# ---------------------------------------------------------------------------- the parts, in this process
@pytest.mark.triton  # the op check runs the Triton backend (under the interpreter here)
@pytest.mark.parametrize("h", [0, 16], ids=["from_logits", "from_hidden"])
def test_op_check_reference_by_sequence_chunks_equals_the_whole(monkeypatch, h):
    """On a GPU the float64 reference runs one sequence at a time (the dry run's tiny batch fits one chunk):
    the chunks' losses and gradients, weighted by their share of the sequences, must be the whole batch's."""
    monkeypatch.setattr(gpu_kernels, "REFERENCE_CHUNK", 1)  # one sequence per chunk
    result = gpu_kernels.check_ops(gpu_kernels.KernelCase(3, 8, 100, h, "float32"), torch.device("cpu"))
    assert result["ok"], result
    assert max(result["errors"].values()) < 1e-5


def test_the_gpu_plans_cover_the_shapes_and_dtypes_asked_for():
    full, quick = gpu_kernels.timing_plan(False, False), gpu_kernels.timing_plan(False, True)
    heads = {(c.h, c.v) for c in full if c.h}
    assert heads == {(896, QWEN25_V), (1536, QWEN25_V), (3584, QWEN25_V), (2048, LLAMA3_V), (4096, LLAMA3_V)}
    assert {c.v for c in full if not c.h} == {QWEN25_V, LLAMA3_V}
    assert {c.n for c in full} == {4096, 16384} and {c.dtype for c in full} == {"bfloat16", "float32"}
    assert len(set(full)) == len(full) and full[: len(quick)] == quick  # --quick: the first rows of the full plan
    assert {(c.family, c.dtype) for c in quick} == {
        (f, d) for f in ("logits", "linear") for d in ("bfloat16", "float32")
    }
    assert len(quick) == 4  # one shape per op and dtype
    checks = gpu_kernels.check_plan(False, False)
    assert any(c.n * c.v > 2**31 for c in checks if not c.h)  # 64-bit offsets exercised on the device


def test_kernel_rows_get_their_fraction_of_the_matching_ceiling():
    data = {
        "environment": {"ceilings": {"copy": {"median": 4000.0}, "gemm_bfloat16": {"median": 800.0}}},
        "kernels": {"rows": [
            {"h": 0, "dtype": "bfloat16", "gbps": 3000.0},
            {"h": 896, "dtype": "bfloat16", "tflops": 400.0},
            {"h": 896, "dtype": "float32", "tflops": 40.0},  # no fp32 ceiling measured: no fraction
            {"h": 0, "dtype": "float32", "status": "failed"},
        ]},
    }  # fmt: skip
    gpu_report.add_fractions(data)
    rows = data["kernels"]["rows"]
    assert (rows[0]["ceiling"], rows[0]["pct_of_ceiling"]) == ("copy", 75.0)
    assert (rows[1]["ceiling"], rows[1]["pct_of_ceiling"]) == ("gemm_bfloat16", 50.0)
    assert "pct_of_ceiling" not in rows[2] and "pct_of_ceiling" not in rows[3]
