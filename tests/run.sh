#!/usr/bin/env bash
# The test command of the README: creates .venv when missing (reusing an installed torch, e.g. a CUDA
# build, through --system-site-packages), installs grpo_fast with its dev extras, runs pytest.
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
"$PY" -m pip install -q -e ".[dev]"
"$PY" -c "import grpo_fast, torch; print('grpo_fast from', grpo_fast.__file__, '| torch', torch.__version__)"
exec "$PY" -m pytest -q "$@"
