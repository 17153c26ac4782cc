"""The applications a user allowed to use its account (OpenID Connect consents), and revoking
them. Revoking ends the application's sessions for the user: its tokens stop working at once."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status
from pydantic import BaseModel

from src.api.dependencies import CurrentUser, SecurityDep, SessionDep
from src.api.errors import PROBLEM
from src.errors import NotFound
from src.oauth import consents

router = APIRouter(prefix="/users/me/consents", tags=["users"])


class ConsentPublic(BaseModel):
    client_id: str
    client_name: str
    # The scopes granted, as OAuth scope names ("openid", "email", ...).
    scopes: list[str]


@router.get("", response_model=list[ConsentPublic], responses={401: PROBLEM})
async def list_my_consents(principal: CurrentUser, db: SessionDep) -> list[ConsentPublic]:
    """The applications the caller allowed, newest first."""
    views = await consents.list_consents(db, principal.id)
    return [
        ConsentPublic(client_id=v.client_id, client_name=v.client_name, scopes=v.scopes)
        for v in views
    ]


@router.delete(
    "/{client_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={401: PROBLEM, 404: PROBLEM, 422: PROBLEM},
)
async def revoke_my_consent(
    client_id: Annotated[str, Path(max_length=255)],
    principal: CurrentUser,
    db: SessionDep,
    sec: SecurityDep,
) -> None:
    """Forget the consent; the application must ask again, and its sessions for the caller
    end now. 404 when the caller had not allowed that application."""
    if not await consents.revoke_consent(db, sec, principal.id, client_id):
        raise NotFound("You have not allowed this application.")
