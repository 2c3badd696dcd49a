#!/usr/bin/env bash
# Build tusk's container images locally with docker or podman, whichever works here, and print
# their sizes and build times.
#
#   scripts/images.sh                      operator, router and the CPU worker (the default set)
#   scripts/images.sh router worker-cuda   only these (operator router worker-cpu worker-cuda
#                                          worker-rocm worker-xpu)
#
# Images are named as the chart and the operator expect: ${TUSK_IMAGE_REGISTRY}/tusk-<name>:${TUSK_IMAGE_TAG}
# (default ghcr.io/tusk-dev/tusk-router:dev ...). Environment:
#   TUSK_IMAGE_REGISTRY     registry/owner prefix (default ghcr.io/tusk-dev)
#   TUSK_IMAGE_TAG          tag (default dev)
#   TUSK_CONTAINER_ENGINE   docker or podman (default: docker when its daemon answers, else podman)
#   TUSK_BASE_IMAGE         base image for every stage (default: the Dockerfiles' BASE_IMAGE; when it
#                           cannot be pulled, a Debian bookworm image made here with debootstrap)
#   TUSK_TORCH_INDEX_URL    torch wheel index for the workers (default: download.pytorch.org's index
#                           for the accelerator; when that is unreachable, the CPU worker gets a local
#                           index serving the torch CPU wheel that pip finds on this machine)
#   TUSK_BUILD_CA_BUNDLE    CA bundle pip trusts inside builds (default: the host's system bundle), so
#                           a TLS-intercepting proxy works; passed as a build secret, never baked in.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKER_DIR="${ROOT}/deploy/docker"
REGISTRY="${TUSK_IMAGE_REGISTRY:-ghcr.io/tusk-dev}"
TAG="${TUSK_IMAGE_TAG:-dev}"
ALL_IMAGES=(operator router worker-cpu worker-cuda worker-rocm worker-xpu)
DEFAULT_IMAGES=(operator router worker-cpu)
LOCAL_BASE="localhost/tusk-base:bookworm"
TORCH_VERSION="2.13.0"
CACHE_DIR="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/tusk/images"

die() {
  echo "images.sh: $*" >&2
  exit 2
}
log() { printf '==> %s\n' "$*" >&2; }

images=("$@")
if [[ ${#images[@]} -eq 0 ]]; then
  images=("${DEFAULT_IMAGES[@]}")
fi
for name in "${images[@]}"; do
  [[ " ${ALL_IMAGES[*]} " == *" ${name} "* ]] || die "unknown image '${name}'; choose from: ${ALL_IMAGES[*]}"
done

# --- the CA bundle pip trusts inside builds ---------------------------------------------------
ca_bundle="${TUSK_BUILD_CA_BUNDLE:-}"
if [[ -z "${ca_bundle}" ]]; then
  for candidate in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}" \
    /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    if [[ -n "${candidate}" && -s "${candidate}" ]]; then
      ca_bundle="${candidate}"
      break
    fi
  done
fi
if [[ -n "${ca_bundle}" ]]; then
  [[ -s "${ca_bundle}" ]] || die "TUSK_BUILD_CA_BUNDLE=${ca_bundle} is not a readable file"
fi

# --- the engine -------------------------------------------------------------------------------
engine="${TUSK_CONTAINER_ENGINE:-}"
if [[ -z "${engine}" ]]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    engine=docker
  elif command -v podman >/dev/null 2>&1; then
    engine=podman
  else
    die "neither a running docker nor podman found; install one (Debian: apt-get install podman buildah runc)"
  fi
fi
[[ "${engine}" == docker || "${engine}" == podman ]] || die "TUSK_CONTAINER_ENGINE must be docker or podman, not '${engine}'"
command -v "${engine}" >/dev/null 2>&1 || die "'${engine}' is not on PATH"

# --- the base image ---------------------------------------------------------------------------
default_base="$(sed -n 's/^ARG BASE_IMAGE=//p' "${DOCKER_DIR}/router.Dockerfile")"
[[ -n "${default_base}" ]] || die "deploy/docker/router.Dockerfile has no 'ARG BASE_IMAGE=' line"

debian_mirror() {
  local uri
  uri="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep -v security | head -n1 || true)"
  if [[ -z "${uri}" ]]; then
    uri="$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

# A Debian bookworm image with Python 3.11 and venv, from the Debian mirror alone (no registry).
make_local_base() {
  command -v debootstrap >/dev/null 2>&1 || die "no registry and no debootstrap to make a base image (apt-get install debootstrap)"
  [[ "$(id -u)" -eq 0 ]] || die "making the local base image with debootstrap needs root"
  local dir mirror
  mirror="$(debian_mirror)"
  dir="$(mktemp -d "${TMPDIR:-/tmp}/tusk-base.XXXXXX")"
  log "base image: ${default_base} cannot be pulled; debootstrap bookworm from ${mirror} -> ${LOCAL_BASE}"
  debootstrap --variant=minbase bookworm "${dir}" "${mirror}" >"${dir}.log" 2>&1 \
    || { tail -n 20 "${dir}.log" >&2; die "debootstrap failed (log: ${dir}.log)"; }
  chroot "${dir}" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    python3 python3-venv >>"${dir}.log" 2>&1 \
    || { tail -n 20 "${dir}.log" >&2; die "installing python3 into the base image failed (log: ${dir}.log)"; }
  chroot "${dir}" apt-get clean
  rm -rf "${dir}/var/lib/apt/lists/"* "${dir}/var/cache/apt/"*.bin "${dir}/var/log/"* \
    "${dir}/usr/share/doc" "${dir}/usr/share/man" "${dir}/usr/share/info" "${dir}/usr/share/locale"
  tar -C "${dir}" -c . | "${engine}" import --change 'CMD ["python3"]' - "${LOCAL_BASE}" >/dev/null
  rm -rf "${dir}" "${dir}.log"
}

base="${TUSK_BASE_IMAGE:-}"
if [[ -z "${base}" ]]; then
  if "${engine}" image inspect "${default_base}" >/dev/null 2>&1 || "${engine}" pull -q "${default_base}" >/dev/null 2>&1; then
    base="${default_base}"
  else
    if ! "${engine}" image inspect "${LOCAL_BASE}" >/dev/null 2>&1; then
      make_local_base
    fi
    base="${LOCAL_BASE}"
  fi
fi
log "engine ${engine}, base image ${base}"

# --- build options shared by every image -----------------------------------------------------
common=(--build-arg "BASE_IMAGE=${base}")
if [[ -n "${ca_bundle}" ]]; then
  common+=(--secret "id=ca-bundle,src=${ca_bundle}")
fi

# --- a local torch index, only when the CPU worker is built and download.pytorch.org is out of reach
index_pid=""
cleanup() {
  if [[ -n "${index_pid}" ]]; then
    kill "${index_pid}" 2>/dev/null || true
    wait "${index_pid}" 2>/dev/null || true
  fi
}
trap cleanup EXIT

# Sets TORCH_INDEX to the URL of a PEP 503 index on loopback serving one torch CPU wheel.
start_local_torch_index() {
  local python dir arch port port_file wheel
  python="${ROOT}/.venv/bin/python"
  [[ -x "${python}" ]] || python="$(command -v python3)"
  arch="$(uname -m)"
  dir="${CACHE_DIR}/torch-index"
  mkdir -p "${dir}/simple/torch"
  wheel="$(find "${dir}" -maxdepth 1 -name "torch-${TORCH_VERSION}+cpu-cp311-*${arch}.whl" | head -n1)"
  if [[ -z "${wheel}" ]]; then
    "${python}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
      --implementation cp --abi cp311 --platform "manylinux_2_28_${arch}" \
      --dest "${dir}" "torch==${TORCH_VERSION}+cpu" >&2 \
      || die "download.pytorch.org is unreachable and pip finds no torch==${TORCH_VERSION}+cpu wheel here; set TUSK_TORCH_INDEX_URL"
    wheel="$(find "${dir}" -maxdepth 1 -name "torch-${TORCH_VERSION}+cpu-cp311-*${arch}.whl" | head -n1)"
  fi
  wheel="$(basename "${wheel}")"
  printf '<!DOCTYPE html><html><body><a href="/%s">%s</a></body></html>\n' \
    "${wheel//+/%2B}" "${wheel}" >"${dir}/simple/torch/index.html"
  port_file="$(mktemp)"
  # The same port every time when it is free: the index URL is a build argument, and a new value
  # would invalidate the worker's cached dependency layer. Otherwise the OS picks one.
  "${python}" - "${dir}" "${port_file}" "${TUSK_TORCH_INDEX_PORT:-47823}" <<'PY' >/dev/null 2>&1 &
import functools, http.server, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
try:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[3])), handler)
except OSError:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
with open(sys.argv[2], "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
PY
  index_pid=$!
  for _ in $(seq 1 50); do
    [[ -s "${port_file}" ]] && break
    sleep 0.1
  done
  port="$(cat "${port_file}")"
  rm -f "${port_file}"
  [[ -n "${port}" ]] || die "the local torch index did not start"
  TORCH_INDEX="http://127.0.0.1:${port}/simple"
}

reachable() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 10 -o /dev/null "$1" >/dev/null 2>&1
  else
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' "$1" >/dev/null 2>&1
  fi
}

# --- build ------------------------------------------------------------------------------------
declare -A seconds
for name in "${images[@]}"; do
  image="${REGISTRY}/tusk-${name}:${TAG}"
  args=("${common[@]}")
  dockerfile="${DOCKER_DIR}/${name}.Dockerfile"
  if [[ "${name}" == worker-* ]]; then
    accelerator="${name#worker-}"
    dockerfile="${DOCKER_DIR}/worker.Dockerfile"
    args+=(--build-arg "ACCELERATOR=${accelerator}")
    index="${TUSK_TORCH_INDEX_URL:-}"
    if [[ -z "${index}" && "${accelerator}" == cpu ]] && ! reachable "https://download.pytorch.org/whl/cpu/torch/"; then
      [[ -n "${index_pid}" ]] || start_local_torch_index
      index="${TORCH_INDEX}"
      log "download.pytorch.org is unreachable; torch comes from the local index ${index}"
      args+=(--network host)
    fi
    if [[ -n "${index}" ]]; then
      args+=(--build-arg "TORCH_INDEX_URL=${index}")
    fi
  fi
  if [[ "${engine}" == podman ]]; then
    # podman reads <Dockerfile>.dockerignore only when told; docker (BuildKit) finds it by name.
    args+=(--ignorefile "${dockerfile}.dockerignore" --layers)
  fi
  log "building ${image}"
  start=${SECONDS}
  "${engine}" build -f "${dockerfile}" "${args[@]}" -t "${image}" "${ROOT}"
  seconds[${name}]=$((SECONDS - start))
done

printf '\n%-48s %10s %10s\n' IMAGE "SIZE (MB)" "BUILD (s)"
for name in "${images[@]}"; do
  image="${REGISTRY}/tusk-${name}:${TAG}"
  size="$("${engine}" image inspect --format '{{.Size}}' "${image}")"
  size="${size:-0}"
  printf '%-48s %10d %10d\n' "${image}" "$((size / 1000000))" "${seconds[${name}]}"
done
