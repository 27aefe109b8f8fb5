#!/usr/bin/env bash
# The browser the dashboard tests drive: Debian's chromium package and the Playwright client.
# Idempotent and quick when both are there. Never `playwright install` (no downloaded browsers):
# the tests launch /usr/bin/chromium through executable_path.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    echo "setup_browser: installing the chromium package"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
  else  # not Debian / no root: the other tests still run
    echo "setup_browser: no /usr/bin/chromium and no apt-get as root here: the browser tests will be skipped" \
         "(install Debian's chromium package to run them)"
  fi
fi
if ! "$PY" -c "import playwright" >/dev/null 2>&1; then
  echo "setup_browser: installing playwright (the Python client only)"
  "$PY" -m pip install -q playwright
fi
