"""Small typed FastAPI dependencies: what a route needs, by name.

They are all ``async def`` although most never await: FastAPI runs a plain ``def`` dependency in
the thread pool, a hop to another thread and back on every request for a dictionary lookup.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from src.api.client_address import client_ip
from src.app.container import AppServices, app_services
from src.auth import service as auth_service
from src.auth import step_up
from src.auth.context import Principal, Security
from src.auth.service import ClientInfo
from src.config.logging import audit_line, client_id_var, user_id_var
from src.config.settings import Settings
from src.db.session import close_session
from src.errors import NotAuthenticated, PermissionDenied, StepUpRequired
from src.services.connections import get_kafka_from_app, get_redis_from_app
from src.services.kafka.manager import KafkaManager

API_V1 = "/api/v1"
audit = logging.getLogger("src.auth.audit")

# The transport: where the access token travels (an "Authorization: Bearer" header). Declaring it
# as OAuth2 password flow is what makes Swagger UI's Authorize button work against /auth/login.
bearer_transport = OAuth2PasswordBearer(tokenUrl=f"{API_V1}/auth/login", auto_error=False)


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_security(request: Request) -> Security:
    return app_services(request.app).security


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's session. It is closed after the answer has gone out (or while an error is on
    its way to its handler), so closing must neither raise nor wait on a failing database: it is
    bounded by DATABASE_CLOSE_TIMEOUT and its failure is logged (``close_session``)."""
    services = app_services(request.app)
    session = services.sessionmaker()
    try:
        yield session
    finally:
        await close_session(session, services.settings.DATABASE_CLOSE_TIMEOUT)


async def get_sessionmaker(request: Request) -> async_sessionmaker[AsyncSession]:
    """For work that runs after the response and opens its own session."""
    return app_services(request.app).sessionmaker


async def get_redis(request: Request) -> Redis | None:
    return get_redis_from_app(request.app)


async def get_kafka(request: Request) -> KafkaManager | None:
    return get_kafka_from_app(request.app)


async def get_client_info(request: Request) -> ClientInfo:
    settings: Settings = request.app.state.settings
    ip = client_ip(
        request.client.host if request.client else None,
        request.headers.getlist(settings.FORWARDED_HEADER),
        settings.FORWARDED_HEADER,
        settings.trusted_proxy_networks,
    )
    return ClientInfo(ip=ip, user_agent=request.headers.get("user-agent"))


SettingsDep = Annotated[Settings, Depends(get_settings)]
SecurityDep = Annotated[Security, Depends(get_security)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
SessionMakerDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)]
RedisDep = Annotated[Redis | None, Depends(get_redis)]
KafkaDep = Annotated[KafkaManager | None, Depends(get_kafka)]
ClientDep = Annotated[ClientInfo, Depends(get_client_info)]


async def get_services(request: Request) -> AppServices:
    return app_services(request.app)


ServicesDep = Annotated[AppServices, Depends(get_services)]


async def get_current_user(
    services: ServicesDep, token: Annotated[str | None, Depends(bearer_transport)]
) -> Principal:
    """The caller. No database session is opened when the cache answers (most requests)."""
    if not token:
        raise NotAuthenticated()
    sessions = services.sessionmaker
    principal = await auth_service.authenticate(sessions, services.security, token)
    # Every log line from here to the end of the request names who it was for.
    user_id_var.set(str(principal.id))
    client_id_var.set(principal.client_id)
    if principal.client_id is not None and not await services.first_party.check(
        sessions, principal.client_id
    ):
        # A third-party application's token is for /oauth2/userinfo (and the scopes the user
        # allowed it), not a key to the account: it must not change a password or act as admin.
        audit_line(
            audit,
            "token refused",
            user=principal.id,
            client=principal.client_id,
            reason="third_party",
        )
        raise PermissionDenied(
            "This application's token is not accepted by the account API.",
            headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
        )
    return principal


CurrentUser = Annotated[Principal, Depends(get_current_user)]


async def get_current_admin(principal: CurrentUser, request: Request) -> Principal:
    if not principal.is_admin:
        audit_line(
            audit,
            "authorization refused",
            user=principal.id,
            method=request.method,
            path=request.url.path,
            reason="not_admin",
        )
        raise PermissionDenied("Administrator role required.")
    return principal


AdminUser = Annotated[Principal, Depends(get_current_admin)]


async def require_step_up(
    principal: Principal, db: AsyncSession, sec: Security, request: Request
) -> None:
    """StepUpRequired unless the caller's authentication is recent and strong enough; each
    refusal is an event (``user.step_up_failed``), as a stolen token trying its luck would be."""
    try:
        await step_up.require_recent_authentication(db, sec, principal)
    except StepUpRequired as exc:
        sessions = app_services(request.app).sessionmaker
        await step_up.record_failure(sessions, sec, principal.id, principal.session_id, exc.reason)
        raise


async def get_recent_user(
    principal: CurrentUser, db: SessionDep, sec: SecurityDep, request: Request
) -> Principal:
    """The caller, if its authentication is recent and strong enough for a sensitive change."""
    await require_step_up(principal, db, sec, request)
    return principal


async def get_recent_admin(
    principal: AdminUser, db: SessionDep, sec: SecurityDep, request: Request
) -> Principal:
    await require_step_up(principal, db, sec, request)
    return principal


# Sensitive changes: a user's own email, password, factors and deletion; every admin write.
RecentUser = Annotated[Principal, Depends(get_recent_user)]
RecentAdmin = Annotated[Principal, Depends(get_recent_admin)]
