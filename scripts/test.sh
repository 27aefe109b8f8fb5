#!/usr/bin/env bash
# Install what is missing (with the viz and dev extras), lint, then run every test: the package
# tests, the Triton kernels under the interpreter, and the notebooks through nbval, spread over
# the machine's cores (pytest-xdist, --dist loadfile: each test file, so each notebook's cells in
# order on one kernel, runs on one worker; --dist loadgroup split notebooks' kernels in a clean venv).
# WB_TEST_WORKERS=N sets the number of workers (default: one per logical CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh viz,dev
PYTHON="$PY" bash scripts/setup_browser.sh  # chromium + playwright for tests/widgets/test_app_browser.py
"$PY" -m ruff check .
# the notebooks run on a kernel of this interpreter, registered in a private Jupyter path (no
# change to the user's kernels), removed on exit
kdir=$(mktemp -d)
trap 'rm -rf "$kdir"' EXIT
export JUPYTER_PATH="$kdir/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
"$PY" -m ipykernel install --prefix "$kdir" --name python3 >/dev/null
"$PY" -m pytest -q -p no:cacheprovider -p no:benchmark -n "${WB_TEST_WORKERS:-logical}" --dist loadfile \
  --nbval notebooks --nbval-sanitize-with notebooks/sanitize.cfg tests "$@"
