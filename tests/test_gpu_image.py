"""``python -m bench.gpu_check --dry-run --quick`` in a venv made like the CUDA image the GPU run will use
(``bench/gpu_image.txt``: torch 2.11 (PyPI's wheel runs on CPU), Triton 3.6, transformers 5.17, numpy < 2.3,
pytest, setuptools 65 (68 on 3.12); none of trl, liger-kernel, datasets, pandas, pyarrow, accelerate, peft),
with this Python: bare, then with the wheels ``bench/gpu_wheels.sh`` fetches for that Python.

The venv is kept in ``.venv-gpu-image/`` at the repository root (gitignored), keyed on the image file, the
packages bench/gpu_wheels.py carries, this Python and the checkout's path: a change of any rebuilds it.
Building it needs PyPI (about 3 GB: torch brings CUDA libraries); where that fails the tests skip and say why.
grpo_fast goes in the way docs/cuda.md says to install it on the GPU machine: offline, ``pip install --no-deps
--no-build-isolation -e .`` with the old setuptools (the ``wheel`` package from the carried folder on
PYTHONPATH); that step failing fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from bench import gpu_wheels

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-gpu-image"
IMAGE = ROOT / "bench" / "gpu_image.txt"
SECTIONS = ("environment", "tests", "kernels", "rollout", "trainer")
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
# CPU, shared with other jobs: Triton's ~270 tests under the interpreter need more than the default share
BUDGET_S = "900"

pytestmark = pytest.mark.slow  # cold: ~6 min to build the venv (network), then the runs: ~4 + ~2 min


def _key() -> str:
    """What the venv and its wheels are made from: the image, the carried requests, this Python, the checkout."""
    wheels = repr((gpu_wheels.CARRIED, gpu_wheels.SIZE_CAPS, gpu_wheels.PLATFORMS)).encode()
    parts = [IMAGE.read_bytes(), wheels, sys.version.encode(), bytes(ROOT)]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()


def _step(cmd: list[str], what: str, network: bool, env: dict | None = None) -> None:
    """Run one build step; a failure of a step that needs the network skips (saying why), any other fails."""
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode == 0:
        return
    tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
    if not network:
        pytest.fail(f"{what} failed:\n{tail}")
    reason = f"the GPU-image venv cannot be built ({what} failed; no network to PyPI?):\n{tail}"
    warnings.warn(reason, stacklevel=2)  # shown in pytest's summary even under -q
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image() -> tuple[Path, Path]:
    """(the venv's python, the carried wheels for it), built when missing or stale; timings in build.json."""
    python, wheels, key = VENV / "bin" / "python", VENV / "wheels", _key()
    if python.exists() and (VENV / "key").exists() and (VENV / "key").read_text() == key:
        return python, wheels
    shutil.rmtree(VENV, ignore_errors=True)
    start = time.time()
    _step([sys.executable, "-m", "venv", str(VENV)], "python -m venv", network=False)
    _step([str(python), "-m", "pip", "install", "-q", "-r", str(IMAGE)], f"pip install -r {IMAGE.name}", network=True)
    _step(["bash", "bench/gpu_wheels.sh", str(wheels), "--python", PYTHON], "bench/gpu_wheels.sh", network=True)
    (wheel,) = wheels.glob("wheel-*.whl")  # setuptools < 70.1 builds the editable wheel with it
    _step([str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-e", "."],
          "the offline install", network=False, env={**os.environ, "PYTHONPATH": str(wheel)})  # fmt: skip
    (VENV / "build.json").write_text(json.dumps({"cold_s": round(time.time() - start, 1), "key": key}))
    (VENV / "key").write_text(key)
    return python, wheels


def dry_run(python: Path, out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [str(python), "-m", "bench.gpu_check", "--dry-run", "--quick", "--budget-s", BUDGET_S, "--out", str(out)]
    proc = subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    print((out / "gpu_check.md").read_text())  # the section table, for the log
    return proc, json.loads((out / "gpu_check.json").read_text())


def _check_sections(proc: subprocess.CompletedProcess, data: dict) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in SECTIONS:
        assert data[name]["status"] in ("ok", "skipped") and data[name]["reason"], (name, data[name])
    assert data["tests"]["pytest"]["counts"]["passed"] > 200  # pytest imported every test module and ran


def test_the_image_has_what_the_gpu_machine_has_and_lacks(image):
    """torch 2.11, an old setuptools, none of the optional packages; grpo_fast (installed offline) imports."""
    python, _ = image
    absent = ("trl", "liger_kernel", "datasets", "pandas", "pyarrow", "accelerate", "peft", "wheel")
    checks = ", ".join(f"u.find_spec({m!r}) is None" for m in absent)
    code = "import importlib.util as u, setuptools, torch, grpo_fast.trainer, grpo_fast.r1.toy; "
    code += f"print(torch.__version__, setuptools.__version__, {checks})"
    out = subprocess.run([str(python), "-c", code], cwd="/", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    torch_version, setuptools_version, *missing = out.stdout.split()
    assert torch_version.startswith("2.11.0") and int(setuptools_version.split(".")[0]) < 70
    assert missing == ["True"] * len(absent)


def test_bare_image_dry_run(image, tmp_path):
    python, _ = image
    proc, data = dry_run(python, tmp_path)
    _check_sections(proc, data)
    trainer = data["trainer"]
    assert trainer["trainers"] == ["grpo_fast"] and trainer["results"]["grpo_fast"]["step_s"] > 0
    assert "TRL's GRPOTrainer does not import here" in trainer["trl"]
    kernel_skips = {r["method"]: r["reason"] for r in data["kernels"]["rows"] if r["status"] == "skipped"}
    assert "does not import here" in kernel_skips["trl"]  # a missing peer is a skipped row, named


def test_carried_wheels_dry_run_times_trl_too(image, tmp_path):
    """The sections the carried packages change: the peers' kernel rows and TRL's trainer steps (the tests
    section, with TRL's test modules collected too, is left out here to keep the warm run to a few minutes)."""
    python, wheels = image
    proc, data = dry_run(python, tmp_path, "--wheels", str(wheels), "--sections", "environment,kernels,trainer")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert data["wheels"]["status"] == "ok" and len(data["wheels"]["installed"]) == len(list(wheels.glob("*.whl")))
    for name in ("environment", "kernels", "trainer"):
        assert data[name]["status"] == "ok", (name, data[name])
    timed = {r["method"] for r in data["kernels"]["rows"] if r["status"] == "ok"}
    assert "trl" in timed  # TRL's selective_log_softmax, now importable, is a timed peer
    results = data["trainer"]["results"]
    assert data["trainer"]["trainers"] == ["grpo_fast", "trl"] and results["trl"]["step_s"] > 0
    assert results["grpo_fast"]["step_s"] > 0


def test_a_build_step_without_network_skips_saying_why_and_an_offline_one_fails():
    fails = [sys.executable, "-c", "import sys; print('ERROR: Could not find a version (no network)'); sys.exit(1)"]
    with pytest.warns(UserWarning, match="cannot be built"), pytest.raises(pytest.skip.Exception) as skipped:
        _step(fails, "pip install -r gpu_image.txt", network=True)
    assert "pip install -r gpu_image.txt failed; no network to PyPI?" in str(skipped.value)
    assert "Could not find a version (no network)" in str(skipped.value)  # pip's own words, printed
    with pytest.raises(pytest.fail.Exception, match="the offline install failed"):
        _step(fails, "the offline install", network=False)
