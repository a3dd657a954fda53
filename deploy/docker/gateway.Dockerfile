# syntax=docker/dockerfile:1.7
# The llmops gateway: `python -m gateway` (FastAPI on uvicorn), no torch, no vLLM.
#   docker build -f deploy/docker/gateway.Dockerfile -t llmops-gateway .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, so that code changes reuse this layer.
COPY pyproject.toml README.md ./
RUN python - <<'PY' > /tmp/requirements.txt
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PY
RUN pip install -r /tmp/requirements.txt
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
RUN pip install --no-deps .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="llmops-gateway" \
      org.opencontainers.image.description="OpenAI-compatible gateway in front of vLLM" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 llmops \
 && useradd --uid 10001 --gid 10001 --home-dir /home/llmops --create-home --shell /usr/sbin/nologin llmops
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LLMOPS_HOST=0.0.0.0
USER 10001:10001
WORKDIR /home/llmops
EXPOSE 8000
# Liveness only (/healthz): /readyz also needs every model to have a healthy engine.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LLMOPS_PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "gateway"]
