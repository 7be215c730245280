"""Test-session setup. With no CUDA device the Triton kernels run under the interpreter, which must be
switched on before triton is first imported (torch does not import triton eagerly)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Where the Triton tests put their tensors: the GPU with real kernels where CUDA is present, else the CPU
# under the interpreter (set above). Tests marked ``triton`` build their inputs on this device.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of the Triton tests (see TRITON_DEVICE)."""
    return TRITON_DEVICE


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (10x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
