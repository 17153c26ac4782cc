"""The baseline: a bare FastAPI app answering with bodies shaped like ours.

Served by the same ``python -m uvicorn`` command as the service, so the ratio of the two is the
cost of what the service adds (middleware, authentication, the database, the cache, validation)
and not of the framework, the server or the load generator.

The bodies are the service's real answers, measured once at the start of the run and passed in a
JSON file named by ``BENCH_BARE_BODIES`` (``{"/users/me": {...}, "/users": {...}}``): the same
bytes to serialise and send, so a bigger answer does not count as overhead. Each becomes one
``GET`` route returning a plain dict, the way a minimal FastAPI endpoint would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI


def _route(body: dict[str, Any]) -> Any:
    async def endpoint() -> dict[str, Any]:
        return body

    return endpoint


def create_app(bodies: dict[str, dict[str, Any]]) -> FastAPI:
    app = FastAPI()
    for path, body in bodies.items():
        app.add_api_route(path, _route(body), methods=["GET"])
    return app


def _bodies() -> dict[str, dict[str, Any]]:
    source = os.environ.get("BENCH_BARE_BODIES")
    if not source:
        return {"/users/me": {"status": "no BENCH_BARE_BODIES given"}}
    loaded: dict[str, dict[str, Any]] = json.loads(Path(source).read_text())
    return loaded


app = create_app(_bodies())
