#!/usr/bin/env bash
# Prepares the wheels `python -m bench.gpu_check --wheels DIR` installs on a GPU machine without network: the
# optional packages the check compares with (liger-kernel, cut-cross-entropy, trl) and every package they need
# that the GPU image (bench/gpu_image.txt) lacks (accelerate, datasets, pandas, pyarrow, xxhash, ...), for the
# GPU machine's CPython on manylinux x86_64, pure-Python wheels where they exist, within 64 MiB (--limit-mib);
# what does not fit is named. Needs pip with network; see bench/gpu_wheels.py.
#
#   bash bench/gpu_wheels.sh DIR [--python 3.10|3.11|3.12]   # default 3.12; then on the GPU machine:
#   python -m bench.gpu_check --wheels DIR --out OUT
set -euo pipefail
exec python3 "$(dirname "$0")/gpu_wheels.py" "$@"
