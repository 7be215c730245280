"""pytest setup of the benchmark suites.

    python -m pytest bench/ --benchmark-only [--bench-profile cpu|gpu|smoke] [--bench-methods a,b]

The suites live in ``bench/bench_*.py``, which pytest's default ``test_*.py`` pattern does not match
and the repository's ``testpaths = ["tests"]`` does not reach: the normal test run never collects
them; they are collected only when bench/ (or a file in it) is passed explicitly.

Run this way, everything happens in one process: timings are as good as in ``bench.run``, and peak
memory relies on resetting the RSS high-water mark between benchmarks (Linux). ``python -m bench.run``
runs each (method, shape) in a fresh process instead; that is the command the published tables use.
"""

from __future__ import annotations

import pytest
import torch

from bench import harness
from bench.shapes import PROFILES


def pytest_addoption(parser):
    group = parser.getgroup("grpo_fast bench")
    group.addoption(
        "--bench-profile",
        choices=["auto", *PROFILES],
        default="auto",
        help="shape set: gpu (real-model shapes), cpu (fits 15 min on 2 cores), smoke; auto = gpu on CUDA, else cpu",
    )
    group.addoption("--bench-methods", default=None, help="comma-separated method names (default: all)")
    group.addoption("--bench-phase", default="", help="recorded with each result, e.g. start/end for the ceilings")


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest's python plugin whatever its name
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def profile_name(config) -> str:
    name = config.getoption("--bench-profile")
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return name


def profile(config):
    return PROFILES[profile_name(config)]


def selected(config, name: str) -> bool:
    wanted = config.getoption("--bench-methods")
    return wanted is None or name in wanted.split(",")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return harness.bench_device()


@pytest.fixture
def phase(request) -> str:
    return request.config.getoption("--bench-phase")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["grpo_fast_bench"] = {**harness.machine_info(harness.bench_device()), "profile": profile_name(config)}
