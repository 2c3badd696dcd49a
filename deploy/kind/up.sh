#!/usr/bin/env bash
# Bring tusk up on a local kind cluster and prove it answers:
#   1. create the kind cluster (kept if it exists)   2. build the images (scripts/images.sh), `kind load` them
#   3. helm install the chart                       4. apply deploy/examples/tiny.yaml (CPU, 1P+1D)
#   5. wait until the ModelDeployment is Ready      6. port-forward the router, send a chat completion
# Needs docker, kind, kubectl, helm and curl (helm and kubectl: scripts/k8s-tools.py puts them in
# .tools/bin). Environment overrides: TUSK_KIND_CLUSTER, TUSK_NAMESPACE, TUSK_IMAGE_TAG,
# TUSK_IMAGE_REGISTRY, TUSK_ROUTER_PORT, KIND_NODE_IMAGE, TUSK_SKIP_BUILD=1 (reuse built images),
# TUSK_READY_TIMEOUT (default 15m); scripts/images.sh reads its own (TUSK_BASE_IMAGE, ...).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER="${TUSK_KIND_CLUSTER:-tusk}"
NAMESPACE="${TUSK_NAMESPACE:-tusk-system}"
TAG="${TUSK_IMAGE_TAG:-dev}"
REGISTRY="${TUSK_IMAGE_REGISTRY:-ghcr.io/tusk-dev}"
PORT="${TUSK_ROUTER_PORT:-8000}"
NODE_IMAGE="${KIND_NODE_IMAGE:-kindest/node:v1.33.1}"
READY_TIMEOUT="${TUSK_READY_TIMEOUT:-15m}"
RELEASE=tusk
CONTEXT="kind-${CLUSTER}"
# Exactly what the chart and the operator run here: the CPU worker serves the tiny model.
IMAGES=(operator router worker-cpu)

# helm and kubectl from scripts/k8s-tools.py, when they are not installed system-wide.
if [[ -d "${ROOT}/.tools/bin" ]]; then
  PATH="${PATH}:${ROOT}/.tools/bin"
fi

log() { printf '\n==> %s\n' "$*" >&2; }

need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "up.sh: '$1' is not on PATH: $2" >&2
    exit 1
  fi
}
need docker "install Docker (https://docs.docker.com/get-docker/)"
need kind "install kind (https://kind.sigs.k8s.io/docs/user/quick-start/)"
need kubectl "run: python scripts/k8s-tools.py  (or install kubectl)"
need helm "run: python scripts/k8s-tools.py  (or install helm)"
need curl "install curl"

diagnose() {
  echo "up.sh: failed; state of namespace ${NAMESPACE}:" >&2
  kubectl --context "${CONTEXT}" -n "${NAMESPACE}" get md,deploy,pods -o wide >&2 || true
  kubectl --context "${CONTEXT}" -n "${NAMESPACE}" describe md tiny >&2 || true
  kubectl --context "${CONTEXT}" -n "${NAMESPACE}" logs "deploy/${RELEASE}-operator" --tail=50 >&2 || true
}

log "1/6 kind cluster '${CLUSTER}'"
if kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
  echo "cluster exists, reusing it" >&2
else
  kind create cluster --name "${CLUSTER}" --image "${NODE_IMAGE}" \
    --config "${ROOT}/deploy/kind/cluster.yaml" --wait 120s
fi

log "2/6 images (tag ${TAG})"
if [[ "${TUSK_SKIP_BUILD:-0}" != "1" ]]; then
  TUSK_CONTAINER_ENGINE=docker TUSK_IMAGE_REGISTRY="${REGISTRY}" TUSK_IMAGE_TAG="${TAG}" \
    bash "${ROOT}/scripts/images.sh" "${IMAGES[@]}"
fi
for component in "${IMAGES[@]}"; do
  kind load docker-image --name "${CLUSTER}" "${REGISTRY}/tusk-${component}:${TAG}"
done

trap diagnose ERR

log "3/6 helm install ${RELEASE} into ${NAMESPACE}"
helm upgrade --install "${RELEASE}" "${ROOT}/helm/tusk" \
  --kube-context "${CONTEXT}" --namespace "${NAMESPACE}" --create-namespace \
  --values "${ROOT}/deploy/kind/values-kind.yaml" \
  --set "image.tag=${TAG}" \
  --set "operator.image.repository=${REGISTRY}/tusk-operator" \
  --set "router.image.repository=${REGISTRY}/tusk-router" \
  --set "operator.workerImage.repository=${REGISTRY}/tusk-worker" \
  --wait --timeout 5m

log "4/6 ModelDeployment tiny (1 prefill + 1 decode, CPU)"
kubectl --context "${CONTEXT}" -n "${NAMESPACE}" apply -f "${ROOT}/deploy/examples/tiny.yaml"

log "5/6 waiting for Ready (up to ${READY_TIMEOUT})"
kubectl --context "${CONTEXT}" -n "${NAMESPACE}" wait --for=condition=Ready md/tiny --timeout="${READY_TIMEOUT}"
kubectl --context "${CONTEXT}" -n "${NAMESPACE}" get md tiny -o wide

log "6/6 chat completion through the router (port-forward 127.0.0.1:${PORT})"
kubectl --context "${CONTEXT}" -n "${NAMESPACE}" port-forward "svc/${RELEASE}-router" "${PORT}:80" >/dev/null 2>&1 &
forward_pid=$!
trap 'kill "${forward_pid}" 2>/dev/null || true' EXIT
# /health answers 200 once the router has discovered a ready worker for every model it serves.
for _ in $(seq 1 60); do
  if curl -fsS "http://127.0.0.1:${PORT}/health" >/dev/null 2>&1; then
    break
  fi
  sleep 2
done
curl -fsS --retry 10 --retry-all-errors --retry-delay 2 --max-time 120 \
  "http://127.0.0.1:${PORT}/v1/chat/completions" \
  -H 'Content-Type: application/json' \
  -d '{"model": "tiny", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}'
echo

cat >&2 <<MSG

tusk is up on kind cluster '${CLUSTER}', namespace '${NAMESPACE}'.
  router:   kubectl --context ${CONTEXT} -n ${NAMESPACE} port-forward svc/${RELEASE}-router ${PORT}:80
            then http://127.0.0.1:${PORT}/v1 (OpenAI API, model "tiny")
  status:   kubectl --context ${CONTEXT} -n ${NAMESPACE} get md,pods
  check:    helm test ${RELEASE} --kube-context ${CONTEXT} -n ${NAMESPACE}
  tear down: deploy/kind/down.sh
MSG
