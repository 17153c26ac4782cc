"""``/.well-known/jwks.json``: the public keys other services verify our tokens with."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from src.api.dependencies import SecurityDep

router = APIRouter(prefix="/.well-known", tags=["auth"])


@router.get("/jwks.json")
async def jwks(sec: SecurityDep, response: Response) -> dict[str, Any]:
    # Every published key: the active one, the next one (published ahead of use for at least
    # this max-age, so a cached copy always knows the key a fresh token names), and retired ones
    # whose tokens may still be live (docs/signing-keys.md).
    max_age = sec.settings.JWKS_MAX_AGE_SECONDS
    response.headers["Cache-Control"] = f"public, max-age={max_age}"
    return sec.tokens.jwks()
