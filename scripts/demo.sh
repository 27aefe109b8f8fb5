#!/usr/bin/env bash
# The main job: install what is missing, then profile the default zoo model (zoo:relu-llama) on
# the bundled validation text, print the per-layer summary and write a fresh run directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m workbench.cli profile "$@"
