"""The wheels ``python -m bench.gpu_check --wheels DIR`` installs on a GPU machine without network: the optional
packages the check compares with, and every package they need that the GPU image lacks, for one CPython.

    bash bench/gpu_wheels.sh DIR [--python 3.10|3.11|3.12]     # default 3.12, the image's Python

The image is ``bench/gpu_image.txt`` (torch, Triton, transformers, numpy, pytest). pip resolves (``install
--dry-run --report``: nothing installed) what the image holds and what the image plus CARRIED needs, for the
target Python on manylinux x86_64; the difference is fetched one wheel at a time, pure Python (``none-any``)
where such a wheel exists, else the platform wheel. Each package of CARRIED comes with the missing packages it
needs, as a group, in CARRIED's order; a group that would take the folder past ``--limit-mib`` (64: what a device
lease carries with a run) is left out whole, and said so. Nothing is installed here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

IMAGE = Path(__file__).resolve().parent / "gpu_image.txt"
# in order of use: wheel (setuptools < 70.1 builds the editable install with it), the kernels' peers (small),
# then TRL's trainer with what it imports (accelerate, datasets, and through datasets pandas and pyarrow: most of
# the 64 MiB). Versions: those this project's tests run with.
CARRIED = ("wheel", "liger-kernel==0.8.5", "cut-cross-entropy==25.1.1", "trl==1.16.0", "datasets==5.2.0")
SIZE_CAPS = ("pyarrow<25",)  # pyarrow 26.0.1 is 52.5 MiB, 24.0.0 46.6 MiB: with pandas (11.5) the set fits 64 MiB
PYTHONS = ("3.10", "3.11", "3.12")
PLATFORMS = [f"manylinux_2_{v}_x86_64" for v in range(17, 36)] + ["manylinux2014_x86_64", "linux_x86_64"]


def pip(*args: str, quiet_failure: bool = False) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL if quiet_failure else None)


def target(python: str, platform: bool = True) -> list[str]:
    """pip's options for wheels that run on CPython ``python``: any platform wheel, or none-any only."""
    plats = PLATFORMS if platform else ["any"]
    abi = [] if platform else ["--abi", "none"]
    return ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", *abi,
            *(arg for p in plats for arg in ("--platform", p))]  # fmt: skip


def resolve(python: str, work: Path, name: str, *requirements: str, quiet_failure=False) -> dict[str, dict]:
    """canonical name -> pip's report entry of everything ``requirements`` install (nothing downloaded but metadata)."""
    report = work / f"{name}.json"
    pip("install", "--dry-run", "--ignore-installed", "--target", str(work / "t"), "--report", str(report),
        *target(python), *requirements, quiet_failure=quiet_failure)  # fmt: skip
    return {canonicalize_name(e["metadata"]["name"]): e for e in json.loads(report.read_text())["install"]}


def needs(entry: dict, python: str) -> list[str]:
    """The packages ``entry`` requires on Linux x86_64 CPython ``python`` (no extras)."""
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": "",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}  # fmt: skip
    reqs = (Requirement(r) for r in entry["metadata"].get("requires_dist") or [])
    return [canonicalize_name(r.name) for r in reqs if r.marker is None or r.marker.evaluate(env)]


def installable(python: str, work: Path, pins: Path) -> tuple[list[str], list[str]]:
    """(the requests of CARRIED that resolve on the image for ``python``, those that do not: e.g. trl 1.16 needs
    Python >= 3.11). All at once first; only if that fails, one by one."""
    image = ("-r", str(IMAGE), "-c", str(pins), *SIZE_CAPS)
    try:
        resolve(python, work, "all", *image, *CARRIED, quiet_failure=True)
        return list(CARRIED), []
    except subprocess.CalledProcessError:
        failed = []
        for request in CARRIED:
            try:
                resolve(python, work, "one", *image, request, quiet_failure=True)
            except subprocess.CalledProcessError:
                failed.append(request)
        return [r for r in CARRIED if r not in failed], failed


def groups(requests: list[str], carried: dict[str, dict], python: str) -> list[tuple[str, list[str]]]:
    """Per request (in order): it and the missing packages it needs that no earlier group brought."""
    taken: set[str] = set()
    out = []
    for request in requests:
        todo, group = [canonicalize_name(Requirement(request).name)], []
        while todo:
            name = todo.pop()
            if name in carried and name not in taken:
                taken.add(name)
                group.append(name)
                todo.extend(needs(carried[name], python))
        out.append((request, sorted(group)))
    return out


def fetch(name: str, version: str, python: str, into: Path) -> Path:
    """The pure-Python wheel of name==version if there is one, else the platform wheel for ``python``."""
    before = set(into.iterdir())
    try:
        pip("download", "--no-deps", "-d", str(into), *target(python, False), f"{name}=={version}", quiet_failure=True)
    except subprocess.CalledProcessError:
        pip("download", "--no-deps", "-d", str(into), *target(python), f"{name}=={version}")
    (wheel,) = set(into.iterdir()) - before
    return wheel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bash bench/gpu_wheels.sh", description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path, help="folder for the wheels (created; existing wheels are left)")
    p.add_argument("--python", default="3.12", choices=PYTHONS, help="the GPU machine's Python (default 3.12)")
    p.add_argument("--limit-mib", type=float, default=64.0, help="the folder's size limit (default 64)")
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_wheels_") as tmp:
        work = Path(tmp)
        image = resolve(args.python, work, "image", "-r", str(IMAGE))
        pins = work / "image-pins.txt"
        pins.write_text("".join(f"{e['metadata']['name']}=={e['metadata']['version']}\n" for e in image.values()))
        requests, unavailable = installable(args.python, work, pins)
        everything = resolve(args.python, work, "carried", "-r", str(IMAGE), "-c", str(pins), *requests, *SIZE_CAPS)
        carried = {name: e for name, e in everything.items() if name not in image}
        used = sum(w.stat().st_size for w in args.dir.glob("*.whl"))
        left_out = []
        for request, names in groups(requests, carried, args.python):
            staged = work / canonicalize_name(Requirement(request).name)
            staged.mkdir()
            wheels = [fetch(n, carried[n]["metadata"]["version"], args.python, staged) for n in names]
            size = sum(w.stat().st_size for w in wheels)
            if used + size > args.limit_mib * 2**20:
                left_out.append(f"{request} ({', '.join(names)}: {size / 2**20:.1f} MiB)")
                continue
            used += size
            for wheel in wheels:
                shutil.copy2(wheel, args.dir / wheel.name)
            print(f"{request}: {', '.join(w.name for w in wheels) or 'carried above'} ({size / 2**20:.1f} MiB)")
    print(f"{args.dir}: {used / 2**20:.1f} MiB of wheels for CPython {args.python} (limit {args.limit_mib:g} MiB)")
    for item in left_out:
        print(f"left out, past the size limit: {item}")
    for request in unavailable:
        print(f"left out, no release for CPython {args.python} on this image: {request}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
