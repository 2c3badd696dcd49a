#!/usr/bin/env bash
# Create .venv and install tusk into it. Usage: scripts/setup.sh [serve|dev]   (default: serve)
# Works on a fresh Debian/Ubuntu machine with Python 3.11+, pip and apt.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-serve}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "tusk needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    # Debian/Ubuntu ship venv separately.
    rm -rf .venv
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    ver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "python${ver}-venv" || $SUDO apt-get install -y -qq python3-venv
    "$PYTHON" -m venv .venv
  fi
fi

.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned resolver run may pick a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[${extra}]"
.venv/bin/python -m tusk.protocol.build 2>/dev/null || .venv/bin/python -c "import tusk.protocol"
echo "tusk installed in .venv (extra: ${extra})" >&2
