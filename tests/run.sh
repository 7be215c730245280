#!/usr/bin/env bash
# The test command of the README: creates .venv when missing (reusing an installed torch, e.g. a CUDA
# build, through --system-site-packages), installs grpo_fast with its dev extras at the newest releases
# pyproject.toml's ranges allow, prints the versions it resolved, runs pytest.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv --system-site-packages .venv
fi
PY=.venv/bin/python
if ! "$PY" -c "import torch" 2>/dev/null; then
    # the CPU build; on a CUDA machine install the torch you want before running this script
    "$PY" -m pip install -q "torch==2.13.0"
fi
# Every direct dependency but torch is upgraded to its newest allowed release (also one found in the system's
# site-packages or left by an earlier run), so a new release that breaks us shows here; torch stays the one
# installed. Their own dependencies are upgraded only where a new release needs it.
TORCH=$("$PY" -c "import torch; print(torch.__version__)")
mapfile -t DEPS < <("$PY" - <<'TOML'
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for dep in project["dependencies"] + project["optional-dependencies"]["dev"]:
    if dep.split(">")[0].split("=")[0].split(";")[0].strip() != "torch":
        print(dep)
TOML
)
"$PY" -m pip install -q --upgrade -e ".[dev]" "${DEPS[@]}" "torch==$TORCH"
"$PY" - <<'EOF'
import importlib.metadata as md

import grpo_fast

names = ("torch", "triton", "transformers", "trl", "peft", "datasets", "kernels", "accelerate", "numpy")
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"
print("grpo_fast from", grpo_fast.__file__)
print("resolved: " + " | ".join(f"{name} {version(name)}" for name in names))
EOF
exec "$PY" -m pytest -q "$@"
