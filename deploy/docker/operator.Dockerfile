# The tusk operator (kopf): `tusk operator ...`. Build from the repository root:
#   docker build -f deploy/docker/operator.Dockerfile -t ghcr.io/tusk-dev/tusk-operator:0.1.0 .
# Base images carry a version tag; pin them by digest (...@sha256:...) when cutting a release.
# Extra CAs of the build host (a TLS-intercepting proxy) come in as the build secret `ca-bundle`
# (see worker.Dockerfile and scripts/images.sh); they never become part of the image.

ARG BASE_IMAGE=docker.io/library/python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/tusk
ENV PATH=/opt/tusk/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a source change rebuilds only the layer after them.
COPY pyproject.toml deploy/docker/requirements.py ./
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python3 requirements.py operator > requirements.txt \
 && pip install --no-compile -r requirements.txt
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
ENV PATH=/opt/tusk/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd --gid 10001 tusk && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tusk
COPY --from=build /opt/tusk /opt/tusk
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["tusk"]
CMD ["operator", "--all-namespaces"]
