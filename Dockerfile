# The service image: installs the package, migrates the database, then serves on port 8000.
#   docker build -t user-management-service .
# docker-compose.yaml runs it with PostgreSQL, Redis and Kafka; deploy/kubernetes/ on a cluster.
#
# Two stages: the builder installs the package and its dependencies into a virtualenv, and only
# that virtualenv reaches the runtime image, without the build's leftovers (build directories,
# egg-info, anything a future build step installs). Both stages use the same base, so the
# virtualenv's interpreter path and compiled extensions match.

# --- builder -------------------------------------------------------------------------------------
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv

WORKDIR /build
# What `pip install .` needs (pyproject.toml names README.md).
COPY pyproject.toml README.md ./
COPY src ./src
# Optional extras, e.g. `docker build --build-arg EXTRAS=tracing .` for OpenTelemetry
# (docs/tracing.md). Empty by default: the image carries only what the service needs.
ARG EXTRAS=""
RUN /opt/venv/bin/pip install ".${EXTRAS:+[$EXTRAS]}"

# --- runtime -------------------------------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WEB_CONCURRENCY=2 \
    PATH=/opt/venv/bin:$PATH

# A fixed, unprivileged uid, so mounted secrets can be made readable to it and nothing else.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# The entry point (`user-service serve --migrate`) and the connectivity check run from here;
# alembic.ini is for running `alembic` by hand.
COPY alembic.ini docker-entrypoint.sh test_connections.py ./
COPY src ./src

# The code stays root-owned and read-only to the service; only DATA_DIR (./data) is writable.
RUN mkdir -p /app/data && chown app:app /app/data
USER app

EXPOSE 8000

# Liveness only: the database, Redis and Kafka have their own checks under /api/v1/health.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/v1/health/live', timeout=2)"]

# Through sh, so the script needs no execute bit from the build context.
ENTRYPOINT ["/bin/sh", "/app/docker-entrypoint.sh"]
