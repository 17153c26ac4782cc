"""``/.well-known/jwks.json``: the public keys other services verify access tokens with."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from src.api.dependencies import SecurityDep

router = APIRouter(prefix="/.well-known", tags=["auth"])


@router.get("/jwks.json")
async def jwks(sec: SecurityDep, response: Response) -> dict[str, Any]:
    # Keys change rarely; a short cache keeps verifiers fast without delaying a rotation long.
    response.headers["Cache-Control"] = "public, max-age=300"
    return sec.tokens.jwks()
