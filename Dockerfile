# syntax=docker/dockerfile:1
# The deltawatch sidecar image: `deltawatch serve` as a non-root user (uid 10001).
#
# CPU (the default base; pass a CPU-only torch wheel index to keep the image small):
#   docker build -t deltawatch:0.1.0-cpu --build-arg TORCH_INDEX_URL=<cpu wheel index> .
# CUDA (torch's CUDA wheels on an NVIDIA CUDA runtime base):
#   docker build -t deltawatch:0.1.0-cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=<cu126 wheel index> .
# Package indexes are build arguments without defaults: PIP_INDEX_URL / PIP_EXTRA_INDEX_URL for
# everything, TORCH_INDEX_URL for torch alone. Left empty, pip uses its own configuration.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG TORCH_INDEX_URL
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# CUDA bases ship no Python: take the distribution's.
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN python3 -m venv /opt/deltawatch
ENV PATH=/opt/deltawatch/bin:$PATH
RUN set -eu; \
    index=""; \
    if [ -n "${PIP_INDEX_URL:-}" ]; then index="--index-url ${PIP_INDEX_URL}"; fi; \
    if [ -n "${PIP_EXTRA_INDEX_URL:-}" ]; then index="$index --extra-index-url ${PIP_EXTRA_INDEX_URL}"; fi; \
    torch_index="$index"; \
    if [ -n "${TORCH_INDEX_URL:-}" ]; then torch_index="--index-url ${TORCH_INDEX_URL}"; fi; \
    pip install $torch_index "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /src/
COPY client /src/client
COPY sidecar /src/sidecar
COPY protos /src/protos
RUN set -eu; \
    index=""; \
    if [ -n "${PIP_INDEX_URL:-}" ]; then index="--index-url ${PIP_INDEX_URL}"; fi; \
    if [ -n "${PIP_EXTRA_INDEX_URL:-}" ]; then index="$index --extra-index-url ${PIP_EXTRA_INDEX_URL}"; fi; \
    pip install $index "/src[sidecar]" \
    && deltawatch serve --help >/dev/null

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && (getent group 10001 >/dev/null || groupadd --gid 10001 deltawatch) \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin deltawatch \
    && mkdir -p /data && chown 10001:10001 /data
COPY --from=build /opt/deltawatch /opt/deltawatch
ENV PATH=/opt/deltawatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    DELTAWATCH_DATA_DIR=/data
# A numeric user, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# gRPC ingest, HTTP (API, /metrics, /healthz, /readyz). The default bind is loopback: pass
# --grpc-address/--http-address 0.0.0.0:PORT (with --token-file and --tls-*) to listen beyond it.
EXPOSE 50051 9400
ENTRYPOINT ["deltawatch", "serve"]
CMD []
