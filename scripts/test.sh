#!/usr/bin/env bash
# Set everything up and run the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
if [ -f scripts/k8s-tools.sh ]; then bash scripts/k8s-tools.sh; fi
export PATH="$PWD/.tools/bin:$PATH"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
