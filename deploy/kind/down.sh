#!/usr/bin/env bash
# Delete the local kind cluster that up.sh created (everything in it goes with it).
# TUSK_KIND_CLUSTER selects the cluster (default: tusk).
set -euo pipefail

CLUSTER="${TUSK_KIND_CLUSTER:-tusk}"

if ! command -v kind >/dev/null 2>&1; then
  echo "down.sh: 'kind' is not on PATH" >&2
  exit 1
fi
if kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
  kind delete cluster --name "${CLUSTER}"
else
  echo "no kind cluster named '${CLUSTER}'; nothing to do" >&2
fi
