"""The admin API for OAuth clients: register, list, read, change, delete, rotate the secret.

Administrators only. A client's secret appears in exactly two answers, the registration and a
rotation; every other answer leaves it (and its hash) out.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from src.api.dependencies import API_V1, AdminUser, RecentAdmin, SecurityDep, SessionDep
from src.api.errors import PROBLEM, Responses
from src.db.models import OAuthClient
from src.oauth import clients as client_service
from src.oauth.schemas import (
    ClientCreate,
    ClientPublic,
    ClientsPage,
    ClientUpdate,
    ClientWithSecret,
)

router = APIRouter(prefix="/clients", tags=["clients"])


def _errors(*statuses: int) -> Responses:
    """The problem responses an operation can give, for its OpenAPI entry."""
    return dict.fromkeys(statuses, PROBLEM)


def _with_secret(client: OAuthClient, secret: str | None) -> ClientWithSecret:
    public = ClientPublic.model_validate(client)
    return ClientWithSecret(**public.model_dump(), client_secret=secret)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ClientWithSecret,
    responses=_errors(401, 403, 409, 422),
)
async def create_client(
    body: ClientCreate, admin: RecentAdmin, db: SessionDep, sec: SecurityDep, response: Response
) -> ClientWithSecret:
    """Register a client. A confidential client's secret is in this answer and nowhere else."""
    client, secret = await client_service.create_client(db, sec, body, actor_id=admin.id)
    response.headers["Location"] = f"{API_V1}/clients/{client.client_id}"
    return _with_secret(client, secret)


@router.get("", response_model=ClientsPage, responses=_errors(401, 403, 422))
async def list_clients(
    _admin: AdminUser,
    db: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> ClientsPage:
    """Oldest first; keyset-paginated: pass ``next_cursor`` back as ``cursor``."""
    page, next_cursor = await client_service.list_clients(db, limit=limit, cursor=cursor)
    return ClientsPage(
        items=[ClientPublic.model_validate(c) for c in page], next_cursor=next_cursor
    )


@router.get("/{client_id}", response_model=ClientPublic, responses=_errors(401, 403, 404, 422))
async def read_client(client_id: str, _admin: AdminUser, db: SessionDep) -> ClientPublic:
    return ClientPublic.model_validate(await client_service.find_client(db, client_id))


@router.patch(
    "/{client_id}", response_model=ClientPublic, responses=_errors(401, 403, 404, 409, 422)
)
async def update_client(
    client_id: str, body: ClientUpdate, admin: RecentAdmin, db: SessionDep, sec: SecurityDep
) -> ClientPublic:
    client = await client_service.update_client(db, sec, client_id, body, actor_id=admin.id)
    return ClientPublic.model_validate(client)


@router.delete(
    "/{client_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_errors(401, 403, 404, 422)
)
async def delete_client(
    client_id: str, admin: RecentAdmin, db: SessionDep, sec: SecurityDep
) -> None:
    """Its consents and codes go with it, and every session it obtained ends at once."""
    await client_service.delete_client(db, sec, client_id, actor_id=admin.id)


@router.post(
    "/{client_id}/secret",
    response_model=ClientWithSecret,
    responses=_errors(401, 403, 404, 409, 422),
)
async def rotate_secret(
    client_id: str, admin: RecentAdmin, db: SessionDep, sec: SecurityDep
) -> ClientWithSecret:
    """A new secret for a confidential client, shown once; the old one stops working now."""
    secret = await client_service.rotate_secret(db, sec, client_id, actor_id=admin.id)
    return _with_secret(await client_service.find_client(db, client_id), secret)
