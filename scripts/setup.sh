#!/usr/bin/env bash
# Install what is missing, nothing more (used by demo.sh, test.sh and .ci/run).
#   scripts/setup.sh            core dependencies (enough for the demo)
#   scripts/setup.sh viz,dev    plus the extras (widgets, notebooks, tests, Triton interpreter)
# torch: an existing install is kept whatever its version (the GPU machine's 2.11 stays);
# otherwise torch==2.13.0 is installed first, so pip never resolves a bare `torch` requirement
# to the multi-GB CUDA build on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi

# the package itself, editable, without touching dependencies; reinstalled when the installed
# one is another checkout's (workbench.kernels maps to kernels/ of the checkout it came from)
here=$(pwd -P)
installed=$("$PY" -c "import os, workbench.kernels as k, workbench.widgets; print(os.path.dirname(os.path.dirname(os.path.realpath(k.__file__))))" 2>/dev/null || true)
if [ "$installed" != "$here" ]; then
  echo "setup: installing the workbench package (editable, from $here)"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
    || "$PY" -m pip install -q --no-deps -e .
fi

# then only the requirements that are missing or too old
mapfile -t missing < <("$PY" scripts/missing_requirements.py "$EXTRAS")
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  "$PY" -m pip install -q "${missing[@]}"
fi
