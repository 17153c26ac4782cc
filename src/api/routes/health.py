"""Health endpoints (DESIGN.md, "Health contract").

``/health`` is 200 unless the database is down; a single-dependency check is 200 when healthy or
disabled and 503 when unhealthy. ``/live`` says the process answers; ``/ready`` that the database
is reachable and migrated.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel

from src.services.health import (
    CheckResult,
    CheckStatus,
    HealthReport,
    OverallStatus,
    check_database_health,
    check_kafka_health,
    check_redis_health,
    health_report,
    readiness,
)

router = APIRouter(prefix="/health", tags=["health"])

_UNHEALTHY: dict[int | str, dict[str, Any]] = {
    503: {"description": "Unhealthy", "model": CheckResult}
}


class Liveness(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    reason: str | None = None


def _check_reply(result: CheckResult, response: Response) -> CheckResult:
    if result.status is CheckStatus.UNHEALTHY:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return result


@router.get(
    "",
    response_model=HealthReport,
    response_model_exclude_none=True,
    responses={503: {"description": "The database is down", "model": HealthReport}},
)
async def health(request: Request, response: Response) -> HealthReport:
    report = await health_report(request.app)
    if report.status is OverallStatus.UNHEALTHY:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return report


@router.get("/live", response_model=Liveness)
async def live() -> Liveness:
    return Liveness(status="alive")


@router.get(
    "/ready",
    response_model=Readiness,
    response_model_exclude_none=True,
    responses={503: {"description": "Not ready", "model": Readiness}},
)
async def ready(request: Request, response: Response) -> Readiness:
    reason = await readiness(request.app)
    if reason is not None:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Readiness(status="not_ready", reason=reason)
    return Readiness(status="ready")


@router.get(
    "/database", response_model=CheckResult, response_model_exclude_none=True, responses=_UNHEALTHY
)
async def database(request: Request, response: Response) -> CheckResult:
    return _check_reply(await check_database_health(request.app), response)


@router.get(
    "/redis", response_model=CheckResult, response_model_exclude_none=True, responses=_UNHEALTHY
)
async def redis(request: Request, response: Response) -> CheckResult:
    return _check_reply(await check_redis_health(request.app), response)


@router.get(
    "/kafka", response_model=CheckResult, response_model_exclude_none=True, responses=_UNHEALTHY
)
async def kafka(request: Request, response: Response) -> CheckResult:
    return _check_reply(await check_kafka_health(request.app), response)
