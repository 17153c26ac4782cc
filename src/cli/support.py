"""What the account commands share: exit codes, error lines, and the service's own connections.

Every command reads the same settings as the service and talks to the same database and Redis,
so a change made here is exactly what the API would have made: the same events, and the cache
entries of the service's instances dropped (``UserCache``).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from src.config.settings import Settings, load_settings
from src.db.session import DATABASE_UNAVAILABLE, create_engine, describe, migration_status
from src.errors import DomainError, InvalidInput
from src.security.sealing import Sealer, load_sealer
from src.services.redis_client import create_redis_client
from src.users.cache import UserCache

OK, REFUSED, USAGE = 0, 1, 2


def fail(message: str, code: int = REFUSED) -> int:
    print(message, file=sys.stderr)
    return code


class NotMigrated(Exception):
    """The database is reachable but not at the migrations' head."""


@dataclass(frozen=True)
class Connected:
    """The service's settings, database and cache, as an ``AccountDeps``."""

    settings: Settings
    engine: AsyncEngine
    cache: UserCache
    sealer: Sealer
    redis: Redis | None


@asynccontextmanager
async def connected() -> AsyncIterator[Connected]:
    """The configured database (checked to be migrated) and Redis; closed after."""
    settings = load_settings()
    sealer = load_sealer(settings)
    engine = create_engine(settings)
    redis: Redis | None = create_redis_client(settings) if settings.REDIS_ENABLED else None

    def cache_write_failed() -> None:
        print(
            "warning: could not drop the service's cached entries in Redis; instances stop "
            f"honouring them within AUTH_CACHE_MAX_AGE_SECONDS "
            f"({settings.AUTH_CACHE_MAX_AGE_SECONDS:g} s)",
            file=sys.stderr,
        )

    cache = UserCache(
        lambda: redis,
        ttl_seconds=settings.CACHE_TTL_SECONDS,
        timeout=settings.HEALTH_CHECK_TIMEOUT,
        on_write_failure=cache_write_failed,
        max_age_seconds=settings.AUTH_CACHE_MAX_AGE_SECONDS,
    )
    try:
        current, head = await migration_status(engine)
        if current != head:
            # Say so, rather than fail on a missing table.
            raise NotMigrated(
                f"the database is not migrated (at {sorted(current) or 'nothing'}, head is "
                f"{sorted(head)}): run `user-service migrate`"
            )
        yield Connected(settings, engine, cache, sealer, redis)
    finally:
        if redis is not None:
            await redis.aclose()
        await engine.dispose()


async def guarded(work: Callable[[Connected], Awaitable[int]]) -> int:
    """Run ``work`` connected; a refusal, an unreachable or unmigrated database is exit code 1,
    a value the rules refuse (as for ``clients``) exit code 2, each one line on stderr."""
    try:
        async with connected() as connection:
            return await work(connection)
    except InvalidInput as exc:
        return fail(f"invalid: {exc.detail}{field_errors(exc.extra)}", USAGE)
    except DomainError as exc:
        return fail(f"refused: {exc.detail}")
    except NotMigrated as exc:
        return fail(str(exc))
    except DATABASE_UNAVAILABLE as exc:
        return fail(f"the database is unavailable: {describe(exc)}")


def field_errors(extra: dict[str, Any]) -> str:
    errors = extra.get("errors") or []
    return "".join(f"\n  {where(error['loc'])}: {error['msg']}" for error in errors)


def where(loc: Any) -> str:
    parts = [str(part) for part in loc if part != "body"]
    return ".".join(parts) or "input"
