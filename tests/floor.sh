#!/usr/bin/env bash
# The dependency floors, run: builds a fresh venv in which every `name>=X` of pyproject.toml's dependencies
# is installed as `name==X` (the rest at their newest), then runs the ops, kernels, decoding and trainer
# tests in it. Not part of CI: it installs PyPI's torch, which brings the CUDA libraries (~3 GB).
#
#   bash tests/floor.sh                    # every floor, torch included
#   bash tests/floor.sh --torch 2.15.0     # another torch (and the Triton it pins), the other floors kept
#   bash tests/floor.sh --venv DIR -x      # the venv's folder (default .venv-floor); the rest goes to pytest
#
# pip's own configuration applies: a constraints file that caps torch (some machines have one) must be
# lifted for --torch with a newer version, e.g. with PIP_CONFIG_FILE=/dev/null.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="" VENV=.venv-floor
while [ $# -gt 0 ]; do
    case "$1" in
        --torch) TORCH="$2"; shift 2 ;;
        --venv) VENV="$2"; shift 2 ;;
        *) break ;;
    esac
done
TESTS=(tests/test_reference.py tests/test_loss_torch.py tests/test_linear.py tests/test_numerics.py
       tests/test_validation.py tests/test_compile.py tests/test_triton_loss.py tests/test_triton_linear.py
       tests/test_triton_token_stats.py tests/test_decoding.py tests/test_engines.py tests/test_shared_prefix.py
       tests/test_trainer.py)

# `name>=X` -> `name==X` (the environment marker kept); with --torch, torch's own pins choose Triton
mapfile -t PINS < <(python3 - "$TORCH" <<'EOF'
import re, sys, tomllib
torch = sys.argv[1]
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name, _, marker = dep.partition(";")
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,\s]+)\s*", name)
    if match is None:
        continue
    package, floor = match.groups()
    if torch and package in ("torch", "triton"):
        pin = f"torch=={torch}" if package == "torch" else None
    else:
        pin = f"{package}=={floor}"
    if pin:
        print(pin + (f";{marker}" if marker else ""))
EOF
)
echo "floors: ${PINS[*]}"
rm -rf "$VENV"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q -e . "${PINS[@]}" pytest
# Triton 3.4's interpreter (torch 2.8's Triton) turns one-element arrays into ints, which NumPy 2.4 refuses
# ("only 0-dimensional arrays can be converted"): the kernel tests need an older NumPy there (a GPU does not)
if "$PY" -c "import sys, triton; sys.exit(tuple(map(int, triton.__version__.split('.')[:2])) >= (3, 5))"; then
    "$PY" -m pip install -q "numpy<2.4"
fi
"$PY" -m pip check
"$PY" - <<'EOF'
import importlib.metadata as md
print(" | ".join(f"{n} {md.version(n)}" for n in ("torch", "triton", "transformers", "numpy", "filelock")))
EOF
exec "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@"
