"""Test-session setup. With no CUDA device the Triton kernels run under the interpreter, which must be
switched on before triton is first imported (torch does not import triton eagerly)."""

import os
import shutil
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# trackio fixes its local store from TRACKIO_DIR when first imported, and importing trl imports it (test
# modules are imported at collection): point it at a throwaway directory now, never at the user's store.
TRACKIO_DIR = os.path.join(tempfile.gettempdir(), f"grpo-fast-tests-trackio-{os.getpid()}")
os.environ["TRACKIO_DIR"] = TRACKIO_DIR


def pytest_unconfigure(config):
    shutil.rmtree(TRACKIO_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (10x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
