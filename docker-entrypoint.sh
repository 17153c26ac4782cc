#!/bin/sh
# Container entry point: migrate, then serve (`user-service serve --migrate`, docs/cli.md). The
# service refuses to start on a database that is not migrated, so the migrations come first (a
# no-op when up to date). `serve` runs uvicorn with WEB_CONCURRENCY processes, without uvicorn's
# proxy headers (the app decides whom to trust, TRUSTED_PROXIES) and with one metrics directory
# for all of them (docs/metrics.md).
# Any arguments run instead, with the same environment, e.g.
#   docker compose run --rm app user-service check
set -eu

if [ "$#" -gt 0 ]; then
    exec "$@"
fi

exec user-service serve --migrate --host 0.0.0.0 --port 8000
