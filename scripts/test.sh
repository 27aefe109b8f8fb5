#!/usr/bin/env bash
# Install what is missing (with the viz and dev extras), lint, then run every test: the package
# tests, the Triton kernels under the interpreter, and the notebooks through nbval.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh viz,dev
"$PY" -m ruff check .
"$PY" -m ipykernel install --user --name python3 >/dev/null 2>&1 || true
exec "$PY" -m pytest -q -p no:cacheprovider --nbval notebooks --nbval-sanitize-with notebooks/sanitize.cfg tests "$@"
