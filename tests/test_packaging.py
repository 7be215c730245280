"""The package as users install it: a wheel (built from the sdist, as an index would serve it) installed into
a fresh virtual environment, used from a directory outside the checkout.

The editable install the other tests run on maps the source tree into place, so a subpackage missing
from the wheel would go unnoticed there. Here the new environment reuses this one's installed packages
(torch, transformers, ...) through a path file, holds nothing of the checkout, and must import every
public module, run the command, compute a loss and gradients on each backend that runs here, and run the
demo for two GRPO steps.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

LOSS_ON_EVERY_BACKEND = textwrap.dedent(
    """
    import torch, grpo_fast as gf
    torch.manual_seed(0)
    for backend in ("reference", "torch", "triton"):
        logits = torch.randn(3, 5, 11, requires_grad=True)
        ids, adv, ref = torch.randint(0, 11, (3, 5)), torch.randn(3), -2 - torch.rand(3, 5)
        out = gf.grpo_loss(logits, ids, adv, ref_logprobs=ref, backend=backend)
        out.loss.backward()
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0, backend
        print(backend, round(float(out.loss), 6))
    """
)


def _run(args, cwd, env=None, timeout=600):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


# Build outputs in the checkout (build/lib, *.egg-info) would leak into a build: copy the sources without them.
NOT_SOURCES = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "runs")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A copy of the checkout without build outputs, virtual environments or caches."""
    copy = tmp_path_factory.mktemp("src") / "grpo_fast"
    shutil.copytree(ROOT, copy, ignore=NOT_SOURCES)
    return copy


@pytest.fixture(scope="module")
def dists(tmp_path_factory, sources):
    """sdist and wheel from ``python -m build`` (the wheel built from the unpacked sdist)."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(sources)],
                            cwd=sources, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert "deprecat" not in printed.lower(), printed  # e.g. setuptools on a table-form project.license
    (wheel,) = out.glob("*.whl")
    return out, wheel


@pytest.fixture(scope="module")
def venv(tmp_path_factory, dists):
    """A fresh venv with the wheel installed, seeing this environment's packages through a .pth file."""
    home = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(home)], cwd=home)
    python = home / "bin" / "python"
    target = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=home).strip())
    reused = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (target / "reused_site_packages.pth").write_text("\n".join(reused) + "\n")
    # pip runs from this environment, installing into the new one: --no-index, so nothing is downloaded
    # and a dependency the reused packages do not satisfy is an error rather than a download.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--quiet", str(dists[1])],
         cwd=home)  # fmt: skip
    return home


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{home / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["TRITON_INTERPRET"] = "1"  # no GPU here: the triton backend runs under the interpreter
    return env


def test_wheel_holds_every_package_and_equals_the_sdist_build(dists, sources):
    """Every folder with an __init__.py is in the wheel (kernels/ as grpo_fast.kernels), and a wheel built
    straight from the source tree holds the same files as the one built from the sdist."""
    out, wheel = dists
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(ROOT).as_posix() for p in ROOT.glob("grpo_fast/**/__init__.py")}
    for package in sorted(packages) + ["kernels"]:
        installed = "grpo_fast/kernels" if package == "kernels" else package
        modules = {f"{installed}/{p.name}" for p in (ROOT / package).glob("*.py")}
        assert modules <= names, f"{package}: missing from the wheel: {sorted(modules - names)}"
    tree = out / "from-tree"
    _run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(tree), str(sources)],
         cwd=sources)  # fmt: skip
    (direct,) = tree.glob("*.whl")
    assert set(zipfile.ZipFile(direct).namelist()) == names


def test_installed_wheel_works_outside_the_checkout(venv, tmp_path):
    python, env = str(venv / "bin" / "python"), _env(venv)
    where = _run([python, "-c", "import grpo_fast, grpo_fast.ops, grpo_fast.kernels, grpo_fast.integrations.trl, "
                  "grpo_fast.cli; print(grpo_fast.__file__)"], cwd=tmp_path, env=env)  # fmt: skip
    assert Path(where.strip()).is_relative_to(venv), f"imported from {where.strip()}, not the new venv"
    assert "demo" in _run([str(venv / "bin" / "grpo-fast"), "--help"], cwd=tmp_path, env=env)
    printed = _run([python, "-c", LOSS_ON_EVERY_BACKEND], cwd=tmp_path, env=env)
    assert [line.split()[0] for line in printed.splitlines()] == ["reference", "torch", "triton"]
    demo = _run([str(venv / "bin" / "grpo-fast"), "demo", "--steps", "2", "--out", str(tmp_path / "demo")],
                cwd=tmp_path, env=env)  # fmt: skip
    assert "in 2 GRPO steps" in demo and (tmp_path / "demo" / "summary.json").is_file()
