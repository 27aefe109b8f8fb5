#!/usr/bin/env bash
# The browser the dashboard tests drive: Debian's chromium package and the Playwright client.
# Idempotent and quick when both are there. Never `playwright install` (no downloaded browsers):
# the tests launch /usr/bin/chromium through executable_path.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x /usr/bin/chromium ]; then
  echo "setup_browser: installing the chromium package"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi
if ! "$PY" -c "import playwright" >/dev/null 2>&1; then
  echo "setup_browser: installing playwright (the Python client only)"
  "$PY" -m pip install -q playwright
fi
