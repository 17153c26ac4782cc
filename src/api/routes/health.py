"""Health endpoints (README.md, "Health").

``/health`` is 200 unless the database is down; a single-dependency check is 200 when healthy or
disabled and 503 when unhealthy. ``/live`` says the process answers; ``/ready`` that the database
is reachable and migrated and shut-down has not begun.

Anonymous callers see statuses only. Error texts name internal hosts and ports, and counters such
as the outbox backlog move when somebody asks for a password reset — which would tell an
attacker that the account exists. Operators prove who they are with ``HEALTH_DETAILS_TOKEN`` or an
administrator's access token, and see everything.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request, Response, status
from pydantic import BaseModel

from src.api.dependencies import bearer_transport
from src.app.container import app_services
from src.app.health import (
    CheckResult,
    CheckStatus,
    HealthReport,
    OverallStatus,
    check_database_health,
    check_kafka_health,
    check_mail_health,
    check_redis_health,
    health_report,
    is_draining,
    readiness,
    shares,
)
from src.auth.service import authenticate
from src.config.settings import Settings

router = APIRouter(prefix="/health", tags=["health"])
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def _probe(path: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
    """GET, documented, and HEAD, which load balancers probe with as often (left out of the
    OpenAPI document: it is the GET without a body)."""

    def register(endpoint: Endpoint) -> Endpoint:
        router.head(path, include_in_schema=False, **options)(endpoint)
        return router.get(path, **options)(endpoint)

    return register


_UNHEALTHY: dict[int | str, dict[str, Any]] = {
    503: {"description": "Unhealthy", "model": CheckResult}
}


class Liveness(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    reason: str | None = None


async def _one_check(
    name: str, request: Request, response: Response, operator: bool
) -> CheckResult:
    """One dependency: fresh with every detail for operators, its status from the shared report
    for everyone else."""
    if operator:
        result = await _CHECKS[name](request.app)
    else:
        result = CheckResult(status=(await _report(request.app, False)).checks[name].status)
    if result.status is CheckStatus.UNHEALTHY:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return result


_CHECKS: dict[str, Callable[[FastAPI], Awaitable[CheckResult]]] = {
    "database": check_database_health,
    "redis": check_redis_health,
    "kafka": check_kafka_health,
    "mail": check_mail_health,
}


async def is_operator(
    request: Request, token: Annotated[str | None, Depends(bearer_transport)]
) -> bool:
    """Whether the caller may see details; never an error (health stays open to everyone)."""
    if not token:
        return False
    settings: Settings = request.app.state.settings
    expected = settings.HEALTH_DETAILS_TOKEN
    if expected is not None and hmac.compare_digest(
        token.encode("utf-8", "surrogatepass"), expected.get_secret_value().encode()
    ):
        return True
    try:
        services = app_services(request.app)
        principal = await authenticate(services.sessionmaker, services.security, token)
    except Exception:  # noqa: BLE001 - not an operator: a bad token, or no database to ask
        return False
    return principal.is_admin


Operator = Annotated[bool, Depends(is_operator)]


@_probe(
    "",
    response_model=HealthReport,
    response_model_exclude_none=True,
    responses={503: {"description": "The database is down", "model": HealthReport}},
)
async def health(request: Request, response: Response, operator: Operator) -> HealthReport:
    report = await _report(request.app, operator)
    if report.status is OverallStatus.UNHEALTHY:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    if operator:
        return report
    return HealthReport(
        status=report.status,
        checks={name: CheckResult(status=check.status) for name, check in report.checks.items()},
    )


async def _report(app: FastAPI, operator: bool) -> HealthReport:
    """Operators get a fresh report; anonymous callers share one for a second."""
    if operator:
        return await health_report(app)
    return await shares(app).report.get(lambda: health_report(app))


@_probe("/live", response_model=Liveness)
async def live() -> Liveness:
    return Liveness(status="alive")


@_probe(
    "/ready",
    response_model=Readiness,
    response_model_exclude_none=True,
    responses={503: {"description": "Not ready", "model": Readiness}},
)
async def ready(request: Request, response: Response, operator: Operator) -> Readiness:
    """503 while the database is unreachable or not migrated, and from the start of shut-down
    (so load balancers drain this instance first), when liveness still answers 200."""
    app = request.app
    if operator or is_draining(app):
        # Draining is a flag, not a check: never answered from the shared (up to 1 s old) result.
        reason = await readiness(app)
    else:
        reason = await shares(app).readiness.get(lambda: readiness(app))
    if reason is not None:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Readiness(status="not_ready", reason=reason if operator else None)
    return Readiness(status="ready")


@_probe(
    "/database",
    response_model=CheckResult,
    response_model_exclude_none=True,
    responses=_UNHEALTHY,
)
async def database(request: Request, response: Response, operator: Operator) -> CheckResult:
    return await _one_check("database", request, response, operator)


@_probe(
    "/redis",
    response_model=CheckResult,
    response_model_exclude_none=True,
    responses=_UNHEALTHY,
)
async def redis(request: Request, response: Response, operator: Operator) -> CheckResult:
    return await _one_check("redis", request, response, operator)


@_probe(
    "/kafka",
    response_model=CheckResult,
    response_model_exclude_none=True,
    responses=_UNHEALTHY,
)
async def kafka(request: Request, response: Response, operator: Operator) -> CheckResult:
    return await _one_check("kafka", request, response, operator)


@_probe(
    "/mail",
    response_model=CheckResult,
    response_model_exclude_none=True,
    responses=_UNHEALTHY,
)
async def mail(request: Request, response: Response, operator: Operator) -> CheckResult:
    return await _one_check("mail", request, response, operator)
