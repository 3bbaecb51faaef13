# syntax=docker/dockerfile:1.7
# teleguard server image: the real-time detector (`teleguard serve`) on KServe's model server with vLLM. The
# Helm chart's ServingRuntime (helm/teleguard) and manifests/base run it; KServe's storage initializer puts the
# model in /mnt/models, which `teleguard serve` loads by default.
#
# Build from the repository root (server.Dockerfile.dockerignore keeps everything but the package out):
#   docker build -f docker/server.Dockerfile -t ghcr.io/teleguard/teleguard-server:0.1.0 .
#
# Versions: kserve 0.21.0 with vllm 0.32.0 (docs/serving.md, "Versions"), every pin from constraints.txt; vLLM
# 0.32.0's GPU wheel pins torch 2.13.0 like constraints.txt, so pip takes PyPI's CUDA build of it here.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
RUN pip install --upgrade pip \
    && pip install -c constraints.txt vllm ".[training,serving]"

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libsndfile1 ffmpeg ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ARG UID=10001
RUN groupadd --gid ${UID} teleguard \
    && useradd --uid ${UID} --gid ${UID} --create-home --home-dir /home/teleguard --shell /usr/sbin/nologin teleguard
COPY --from=build /opt/venv /opt/venv
# The chart mounts a read-only root filesystem: caches live under HOME and /tmp, which the pod mounts as emptyDirs.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/teleguard \
    HF_HOME=/home/teleguard/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MODELSCOPE_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1
WORKDIR /home/teleguard
USER 10001:10001
EXPOSE 8080
# Liveness as Docker sees it; on Kubernetes the chart's startup/liveness/readiness probes use the same routes
# (/v2/health/live answers while the model loads; /v2/health/ready once it is loaded).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/live', timeout=4)"]
ENTRYPOINT ["teleguard", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
