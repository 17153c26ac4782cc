#!/bin/sh
# Container entry point: migrate, then serve. The service refuses to start on a database that is
# not migrated, so `alembic upgrade head` has to come first (it is a no-op when up to date).
# Any arguments run instead, with the same environment, e.g.
#   docker compose run --rm app python test_connections.py
set -eu

if [ "$#" -gt 0 ]; then
    exec "$@"
fi

alembic upgrade head
# Metrics of several worker processes meet in one directory (docs/metrics.md). It is emptied
# before the workers start: files left by an earlier run would be counted again.
export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-/tmp/ums-metrics}"
rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
# --no-proxy-headers: the app decides whom to trust (TRUSTED_PROXIES), from the real peer.
# WEB_CONCURRENCY server processes (one per core is a good start; see BENCHMARKS.md).
exec uvicorn src.main:app --host 0.0.0.0 --port 8000 --no-proxy-headers \
    --workers "${WEB_CONCURRENCY:-1}" --no-access-log
