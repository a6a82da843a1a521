# digitserve: the LitServe digit classifier with the committed default model baked in.
#
#   docker build -t digitserve .                                               # CPU-only torch (small)
#   docker build -t digitserve:cuda --build-arg TORCH_INDEX=https://pypi.org/simple .   # CUDA torch
#   docker run --rm -p 8000:8000 -p 8001:8001 digitserve   # HTTP, and the Open Inference Protocol's gRPC
#
# Configuration is the service's DIGITSERVE_* environment (see service/config.py).
# PID 1 is tini (pinned Debian package), so SIGTERM reaches the server and worker processes are
# reaped under plain `docker run` and Kubernetes too, not only under compose.

# ---- builder: resolve and install every Python dependency into /opt/venv --------------------
FROM python:3.11-slim-bookworm AS builder

# Where torch/torchvision come from. The default is the CPU-only wheel index (no CUDA libraries,
# a fraction of the size); PyPI's Linux wheels are the CUDA (13.0) builds, and a
# https://download.pytorch.org/whl/cuXXX index picks another CUDA runtime.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Torch first, from its index, so the PyPI step below finds the pinned version already satisfied
# (2.14.1+cpu satisfies ==2.14.1) instead of pulling the CUDA build.
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.14.1 torchvision==0.29.1

# The remaining pins, read from pyproject.toml alone, so this layer is rebuilt only when they change.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt

COPY service ./service
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import service.config, torch; print('torch', torch.__version__)"

# ---- runtime: the venv, the model store and nothing to build with ------------------------------
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

# A numeric UID lets Kubernetes' runAsNonRoot verify it; the home gives torch a writable cache.
RUN groupadd --gid 10001 digitserve \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home --home-dir /home/digitserve digitserve \
    && mkdir /data && chown 10001:10001 /data
# /data: mount point of the compose `mnist` volume; owned here so a fresh volume is writable.

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# Baked in so the image serves out of the box; a volume at /app/model_store overrides it (a fresh
# named volume is seeded with this content, owned by the service user so training can add versions).
COPY --chown=10001:10001 model_store /app/model_store

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DIGITSERVE_HOST=0.0.0.0 \
    DIGITSERVE_PORT=8000 \
    DIGITSERVE_GRPC_PORT=8001 \
    DIGITSERVE_STORE=/app/model_store \
    DIGITSERVE_LOG_FORMAT=json

USER 10001:10001
EXPOSE 8000 8001

# No curl in the image: Python's urllib. urlopen raises on any non-2xx (503 while loading or
# draining) and on refused connections, so anything but 200 exits 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; r = u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('DIGITSERVE_PORT', '8000'), timeout=4); sys.exit(0 if r.status == 200 else 1)"]

# Only the server gets tini's forwarded SIGTERM (no -g): it drains and stops its own workers.
ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "service"]
