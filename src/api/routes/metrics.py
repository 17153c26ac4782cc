"""``GET /metrics``: the Prometheus exposition on the main port (``METRICS_PORT=0``).

Installed only when ``METRICS`` is not ``off`` and no port of its own is configured; otherwise
``/metrics`` is a 404 like any unknown path. Never in the OpenAPI document (it is for a scraper,
not for clients), and never refused by the overload cap (a busy process is exactly when its
metrics matter).
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response

from src.api.errors import problem_response
from src.app.container import app_services
from src.config.settings import Settings
from src.events.relay import outbox_backlog_reader
from src.services import metrics

router = APIRouter(include_in_schema=False)


@router.get(metrics.METRICS_PATH)
async def scrape(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    if not metrics.authorized(settings, request.headers.get("authorization")):
        return problem_response(
            401,
            metrics.UNAUTHORIZED_DETAIL,
            instance=request.url.path,
            headers={"WWW-Authenticate": metrics.CHALLENGE},
        )
    backlog = await metrics.read_backlog(
        outbox_backlog_reader(app_services(request.app).sessionmaker), settings.HEALTH_CHECK_TIMEOUT
    )
    return Response(
        metrics.exposition(backlog),
        media_type=metrics.CONTENT_TYPE,
        headers={"Cache-Control": "no-store"},
    )


def install_metrics(app: FastAPI, settings: Settings) -> None:
    """Serve ``/metrics`` on the main port when metrics are on there."""
    if settings.METRICS != "off" and settings.METRICS_PORT == 0:
        app.include_router(router)
