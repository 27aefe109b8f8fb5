#!/usr/bin/env bash
# Install what is missing, nothing more (used by demo.sh, test.sh and .ci/run).
#   scripts/setup.sh            core dependencies (enough for the demo)
#   scripts/setup.sh viz,dev    plus the extras (widgets, notebooks, tests, Triton interpreter)
# torch: an existing install is kept whatever its version (the GPU machine's 2.11 stays);
# otherwise `pip install torch==2.13.0` runs first. Where pip is set up with a local CPU wheel
# (find-links) that wheel is used; elsewhere on Linux x86_64 pip takes PyPI's default build, the
# CUDA one with its nvidia-* packages (several GB): install a CPU build of torch first to avoid it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}

if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" 2>/dev/null; then
  echo "setup: installing torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi

# the package itself, editable, without touching dependencies; reinstalled when the installed
# one is another checkout's (workbench.kernels maps to kernels/ of the checkout it came from).
# find_spec locates it without importing torch.
here=$(pwd -P)
installed=$("$PY" -c "import importlib.util as u, os; s = u.find_spec('workbench.kernels'); u.find_spec('workbench.widgets'); print(os.path.dirname(os.path.dirname(os.path.realpath(s.origin))))" 2>/dev/null || true)
if [ "$installed" != "$here" ]; then
  echo "setup: installing the workbench package (editable, from $here)"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
    || "$PY" -m pip install -q --no-deps -e .
fi

# then the requirements of pyproject.toml (core + extras), torch excepted (above): pip's resolver
# installs what is missing or too old and leaves the rest alone
mapfile -t reqs < <("$PY" - "$EXTRAS" <<'PYEOF'
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(project["dependencies"])
for extra in filter(None, sys.argv[1].split(",")):
    reqs += project["optional-dependencies"][extra]
print("\n".join(r for r in dict.fromkeys(reqs) if not r.startswith("torch")))
PYEOF
)
"$PY" -m pip install -q "${reqs[@]}"
