# syntax=docker/dockerfile:1.7
# llmops Celery workers: fine-tuning (queue `finetune`, the default command), ingestion
# (queue `ingest`) and eval runs (queue `eval`). Two targets:
#   docker build -f deploy/docker/worker.Dockerfile --target worker     -t llmops-worker .
#   docker build -f deploy/docker/worker.Dockerfile --target worker-gpu -t llmops-worker-gpu .
# `worker` has CPU PyTorch (ingestion, CPU training); `worker-gpu` has CUDA PyTorch (its wheels
# carry the CUDA runtime; the host's NVIDIA driver comes in through the container toolkit).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS source
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY llmops llmops
COPY gateway gateway
COPY workers workers
COPY finetune finetune
COPY retrieval retrieval
COPY conversations conversations
COPY tenancy tenancy
COPY guardrails guardrails
COPY evals evals
COPY batches batches
COPY observability observability

FROM source AS build-cpu
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
 && pip install ".[train]"

FROM source AS build-gpu
ARG TORCH_VERSION=2.13.0
# The CUDA build of the PyTorch index (cu128: drivers >= 570).
ARG TORCH_CUDA=cu128
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" "torch==${TORCH_VERSION}" \
 && pip install ".[train]"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="llmops-worker" \
      org.opencontainers.image.description="llmops Celery workers: LoRA/QLoRA fine-tuning and ingestion" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 llmops \
 && useradd --uid 10001 --gid 10001 --home-dir /home/llmops --create-home --shell /usr/sbin/nologin llmops
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    LLMOPS_HOST=0.0.0.0 \
    LLMOPS_METRICS__WORKER_PORT=9100
USER 10001:10001
WORKDIR /home/llmops
EXPOSE 9100
# The worker serves /metrics from its only process: the port answers while the worker lives.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, socket; socket.create_connection(('127.0.0.1', int(os.environ['LLMOPS_METRICS__WORKER_PORT'])), 4).close()"]
# Fine-tuning: one job at a time, in-process (no fork after CUDA is initialised). For
# ingestion: celery -A workers.tasks worker -Q ingest --pool threads --concurrency 4 -n ingest@%h
# For eval runs: celery -A workers.tasks worker -Q eval --pool threads --concurrency 2 -n eval@%h
CMD ["celery", "-A", "workers.tasks", "worker", "-Q", "finetune", "--pool", "solo", "--loglevel", "info", "-n", "finetune@%h"]

FROM runtime AS worker-gpu
COPY --from=build-gpu /opt/venv /opt/venv
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Last, so that a plain `docker build` makes the CPU image.
FROM runtime AS worker
COPY --from=build-cpu /opt/venv /opt/venv
