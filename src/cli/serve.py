"""``user-service serve``: the API under uvicorn, as the container's entry point runs it.

The same options as ``docker-entrypoint.sh``: ``--no-proxy-headers`` (the app decides whom to
trust, TRUSTED_PROXIES, from the real peer), WEB_CONCURRENCY worker processes, and no access log
of uvicorn's own (the app writes one line per request). Host and port come from HOST and PORT.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import uvicorn

from src.cli.migrate import failure
from src.cli.support import fail
from src.config.settings import load_settings
from src.db.session import upgrade_database

APP = "src.main:app"


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve the API (uvicorn src.main:app)",
        description="Serve the API with uvicorn, as the container does: no proxy headers "
        "trusted by uvicorn (the app applies TRUSTED_PROXIES itself), WEB_CONCURRENCY worker "
        "processes, the app's own access log. The service refuses to start on a database that "
        "is unreachable or not migrated (see --migrate). SIGTERM or Ctrl-C stops it gracefully.",
        epilog="Exit codes: 1 could not start or migrate (the reason on stderr), 2 bad usage or "
        "settings. Stopped by SIGTERM or Ctrl-C, it shuts down gracefully and then ends by that "
        "signal, as uvicorn does (143 or 130 in a shell). See docs/cli.md.",
    )
    parser.add_argument("--host", help="the interface to listen on (default: HOST, 127.0.0.1)")
    parser.add_argument(
        "--port", type=_port, help="the TCP port to listen on (default: PORT, 8000)"
    )
    parser.add_argument(
        "--workers",
        type=_workers,
        help="server processes (default: WEB_CONCURRENCY, 1); one per core is a good start",
    )
    parser.add_argument(
        "--migrate",
        action="store_true",
        help="apply the database migrations first, as the container's entry point does",
    )
    parser.set_defaults(run=serve_command)


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be between 1 and 65535")
    return value


def _workers(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError("must be between 1 and 64")
    return value


def _fresh_metrics_directory() -> None:
    """Several workers write their metrics to files in one directory, which the scrape sums
    (docs/metrics.md); the workers inherit its name from here. It starts empty: files left by an
    earlier run would be counted again."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
        Path(directory).mkdir(parents=True, exist_ok=True)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ums-metrics-")


def serve_command(args: argparse.Namespace) -> int:
    """Not a coroutine: uvicorn runs its own event loop (and, with workers, its processes)."""
    settings = load_settings()
    if args.migrate:
        try:
            upgrade_database(settings.DATABASE_URL)
        except Exception as exc:  # noqa: BLE001 - reported in one line, no stack trace
            return fail(f"migration failed: {failure(exc)}")
    workers = args.workers or settings.WEB_CONCURRENCY
    if workers > 1:
        _fresh_metrics_directory()
    try:
        uvicorn.run(
            APP,
            host=args.host or settings.HOST,
            port=args.port or settings.PORT,
            workers=workers,
            proxy_headers=False,
            access_log=False,
        )
    except SystemExit as exc:
        # uvicorn exits with 3 when the app did not start (its log says why).
        if exc.code not in (None, 0):
            return fail("the service did not start (see the log above)")
    return 0
