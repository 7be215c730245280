#!/usr/bin/env bash
# Prepares the wheels `python -m bench.gpu_check --wheels DIR` installs on a GPU machine without network:
# the optional packages the check compares with or needs, for CPython 3.12 on manylinux x86_64.
#
#   bash bench/gpu_wheels.sh DIR          # then: python -m bench.gpu_check --wheels DIR --out OUT
#
# datasets (imported by grpo_fast.trainer) with the two dependencies a CUDA image usually lacks (dill,
# multiprocess); trl (TRL's trainer and log-prob helpers), liger-kernel and cut-cross-entropy (the peers).
# Every wheel here is pure Python. Pins: the versions this project's tests run with (trl 1.16.0 and
# datasets 5.2.0 with transformers 5.x); the two peers at the versions current when this was written.
# The check installs them with --no-deps into a temporary folder on its sections' PYTHONPATH, so their
# other requirements (accelerate, pyarrow, pandas, xxhash, fsspec, huggingface-hub) must already be there.
# Checks the folder's size against LIMIT_MIB (default 64: what a device lease may carry with a run).
set -euo pipefail
DIR=${1:?usage: bash bench/gpu_wheels.sh DIR}
LIMIT_MIB=${LIMIT_MIB:-64}
PACKAGES=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
mkdir -p "$DIR"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" "${PACKAGES[@]}"
ls -1 "$DIR"
KIB=$(du -sk "$DIR" | cut -f1)
echo "$DIR: $((KIB / 1024)).$(((KIB % 1024) * 10 / 1024)) MiB (limit $LIMIT_MIB MiB)"
if [ "$KIB" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "$DIR is larger than $LIMIT_MIB MiB" >&2
    exit 1
fi
