# syntax=docker/dockerfile:1
# The streaming gateway: gunicorn + uvicorn workers, non-root, read-only root filesystem.
#   docker build -t streaming-gateway:0.1.0 .
#   docker run --rm -p 8000:8000 --read-only --tmpfs /tmp streaming-gateway:0.1.0
# Writable paths: only /tmp (an emptyDir in the chart): TMPDIR and the prometheus-client multiprocess
# directory, which `python -m app` wipes at start (an emptyDir outlives container restarts).

# --- build: the locked dependencies in a virtualenv, then the app ------------------------------------
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# No pip or setuptools in the virtualenv: the base image's pip installs into it (--python), and the
# runtime image never installs anything.
RUN python -m venv --without-pip /opt/venv
WORKDIR /src
# Dependencies first, in their own layer: a change to app/ does not reinstall them. requirements.lock holds
# every transitive dependency, pinned and hashed (pip-compile --generate-hashes from pyproject.toml; a test
# keeps them in sync), so nothing unpinned or altered can be installed.
COPY requirements.lock ./
RUN python -m pip --python /opt/venv/bin/python install --no-cache-dir --require-hashes --no-deps \
        --only-binary :all: -r requirements.lock \
    && python -m pip --python /opt/venv/bin/python check

# --- runtime ------------------------------------------------------------------------------------------
# the same base as the build stage: the venv's interpreter symlinks point into it
FROM python:3.11.14-slim-bookworm AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="streaming-gateway" \
      org.opencontainers.image.description="A streaming gateway for LLM token streams: SSE, OpenAI-compatible and WebSocket relays with admission, deadlines and drain." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm"

RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gateway

COPY --from=build /opt/venv /opt/venv
# The app's code last: `python -m app` imports it from the working directory.
COPY app /srv/app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TMPDIR=/tmp \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus-multiproc \
    HOST=0.0.0.0 \
    PORT=8000 \
    METRICS_PORT=9464

WORKDIR /srv
USER 10001:10001
# 8000: streams and probes; 9464: GET /metrics only
EXPOSE 8000 9464

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=2)"]

# Exec form: `python -m app` (from /srv) prepares the metrics directory, then execs gunicorn, which is PID 1 and
# receives the pod's SIGTERM itself (then each worker drains its streams: app/drain.py).
ENTRYPOINT ["python", "-m", "app"]
