"""Test-session setup. With no CUDA device the Triton kernels run under the interpreter, which must be
switched on before triton is first imported (torch does not import triton eagerly).

Tests marked ``triton`` run Triton kernels: on a CUDA host on the GPU with real kernels, elsewhere on
the CPU under the interpreter. Their tensors get there through one mechanism (``_triton_placement``):
on a CUDA host, every tensor test code makes with a factory function (torch.randn, torch.zeros, ...)
without an explicit device is moved to the GPU, after being drawn on the CPU, so seeded inputs are the
same values on both hosts. A test that launches a kernel without the marker fails, so
``pytest -m triton`` selects them all.
"""

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from grpo_fast.optional import MissingPackage

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# trackio fixes its local store from TRACKIO_DIR when first imported, and importing trl imports it (test
# modules are imported at collection): point it at a throwaway directory now, never at the user's store.
TRACKIO_DIR = os.path.join(tempfile.gettempdir(), f"grpo-fast-tests-trackio-{os.getpid()}")
os.environ["TRACKIO_DIR"] = TRACKIO_DIR


def pytest_unconfigure(config):
    shutil.rmtree(TRACKIO_DIR, ignore_errors=True)


TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_FACTORIES = {torch.randn, torch.rand, torch.randint, torch.randperm, torch.zeros, torch.ones, torch.full,
              torch.empty, torch.tensor, torch.arange, torch.linspace, torch.eye}  # fmt: skip


class FactoriesOn(TorchFunctionMode):
    """Factory calls made by test code (files under tests/) without ``device=`` make their tensor on the
    CPU (with the caller's CPU generator, if any) and return it moved to ``device``. Calls that name a
    device, and every call made by library code, are left alone: grpo_fast runs as it would for a user."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES and kwargs.get("device") is None and _called_from_tests():
            return out.to(self.device)
        return out


def _called_from_tests() -> bool:
    """Whether the first frame outside torch and this file belongs to a file under tests/."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename == __file__ or _in(frame, _TORCH)):
        frame = frame.f_back
    return frame is not None and _in(frame, _TESTS)


def _in(frame, directory: Path) -> bool:
    return Path(frame.f_code.co_filename).resolve().is_relative_to(directory)


_TESTS = Path(__file__).resolve().parent
_TORCH = Path(torch.__file__).resolve().parent


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test (or its fixture) stopped by grpo_fast's MissingPackage, an optional package that is not installed
    here (datasets for the toy task's data, ...), is skipped naming the package, not failed. One installed but
    failing to import (a broken new release) still fails."""
    outcome = yield
    report = outcome.get_result()
    missing = call.excinfo is not None and call.excinfo.errisinstance(MissingPackage)
    if missing and importlib.util.find_spec(call.excinfo.value.package) is None:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {call.excinfo.value}")


def pytest_collection_modifyitems(items):
    """A test parametrized with backend="triton" runs the kernels: it gets the ``triton`` marker."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("backend") == "triton" or params.get("loss_backend") == "triton":
            item.add_marker(pytest.mark.triton)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of the Triton tests: the GPU where CUDA is present, else the CPU (interpreter)."""
    return TRITON_DEVICE


@pytest.fixture(autouse=True)
def _triton_placement(request, monkeypatch):
    if request.node.get_closest_marker("triton") is None:
        _refuse_launches(monkeypatch, request.node.nodeid)
        yield
    elif TRITON_DEVICE.type == "cuda":
        with FactoriesOn(TRITON_DEVICE):
            yield
    else:
        yield


def _refuse_launches(monkeypatch, test: str) -> None:
    if importlib.util.find_spec("triton") is None:
        return
    from grpo_fast.kernels import linear_token_stats, token_stats

    def refuse(kernel, *args, **kwargs):
        raise AssertionError(f"{test} launches a Triton kernel: mark it @pytest.mark.triton")

    for module in (token_stats, linear_token_stats):
        monkeypatch.setattr(module, "launch", refuse)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (10x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
