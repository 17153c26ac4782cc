"""The console's health panel: each dependency's status and latency, the outbox backlog and the
relay, from the health details the API gives administrators (``/api/v1/health``). The page
refreshes its panel by itself (admin.js fetches ``/admin/health/panel``, the same panel alone);
without the script, reloading the page does the same."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request
from starlette.responses import Response

from src.web.admin.api import API, open_console
from src.web.admin.pages import AdminRoute, page, remember

router = APIRouter(route_class=AdminRoute, include_in_schema=False)

REFRESH_SECONDS = 5


async def _health(request: Request, template: str) -> Response:
    console = remember(request, await open_console(request))
    # 503 is an answer here (the database is down), not an error.
    report = (await console.call("GET", f"{API}/health", accept=(503,))).json()
    kafka = report["checks"].get("kafka", {}).get("details") or {}
    return page(
        request,
        console,
        template,
        {
            "report": report,
            "outbox": kafka.get("outbox"),
            "relay": kafka.get("relay"),
            "checked_at": datetime.now(UTC).strftime("%H:%M:%S UTC"),
            "refresh_seconds": REFRESH_SECONDS,
        },
        section="health",
    )


@router.get("/admin/health")
async def health_page(request: Request) -> Response:
    return await _health(request, "admin/health.html")


@router.get("/admin/health/panel")
async def health_panel(request: Request) -> Response:
    """The panel alone, for the page's script to swap in."""
    return await _health(request, "admin/health_panel.html")
