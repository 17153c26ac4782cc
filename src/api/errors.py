"""RFC 9457 ``application/problem+json`` for every error the API returns.

Handlers here are the only place an exception becomes a response, so no stack trace and no
internal message ever reaches a client: unknown errors are logged and answered with a bare 500.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from src.db.session import DATABASE_UNAVAILABLE, describe
from src.errors import DomainError

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_JSON


class ProblemDocument(BaseModel):
    """RFC 9457 problem details (extension members may follow)."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None


Responses = dict[int | str, dict[str, Any]]

# For ``responses=`` in route declarations, so OpenAPI documents every error reply.
PROBLEM: dict[str, Any] = {
    "description": "Problem details (RFC 9457)",
    "content": {PROBLEM_JSON: {"schema": ProblemDocument.model_json_schema()}},
}


def problem_response(
    status: int,
    detail: str | None = None,
    *,
    title: str | None = None,
    type_: str = "about:blank",
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> ProblemResponse:
    body: dict[str, Any] = {"type": type_, "title": title or HTTPStatus(status).phrase}
    body["status"] = status
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    body.update(extra)
    return ProblemResponse(body, status_code=status, headers=headers)


async def _domain_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, DomainError)
    return problem_response(
        exc.status,
        exc.detail,
        title=exc.title,
        instance=request.url.path,
        headers=exc.headers,
        **exc.extra,
    )


async def _http_exception(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail: str | None = exc.detail if isinstance(exc.detail, str) else None
    if detail == HTTPStatus(exc.status_code).phrase:
        detail = None
    headers = dict(exc.headers) if exc.headers else None
    return problem_response(exc.status_code, detail, instance=request.url.path, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ())]
        item: dict[str, Any] = {"loc": loc, "msg": error.get("msg", ""), "type": error.get("type")}
        errors.append(item)
    return problem_response(
        422,
        "The request is not valid; see 'errors'.",
        title="Validation failed",
        instance=request.url.path,
        errors=errors,
    )


async def _database_unavailable(request: Request, exc: Exception) -> ProblemResponse:
    # One line, no stack: an outage is not a bug, and it would repeat for every request.
    logger.error("Database unavailable while serving %s: %s", request.url.path, describe(exc))
    return problem_response(
        503,
        "The database is unavailable; try again shortly.",
        instance=request.url.path,
        headers={"Retry-After": "5"},
    )


class UnhandledErrorMiddleware:
    """The last line: any other exception becomes a bare 500 problem, logged once.

    Starlette's own handler for ``Exception`` sits outside every middleware (so its 500 would
    miss the security headers) and re-raises after answering (so the server logs the traceback a
    second time and drops the connection). Here the error is answered inside the middleware
    stack and goes no further.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception:
            logger.exception(
                "Unhandled error while serving %s %s", scope.get("method"), scope.get("path")
            )
            if started:
                raise  # half an answer is out: only the server can end the connection now
            await problem_response(500, instance=scope.get("path"))(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    # Exactly the failures that mean "the database cannot serve now" (src.db.session turns a
    # refused, reset, lost or silent connection into one of them); a data error stays what it is
    # (a duplicate key is the service's 409, a bad value a 500), and an OSError from elsewhere is
    # no database outage.
    for exc_type in DATABASE_UNAVAILABLE:
        app.add_exception_handler(exc_type, _database_unavailable)
    app.add_middleware(UnhandledErrorMiddleware)
